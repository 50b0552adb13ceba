"""Deprecated: `xgenmm.prompts` moved to `xgenmm.chat.template` (this alias goes away in the next release)."""

from ._moved import reexport

reexport(globals(), __name__, "xgenmm.chat.template")
