"""Local paths as base models: refused unless under an operator-allowed directory, with one answer that says
nothing about the path (existing, missing, unreadable, a link out); store models only the tenant's own."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from afina.core.catalog import CATALOG, LocalPathSource, check_model_access, resolve_base_model
from afina.core.catalog.access import LOCAL_PATH_REFUSED_CODE, allowed_local_path
from afina.core.errors import InvalidRequest


def model_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({
        "model_type": "qwen3", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
        "vocab_size": 1000, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096}))
    return path


def refusal(name: str, allowed: list[Path]) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        resolve_base_model(name, allowed_model_dirs=allowed)
    return caught.value


def shape(error: InvalidRequest, name: str) -> tuple[str, str | None, str | None, int]:
    """What a caller sees, with the name it sent taken out."""
    return error.message.replace(repr(name), "<name>"), error.param, error.code, error.http_status


@pytest.fixture
def outside(tmp_path: Path) -> dict[str, str]:
    """Paths outside any allowed directory: one that exists, one that does not, ones that cannot be resolved."""
    real = model_folder(tmp_path / "secret-models" / "other-tenant-export")
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    return {"existing": str(real), "missing": str(tmp_path / "nothing-here"), "file_uri": f"file://{real}",
            "gguf": str(tmp_path / "nothing.gguf"), "symlink_loop": str(loop / "x"),
            "nul_byte": str(tmp_path / "a\x00b"), "relative": "../../etc", "home": "~/models/x",
            "other_user": "~root/models/x"}


@pytest.mark.parametrize("allowed", [[], ["allowed"]], ids=["off", "elsewhere"])
def test_every_path_outside_the_allowed_dirs_gets_the_same_answer(tmp_path: Path, outside: dict[str, str],
                                                                  allowed: list[str]) -> None:
    dirs = [(tmp_path / name) for name in allowed]
    for folder in dirs:
        folder.mkdir()
    shapes = {kind: shape(refusal(name, dirs), name) for kind, name in outside.items()}
    assert len(set(shapes.values())) == 1, shapes
    message, param, code, status = next(iter(shapes.values()))
    assert (param, code, status) == ("model", LOCAL_PATH_REFUSED_CODE, 400)
    assert str(tmp_path) not in message and "exist" not in message


def test_a_folder_inside_an_allowed_dir_resolves(tmp_path: Path) -> None:
    root = tmp_path / "models"
    folder = model_folder(root / "qwen-suporte")
    for name in (str(folder), f"file://{folder}", str(root / "." / "qwen-suporte")):
        spec = resolve_base_model(name, allowed_model_dirs=[root])
        assert isinstance(spec.source, LocalPathSource) and spec.source.path == folder.resolve()
    # the allowed dir itself may be named through a link to it (resolved on both sides)
    link_to_root = tmp_path / "models-link"
    link_to_root.symlink_to(root)
    assert resolve_base_model(str(folder), allowed_model_dirs=[link_to_root]).family.name == "qwen3"
    # a missing folder inside the allowed dir is the operator's own to report
    with pytest.raises(InvalidRequest, match="does not exist") as caught:
        resolve_base_model(str(root / "missing"), allowed_model_dirs=[root])
    assert str(root) not in caught.value.message.replace(repr(str(root / "missing")), "")


def test_dot_dot_and_symlinks_out_of_an_allowed_dir_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "models"
    root.mkdir()
    secret = model_folder(tmp_path / "private" / "export")
    (root / "escape").symlink_to(secret)
    for name in (str(root / ".." / "private" / "export"), str(root / "escape"), f"file://{root}/../private/export"):
        error = refusal(name, [root])
        assert error.code == LOCAL_PATH_REFUSED_CODE, name
    # a prefix that is not a parent: /x/models-evil is not inside /x/models
    model_folder(tmp_path / "models-evil")
    assert refusal(str(tmp_path / "models-evil"), [root]).code == LOCAL_PATH_REFUSED_CODE


def test_the_refusal_reads_nothing_when_no_dir_is_allowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_filesystem(*args: object, **kwargs: object) -> None:
        raise AssertionError("the filesystem was consulted")

    monkeypatch.setattr(Path, "resolve", no_filesystem)
    monkeypatch.setattr(os, "stat", no_filesystem)
    with pytest.raises(InvalidRequest) as caught:
        allowed_local_path(str(tmp_path), [])
    assert caught.value.code == LOCAL_PATH_REFUSED_CODE


def test_catalog_models_and_the_packaged_smollm2_are_not_user_paths() -> None:
    # the CLI and demo name the catalog id; its weights come from an installed package (operator side)
    spec = resolve_base_model("smollm2-135m-instruct", allowed_model_dirs=[])
    assert spec is CATALOG["smollm2-135m-instruct"] and spec.gguf_path().is_file()
    check_model_access("smollm2-135m-instruct", "acme", [])
    check_model_access("HuggingFaceTB/SmolLM2-135M-Instruct", "acme", [])


def test_store_models_are_the_tenants_own_or_the_operators() -> None:
    for name in ("store://models/acme/base", "store://base-models/qwen", "store://models/acme/x/model.gguf"):
        check_model_access(name, "acme", [])
    for name in ("store://models/globex/base", "store://models/acme", "store://files/acme/f/x",
                 "store://models/acme/../globex/base", "store://models//acme/x", "store://base-models/"):
        with pytest.raises(InvalidRequest, match="must be under store://models/acme/"):
            check_model_access(name, "acme", [])


def test_a_path_is_checked_by_check_model_access_too(tmp_path: Path) -> None:
    root = tmp_path / "models"
    folder = model_folder(root / "m")
    check_model_access(str(folder), "acme", [root])
    with pytest.raises(InvalidRequest) as caught:
        check_model_access(str(folder), "acme", [])
    assert caught.value.code == LOCAL_PATH_REFUSED_CODE
