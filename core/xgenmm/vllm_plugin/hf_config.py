"""The `transformers` config class vLLM needs for `model_type="xgenmm"` (the official config.json, no remote code).

The official `config.json` names a remote-code class (`modeling_xgenmm.XGenMMConfig`); vLLM must not run it. This
class reads the same file: `text_config` becomes a `Phi3Config` (Phi-3 defaults fill what the file omits, as in
`xgenmm.model.config`) that vLLM's in-tree Phi-3 is built from, with two deliberate changes:

* `vocab_size` is the model's effective vocabulary, 32015 (32012 base rows + 3 decoupled rows). The plugin folds the
  decoupled embedding / head into one [32015, H] matrix each, so vLLM samples over exactly the logits the reference
  produces (the checkpoint's 32064-row matrices keep their size in `checkpoint_vocab_rows`).
* `sliding_window` is dropped: the reference (HF eager Phi-3) never applies the 2047 window (docs/architecture.md).
"""

from __future__ import annotations

from typing import Any

from transformers import Phi3Config, PretrainedConfig

from ..special_tokens import VOCAB_SIZE

MODEL_TYPE = "xgenmm"
ARCHITECTURE = "XGenMMModelForConditionalGeneration"


class XGenMMVllmConfig(PretrainedConfig):
    model_type = MODEL_TYPE
    sub_configs = {"text_config": Phi3Config}

    def __init__(
        self,
        text_config: dict[str, Any] | Phi3Config | None = None,
        vision_encoder_config: dict[str, Any] | None = None,
        vision_tokenizer_config: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("architectures", [ARCHITECTURE])
        kwargs.pop("auto_map", None)  # never point transformers at the remote-code classes
        if isinstance(text_config, Phi3Config):
            text = text_config
        else:
            raw = dict(text_config or {})
            initial_len = int(raw.pop("initial_tokenizer_len", VOCAB_SIZE - 3))
            checkpoint_rows = raw.pop("checkpoint_vocab_rows", None)
            for key in ("model_type", "torch_dtype", "dtype"):
                raw.pop(key, None)
            text = Phi3Config(**raw)
            text.initial_tokenizer_len = initial_len
            text.checkpoint_vocab_rows = int(checkpoint_rows if checkpoint_rows is not None else text.vocab_size)
            text.vocab_size = initial_len + 3
            text.sliding_window = None
        text.architectures = ["Phi3ForCausalLM"]
        self.text_config = text
        self.vision_encoder_config = dict(vision_encoder_config or {})
        self.vision_tokenizer_config = dict(vision_tokenizer_config or {})
        super().__init__(**kwargs)

    def get_text_config(self, *args: Any, **kwargs: Any) -> Phi3Config:
        return self.text_config

    def to_xgenmm_dict(self) -> dict[str, Any]:
        """The subset of the official config.json that `xgenmm.model.config.XGenMMConfig.from_dict` reads."""
        t = self.text_config
        return {
            "model_type": MODEL_TYPE,
            "text_config": {
                "model_type": "phi3",
                "initial_tokenizer_len": t.initial_tokenizer_len,
                "vocab_size": t.checkpoint_vocab_rows,
                "hidden_size": t.hidden_size,
                "intermediate_size": t.intermediate_size,
                "num_hidden_layers": t.num_hidden_layers,
                "num_attention_heads": t.num_attention_heads,
                "num_key_value_heads": t.num_key_value_heads,
                "max_position_embeddings": t.max_position_embeddings,
                "rms_norm_eps": t.rms_norm_eps,
            },
            "vision_encoder_config": self.vision_encoder_config,
            "vision_tokenizer_config": self.vision_tokenizer_config,
        }
