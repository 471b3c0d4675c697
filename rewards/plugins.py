"""User code named by import path (``package.module:attribute``): reward functions, a judge's
verdict parser, tools and environments."""
from __future__ import annotations

import importlib


def import_callable(path: str, kind: str, name: str | None = None):
    """The callable at ``package.module:attribute`` (a user's reward or tool); ValueError naming
    the ``kind`` and ``name`` (default: the path) otherwise."""
    name = path if name is None else name
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"{kind} import path {name!r} must look like 'package.module:function'")
    try:
        target = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except Exception as e:  # an import error is a recipe error: say which one
        raise ValueError(f"cannot load {kind} {name!r}: {type(e).__name__}: {e}") from e
    if not callable(target):
        raise ValueError(f"{kind} {name!r} is not callable")
    return target
