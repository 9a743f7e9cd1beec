"""Dynamic batching: which queued requests run together. Pure logic, no threads, no clock.

The pool keeps one FIFO queue. When a worker is free, ``select`` looks at the queue and returns
either a batch to run now or the time at which to look again. Rules:

* The oldest request always goes in the next batch: nothing starves behind newer requests.
* Requests join it only if they are *compatible*: the same input names, and per input the
  same dtype and the same shape after axis 0. Incompatible requests wait their turn (they
  never mix).
* A batch holds at most ``max_batch_size`` rows (axis 0, summed). A request that is bigger
  than that on its own runs alone, whole; it is never cut.
* A batch that is not full waits for more requests until ``max_batch_delay`` after its oldest
  request arrived, then runs as it is.

``merge`` concatenates the inputs of a batch; ``split`` cuts the outputs back per request and
checks that the model kept one output row per input row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, TypeVar

import numpy as np

from ._exceptions import BatchError

__all__ = ["BatchError", "Batchable", "Item", "merge", "select", "signature", "split"]

Signature = tuple[tuple[str, str, tuple[int, ...]], ...]


class Batchable(Protocol):
    """What the batcher reads of a queued request."""

    arrival: float
    rows: int
    signature: Signature | None


T = TypeVar("T", bound=Batchable)


@dataclasses.dataclass
class Item:
    """What the batcher needs to know of a queued request."""

    arrival: float
    rows: int
    signature: Signature | None  # None: cannot be batched with anything (runs alone)
    ref: Any = None  # the request itself, opaque here


def signature(inputs: Any) -> tuple[Signature | None, int]:
    """(compatibility key, rows) of a request's inputs; (None, 1) when it cannot be batched."""
    if not isinstance(inputs, dict) or not inputs:
        return None, 1
    key = []
    rows = -1
    for name, value in inputs.items():
        if not isinstance(name, str) or not isinstance(value, np.ndarray) or value.ndim == 0:
            return None, 1
        if rows == -1:
            rows = value.shape[0]
        elif value.shape[0] != rows:
            return None, 1  # inputs disagree on the batch dimension: leave it to the model
        key.append((name, value.dtype.str, value.shape[1:]))
    return tuple(sorted(key)), rows


def select(
    queue: Iterable[T],
    now: float,
    max_batch_size: int,
    max_batch_delay: float,
    *,
    is_live: Callable[[T], bool] = lambda item: True,
    scan_limit: int = 1024,
) -> tuple[list[T], float | None]:
    """The batch to run now (possibly empty) and, if empty, when to look again (or None)."""
    batch: list[T] = []
    rows = 0
    head: T | None = None
    for scanned, item in enumerate(queue):
        if scanned >= scan_limit:
            break
        if not is_live(item):
            continue
        if head is None:
            head = item
            batch.append(item)
            rows = item.rows
            if item.signature is None or rows >= max_batch_size:
                return batch, None  # alone: unbatchable, or full (or too big) by itself
            continue
        if item.signature == head.signature and rows + item.rows <= max_batch_size:
            batch.append(item)
            rows += item.rows
            if rows >= max_batch_size:
                return batch, None  # full
    if head is None:
        return [], None
    due = head.arrival + max_batch_delay
    if now >= due:
        return batch, None
    return [], due


def merge(inputs: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate compatible requests' inputs along axis 0."""
    if len(inputs) == 1:
        return inputs[0]
    return {name: np.concatenate([x[name] for x in inputs]) for name in inputs[0]}


def split(outputs: Any, rows: Sequence[int], model_name: str) -> list[Any]:
    """Cut a batch's outputs into one answer per request (``rows`` each), in order."""
    total = sum(rows)
    if len(rows) == 1:
        return [outputs]
    if not isinstance(outputs, dict):
        raise BatchError(
            f"model {model_name!r} returned {type(outputs).__name__} for a batch of {total} rows;"
            " with batching on, predict must return a dict of arrays whose first dimension is "
            "the batch size"
        )
    for name, value in outputs.items():
        shape = getattr(value, "shape", None)
        if not shape or shape[0] != total:
            got = f"shape {list(shape)}" if shape is not None else f"a {type(value).__name__}"
            raise BatchError(
                f"model {model_name!r} returned output {name!r} as {got} for a batch of "
                f"{total} rows (from {len(rows)} requests); with batching on, every output's "
                "first dimension must equal the batch size"
            )
    answers = []
    start = 0
    for n in rows:
        answers.append({name: value[start : start + n] for name, value in outputs.items()})
        start += n
    return answers
