"""A Jinja chat template for `vllm serve` that renders like the native `ChatRenderer` (and the official demos).

The checkpoints' own template (the plain Phi-3 one) adds no system turn; the official demos, the SFT data and the
native `ChatRenderer` always start with one (the SFT default when the conversation has none). To serve with the
native prompt format:

    python -m xgenmm.vllm_plugin.chat_template > xgenmm_chat.jinja
    vllm serve <checkpoint> --chat-template xgenmm_chat.jinja

vLLM turns each image part into `<image>` and (by default) puts the placeholders, joined with "\\n", before the
text of the message: `[image, text q]` -> `<image>\\nq`, the SFT format, as the native renderer does. Tool calls are
not rendered by this template (use the xgenmm server or the Python API for tools).
"""

from __future__ import annotations

from ..chat.template import DEFAULT_SYSTEM_MESSAGE

XGENMM_CHAT_TEMPLATE = (
    "{%- set ns = namespace(system=[]) -%}"
    "{%- for m in messages -%}{%- if m['role'] in ['system', 'developer'] -%}"
    "{%- set ns.system = ns.system + [m['content']] -%}{%- endif -%}{%- endfor -%}"
    "{{- '<|system|>\\n' + (ns.system | join('\\n') if ns.system else " + repr(DEFAULT_SYSTEM_MESSAGE) + ") + '<|end|>\\n' -}}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}{{- '<|user|>\\n' + m['content'] + '<|end|>\\n' -}}"
    "{%- elif m['role'] == 'assistant' -%}{{- '<|assistant|>\\n' + (m['content'] or '') + '<|end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- else -%}{{- '<|endoftext|>' -}}{%- endif -%}"
)

if __name__ == "__main__":
    print(XGENMM_CHAT_TEMPLATE)
