"""Mistral 7B Instruct v0.3: ``[INST] … [/INST]`` then the reply and ``</s>``.

Its template puts the system message in front of the *last* user message only. The tokenizer has no pad
token; ``[control_768]``, one of the v3 vocabulary's unused control tokens, pads (as Unsloth does).
"""

from __future__ import annotations

from afina.core.catalog.family import ChatFamily, load_template
from afina.core.catalog.sources import HubSource
from afina.core.catalog.spec import BaseModelSpec

MISTRAL = ChatFamily(
    name="mistral",
    display_name="Mistral v0.3",
    stock_template=load_template("mistral-v0.3.jinja"),
    training_template=load_template("mistral-v0.3.training.jinja"),
    ollama_template=(
        "{{- range $i, $_ := .Messages }}\n"
        "{{- if eq .Role \"user\" }}[INST] {{ if and $.System (eq (len (slice $.Messages $i)) 1) }}{{ $.System }}\n\n"
        "{{ end }}{{ .Content }}[/INST]\n"
        "{{- else if eq .Role \"assistant\" }} {{ .Content }}</s>\n"
        "{{- end }}\n"
        "{{- end }}"
    ),
    eos_token="</s>",
    pad_token="[control_768]",
    bos_token="<s>",
    stop=("</s>", "[INST]", "[/INST]"),
    instruction_part="[INST]",
    response_part="[/INST]",
)

MODELS = (
    BaseModelSpec(
        id="mistral-7b-instruct-v0.3", display_name="Mistral 7B Instruct v0.3", family=MISTRAL,
        source=HubSource("mistralai/Mistral-7B-Instruct-v0.3"), parameters=7_248_023_552, context_length=32_768,
        hf_repo="mistralai/Mistral-7B-Instruct-v0.3", aliases=("mistralai/Mistral-7B-Instruct-v0.3", "mistral:7b"),
        unsloth_repo="unsloth/mistral-7b-instruct-v0.3-bnb-4bit",
    ),
)
