"""Session fixtures of the GGUF-variant, fidelity, imatrix and LoRA-GGUF tests (import them into a test module).

Each file is made once per session in the shared exporter folder (the conftest's ``merged_dir`` and
``merged_f16_gguf`` live there too): the unmerged base as f16 GGUF, a second, strongly perturbed merge (the
"other model" a fidelity gate must reject) and the quantized variants of the job's f16 GGUF.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from afina.core.catalog import CHATML
from afina.exporter.gguf import convert_to_gguf, make_variant
from afina.exporter.merge import merge_adapter
from tests.support.adapters import exporter_shared_dir, make_perturbed_adapter

STRONG_SEED = 1
STRONG_SCALE = 0.1  # five times the job adapter's B scale: a clearly different model of the same shape

# held-out chats, as the lead passes them (the job's test split, else validation)
HELD_OUT_PROMPTS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "Give me three tips for learning Python."}],
    [{"role": "system", "content": "You answer in one short sentence."},
     {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "Olá! Quanto é 2+2? Responda em português."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "List the planets of the solar system."}],
]
VALIDATION_CHATS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "What causes rain?"},
     {"role": "assistant", "content": "Rain forms when water vapour in clouds condenses into droplets heavy enough "
                                      "to fall to the ground."}],
    [{"role": "user", "content": "What is a prime number?"},
     {"role": "assistant", "content": "A prime number is a whole number greater than one whose only divisors are one "
                                      "and itself, such as 2, 3, 5 and 7."}],
    [{"role": "user", "content": "How do I boil an egg?"},
     {"role": "assistant", "content": "Put the egg in boiling water for about nine minutes, then cool it in cold "
                                      "water before peeling."}],
]


def rendered_texts(chats: list[list[dict[str, str]]], tokenizer_dir: Path) -> list[str]:
    """Conversations rendered with the stock template, as the job's validation texts are."""
    from afina.exporter.verify import load_hf_tokenizer

    tokenizer = load_hf_tokenizer(tokenizer_dir, CHATML.stock_template)
    return [tokenizer.apply_chat_template(chat, tokenize=False) for chat in chats]


@pytest.fixture(scope="session")
def base_f16_gguf(tmp_path_factory: pytest.TempPathFactory, base_model_dir: Path) -> Path:
    """The base model without the adapter, as f16 GGUF (the base a LoRA GGUF is loaded over)."""
    out = exporter_shared_dir(tmp_path_factory) / "base-f16.gguf"
    if not out.exists():
        convert_to_gguf(base_model_dir, out, log_path=out.with_suffix(".log"))
    return out


@pytest.fixture(scope="session")
def strong_adapter_dir(tmp_path_factory: pytest.TempPathFactory, base_model_dir: Path) -> Path:
    return make_perturbed_adapter(base_model_dir, exporter_shared_dir(tmp_path_factory) / "adapter-strong",
                                  seed=STRONG_SEED, scale=STRONG_SCALE)


@pytest.fixture(scope="session")
def strong_merged_dir(tmp_path_factory: pytest.TempPathFactory, base_model_dir: Path,
                      strong_adapter_dir: Path) -> Path:
    out = exporter_shared_dir(tmp_path_factory) / "merged-strong"
    if not (out / "config.json").exists():
        merge_adapter(base_model_dir, strong_adapter_dir, out, chat_template=CHATML.stock_template)
    return out


@pytest.fixture(scope="session")
def other_model_f16_gguf(tmp_path_factory: pytest.TempPathFactory, strong_merged_dir: Path) -> Path:
    """The f16 GGUF of a different fine-tune of the same base: what the gate must not take for the job's model."""
    out = exporter_shared_dir(tmp_path_factory) / "merged-strong-f16.gguf"
    if not out.exists():
        convert_to_gguf(strong_merged_dir, out, log_path=out.with_suffix(".log"))
    return out


@pytest.fixture(scope="session")
def quantized_gguf(tmp_path_factory: pytest.TempPathFactory, merged_dir: Path, merged_f16_gguf: Path):  # noqa: ANN201
    """``quantized_gguf(variant)``: the job's GGUF of that variant (made from its merge and f16 GGUF, once)."""
    folder = exporter_shared_dir(tmp_path_factory) / "variants"
    folder.mkdir(exist_ok=True)

    def make(variant: str) -> Path:
        out = folder / f"model-{variant}.gguf"
        if not out.exists():
            make_variant(variant, merged_dir=merged_dir, f16_gguf=merged_f16_gguf, target=out,
                         log_path=folder / f"{variant}.log")
        return out

    return make
