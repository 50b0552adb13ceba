"""The vLLM plugin itself: registration, config parsing, and that the other checkpoint variants load and agree with
the native engine (the golden fixture is an interleave checkpoint; see test_vllm_backend.py for it).

Runs only where vLLM is installed (`.venv-vllm`, via `.ci/vllm.sh`); see conftest.py for why it is skipped elsewhere.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from PIL import Image  # noqa: E402

from xgenmm import SamplingParams  # noqa: E402
from xgenmm.lazy_engine import EngineClients  # noqa: E402
from xgenmm.special_tokens import IMAGE_PLACEHOLDER_TOKEN, IMAGE_TOKEN  # noqa: E402
from xgenmm.testing import make_random_checkpoint  # noqa: E402

SMALL_ENGINE = dict(kv_cache_memory_bytes=128 * 1024**2, max_model_len=2048)


def test_register_is_idempotent_and_complete():
    from transformers import AutoConfig
    from vllm import ModelRegistry
    from vllm.tokenizers import TokenizerRegistry

    from xgenmm.vllm_plugin import ARCHITECTURE, register
    from xgenmm.vllm_plugin.hf_config import XGenMMVllmConfig

    register()
    register()
    assert ARCHITECTURE in ModelRegistry.get_supported_archs()
    assert TokenizerRegistry.tokenizers["hf"] == ("xgenmm.vllm_plugin.tokenizer", "XGenMMAwareHfTokenizer")
    assert TokenizerRegistry.tokenizers["xgenmm"] == ("xgenmm.vllm_plugin.tokenizer", "XGenMMAwareHfTokenizer")
    assert AutoConfig.for_model("xgenmm").__class__ is XGenMMVllmConfig


def test_entry_point_is_declared():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("xgenmm") == "xgenmm.vllm_plugin:register"


def test_hf_config_parses_the_official_config(fixture_checkpoint_with_tokenizer):
    from transformers import AutoConfig

    from xgenmm.vllm_plugin import register

    register()
    config = AutoConfig.from_pretrained(fixture_checkpoint_with_tokenizer)
    text = config.get_text_config()
    assert config.architectures == ["XGenMMModelForConditionalGeneration"]
    assert (text.vocab_size, text.checkpoint_vocab_rows, text.initial_tokenizer_len) == (32015, 32064, 32012)
    assert text.architectures == ["Phi3ForCausalLM"] and text.sliding_window is None
    assert config.vision_encoder_config["siglip_vision_config"]["hidden_size"] == 32
    assert not hasattr(config, "auto_map") or not config.auto_map


def test_plugin_tokenizer_has_the_vlm_tokens(fixture_checkpoint_with_tokenizer):
    from vllm.tokenizers import get_tokenizer

    from xgenmm.vllm_plugin import register

    register()
    tok = get_tokenizer(str(fixture_checkpoint_with_tokenizer))
    assert len(tok) == 32015 and tok.eos_token_id == 32007
    assert tok.encode("a <image> b", add_special_tokens=False).count(32012) == 1
    assert tok.chat_template


@pytest.mark.parametrize("variant", ["dpo", "base"])
def test_variant_loads_and_matches_native(tmp_path, fixture_dir, variant):
    """A dpo (instruct-family, anyres) and a base (one 384 squash image, `<image>` + 127 placeholders) checkpoint."""
    ckpt = make_random_checkpoint(tmp_path / variant, preset="tiny", seed=3, variant=variant)
    image = Image.open(fixture_dir / "images/a_1200x350.png")
    if variant == "base":
        prompt = IMAGE_TOKEN + IMAGE_PLACEHOLDER_TOKEN * 127 + "a photo of"
        expected_prompt_tokens = None  # 128 image ids + the text, nothing expanded
    else:
        prompt = "<|user|>\n<image>\nWhat is this?<|end|>\n<|assistant|>\n"
        expected_prompt_tokens = 512  # a 1200x350 image: 3x1 grid, 4 patches, 4 x 128 vision tokens
    request = {"prompt": prompt, "multi_modal_data": {"image": image}}
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    vllm_engine = EngineClients.open("vllm", model=str(ckpt), dtype="float32", **SMALL_ENGINE)
    native_engine = EngineClients.open("native", model=str(ckpt), device="cpu", dtype="float32")
    try:
        v = vllm_engine.sync.generate(request, params)[0]
        n = native_engine.sync.generate(request, params)[0]
    finally:
        vllm_engine.handle.shutdown()
        native_engine.handle.shutdown()
    assert v.outputs[0].token_ids == n.outputs[0].token_ids
    assert v.metrics.num_prompt_tokens == n.metrics.num_prompt_tokens
    if expected_prompt_tokens is not None:
        assert v.metrics.num_prompt_tokens - len(v.prompt_token_ids) + 1 == expected_prompt_tokens
    else:
        assert v.metrics.num_prompt_tokens == len(v.prompt_token_ids)


def test_serving_chat_template_renders_like_the_native_renderer(fixture_checkpoint_with_tokenizer):
    """`--chat-template` from `xgenmm.vllm_plugin.chat_template` gives vLLM the native prompt (default system turn,
    system messages on top, `<image>\\n` before the text of an image message, as vLLM flattens image parts)."""
    from xgenmm.chat.template import ChatRenderer
    from xgenmm.tokenizer import load_tokenizer
    from xgenmm.vllm_plugin.chat_template import XGENMM_CHAT_TEMPLATE

    tok = load_tokenizer(fixture_checkpoint_with_tokenizer)
    renderer = ChatRenderer(tok)
    image = Image.new("RGB", (40, 30))
    native_conversations = [
        [{"role": "user", "content": [{"type": "image_pil", "image_pil": image}, {"type": "text", "text": "q"}]}],
        [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
         {"role": "system", "content": "T"}, {"role": "user", "content": "c"}],
    ]
    vllm_conversations = [  # what vLLM hands the template for the same messages ("string" content format)
        [{"role": "user", "content": "<image>\nq"}],
        native_conversations[1],
    ]
    for native, flattened in zip(native_conversations, vllm_conversations):
        expected = renderer.render(native, add_generation_prompt=True).text
        got = tok.apply_chat_template(flattened, chat_template=XGENMM_CHAT_TEMPLATE, tokenize=False,
                                      add_generation_prompt=True)
        assert got == expected


def test_text_only_engine_without_vision_tower(tmp_path):
    """`max_images_per_prompt=0` (vLLM's image limit 0) builds no vision tower; the checkpoint still loads and text
    generation equals the native engine's, and images are refused at the call."""
    from xgenmm.errors import PromptError

    ckpt = make_random_checkpoint(tmp_path / "instruct", preset="tiny", seed=4, variant="instruct")
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    prompt = "<|user|>\nHello there<|end|>\n<|assistant|>\n"
    vllm_engine = EngineClients.open("vllm", model=str(ckpt), dtype="float32", max_images_per_prompt=0, **SMALL_ENGINE)
    native_engine = EngineClients.open("native", model=str(ckpt), device="cpu", dtype="float32")
    try:
        assert type(vllm_engine.handle.core.vllm_engine.model_executor.driver_worker.worker.model_runner.model.vision
                    ).__name__ == "StageMissingLayer"
        v = vllm_engine.sync.generate(prompt, params)[0]
        n = native_engine.sync.generate(prompt, params)[0]
        with pytest.raises(PromptError, match="limit"):
            vllm_engine.sync.generate({"prompt": "<image>", "multi_modal_data": {"image": Image.new("RGB", (8, 8))}})
    finally:
        vllm_engine.handle.shutdown()
        native_engine.handle.shutdown()
    assert v.outputs[0].token_ids == n.outputs[0].token_ids
