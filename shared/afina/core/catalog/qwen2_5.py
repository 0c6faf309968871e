"""Qwen 2.5 Instruct: ChatML with Qwen's default system prompt; EOS ``<|im_end|>``, pad ``<|endoftext|>``."""

from __future__ import annotations

from afina.core.catalog.family import ChatFamily, load_template
from afina.core.catalog.sources import HubSource
from afina.core.catalog.spec import BaseModelSpec

QWEN25 = ChatFamily(
    name="qwen2.5",
    display_name="Qwen 2.5",
    stock_template=load_template("qwen2.5.jinja"),
    training_template=load_template("qwen2.5.training.jinja"),
    ollama_template=(
        "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n"
        "{{ else }}<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
        "<|im_end|>\n{{ end }}"
        "{{- range .Messages }}{{- if ne .Role \"system\" }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
        "{{ end }}{{- end }}<|im_start|>assistant\n"
    ),
    eos_token="<|im_end|>",
    pad_token="<|endoftext|>",
    stop=("<|im_end|>", "<|im_start|>", "<|endoftext|>"),
    instruction_part="<|im_start|>user\n",
    response_part="<|im_start|>assistant\n",
)


def _qwen25(size: str, parameters: int) -> BaseModelSpec:
    repo = f"Qwen/Qwen2.5-{size}-Instruct"
    return BaseModelSpec(
        id=f"qwen2.5-{size.lower()}-instruct", display_name=f"Qwen2.5 {size} Instruct", family=QWEN25,
        source=HubSource(repo), parameters=parameters, context_length=32_768, hf_repo=repo,
        aliases=(repo, f"qwen2.5:{size.lower()}"), unsloth_repo=f"unsloth/Qwen2.5-{size}-Instruct-bnb-4bit",
    )


MODELS = (_qwen25("0.5B", 494_032_768), _qwen25("1.5B", 1_543_714_304), _qwen25("7B", 7_615_616_512))
