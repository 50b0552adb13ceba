"""xGen-MM (BLIP-3) v1.5 as an out-of-tree vLLM model plugin.

`register()` is the `vllm.general_plugins` entry point (pyproject.toml). vLLM calls it in every process it starts
(front end, engine core, workers), possibly several times, so it is idempotent. It registers:

* the `transformers` config class for `model_type="xgenmm"` (the official config.json, no remote code);
* the model class for the official architecture name `XGenMMModelForConditionalGeneration`, lazily (the string
  form: the model module, and with it torch-heavy imports, loads only when an xGen-MM checkpoint is served);
* a tokenizer loader in vLLM's "hf" slot that adds the three VLM tokens (`<image>` = 32012, ...) for xGen-MM
  checkpoints, as the official model code does; other models keep vLLM's loader.

Nothing here is imported by `xgenmm` itself: vLLM is an optional dependency (the `vllm` extra: `pip install ".[vllm]"`, docs/vllm.md).
"""

from __future__ import annotations

ARCHITECTURE = "XGenMMModelForConditionalGeneration"
MODEL_CLASS = "xgenmm.vllm_plugin.model:XGenMMForVLLM"
TOKENIZER_MODULE = "xgenmm.vllm_plugin.tokenizer"
TOKENIZER_CLASS = "XGenMMAwareHfTokenizer"

__all__ = ["register", "ARCHITECTURE", "MODEL_CLASS"]


def _register_config() -> None:
    from transformers import AutoConfig

    from .hf_config import MODEL_TYPE, XGenMMVllmConfig

    AutoConfig.register(MODEL_TYPE, XGenMMVllmConfig, exist_ok=True)
    try:  # also vLLM's own table, so vLLM never treats config.json's auto_map as remote code to run
        from vllm.transformers_utils.config import _CONFIG_REGISTRY

        _CONFIG_REGISTRY.setdefault(MODEL_TYPE, XGenMMVllmConfig)
    except ImportError:  # pragma: no cover - a vLLM without that private table: AutoConfig alone is enough
        pass


def _register_model() -> None:
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)


def _register_tokenizer() -> None:
    from vllm.tokenizers import TokenizerRegistry

    current = TokenizerRegistry.tokenizers.get("hf")
    # Take the "hf" slot only from vLLM's own loader (never from another plugin that replaced it).
    if current == ("vllm.tokenizers.hf", "CachedHfTokenizer"):
        TokenizerRegistry.tokenizers["hf"] = (TOKENIZER_MODULE, TOKENIZER_CLASS)
    if "xgenmm" not in TokenizerRegistry.tokenizers:  # explicit `--tokenizer-mode xgenmm`
        TokenizerRegistry.tokenizers["xgenmm"] = (TOKENIZER_MODULE, TOKENIZER_CLASS)


def register() -> None:
    """vLLM plugin entry point; safe to call any number of times in any process."""
    _register_config()
    _register_model()
    _register_tokenizer()
