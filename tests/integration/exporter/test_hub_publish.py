"""Publishing to the Hub with the real ``huggingface_hub`` client against the local Hub (tests/support/hub_server.py).

Each refusal (no token, an unknown one, a read-only one, a fine-grained one without write on the namespace, a
namespace the user is not in) has its own message, uploads nothing, and never shows the token; a write token
publishes byte-identical files, the card and a private repository, in the user's namespace or an organization's;
a retry after a failure uploads only what had not reached the Hub.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import HfApi, constants
from huggingface_hub.errors import HfHubHTTPError
from pydantic import SecretStr

from afina.core.artifacts import AdapterManifest, HubPublication, HubTarget, LoraSettings
from afina.core.catalog import CATALOG
from afina.exporter.hub import HubUnavailable, PublishRefused, check_hub_access, publish_to_hub
from afina.exporter.model_card import render_model_card
from tests.support import hub_server as hub_server_module
from tests.support.hub_server import HubServer
from tests.support.servers import free_port

hub_server = hub_server_module.hub_server

CARD = "---\nlicense: llama3.2\nlibrary_name: gguf\ntags:\n- afina\n---\n\n# pt-assistant\n"
UPLOAD_ROUTES = {"create", "preupload", "batch", "upload", "upload_part", "complete", "verify", "commit"}


@dataclass
class Tokens:
    write: str
    read: str
    fine_grained_user_only: str  # repo.write on ana, read on aeon-labs
    unknown: str


@pytest.fixture
def tokens(hub_server: HubServer) -> Tokens:
    state = hub_server.state
    state.add_user("ana", orgs={"aeon-labs": "write"})
    state.add_user("bruno", orgs={"acme": "admin"})
    return Tokens(write=state.issue_token("ana", "write", name="publish"),
                  read=state.issue_token("ana", "read", name="laptop"),
                  fine_grained_user_only=state.issue_token("ana", "fineGrained", write_to=("ana",),
                                                           read_from=("aeon-labs",), name="ci"),
                  unknown="hf_" + "Q" * 34)


@pytest.fixture
def export_files(tmp_path: Path) -> list[tuple[str, Path]]:
    """What the exporter publishes: two GGUFs and the adapter (binary, so LFS), the Modelfile and config (text)."""
    folder = tmp_path / "export"
    (folder / "adapter").mkdir(parents=True)
    contents = {
        "model-q4_k_m.gguf": b"GGUF\x03\x00\x00\x00" + os.urandom(2_000_000),
        "model-q8_0.gguf": b"GGUF\x03\x00\x00\x00" + os.urandom(3_100_000),
        "adapter/adapter_model.safetensors": len(b"{}").to_bytes(8, "little") + b"{}" + os.urandom(300_000),
        "adapter/adapter_config.json": json.dumps({"r": 16, "lora_alpha": 32, "peft_type": "LORA"}).encode(),
        "Modelfile": b'FROM ./model-q4_k_m.gguf\nPARAMETER stop "<|eot_id|>"\n',
    }
    files = []
    for path, content in contents.items():
        (folder / path).write_bytes(content)
        files.append((path, folder / path))
    return files


def publish(hub: HubServer, token: str | None, repo: str, files: list[tuple[str, Path]],
            progress: Callable[[str], None] | None = None, **target: object) -> HubPublication:
    return publish_to_hub(endpoint=hub.url, token=SecretStr(token) if token is not None else None,
                          target=HubTarget(repo=repo, **target), files=files, model_card=CARD,
                          commit_message="Publish pt-assistant (ftjob-abc123)", progress=progress)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def lfs_oids(files: list[tuple[str, Path]]) -> set[str]:
    return {sha256(local) for path, local in files if not path.endswith(("Modelfile", ".json"))}


def test_a_write_token_publishes_every_file_and_the_card_privately(hub_server: HubServer, tokens: Tokens,
                                                                   export_files: list[tuple[str, Path]]) -> None:
    state = hub_server.state
    state.multipart_threshold, state.multipart_chunk_size = 2_500_000, 1_000_000  # q8_0 goes up in 4 parts
    flags = constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_XET

    progress: list[str] = []
    publication = publish(hub_server, tokens.write, "pt-assistant", export_files, progress=progress.append)

    assert publication.status == "registered", publication.error
    assert progress[0] == "model-q4_k_m.gguf (2.0 MB) is ready in ana/pt-assistant (1/6; visible once committed)"
    assert len(progress) == 6 and progress[-1].startswith("README.md")
    repo = state.repo("ana/pt-assistant")
    assert (publication.repo, publication.private, repo.private) == ("ana/pt-assistant", True, True)
    assert publication.commit == repo.head and publication.url == f"{hub_server.url}/ana/pt-assistant"
    assert publication.files == [path for path, _ in export_files] + ["README.md"]
    for path, local in export_files:
        assert repo.read(path) == local.read_bytes(), path
    assert repo.read("README.md").decode() == CARD
    # binary files went through LFS, text files into the commit itself
    assert {path for path, stored in repo.files.items() if stored.lfs_oid} == {
        "model-q4_k_m.gguf", "model-q8_0.gguf", "adapter/adapter_model.safetensors"}
    assert {oid for _, oid in state.lfs_uploads} == lfs_oids(export_files)
    seen = state.routes_seen()
    assert seen[0] == "whoami" and seen[-1] == "commit" and seen.count("commit") == 1
    assert {"upload", "upload_part", "complete", "verify", "validate_yaml"} <= set(seen)
    assert state.unhandled == []  # plain LFS: no Xet endpoint was asked for
    assert (constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_XET) == flags  # the client's switches restored


def test_the_rendered_card_names_the_repository_the_token_resolved(hub_server: HubServer, tokens: Tokens,
                                                                   export_files: list[tuple[str, Path]]) -> None:
    """The namespace is known only after whoami: the card is rendered for the resolved ``ana/pt-assistant``, and
    the Hub's metadata check (``/api/validate-yaml``, called by the client for a README) accepts it."""
    base = CATALOG["llama-3.2-1b-instruct"]
    adapter = AdapterManifest.build(job_id="ftjob-abc123", base_model=base.id, hf_repo=base.hf_repo,
                                    chat_family=base.family.name, global_step=10, trained_tokens=5000,
                                    lora=LoraSettings(r=8, alpha=16, target_modules=("q_proj", "v_proj")), files=())

    def card(repo_id: str) -> str:
        return render_model_card(repo_id=repo_id, base=base, adapter=adapter,
                                 gguf_files={"q4_k_m": "model-q4_k_m.gguf", "q8_0": "model-q8_0.gguf"},
                                 served_variant="q4_k_m", adapter_dir="adapter",
                                 modelfile=export_files[-1][1].read_text(), fidelity={"prompts": 16},
                                 license_id="llama3.2")

    publication = publish_to_hub(endpoint=hub_server.url, token=SecretStr(tokens.write),
                                 target=HubTarget(repo="pt-assistant"), files=export_files, model_card=card,
                                 commit_message="Publish pt-assistant")

    assert publication.status == "registered", publication.error
    readme = hub_server.state.repo("ana/pt-assistant").read("README.md").decode()
    assert readme == card("ana/pt-assistant")
    assert "hf download ana/pt-assistant model-q4_k_m.gguf Modelfile" in readme
    assert "validate_yaml" in hub_server.state.routes_seen()


