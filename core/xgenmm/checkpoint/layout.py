"""The official checkpoint layout of an `XGenMMForConditionalGeneration`: which key holds which parameter with
which shape (the embedding and LM head are folded: base vocabulary rows + the additional tokens' rows), checked
against the shards' headers before anything is allocated, then copied in tensor by tensor. The SigLIP pooling-head
keys (`vlm.vision_encoder.head.*`) are ignored on purpose (xGen-MM never uses them); any other unknown key, missing
key or shape mismatch is a `CheckpointError`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError
from .shards import TensorEntry, checkpoint_files, names_by_file, read_rows_into, safetensors_index

IGNORED_PREFIXES = ("vlm.vision_encoder.head.",)
_V, _T, _L = "vlm.vision_encoder.", "vlm.vision_tokenizer.", "vlm.lang_model."


def expected_checkpoint_shapes(model) -> dict[str, tuple[int, ...]]:
    """The official key -> shape table for a model built from a config."""
    cfg = model.config.text
    shapes: dict[str, tuple[int, ...]] = {}
    for name, p in model.vision.vision_encoder.state_dict().items():
        shapes[_V + name] = tuple(p.shape)
    for name, p in model.vision.vision_tokenizer.state_dict().items():
        shapes[_T + name] = tuple(p.shape)
    for name, p in model.language_model.state_dict().items():
        shapes[_L + "model." + name] = tuple(p.shape)
    h, extra = cfg.hidden_size, cfg.num_additional_tokens
    shapes[_L + "model.embed_tokens.weight"] = (cfg.vocab_size, h)
    shapes[_L + "model.embed_tokens.additional_embedding.weight"] = (extra, h)
    shapes[_L + "lm_head.weight"] = (cfg.vocab_size, h)
    shapes[_L + "lm_head.bias"] = (cfg.vocab_size,)
    shapes[_L + "lm_head.additional_fc.weight"] = (extra, h)
    shapes[_L + "lm_head.additional_fc.bias"] = (extra,)
    return shapes


@dataclass(frozen=True)
class CheckpointLayout:
    """A checkpoint's tensors, checked against the model its config builds: key -> file, key -> shape, headers."""

    files: dict[str, Path]
    expected: dict[str, tuple[int, ...]]
    index: dict[Path, dict[str, TensorEntry]]


def check_checkpoint_layout(model, checkpoint_dir: Path) -> CheckpointLayout:
    """Keys and shapes of the shards' headers against the model built from config.json (on the meta device, so a
    config that disagrees with its weights, e.g. an absurd layer count, fails here before anything is allocated)."""
    files = checkpoint_files(checkpoint_dir)
    expected = expected_checkpoint_shapes(model)
    present = {k for k in files if not k.startswith(IGNORED_PREFIXES)}
    missing = sorted(set(expected) - present)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"checkpoint {checkpoint_dir} is missing {', '.join(missing[:5])}{more}")
    unexpected = sorted(present - set(expected))
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise CheckpointError(f"checkpoint {checkpoint_dir} has unexpected keys {', '.join(unexpected[:5])}{more}")
    index = safetensors_index(files)
    for name in sorted(expected):
        path = files[name]
        entry = index[path].get(name)
        if entry is None:
            raise CheckpointError(f"{path.name} does not contain {name} although the index says so")
        if entry.shape != expected[name]:
            raise CheckpointError(f"{name} in {path.name} has shape {list(entry.shape)}, expected "
                                  f"{list(expected[name])} from config.json")
    return CheckpointLayout(files, expected, index)


class _Targets:
    """Checkpoint name -> the model's tensor, looked up by attribute path, only for the names being read. Not
    `state_dict()`: a quantized layer's state dict is a fresh unpacked copy of its weight, so building one per
    `load_checkpoint_into` call (the quantizing loader calls it once per decoder layer) copied every layer already
    quantized, 3.6 GB at the last layer at full size. Falls back to the state dict for a name that is not an attribute
    path."""

    def __init__(self, model):
        self._roots = ((_V, model.vision.vision_encoder), (_T, model.vision.vision_tokenizer),
                       (_L + "model.", model.language_model))
        self._fallback: dict | None = None

    def __getitem__(self, name: str) -> torch.Tensor:
        for prefix, root in self._roots:
            if name.startswith(prefix):
                owner, _, attr = name[len(prefix):].rpartition(".")
                try:
                    tensor = getattr(root.get_submodule(owner) if owner else root, attr)
                except AttributeError:
                    break
                if isinstance(tensor, torch.Tensor):
                    return tensor
                break
        if self._fallback is None:
            self._fallback = {prefix + n: t for prefix, root in self._roots
                              for n, t in root.state_dict(keep_vars=True).items()}
        return self._fallback[name]


def load_checkpoint_into(model, checkpoint_dir: Path, device: torch.device, dtype: torch.dtype,
                         layout: CheckpointLayout | None = None) -> None:
    """Copy every official tensor into `model` (already materialised on `device` with `dtype`), checking keys and
    shapes (`layout`: the result of `check_checkpoint_layout` when the caller already ran it)."""
    layout = layout or check_checkpoint_layout(model, checkpoint_dir)
    files, expected, index = layout.files, layout.expected, layout.index
    cut = model.config.text.initial_tokenizer_len
    targets = _Targets(model)
    folded = {
        _L + "model.embed_tokens.weight": (model.embed_weight, slice(0, cut), True),
        _L + "model.embed_tokens.additional_embedding.weight": (model.embed_weight, slice(cut, None), False),
        _L + "lm_head.weight": (model.lm_head_weight, slice(0, cut), True),
        _L + "lm_head.additional_fc.weight": (model.lm_head_weight, slice(cut, None), False),
        _L + "lm_head.bias": (model.lm_head_bias, slice(0, cut), True),
        _L + "lm_head.additional_fc.bias": (model.lm_head_bias, slice(cut, None), False),
    }
    with torch.no_grad():
        for path, names in names_by_file(files, sorted(expected)).items():
            with open(path, "rb", buffering=0) as fh:
                for name in names:
                    entry = index[path][name]
                    if name in folded:
                        param, rows, truncate = folded[name]
                        dest = param.data[rows]
                        rows_read = dest.shape[0] if truncate else entry.shape[0]
                    else:
                        dest, rows_read = targets[name].data, entry.shape[0] if entry.shape else 0
                    read_rows_into(fh, path, name, entry, dest, rows_read)
