"""Deprecated: `xgenmm.tools` moved to the `xgenmm.tool_calls` package (this alias goes away in the next release)."""

from ._moved import reexport

reexport(globals(), __name__, "xgenmm.tool_calls")
