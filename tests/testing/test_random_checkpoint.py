"""Random checkpoints (`xgenmm.testing`) must match the official format exactly: same keys, shapes and files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.support import XGENMM_TINY
from xgenmm.errors import ConfigError
from xgenmm.testing import (
    ANYRES_GRIDS,
    build_config,
    checkpoint_tensor_specs,
    make_random_checkpoint,
    split_into_shards,
)
from xgenmm.testing.__main__ import main as cli_main

FIXTURE = XGENMM_TINY / "checkpoint"


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    files = sorted(directory.glob("*.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                assert key not in out, f"{key} stored twice"
                out[key] = f.get_tensor(key)
    return out


@pytest.fixture(scope="module")
def fixture_weights() -> dict[str, torch.Tensor]:
    return read_weights(FIXTURE)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("tiny"), preset="tiny", seed=0)


def test_tiny_keys_shapes_dtypes_equal_fixture(tiny, fixture_weights):
    ours = read_weights(tiny)
    assert set(ours) == set(fixture_weights)
    for key, ref in fixture_weights.items():
        assert tuple(ours[key].shape) == tuple(ref.shape), key
        assert ours[key].dtype == ref.dtype == torch.float32, key
    specs = checkpoint_tensor_specs("tiny")
    assert len(specs) == 138 and sum(s.numel for s in specs) == 5_522_947


def test_tiny_files_and_index(tiny):
    names = {p.name for p in tiny.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "preprocessor_config.json",
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
    } <= names
    index = json.loads((tiny / "model.safetensors.index.json").read_text())
    weights = read_weights(tiny)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in weights.values()) == 22_091_788
    assert set(index["weight_map"]) == set(weights)
    for shard in set(index["weight_map"].values()):
        with safe_open(str(tiny / shard), framework="pt") as f:
            assert set(f.keys()) == {k for k, v in index["weight_map"].items() if v == shard}
            assert f.metadata() == {"format": "pt"}


def test_config_json_matches_fixture(tiny):
    ours = json.loads((tiny / "config.json").read_text())
    ref = json.loads((FIXTURE / "config.json").read_text())
    assert ours == ref
    for name in ("generation_config.json", "preprocessor_config.json"):
        assert json.loads((tiny / name).read_text()) == json.loads((FIXTURE / name).read_text()), name


def test_init_scheme_is_not_trivial(tiny):
    w = read_weights(tiny)
    norm = w["vlm.lang_model.model.norm.weight"]
    assert abs(norm.mean().item() - 1.0) < 0.1 and 0.05 < norm.std().item() < 0.2
    head_bias = w["vlm.lang_model.lm_head.bias"]
    assert 0.25 < head_bias.std().item() < 0.35
    emb = w["vlm.lang_model.model.embed_tokens.weight"]
    assert 0.45 < emb.std().item() < 0.55
    qkv = w["vlm.lang_model.model.layers.0.self_attn.qkv_proj.weight"]
    assert abs(qkv.std().item() - 1 / math.sqrt(64)) < 0.02
    conv = w["vlm.vision_encoder.embeddings.patch_embedding.weight"]
    assert abs(conv.std().item() - 1 / math.sqrt(3 * 14 * 14)) < 0.01
    assert 0.9 < w["vlm.vision_tokenizer.latents"].std().item() < 1.1
    assert 0.03 < w["vlm.vision_encoder.encoder.layers.0.layer_norm1.bias"].std().item() < 0.07
    # all tensors distinct (no two tensors drawn from the same stream)
    assert not torch.equal(w["vlm.vision_encoder.encoder.layers.0.self_attn.q_proj.weight"],
                           w["vlm.vision_encoder.encoder.layers.0.self_attn.k_proj.weight"])


def test_seed_determinism(tiny, tmp_path):
    again = read_weights(make_random_checkpoint(tmp_path / "a", seed=0))
    other = read_weights(make_random_checkpoint(tmp_path / "b", seed=1))
    ref = read_weights(tiny)
    key = "vlm.vision_tokenizer.layers.3.0.to_kv.weight"
    assert all(torch.equal(again[k], ref[k]) for k in ref)
    assert not torch.equal(other[key], ref[key])


def test_single_file_mode_and_bf16(tmp_path):
    out = make_random_checkpoint(tmp_path / "one", num_shards=1, dtype="bfloat16")
    assert (out / "model.safetensors").is_file()
    assert not (out / "model.safetensors.index.json").exists()
    assert not list(out.glob("model-*-of-*.safetensors"))
    weights = read_weights(out)
    assert len(weights) == 138 and all(t.dtype == torch.bfloat16 for t in weights.values())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16" and cfg["text_config"]["torch_dtype"] == "bfloat16"
    # rewriting the same directory with shards removes the stale single file
    make_random_checkpoint(out, num_shards=3)
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]


def test_shard_split_balanced_and_nonempty():
    specs = checkpoint_tensor_specs("full")
    shards = split_into_shards(specs, 4, torch.bfloat16)
    assert [s for group in shards for s in group] == specs
    sizes = [sum(s.numel for s in g) * 2 for g in shards]
    assert all(sizes) and max(sizes) < 1.6 * sum(sizes) / 4
    tiny = checkpoint_tensor_specs("tiny")
    assert all(split_into_shards(tiny, 100, torch.float32))
    with pytest.raises(ConfigError):
        split_into_shards(tiny, 0, torch.float32)


def test_base_variant_format(tmp_path):
    out = make_random_checkpoint(tmp_path / "base", variant="base")
    cfg = json.loads((out / "config.json").read_text())
    assert "anyres_grids" not in cfg["vision_encoder_config"]
    assert cfg["vision_encoder_config"]["siglip_vision_config"]["hidden_size"] == 32
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert pre["grids"] is None and "image_aspect_ratio" not in pre
    assert set(read_weights(out)) == {s.name for s in checkpoint_tensor_specs("tiny")}


@pytest.mark.parametrize("variant", ["instruct", "singleimg", "dpo"])
def test_instruct_variants_have_anyres(variant):
    cfg = build_config("tiny", variant)
    assert cfg["vision_encoder_config"]["anyres_grids"] == ANYRES_GRIDS


def test_full_preset_config_resolves_to_real_dims(tmp_path):
    from transformers import Phi3Config

    out = make_random_checkpoint(tmp_path / "full", preset="full", dtype="bfloat16", config_only=True)
    assert not list(out.glob("*.safetensors"))
    cfg = json.loads((out / "config.json").read_text())
    text = cfg["text_config"]
    assert text == {"model_type": "phi3", "initial_tokenizer_len": 32012, "sliding_window": 2047, "torch_dtype": "bfloat16"}
    assert "siglip_vision_config" not in cfg["vision_encoder_config"]
    assert cfg["vision_tokenizer_config"] == {"model_type": "xgenmm_vision_tokenizer"}
    phi3 = Phi3Config(**{k: v for k, v in text.items() if k not in ("model_type", "initial_tokenizer_len", "torch_dtype")})
    assert (phi3.vocab_size, phi3.hidden_size, phi3.intermediate_size) == (32064, 3072, 8192)
    assert (phi3.num_hidden_layers, phi3.num_attention_heads, phi3.num_key_value_heads) == (32, 32, 32)
    assert (phi3.pad_token_id, phi3.eos_token_id, phi3.bos_token_id) == (32000, 32000, 1)
    specs = {s.name: s.shape for s in checkpoint_tensor_specs("full")}
    assert len(specs) == 718
    assert specs["vlm.vision_encoder.embeddings.patch_embedding.weight"] == (1152, 3, 14, 14)
    assert specs["vlm.vision_encoder.encoder.layers.26.mlp.fc1.weight"] == (4304, 1152)
    assert "vlm.vision_encoder.encoder.layers.27.mlp.fc1.weight" not in specs
    assert specs["vlm.vision_tokenizer.layers.5.0.to_kv.weight"] == (3072, 1152)
    assert specs["vlm.vision_tokenizer.projection.weight"] == (3072, 1152)
    assert specs["vlm.lang_model.model.layers.31.self_attn.qkv_proj.weight"] == (9216, 3072)
    assert specs["vlm.lang_model.model.layers.31.mlp.gate_up_proj.weight"] == (16384, 3072)
    assert specs["vlm.lang_model.lm_head.bias"] == (32064,)
    # parameter counts printed by the official code (spec section 2)
    by_part: dict[str, int] = {}
    for s in checkpoint_tensor_specs("full"):
        by_part[s.name.split(".")[1]] = by_part.get(s.name.split(".")[1], 0) + s.numel
    assert by_part == {"vision_encoder": 428_225_600, "vision_tokenizer": 109_901_568, "lang_model": 3_821_130_051}


def test_full_config_through_project_config_reader(tmp_path):
    from xgenmm.model.config import XGenMMConfig

    for preset in ("full", "small", "tiny"):
        out = make_random_checkpoint(tmp_path / preset, preset=preset, config_only=True)
        cfg = XGenMMConfig.from_pretrained(out)
        specs = {s.name: s.shape for s in checkpoint_tensor_specs(preset)}
        assert specs["vlm.lang_model.model.embed_tokens.weight"] == (cfg.text.vocab_size, cfg.text.hidden_size)
        assert specs["vlm.vision_tokenizer.latents"] == (cfg.perceiver.num_latents, cfg.perceiver.dim)
        assert specs["vlm.vision_encoder.embeddings.position_embedding.weight"][1] == cfg.vision_hidden_size
    small = XGenMMConfig.from_pretrained(tmp_path / "small")
    assert small.text.head_dim == 96 and small.vision_hidden_size == 128


def test_small_preset_geometry():
    specs = {s.name: s.shape for s in checkpoint_tensor_specs("small")}
    assert specs["vlm.lang_model.model.layers.3.self_attn.qkv_proj.weight"] == (3 * 384, 384)
    assert specs["vlm.vision_tokenizer.layers.0.0.to_q.weight"] == (1536, 128)
    assert specs["vlm.vision_encoder.embeddings.position_embedding.weight"] == (729, 128)


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="preset"):
        make_random_checkpoint(tmp_path, preset="huge")
    with pytest.raises(ConfigError, match="variant"):
        make_random_checkpoint(tmp_path, variant="chat")
    with pytest.raises(ConfigError, match="dtype"):
        make_random_checkpoint(tmp_path, dtype="int8")


def test_cli_writes_checkpoint(tmp_path, capsys):
    assert cli_main(["--preset", "tiny", "--out", str(tmp_path / "cli"), "--num-shards", "1", "--seed", "3"]) == 0
    assert (tmp_path / "cli" / "model.safetensors").is_file()
    assert "5,522,947 parameters" in capsys.readouterr().out
