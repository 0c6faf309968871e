"""DeepSeek-R1 distills (Qwen 2.5 and Llama 3.1 bases): ``<｜User｜>…<｜Assistant｜>…<｜end▁of▁sentence｜>``.

The template drops everything up to ``</think>`` from assistant turns and opens a generation with
``<think>\\n``. The tokenizers ship pad == EOS; the Qwen-based ones pad with ``<|vision_pad|>``, the
Llama-based one with ``<|finetune_right_pad_id|>`` (both unused in text chats).
"""

from __future__ import annotations

from afina.core.catalog.family import ChatFamily, load_template
from afina.core.catalog.sources import HubSource
from afina.core.catalog.spec import BaseModelSpec

_COMMON = {
    "stock_template": load_template("deepseek-r1.jinja"),
    "training_template": load_template("deepseek-r1.training.jinja"),
    "ollama_template": (
        "{{- if .System }}{{ .System }}{{ end }}\n"
        "{{- range $i, $_ := .Messages }}\n"
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}\n"
        "{{- if eq .Role \"user\" }}<｜User｜>{{ .Content }}\n"
        "{{- else if eq .Role \"assistant\" }}<｜Assistant｜>{{ .Content }}"
        "{{- if not $last }}<｜end▁of▁sentence｜>{{- end }}\n"
        "{{- end }}\n"
        "{{- if and $last (ne .Role \"assistant\") }}<｜Assistant｜><think>\n{{ end }}\n"
        "{{- end }}"
    ),
    "eos_token": "<｜end▁of▁sentence｜>",
    "bos_token": "<｜begin▁of▁sentence｜>",
    "stop": ("<｜end▁of▁sentence｜>", "<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"),
    "instruction_part": "<｜User｜>",
    "response_part": "<｜Assistant｜>",
}

DEEPSEEK_R1_QWEN = ChatFamily(name="deepseek-r1-qwen", display_name="DeepSeek-R1 distill (Qwen)",
                              pad_token="<|vision_pad|>", **_COMMON)
DEEPSEEK_R1_LLAMA = ChatFamily(name="deepseek-r1-llama", display_name="DeepSeek-R1 distill (Llama)",
                               pad_token="<|finetune_right_pad_id|>", **_COMMON)


def _distill(base: str, size: str, family: ChatFamily, parameters: int, ollama_tag: str) -> BaseModelSpec:
    repo = f"deepseek-ai/DeepSeek-R1-Distill-{base}-{size}"
    return BaseModelSpec(
        id=f"deepseek-r1-distill-{base.lower()}-{size.lower()}", display_name=f"DeepSeek-R1 Distill {base} {size}",
        family=family, source=HubSource(repo), parameters=parameters, context_length=131_072, hf_repo=repo,
        aliases=(repo, f"deepseek-r1:{ollama_tag}"),
        unsloth_repo=f"unsloth/DeepSeek-R1-Distill-{base}-{size}-bnb-4bit",
    )


MODELS = (
    _distill("Qwen", "1.5B", DEEPSEEK_R1_QWEN, 1_777_088_000, "1.5b"),
    _distill("Qwen", "7B", DEEPSEEK_R1_QWEN, 7_615_616_512, "7b"),
    _distill("Llama", "8B", DEEPSEEK_R1_LLAMA, 8_030_261_248, "8b"),
)
