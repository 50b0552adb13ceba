"""Old import paths that moved in 0.2 keep working for one release, with a `DeprecationWarning` naming the new one.

Each old module is a shim: `reexport(globals(), __name__, "xgenmm.new.place")` copies the new module's public names
(and the private ones tests of 0.1 used) and warns once per process.
"""

from __future__ import annotations

import importlib
import warnings

__all__ = ["reexport", "MOVED_MODULES"]

# old module -> new module (README "What moved in 0.2")
MOVED_MODULES = {
    "xgenmm.prompts": "xgenmm.chat.template",
    "xgenmm.tools": "xgenmm.tool_calls",
    "xgenmm.schema_budget": "xgenmm.structured.schema_budget",
    "xgenmm.image_processing": "xgenmm.multimodal.image_processing",
    "xgenmm.config": "xgenmm.model.config",
}


def reexport(namespace: dict, old: str, new: str) -> None:
    warnings.warn(f"{old} moved to {new}; the old import path will be removed in the next release",
                  DeprecationWarning, stacklevel=3)
    module = importlib.import_module(new)
    names = getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("__")]
    for name in dict.fromkeys([*names, *(n for n in vars(module) if n.startswith("_") and not n.startswith("__"))]):
        namespace[name] = getattr(module, name)
    namespace["__all__"] = list(names)
