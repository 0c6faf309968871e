"""What a model family needs to be trained and served: templates, special tokens, LoRA targets.

A family's ``stock_template`` is the Jinja chat template its models ship (in
``templates/<name>.jinja``): the adapter and the exported model carry it, so a
client formats chats exactly as the model was trained. The ``training_template``
(``templates/<name>.training.jinja``) renders byte for byte the same text but
wraps what each assistant turn says, and the end-of-turn token that closes it,
in ``{% generation %}`` markers: the assistant-token mask then comes from the
template itself (transformers' ``return_assistant_tokens_mask``, TRL's
``assistant_only_loss``) and never from a search for marker strings.

Template files end with one newline that is not part of the template (editors
add it); every template here ends in a block tag, whose trailing newline Jinja
drops anyway, so the rendering is the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@cache
def load_template(filename: str) -> str:
    """The Jinja template ``templates/<filename>`` shipped in this package."""
    text = resources.files("afina.core.catalog").joinpath("templates", filename).read_text(encoding="utf-8")
    return text.removesuffix("\n")


@dataclass(frozen=True)
class ChatFamily:
    """How a family formats chats, which tokens end and pad a turn, and where LoRA attaches.

    ``eos_token`` is the token that ends an assistant turn, the one the model must learn to emit
    (for Gemma ``<end_of_turn>``, not the tokenizer's document ``<eos>``); the base model's tokenizer
    is set to it when the model is prepared. ``pad_token`` is never ``eos_token``: with pad == EOS the
    collator masks every EOS out of the loss and the model never learns to stop (unsloth#416,
    axolotl#1806). ``instruction_part``/``response_part`` are the strings Unsloth's
    ``train_on_responses_only`` splits turns on.
    """

    name: str
    display_name: str
    stock_template: str
    training_template: str
    ollama_template: str
    eos_token: str
    pad_token: str
    stop: tuple[str, ...]
    instruction_part: str
    response_part: str
    bos_token: str = ""  # what the template's ``bos_token`` is ("" for templates that write none)
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    supports_system_role: bool = True

    def __post_init__(self) -> None:
        if self.pad_token == self.eos_token:
            raise ValueError(f"{self.name}: pad token must differ from EOS ({self.eos_token!r})")
        if self.eos_token not in self.stop:
            raise ValueError(f"{self.name}: the end-of-turn token {self.eos_token!r} must be a stop token")
