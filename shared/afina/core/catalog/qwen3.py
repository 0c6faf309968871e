"""Qwen 3 (hybrid thinking): ChatML without a default system prompt; the last assistant turn after the last
user query renders its ``<think>`` block (empty when the reply has none), earlier ones drop it."""

from __future__ import annotations

from afina.core.catalog.family import ChatFamily, load_template
from afina.core.catalog.sources import HubSource
from afina.core.catalog.spec import BaseModelSpec

QWEN3 = ChatFamily(
    name="qwen3",
    display_name="Qwen 3",
    stock_template=load_template("qwen3.jinja"),
    training_template=load_template("qwen3.training.jinja"),
    ollama_template=(
        "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
        "{{- range .Messages }}{{- if ne .Role \"system\" }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
        "{{ end }}{{- end }}<|im_start|>assistant\n"
    ),
    eos_token="<|im_end|>",
    pad_token="<|endoftext|>",
    stop=("<|im_end|>", "<|im_start|>", "<|endoftext|>"),
    instruction_part="<|im_start|>user\n",
    response_part="<|im_start|>assistant\n",
)


def _qwen3(size: str, parameters: int) -> BaseModelSpec:
    repo = f"Qwen/Qwen3-{size}"
    return BaseModelSpec(
        id=f"qwen3-{size.lower()}", display_name=f"Qwen3 {size}", family=QWEN3, source=HubSource(repo),
        parameters=parameters, context_length=40_960, hf_repo=repo, aliases=(repo, f"qwen3:{size.lower()}"),
        unsloth_repo=f"unsloth/Qwen3-{size}-bnb-4bit",
    )


MODELS = (_qwen3("0.6B", 596_049_920), _qwen3("1.7B", 2_031_739_904), _qwen3("4B", 4_022_468_096),
          _qwen3("8B", 8_190_735_360))
