"""Deprecated: `xgenmm.config` moved to `xgenmm.model.config` (this alias goes away in the next release)."""

from ._moved import reexport

reexport(globals(), __name__, "xgenmm.model.config")
