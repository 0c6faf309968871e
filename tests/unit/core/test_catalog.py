"""The catalog: every model's figures and family, how names resolve, and the sources of weights
(bundled GGUF, local Hub cache, local folder, object store, GGUF file). Nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from afina.core.catalog import (
    CATALOG,
    FAMILIES,
    BaseModelSpec,
    GgufFileSource,
    GgufPackageSource,
    HubSource,
    LocalPathSource,
    StoreSource,
    resolve_base_model,
)
from afina.core.catalog.gguf_metadata import gguf_metadata
from afina.core.errors import InvalidRequest, NotFound
from afina.core.store.local import LocalStore

EXPECTED_MODELS = {
    "llama-3.2-1b-instruct", "llama-3.2-3b-instruct", "llama-3.1-8b-instruct", "qwen2.5-0.5b-instruct",
    "qwen2.5-1.5b-instruct", "qwen2.5-7b-instruct", "qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "qwen3-8b",
    "gemma-2-2b-it", "gemma-3-1b-it", "gemma-3-4b-it", "mistral-7b-instruct-v0.3", "deepseek-r1-distill-qwen-1.5b",
    "deepseek-r1-distill-qwen-7b", "deepseek-r1-distill-llama-8b", "smollm2-135m-instruct", "smollm2-360m-instruct",
    "smollm2-1.7b-instruct",
}


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache for this test (HF_HUB_CACHE wins over HF_HOME, as in huggingface_hub)."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def cached_snapshot(cache: Path, repo: str, files: dict[str, object]) -> Path:
    """A snapshot laid out as huggingface_hub lays one out (refs/main -> snapshots/<commit>)."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("0123abcd")
    for name, content in files.items():
        (snapshot / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return snapshot


def model_folder(path: Path, model_type: str, chat_template: str | None) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({
        "model_type": model_type, "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
        "vocab_size": 1000, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096}))
    if chat_template is not None:
        (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": chat_template}))
    return path


def test_the_catalog_has_every_family_and_model() -> None:
    assert set(CATALOG) == EXPECTED_MODELS
    assert {spec.family.name for spec in CATALOG.values()} == set(FAMILIES)


@pytest.mark.parametrize("spec", CATALOG.values(), ids=lambda spec: spec.id)
def test_every_model_is_fully_described(spec: BaseModelSpec) -> None:
    assert spec.family is FAMILIES[spec.family.name]
    assert spec.parameters > 100_000_000 and spec.context_length >= 8192
    assert spec.hf_repo in spec.aliases and resolve_base_model(spec.hf_repo) is spec
    assert spec.unsloth_repo is not None and spec.unsloth_repo.startswith("unsloth/")
    assert spec.unsloth_repo.endswith("-bnb-4bit") and resolve_base_model(spec.unsloth_repo) is spec
    assert spec.cache_key == spec.id and spec.catalog
    assert isinstance(spec.source, GgufPackageSource | HubSource)


@pytest.mark.parametrize("family", FAMILIES.values(), ids=lambda family: family.name)
def test_every_family_pads_with_something_else_than_eos(family) -> None:  # noqa: ANN001
    assert family.pad_token != family.eos_token
    assert family.eos_token in family.stop
    assert family.instruction_part and family.response_part and family.target_modules
    assert '"""' not in family.ollama_template  # it goes between triple quotes in a Modelfile


@pytest.mark.parametrize(("name", "model"), [
    ("llama-3.2-1b-instruct", "llama-3.2-1b-instruct"), ("Meta-Llama/Llama-3.2-1B-Instruct", "llama-3.2-1b-instruct"),
    ("llama3.2:1b", "llama-3.2-1b-instruct"), ("qwen3:8b", "qwen3-8b"),
    ("Qwen/Qwen2.5-7B-Instruct", "qwen2.5-7b-instruct"),
    ("deepseek-r1:8b", "deepseek-r1-distill-llama-8b"), ("gemma3:1b", "gemma-3-1b-it"),
    ("mistralai/Mistral-7B-Instruct-v0.3", "mistral-7b-instruct-v0.3"), ("smollm2:135m", "smollm2-135m-instruct"),
])
def test_names_resolve_to_catalog_models(name: str, model: str) -> None:
    assert resolve_base_model(name).id == model


@pytest.mark.usefixtures("hub_cache")
@pytest.mark.parametrize("name", ["gpt-4o-mini", "llama-9-400b", "acme/not-cached", ""])
def test_an_unknown_model_is_a_400_naming_model_and_the_choices(name: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        resolve_base_model(name)
    assert caught.value.param == "model" and caught.value.http_status == 400
    assert "llama-3.2-1b-instruct" in caught.value.message and "smollm2-135m-instruct" in caught.value.message


def test_chat_family_overrides_and_unknown_families_are_refused() -> None:
    assert resolve_base_model("qwen3-0.6b", chat_family="qwen2.5").family is FAMILIES["qwen2.5"]
    with pytest.raises(InvalidRequest) as caught:
        resolve_base_model("qwen3-0.6b", chat_family="qwen9")
    assert caught.value.param == "hyperparameters.chat_family" and "qwen3" in caught.value.message


def test_a_hub_model_missing_from_the_cache_says_how_to_get_it(hub_cache: Path) -> None:
    spec = resolve_base_model("llama-3.2-1b-instruct")  # resolving never needs the weights
    with pytest.raises(NotFound) as caught:
        spec.source.locate()
    message = caught.value.message
    assert f"not in the local cache at {hub_cache}" in message and "afina never downloads weights" in message
    assert "huggingface-cli download meta-llama/Llama-3.2-1B-Instruct" in message
    with pytest.raises(NotFound):
        spec.gguf_path()  # no GGUF to serve with llama.cpp either


def test_a_hub_model_in_the_cache_is_found_offline(hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = cached_snapshot(hub_cache, "Qwen/Qwen2.5-0.5B-Instruct", {"config.json": {"model_type": "qwen2"}})
    assert resolve_base_model("qwen2.5:0.5b").source.locate() == snapshot


def test_an_uncatalogued_cached_hub_model_gets_its_family_from_its_template(hub_cache: Path) -> None:
    cached_snapshot(hub_cache, "acme/qwen-suporte", {
        "config.json": {"model_type": "qwen2", "max_position_embeddings": 32768},
        "tokenizer_config.json": {"chat_template": FAMILIES["qwen2.5"].stock_template}})
    spec = resolve_base_model("acme/qwen-suporte")
    assert (spec.family.name, spec.hf_repo, spec.context_length, spec.catalog) == \
        ("qwen2.5", "acme/qwen-suporte", 32768, False)
    assert spec.cache_key.startswith("custom-acme-qwen-suporte-")


@pytest.mark.parametrize(("model_type", "template", "family"), [
    ("llama", "llama3.2", "llama3.2"), ("llama", "llama3.1", "llama3.1"), ("qwen3", "qwen3", "qwen3"),
    ("gemma3_text", "gemma3", "gemma3"), ("mistral", "mistral", "mistral"),
    ("qwen2", "deepseek-r1-qwen", "deepseek-r1-qwen"), ("llama", "deepseek-r1-llama", "deepseek-r1-llama"),
    # a template edited by its author is recognised by its markers and the architecture
    ("llama", "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}", "chatml"),
    ("qwen2", "{% for m in messages %}<|im_start|>{{ m.role }}{% endfor %}", "qwen2.5"),
    ("gemma2", None, "gemma2"),
])
def test_a_local_folder_gets_its_family_from_config_and_tokenizer(tmp_path: Path, model_type: str,
                                                                  template: str | None, family: str) -> None:
    chat_template = FAMILIES[template].stock_template if template in FAMILIES else template
    folder = model_folder(tmp_path / "modelo", model_type, chat_template)
    spec = resolve_base_model(str(folder))
    assert spec.family.name == family and spec.context_length == 4096 and spec.parameters > 0
    assert isinstance(spec.source, LocalPathSource) and spec.source.locate() == folder


def test_a_folder_nothing_identifies_needs_chat_family(tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "phi", "phi3", "{{ messages }}")
    with pytest.raises(InvalidRequest) as caught:
        resolve_base_model(str(folder))
    assert caught.value.param == "hyperparameters.chat_family" and "phi3" in caught.value.message
    assert resolve_base_model(str(folder), chat_family="chatml").family.name == "chatml"


def test_a_missing_path_is_a_400_naming_model(tmp_path: Path) -> None:
    for name in (str(tmp_path / "nothing"), str(tmp_path / "nothing.gguf")):
        with pytest.raises(InvalidRequest) as caught:
            resolve_base_model(name)
        assert caught.value.param == "model" and "does not exist" in caught.value.message
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidRequest, match="no config.json"):
        resolve_base_model(str(tmp_path / "empty"))


def test_a_gguf_file_is_read_without_llama_cpp() -> None:
    path = CATALOG["smollm2-135m-instruct"].gguf_path()
    metadata = gguf_metadata(path)
    assert metadata["general.architecture"] == "llama" and metadata["tokenizer.ggml.tokens"] == 49152
    spec = resolve_base_model(str(path))
    assert isinstance(spec.source, GgufFileSource) and spec.family.name == "chatml"
    assert spec.context_length == 8192 and spec.gguf_path() == path


def test_a_file_that_is_not_gguf_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(InvalidRequest, match="not a readable GGUF"):
        resolve_base_model(str(fake))


def test_a_store_model_reads_its_family_from_the_store(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    store.put_bytes("models/acme/base/config.json", json.dumps({"model_type": "qwen3"}).encode())
    store.put_bytes("models/acme/base/tokenizer_config.json",
                    json.dumps({"chat_template": FAMILIES["qwen3"].stock_template}).encode())
    spec = resolve_base_model("store://models/acme/base", store=store)
    assert isinstance(spec.source, StoreSource) and spec.source.prefix == "models/acme/base"
    assert spec.family.name == "qwen3"
    with pytest.raises(InvalidRequest) as caught:
        resolve_base_model("store://models/acme/base")  # no store to read it from
    assert caught.value.param == "hyperparameters.chat_family"
    with pytest.raises(InvalidRequest) as caught:
        resolve_base_model("store://models/acme/none", store=store)
    assert caught.value.param == "model"
    with pytest.raises(InvalidRequest):
        resolve_base_model("store://models/../secrets")
