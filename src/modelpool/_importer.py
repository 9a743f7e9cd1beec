"""Resolve ``"pkg.module:Name"`` strings and decide how objects reach a worker.

Workers import the model class by reference (module + qualified name), so the class must be
importable from a fresh process. ``reference_of`` checks that in the parent, before any process
starts, and says precisely what to change when it is not.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import os
import pickle
import sys
import weakref
from collections.abc import Callable
from typing import Any

from ._exceptions import ModelSpecError

__all__ = ["ByValue", "import_from_string", "portable", "reference_of"]


def import_from_string(spec: str) -> Any:
    """Import ``"pkg.module:attr.path"`` and return the attribute.

    Raises ``ModelSpecError`` naming the part that failed.
    """
    if not isinstance(spec, str):
        raise ModelSpecError(f"expected an import string 'pkg.module:Name', got {spec!r}")
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise ModelSpecError(
            f"import string {spec!r} must have the form 'pkg.module:Name' "
            "(a module path, a colon, then the attribute)"
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise ModelSpecError(
                f"cannot import module {module_name!r} (from {spec!r}): no module named "
                f"{exc.name!r}. Check the spelling, and that the package is installed or its "
                "directory is on sys.path (PYTHONPATH)."
            ) from exc
        raise ModelSpecError(
            f"module {module_name!r} (from {spec!r}) failed to import: {exc}"
        ) from exc
    except Exception as exc:
        raise ModelSpecError(
            f"module {module_name!r} (from {spec!r}) raised while importing: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    obj: Any = module
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ModelSpecError(
                f"module {module_name!r} has no attribute {attr_path!r} (from {spec!r})"
            ) from None
    return obj


def _main_is_importable() -> bool:
    """Can a fresh worker re-create ``__main__`` (a script file or ``python -m``)?"""
    main = sys.modules.get("__main__")
    if getattr(main, "__spec__", None) is not None:
        return True
    path = getattr(main, "__file__", None)
    return isinstance(path, str) and os.path.isfile(path)  # not "<stdin>", not a notebook


def reference_of(obj: Any, *, start_method: str) -> str:
    """Return the ``"module:qualname"`` by which a fresh worker can import ``obj``.

    Raises ``ModelSpecError`` when a worker could not find ``obj`` that way: a class defined
    inside a function, an object whose ``__qualname__`` does not lead back to it (a decorator
    without ``functools.wraps``), or one defined in an interactive ``__main__``.
    """
    module_name = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    name = qualname or repr(obj)
    if not module_name or not qualname:
        raise ModelSpecError(
            f"{obj!r} has no module and qualified name, so worker processes cannot import it; "
            "pass a class defined at the top level of a module, or 'pkg.module:Name'"
        )
    if "<locals>" in qualname or "<lambda>" in qualname:
        raise ModelSpecError(
            f"{name} is defined inside a function ({module_name}.{qualname}), so worker "
            "processes cannot import it. Move it to the top level of a module and pass it "
            f"(or '{module_name}:{qualname.split('.<locals>.')[-1]}') to the pool."
        )
    if module_name == "__main__" and start_method != "fork" and not _main_is_importable():
        raise ModelSpecError(
            f"{name} is defined in a __main__ that workers cannot re-import (an interactive "
            "session, a notebook, `python -c`, or a script read from standard input), and "
            f"'{start_method}' workers start fresh. Put it in a .py module and import it from "
            "there."
        )
    module = sys.modules.get(module_name)
    found: Any = module
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if found is not obj:
        raise ModelSpecError(
            f"{module_name}:{qualname} does not lead back to {obj!r}: something (often a "
            "decorator without functools.wraps, or a later redefinition) replaced it, so "
            "workers would import a different object. Use functools.wraps in the decorator, or "
            "pass an import string."
        )
    return f"{module_name}:{qualname}"


class ByValue:
    """A callable pickled by value (cloudpickle), for one workers cannot import by name.

    Workers keep the last few they rebuilt, so a lambda submitted many times is unpickled once.
    """

    __slots__ = ("blob", "name")
    _rebuilt: collections.OrderedDict[bytes, Any] = collections.OrderedDict()

    def __init__(self, blob: bytes, name: str) -> None:
        self.blob = blob
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        cache = ByValue._rebuilt
        fn = cache.get(self.blob)
        if fn is None:
            import cloudpickle

            fn = cache[self.blob] = cloudpickle.loads(self.blob)
            if len(cache) > 64:
                cache.popitem(last=False)
        return fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<{self.name} (by value)>"


#: function -> whether workers can import it by name (that does not change for an object)
_by_name_cache: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def portable(fn: Callable[..., Any], start_method: str) -> Any:
    """``fn`` itself when workers can import it by name, else a ``ByValue`` copy.

    Raises ``ModelSpecError`` naming the object and what to change when neither works.
    """
    by_name = None
    with contextlib.suppress(KeyError, TypeError):
        by_name = _by_name_cache[fn]
    if by_name is None:
        try:
            reference_of(fn, start_method=start_method)
            pickle.dumps(fn, protocol=5)
            by_name = True
        except Exception:
            by_name = False
        with contextlib.suppress(TypeError):  # not weakly referenceable: decide each time
            _by_name_cache[fn] = by_name
    if by_name:
        return fn
    # by value, pickled now: a closure's captured state may have changed since the last call
    import cloudpickle

    name = getattr(fn, "__qualname__", None) or repr(fn)
    try:
        return ByValue(cloudpickle.dumps(fn, protocol=5), name)
    except Exception as exc:
        raise ModelSpecError(
            f"cannot send {name!r} to a worker: workers cannot import it by name, and pickling "
            f"it by value failed ({type(exc).__name__}: {exc}). It probably captures something "
            "that cannot be pickled (a lock, a socket, an open file, a pool); define it at the "
            "top level of a module and pass that state as arguments instead."
        ) from exc
