"""Find an xGen-MM checkpoint and load its official-format safetensors into our model, one job per module:

- `hub`: a model argument -> a local checkpoint directory (local path, or a Hugging Face id from the cache / online);
- `shards`: safetensors reading (headers, the name -> shard map, chunked row copies; never a memory map);
- `layout`: the official key -> parameter / shape table, checked before allocation, then copied in;
- `loader`: `load_model` (device and dtype come from `xgenmm.placement`).
"""

from .hub import DEFAULT_MODEL_ID, DOWNLOAD_PATTERNS, KNOWN_MODEL_IDS, is_local_path, resolve_model_dir
from .layout import IGNORED_PREFIXES, CheckpointLayout, check_checkpoint_layout, expected_checkpoint_shapes, load_checkpoint_into
from .loader import load_model
from .shards import TensorEntry, checkpoint_files, iter_checkpoint_tensors, read_safetensors_header, safetensors_index

__all__ = [
    "DEFAULT_MODEL_ID",
    "DOWNLOAD_PATTERNS",
    "KNOWN_MODEL_IDS",
    "IGNORED_PREFIXES",
    "CheckpointLayout",
    "TensorEntry",
    "check_checkpoint_layout",
    "checkpoint_files",
    "expected_checkpoint_shapes",
    "is_local_path",
    "iter_checkpoint_tensors",
    "load_checkpoint_into",
    "load_model",
    "read_safetensors_header",
    "resolve_model_dir",
    "safetensors_index",
]
