"""Gemma 2 and Gemma 3 instruction-tuned: ``<start_of_turn>user|model`` turns ended by ``<end_of_turn>``.

The tokenizers ship ``<eos>`` as EOS, but a chat turn ends with ``<end_of_turn>``: that is the token the
model must learn to emit (and the one generation stops on), so the family's EOS is ``<end_of_turn>`` and
the prepared tokenizer is set to it. Gemma 2's template refuses a system message; Gemma 3's puts it at
the top of the first user turn.
"""

from __future__ import annotations

from afina.core.catalog.family import ChatFamily, load_template
from afina.core.catalog.sources import HubSource
from afina.core.catalog.spec import BaseModelSpec

_COMMON = {
    "eos_token": "<end_of_turn>",
    "pad_token": "<pad>",
    "bos_token": "<bos>",
    "stop": ("<end_of_turn>", "<start_of_turn>", "<eos>"),
    "instruction_part": "<start_of_turn>user\n",
    "response_part": "<start_of_turn>model\n",
}

GEMMA2 = ChatFamily(
    name="gemma2",
    display_name="Gemma 2",
    stock_template=load_template("gemma2.jinja"),
    training_template=load_template("gemma2.training.jinja"),
    # Ollama's own Gemma template: a system message becomes a user turn (the HF template refuses one)
    ollama_template=(
        "{{- range $i, $_ := .Messages }}\n"
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}\n"
        "{{- if or (eq .Role \"user\") (eq .Role \"system\") }}<start_of_turn>user\n"
        "{{ .Content }}<end_of_turn>\n"
        "{{ if $last }}<start_of_turn>model\n"
        "{{ end }}\n"
        "{{- else if eq .Role \"assistant\" }}<start_of_turn>model\n"
        "{{ .Content }}{{ if not $last }}<end_of_turn>\n"
        "{{ end }}\n"
        "{{- end }}\n"
        "{{- end }}"
    ),
    supports_system_role=False,
    **_COMMON,
)

GEMMA3 = ChatFamily(
    name="gemma3",
    display_name="Gemma 3",
    stock_template=load_template("gemma3.jinja"),
    training_template=load_template("gemma3.training.jinja"),
    # as the HF template: the system message opens the first user turn (Ollama puts it at index 0)
    ollama_template=(
        "{{- range $i, $_ := .Messages }}\n"
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}\n"
        "{{- if eq .Role \"user\" }}<start_of_turn>user\n"
        "{{ if and $.System (eq $i 1) }}{{ $.System }}\n\n{{ end }}{{ .Content }}<end_of_turn>\n"
        "{{ if $last }}<start_of_turn>model\n"
        "{{ end }}\n"
        "{{- else if eq .Role \"assistant\" }}<start_of_turn>model\n"
        "{{ .Content }}{{ if not $last }}<end_of_turn>\n"
        "{{ end }}\n"
        "{{- end }}\n"
        "{{- end }}"
    ),
    **_COMMON,
)

MODELS = (
    BaseModelSpec(
        id="gemma-2-2b-it", display_name="Gemma 2 2B IT", family=GEMMA2, source=HubSource("google/gemma-2-2b-it"),
        parameters=2_614_341_888, context_length=8192, hf_repo="google/gemma-2-2b-it",
        aliases=("google/gemma-2-2b-it", "gemma2:2b"), unsloth_repo="unsloth/gemma-2-2b-it-bnb-4bit",
    ),
    BaseModelSpec(
        id="gemma-3-1b-it", display_name="Gemma 3 1B IT", family=GEMMA3, source=HubSource("google/gemma-3-1b-it"),
        parameters=999_885_952, context_length=32_768, hf_repo="google/gemma-3-1b-it",
        aliases=("google/gemma-3-1b-it", "gemma3:1b"), unsloth_repo="unsloth/gemma-3-1b-it-bnb-4bit",
    ),
    BaseModelSpec(
        id="gemma-3-4b-it", display_name="Gemma 3 4B IT", family=GEMMA3, source=HubSource("google/gemma-3-4b-it"),
        parameters=4_300_079_472, context_length=131_072, hf_repo="google/gemma-3-4b-it",
        aliases=("google/gemma-3-4b-it", "gemma3:4b"), unsloth_repo="unsloth/gemma-3-4b-it-bnb-4bit",
    ),
)
