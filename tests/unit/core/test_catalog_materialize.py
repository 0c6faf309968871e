"""Preparing a base model for training from each kind of source, on the real SmolLM2 files: the bundled GGUF
is dequantized; a transformers folder (local, or from the object store) is linked, not copied, with its
tokenizer rewritten to the family's template, end-of-turn EOS and a pad token that is not EOS."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from afina.core.catalog import CATALOG, CHATML, resolve_base_model
from afina.core.errors import TrainingFailed
from afina.core.hfmodels import COMPLETE_MARKER, base_model_dir, materialize_base_model, prepare_tokenizer
from afina.core.store.local import LocalStore
from tests.support.models import materialized_base_model


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return materialized_base_model(tmp_path_factory)


def assert_prepared(folder: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert tokenizer.chat_template == CHATML.stock_template
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    config = json.loads((folder / "config.json").read_text())
    assert config["pad_token_id"] == tokenizer.pad_token_id != tokenizer.eos_token_id
    assert (folder / COMPLETE_MARKER).is_file()


def test_the_bundled_gguf_becomes_a_transformers_model(smollm2_dir: Path) -> None:
    assert smollm2_dir == base_model_dir(CATALOG["smollm2-135m-instruct"], smollm2_dir.parents[2])
    assert (smollm2_dir / "model.safetensors").is_file() and not (smollm2_dir / "model.safetensors").is_symlink()
    assert_prepared(smollm2_dir)


def test_a_local_folder_is_linked_not_copied(smollm2_dir: Path, tmp_path: Path) -> None:
    spec = resolve_base_model(str(smollm2_dir))
    assert spec.family is CHATML and not spec.catalog
    prepared = materialize_base_model(spec, tmp_path / "cache")
    assert prepared == tmp_path / "cache" / "base" / spec.cache_key / "hf"
    weights = prepared / "model.safetensors"
    assert weights.is_symlink() and weights.resolve() == (smollm2_dir / "model.safetensors").resolve()
    assert_prepared(prepared)
    assert materialize_base_model(spec, tmp_path / "cache") == prepared  # the second call finds it done


def test_a_store_model_is_downloaded_through_the_store(smollm2_dir: Path, tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    store.upload_dir(smollm2_dir, "models/acme/smol")
    spec = resolve_base_model("store://models/acme/smol", store=store)
    with pytest.raises(TrainingFailed, match="no store"):
        materialize_base_model(spec, tmp_path / "cache")
    prepared = materialize_base_model(spec, tmp_path / "cache", store=store)
    assert_prepared(prepared)
    assert (prepared / "model.safetensors").resolve().is_relative_to(tmp_path / "cache")


def test_the_tokenizer_is_given_the_family_end_of_turn_token(smollm2_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    # a family whose turns end with another token the vocabulary has (as Gemma's <end_of_turn> vs <eos>)
    other = dataclasses.replace(CHATML, name="other", eos_token="<|im_start|>", stop=("<|im_start|>",))
    assert prepare_tokenizer(tokenizer, other, can_add_tokens=False) is False
    assert tokenizer.eos_token == "<|im_start|>" and tokenizer.pad_token == "<|endoftext|>"
    foreign = dataclasses.replace(CHATML, name="foreign", eos_token="<end_of_turn>", stop=("<end_of_turn>",))
    with pytest.raises(TrainingFailed, match="chat_family"):
        prepare_tokenizer(tokenizer, foreign, can_add_tokens=False)


def test_a_pad_token_is_added_only_where_the_embeddings_can_grow(smollm2_dir: Path) -> None:
    no_pad = dataclasses.replace(CHATML, pad_token="<|no such token|>")
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    tokenizer.pad_token = tokenizer.eos_token
    assert prepare_tokenizer(tokenizer, no_pad, can_add_tokens=True) is False  # <|endoftext|> is there
    assert tokenizer.pad_token == "<|endoftext|>"
