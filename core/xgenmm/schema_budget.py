"""Deprecated: `xgenmm.schema_budget` moved to `xgenmm.structured.schema_budget` (this alias goes away in the next release)."""

from ._moved import reexport

reexport(globals(), __name__, "xgenmm.structured.schema_budget")
