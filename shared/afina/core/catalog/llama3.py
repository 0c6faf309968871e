"""Llama 3.1 and 3.2 Instruct: ``<|start_header_id|>role<|end_header_id|>`` turns ended by ``<|eot_id|>``.

The two families differ only in the date line of the system header: 3.1 writes a fixed "26 Jul 2024"
unless ``date_string`` is given, 3.2 writes today's date (``strftime_now``). The pad token is
``<|finetune_right_pad_id|>``, the reserved token Meta added for exactly that.
"""

from __future__ import annotations

from afina.core.catalog.family import ChatFamily, load_template
from afina.core.catalog.sources import HubSource
from afina.core.catalog.spec import BaseModelSpec

# Ollama has no strftime: the header carries the template's own fallback date
_OLLAMA_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\n"
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
    "{{ if .System }}{{ .System }}{{ end }}<|eot_id|>\n"
    "{{- range .Messages }}{{- if ne .Role \"system\" }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
    "{{ .Content }}<|eot_id|>\n"
    "{{- end }}{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
)
_COMMON = {
    "ollama_template": _OLLAMA_TEMPLATE,
    "eos_token": "<|eot_id|>",
    "pad_token": "<|finetune_right_pad_id|>",
    "bos_token": "<|begin_of_text|>",
    "stop": ("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"),
    "instruction_part": "<|start_header_id|>user<|end_header_id|>\n\n",
    "response_part": "<|start_header_id|>assistant<|end_header_id|>\n\n",
}

LLAMA31 = ChatFamily(name="llama3.1", display_name="Llama 3.1",
                     stock_template=load_template("llama3.1.jinja"),
                     training_template=load_template("llama3.1.training.jinja"), **_COMMON)
LLAMA32 = ChatFamily(name="llama3.2", display_name="Llama 3.2",
                     stock_template=load_template("llama3.2.jinja"),
                     training_template=load_template("llama3.2.training.jinja"), **_COMMON)

MODELS = (
    BaseModelSpec(
        id="llama-3.2-1b-instruct", display_name="Llama 3.2 1B Instruct", family=LLAMA32,
        source=HubSource("meta-llama/Llama-3.2-1B-Instruct"), parameters=1_235_814_400, context_length=131_072,
        hf_repo="meta-llama/Llama-3.2-1B-Instruct", aliases=("meta-llama/Llama-3.2-1B-Instruct", "llama3.2:1b"),
        unsloth_repo="unsloth/Llama-3.2-1B-Instruct-bnb-4bit",
    ),
    BaseModelSpec(
        id="llama-3.2-3b-instruct", display_name="Llama 3.2 3B Instruct", family=LLAMA32,
        source=HubSource("meta-llama/Llama-3.2-3B-Instruct"), parameters=3_212_749_824, context_length=131_072,
        hf_repo="meta-llama/Llama-3.2-3B-Instruct", aliases=("meta-llama/Llama-3.2-3B-Instruct", "llama3.2:3b"),
        unsloth_repo="unsloth/Llama-3.2-3B-Instruct-bnb-4bit",
    ),
    BaseModelSpec(
        id="llama-3.1-8b-instruct", display_name="Llama 3.1 8B Instruct", family=LLAMA31,
        source=HubSource("meta-llama/Llama-3.1-8B-Instruct"), parameters=8_030_261_248, context_length=131_072,
        hf_repo="meta-llama/Llama-3.1-8B-Instruct",
        aliases=("meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Meta-Llama-3.1-8B-Instruct", "llama3.1:8b"),
        unsloth_repo="unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit",
    ),
)
