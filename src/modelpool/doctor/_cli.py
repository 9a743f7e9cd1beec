"""The ``modelpool doctor`` command."""

from __future__ import annotations

import os
import sys

import click
import yaml

from modelpool import _hygiene

from ._environment import check_environment
from ._model_check import check_model
from ._report import Report

__all__ = ["doctor"]


@click.command()
@click.argument("target", required=False)
@click.option(
    "--option", "options", multiple=True, metavar="KEY=VALUE", help="Model option (repeatable)."
)
@click.option(
    "--threads-per-worker",
    type=click.IntRange(min=1),
    help="The worker's thread budget for the model check (default: usable cores).",
)
@click.option(
    "--no-frameworks",
    is_flag=True,
    help="Skip importing the installed frameworks (faster; no OpenMP or thread-pool checks).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (for machines).")
def doctor(
    target: str | None,
    options: tuple[str, ...],
    threads_per_worker: int | None,
    no_frameworks: bool,
    as_json: bool,
) -> None:
    """Check this environment, or a model, for what will go wrong in worker processes.

    With no TARGET: the start method, CUDA, OpenMP runtimes, thread settings against usable
    cores, /dev/shm, memfd, open-file and locked-memory limits, PR_SET_PDEATHSIG and the
    versions that matter (the installed frameworks are imported in a child to see what they
    load). With TARGET ('pkg.module:Class'): the model is loaded in a child the way a worker
    loads it, and checked. Exit status: 0 clean, 1 warnings, 2 hazards.
    """
    parsed: dict[str, object] = {}
    for item in options:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.UsageError(f"--option {item!r}: write KEY=VALUE")
        parsed[key] = yaml.safe_load(value)
    if target is not None and ":" not in target:
        raise click.UsageError(f"{target!r} is not an import string: write 'package.module:Class'")

    def progress(text: str) -> None:
        if not as_json:  # (stderr: the report alone goes to stdout)
            click.echo(text, err=True)

    if target is None:
        report = Report("modelpool doctor: this environment")
        if not no_frameworks:
            progress("checking the environment; importing the installed frameworks in a child")
        report.add(check_environment(report.facts, import_frameworks=not no_frameworks))
    else:
        threads = threads_per_worker or _hygiene.resolve_threads(None, 1)
        report = Report(f"modelpool doctor: {target} (threads per worker: {threads})")
        report.add(check_environment(report.facts, import_frameworks=False))
        progress(f"loading {target} in a child, as a worker would ...")
        sys.path.insert(0, os.getcwd())
        report.add(check_model(target, parsed, threads, report.facts))
    click.echo(report.to_json() if as_json else report.to_text())
    sys.exit(report.exit_code())
