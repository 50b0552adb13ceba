"""Deprecated: `xgenmm.image_processing` moved to `xgenmm.multimodal.image_processing` (this alias goes away in the next release)."""

from ._moved import reexport

reexport(globals(), __name__, "xgenmm.multimodal.image_processing")