def test_publishing_the_same_files_again_uploads_and_commits_nothing(hub_server: HubServer, tokens: Tokens,
                                                                     export_files: list[tuple[str, Path]]) -> None:
    first = publish(hub_server, tokens.write, "pt-assistant", export_files)
    uploads, commits = len(hub_server.state.lfs_uploads), len(hub_server.state.repo("ana/pt-assistant").commits)

    again = publish(hub_server, tokens.write, "pt-assistant", export_files)

    assert again.status == "registered" and again.commit == first.commit
    assert len(hub_server.state.lfs_uploads) == uploads
    assert len(hub_server.state.repo("ana/pt-assistant").commits) == commits


def test_an_organization_the_user_can_write_in_gets_the_model(hub_server: HubServer, tokens: Tokens,
                                                              export_files: list[tuple[str, Path]]) -> None:
    publication = publish(hub_server, tokens.write, "aeon-labs/pt-assistant", export_files, private=False)

    assert publication.status == "registered", publication.error
    repo = hub_server.state.repo("aeon-labs/pt-assistant")
    assert (repo.private, repo.creator, publication.private) == (False, "ana", False)
    assert repo.read("model-q4_k_m.gguf") == export_files[0][1].read_bytes()


REFUSALS = {
    "no token": (None, "pt-assistant", "no Hub token: set HF_TOKEN to a write token"),
    "unknown token": ("unknown", "pt-assistant", "does not accept this token (401: unknown, revoked or expired); "
                                                 "create a write token at {url}/settings/tokens"),
    "read-only token": ("read", "pt-assistant", "this token can only read; create a write token at "
                                                "{url}/settings/tokens (the token 'laptop' of user ana"),
    "fine-grained token without write on the namespace": (
        "fine_grained_user_only", "aeon-labs/pt-assistant",
        "the fine-grained token 'ci' of user ana has no write access to 'aeon-labs' (it lacks repo.write there)"),
    "namespace of another organization": (
        "write", "acme/pt-assistant", "user ana cannot write to the namespace 'acme': it is neither ana's own nor an "
                                      "organization ana belongs to (ana's organizations: aeon-labs)"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_token_that_cannot_publish_is_refused_before_any_upload(
        case: str, hub_server: HubServer, tokens: Tokens, export_files: list[tuple[str, Path]],
        caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> None:
    kind, repo, expected = REFUSALS[case]
    token = getattr(tokens, kind) if kind is not None else None
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")

    publication = publish(hub_server, token, repo, export_files)

    assert publication.status == "failed" and publication.commit is None and publication.files == []
    assert publication.error is not None and expected.format(url=hub_server.url) in publication.error
    seen = hub_server.state.routes_seen()
    assert seen == ([] if token is None else ["whoami"])  # nothing created, nothing uploaded
    assert hub_server.state.repos == {} and hub_server.state.lfs_uploads == []
    if token is not None:
        output = capfd.readouterr()
        logged = caplog.text + "".join(str(record.args) for record in caplog.records) + output.out + output.err
        assert token not in publication.model_dump_json() and token not in logged
        assert any(record.getMessage() == "hub.publish_refused" for record in caplog.records)


def test_each_refusal_has_its_own_message(hub_server: HubServer, tokens: Tokens,
                                          export_files: list[tuple[str, Path]]) -> None:
    messages = {publish(hub_server, getattr(tokens, kind) if kind else None, repo, export_files).error
                for kind, repo, _ in REFUSALS.values()}
    assert len(messages) == len(REFUSALS)


def test_a_retry_after_a_failed_commit_uploads_no_lfs_object_again(hub_server: HubServer, tokens: Tokens,
                                                                   export_files: list[tuple[str, Path]],
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    state = hub_server.state
    state.fail_next("commit", 500, message="Internal Error - We're working hard to fix this as soon as possible!")
    caplog.set_level(logging.DEBUG)

    failed = publish(hub_server, tokens.write, "pt-assistant", export_files)

    assert failed.status == "failed" and failed.repo == "ana/pt-assistant"
    assert f"the Hub at {hub_server.url} answered 500 while committing to ana/pt-assistant" in (failed.error or "")
    assert tokens.write not in (failed.error or "") and tokens.write not in caplog.text
    repo = state.repo("ana/pt-assistant")
    assert "model-q4_k_m.gguf" not in repo.files  # nothing half-visible: the commit is all or nothing
    uploaded = list(state.lfs_uploads)
    assert {oid for _, oid in uploaded} == lfs_oids(export_files)
    routes_before = len(state.requests)

    retried = publish(hub_server, tokens.write, "pt-assistant", export_files)

    assert retried.status == "registered", retried.error
    assert state.lfs_uploads == uploaded  # the batch API said every object was there
    assert not {"upload", "upload_part", "complete"} & {r.route for r in state.requests[routes_before:]}
    for path, local in export_files:
        assert repo.read(path) == local.read_bytes(), path


def test_a_retry_after_a_failed_upload_sends_only_what_did_not_arrive(hub_server: HubServer, tokens: Tokens,
                                                                      export_files: list[tuple[str, Path]]) -> None:
    state = hub_server.state
    # the second LFS object's presigned upload is refused (an expired URL: not retried by the client)
    state.fail_next("upload", 403, skip=1, message="Request has expired")

    failed = publish(hub_server, tokens.write, "pt-assistant", export_files)

    assert failed.status == "failed"
    assert "answered 403 while uploading model-q8_0.gguf to ana/pt-assistant" in (failed.error or ""), failed.error
    assert [oid for _, oid in state.lfs_uploads] == [sha256(export_files[0][1])]

    retried = publish(hub_server, tokens.write, "pt-assistant", export_files)

    assert retried.status == "registered", retried.error
    oids = [oid for _, oid in state.lfs_uploads]
    assert sorted(oids) == sorted(lfs_oids(export_files))  # each object uploaded exactly once over both attempts
    assert state.repo("ana/pt-assistant").read("model-q8_0.gguf") == export_files[1][1].read_bytes()


def test_a_private_publication_never_goes_into_an_existing_public_repository(
        hub_server: HubServer, tokens: Tokens, export_files: list[tuple[str, Path]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    HfApi(endpoint=hub_server.url, token=tokens.write).create_repo("ana/pt-assistant", private=False)
    seen_before = len(hub_server.state.requests)

    publication = publish(hub_server, tokens.write, "pt-assistant", export_files)

    assert publication.status == "failed"
    assert "ana/pt-assistant already exists and is public, but this publication is private" in (publication.error or "")
    assert not {"preupload", "batch", "upload", "commit"} & {r.route for r in hub_server.state.requests[seen_before:]}
    assert set(hub_server.state.repo("ana/pt-assistant").files) == {".gitattributes"}


def test_a_stop_raised_by_the_progress_callback_stops_the_publication(hub_server: HubServer, tokens: Tokens,
                                                                     export_files: list[tuple[str, Path]]) -> None:
    """A cancelled job's ``check_continue`` raises from the progress callback: it is not a failed publication."""
    class Cancelled(Exception):
        pass

    def stop(_line: str) -> None:
        raise Cancelled

    flags = constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_XET
    with pytest.raises(Cancelled):
        publish(hub_server, tokens.write, "pt-assistant", export_files, progress=stop)
    assert "commit" not in hub_server.state.routes_seen()
    assert (constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_XET) == flags


def test_the_api_can_check_a_token_before_it_queues_a_publication(hub_server: HubServer, tokens: Tokens) -> None:
    identity = check_hub_access(endpoint=hub_server.url, token=SecretStr(tokens.write),
                                target=HubTarget(repo="aeon-labs/pt-assistant"))
    assert (identity.user, identity.namespace) == ("ana", "aeon-labs")
    with pytest.raises(PublishRefused) as refused:
        check_hub_access(endpoint=hub_server.url, token=SecretStr(tokens.read), target=HubTarget(repo="x"))
    assert refused.value.code == "hub_token_read_only" and tokens.read not in refused.value.message
    with pytest.raises(HubUnavailable):
        check_hub_access(endpoint=f"http://127.0.0.1:{free_port()}", token=SecretStr(tokens.write),
                         target=HubTarget(repo="x"))
    assert hub_server.state.routes_seen() == ["whoami", "whoami"]


def test_a_hub_that_cannot_be_reached_is_a_failed_publication(tokens: Tokens,
                                                              export_files: list[tuple[str, Path]]) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    publication = publish_to_hub(endpoint=endpoint, token=SecretStr(tokens.write), target=HubTarget(repo="x"),
                                 files=export_files, model_card=CARD, commit_message="x")
    assert publication.status == "failed"
    assert publication.error is not None and publication.error.startswith(f"could not reach the Hub at {endpoint}")


def test_the_local_hub_refuses_what_the_hub_refuses(hub_server: HubServer, tokens: Tokens, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The server is not permissive: the client itself, without afina's checks, gets the Hub's refusals."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    url = hub_server.url
    with pytest.raises(HfHubHTTPError, match="Invalid user token"):
        HfApi(endpoint=url, token=tokens.unknown).whoami()
    with pytest.raises(HfHubHTTPError) as read_only:
        HfApi(endpoint=url, token=tokens.read).create_repo("ana/x")
    assert read_only.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as elsewhere:
        HfApi(endpoint=url, token=tokens.write).create_repo("acme/x")
    assert elsewhere.value.response.status_code == 403
    api = HfApi(endpoint=url, token=tokens.write)
    api.create_repo("ana/x", private=True)
    with pytest.raises(HfHubHTTPError) as exists:
        api.create_repo("ana/x")
    assert exists.value.response.status_code == 409
    assert api.create_repo("ana/x", exist_ok=True).repo_id == "ana/x"
    with pytest.raises(HfHubHTTPError) as fine_grained:  # repo.write on ana only
        HfApi(endpoint=url, token=tokens.fine_grained_user_only).create_repo("aeon-labs/x")
    assert fine_grained.value.response.status_code == 403

    auth = {"authorization": f"Bearer {tokens.write}"}
    never_uploaded = {"key": "lfsFile", "value": {"path": "model.gguf", "algo": "sha256", "oid": "ab" * 32,
                                                  "size": 10}}
    body = "\n".join(json.dumps(line) for line in [{"key": "header", "value": {"summary": "x"}}, never_uploaded])
    refused = httpx2.post(f"{url}/api/models/ana/x/commit/main", content=body, headers=auth)
    assert refused.status_code == 400 and "LFS pointer pointed to a file that does not exist" in refused.text
    binary = {"key": "file", "value": {"path": "w.bin", "encoding": "base64",
                                       "content": base64.b64encode(b"\0\1\2").decode()}}
    body = "\n".join(json.dumps(line) for line in [{"key": "header", "value": {"summary": "x"}}, binary])
    assert httpx2.post(f"{url}/api/models/ana/x/commit/main", content=body, headers=auth).status_code == 400

    content = os.urandom(1000)
    batch = httpx2.post(f"{url}/ana/x.git/info/lfs/objects/batch", headers=auth, json={
        "operation": "upload", "transfers": ["basic"], "hash_algo": "sha256",
        "objects": [{"oid": hashlib.sha256(content).hexdigest(), "size": len(content)}]}).json()
    href = batch["objects"][0]["actions"]["upload"]["href"]
    assert httpx2.put(href, content=os.urandom(1000)).status_code == 400  # not the announced bytes
    assert hub_server.state.repo("ana/x").lfs_objects == {}
    assert httpx2.post(f"{url}/api/models/ana/x/preupload/main", json={"files": []}).status_code == 401
    assert httpx2.get(f"{url}/api/models/ana/x").status_code == 401  # private: hidden from the anonymous
    assert httpx2.get(f"{url}/api/models/ana/x", headers={
        "authorization": f"Bearer {hub_server.state.issue_token('bruno', 'write')}"}).status_code == 404
