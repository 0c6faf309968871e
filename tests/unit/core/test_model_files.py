"""A base model's own files are user input: a config.json that is not an object, a GGUF header with nested or
huge arrays, are each a 400 naming ``model`` and what is wrong — never a crash (AttributeError, RecursionError,
MemoryError) that answers 500."""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

import pytest

from afina.core.catalog import CATALOG, LocalPathSource, resolve_base_model
from afina.core.catalog.gguf_metadata import MAX_ARRAY_DEPTH, read_gguf_metadata
from afina.core.errors import InvalidRequest, TrainingFailed
from afina.core.hfmodels import materialize_base_model
from afina.core.store.local import LocalStore

GOOD_CONFIG = {"model_type": "qwen3", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
               "vocab_size": 1000, "num_attention_heads": 4, "max_position_embeddings": 4096}


def folder_with(path: Path, config_text: str, tokenizer_config: str | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(config_text)
    if tokenizer_config is not None:
        (path / "tokenizer_config.json").write_text(tokenizer_config)
    return path


def refused(name: str, allowed: Path | None = None, **kwargs: object) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        resolve_base_model(name, allowed_model_dirs=[allowed] if allowed else None, **kwargs)  # type: ignore[arg-type]
    assert caught.value.param == "model" and caught.value.http_status == 400
    return caught.value


@pytest.mark.parametrize(("config_text", "says"), [
    ("[1, 2, 3]", "config.json is a JSON array, not an object"),
    ('"qwen3"', "config.json is a JSON string, not an object"),
    ("42", "config.json is a JSON number, not an object"),
    ("null", "config.json is a JSON null, not an object"),
    ("{not json", "config.json is not valid JSON"),
    ("[" * 100_000, "config.json is not valid JSON"),
    (json.dumps({**GOOD_CONFIG, "text_config": ["x"]}), "text_config in its config.json is not a JSON object"),
    (json.dumps({**GOOD_CONFIG, "max_position_embeddings": "lots"}), "max_position_embeddings in its config"),
    (json.dumps({**GOOD_CONFIG, "max_position_embeddings": [4096]}), "max_position_embeddings in its config"),
])
def test_a_config_json_that_is_not_an_object_is_a_400(tmp_path: Path, config_text: str, says: str) -> None:
    folder = folder_with(tmp_path / "models" / "m", config_text)
    error = refused(str(folder), tmp_path / "models", chat_family="chatml")
    assert says in error.message and error.code == "invalid_model_config"
    assert str(tmp_path) not in error.message.replace(repr(str(folder)), "")


def test_a_tokenizer_config_that_is_not_an_object_is_a_400(tmp_path: Path) -> None:
    folder = folder_with(tmp_path / "m", json.dumps(GOOD_CONFIG), tokenizer_config='["chat_template"]')
    assert "tokenizer_config.json is a JSON array" in refused(str(folder)).message


def test_odd_but_valid_numbers_in_a_config_do_not_crash(tmp_path: Path) -> None:
    config = {**GOOD_CONFIG, "num_attention_heads": "four", "head_dim": [1], "hidden_size": 1e400}
    folder = folder_with(tmp_path / "m", json.dumps(config).replace("Infinity", "1e400"))
    spec = resolve_base_model(str(folder))
    assert spec.family.name == "qwen3" and spec.parameters == 0 and spec.context_length == 4096


def test_a_store_model_whose_config_is_a_list_is_a_400(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    store.put_bytes("models/acme/base/config.json", b'["model_type", "qwen3"]')
    error = refused("store://models/acme/base", store=store)
    assert "config.json is a JSON array" in error.message
    store.put_bytes("models/acme/other/config.json", json.dumps(GOOD_CONFIG).encode())
    store.put_bytes("models/acme/other/chat_template.jinja", b"\xff\xfe not utf-8")
    assert "chat_template.jinja is not UTF-8" in refused("store://models/acme/other", store=store).message


def test_the_trainer_refuses_a_config_that_is_not_an_object_before_transformers_reads_it(tmp_path: Path) -> None:
    folder = folder_with(tmp_path / "m", "[]")
    spec = dataclasses.replace(CATALOG["qwen3-0.6b"], id=str(folder), source=LocalPathSource(folder), catalog=False)
    with pytest.raises(TrainingFailed, match="config.json is not a JSON object") as caught:
        materialize_base_model(spec, tmp_path / "cache")
    assert caught.value.code == "invalid_model_config" and str(folder) not in caught.value.message


# GGUF headers ---------------------------------------------------------------------------------------------


def gguf_string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def gguf_header(*pairs: bytes, pair_count: int | None = None) -> bytes:
    count = len(pairs) if pair_count is None else pair_count
    return b"GGUF" + struct.pack("<IQQ", 3, 0, count) + b"".join(pairs)


def nested_array(depth: int) -> bytes:
    """``key: [[[ ... [] ... ]]]``, ``depth`` arrays deep."""
    body = struct.pack("<IQ", 9, 1) * (depth - 1) + struct.pack("<IQ", 4, 0)
    return gguf_string("general.nested") + struct.pack("<I", 9) + body


ARCH = gguf_string("general.architecture") + struct.pack("<I", 8) + gguf_string("llama")
BAD_HEADERS = {
    "nested 5000 deep": (gguf_header(ARCH, nested_array(5000)), "nested more than"),
    "2^62 u8 items": (gguf_header(ARCH, gguf_string("x.huge") + struct.pack("<IIQ", 9, 0, 2**62)), "items"),
    "2^40 strings": (gguf_header(ARCH, gguf_string("x.many") + struct.pack("<IIQ", 9, 8, 2**40)), "items"),
    "a 2^60-byte string": (gguf_header(ARCH, struct.pack("<Q", 2**60)), "GGUF string of"),
    "2^63 pairs": (gguf_header(ARCH, pair_count=2**63), "key-value pairs"),
    "cut short": (gguf_header(ARCH, gguf_string("x.cut") + struct.pack("<I", 8) + struct.pack("<Q", 99)),
                  "ends early"),
    "unknown value type": (gguf_header(ARCH, gguf_string("x.odd") + struct.pack("<I", 77)), "unknown GGUF value"),
    "chat template not a string": (gguf_header(ARCH, gguf_string("tokenizer.chat_template") + struct.pack("<II", 4, 7)),
                                   "tokenizer.chat_template is not a string"),
}


@pytest.mark.parametrize("case", BAD_HEADERS, ids=list(BAD_HEADERS))
def test_a_gguf_file_with_a_hostile_header_is_a_400(tmp_path: Path, case: str) -> None:
    data, says = BAD_HEADERS[case]
    path = tmp_path / "models" / "bad.gguf"
    path.parent.mkdir()
    path.write_bytes(data)
    error = refused(str(path), tmp_path / "models", chat_family="chatml")
    assert says in error.message and str(tmp_path) not in error.message.replace(repr(str(path)), "")


@pytest.mark.parametrize("case", BAD_HEADERS, ids=list(BAD_HEADERS))
def test_a_store_gguf_with_a_hostile_header_is_a_400(tmp_path: Path, case: str) -> None:
    data, says = BAD_HEADERS[case]
    store = LocalStore(tmp_path / "store")
    store.put_bytes("models/acme/bad.gguf", data)
    assert says in refused("store://models/acme/bad.gguf", store=store).message


def test_arrays_nested_within_the_limit_are_read() -> None:
    import io

    metadata = read_gguf_metadata(io.BytesIO(gguf_header(ARCH, nested_array(MAX_ARRAY_DEPTH))), keep_arrays=True)
    value = metadata["general.nested"]
    for _ in range(MAX_ARRAY_DEPTH - 1):
        value = value[0]
    assert value == [] and metadata["general.architecture"] == "llama"
