"""``/v1/files`` through the official client: streamed uploads, checks, tenancy, deletion."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from sqlalchemy import select

from afina.core.db.models import File
from tests.integration.gateway.conftest import Gateway, chat_jsonl


def _rows(gateway: Gateway, tenant: str) -> list[File]:
    with gateway.runtime.db.session() as session:
        return list(session.scalars(select(File).where(File.tenant_id == tenant)))


def test_upload_list_retrieve_content_delete(gateway: Gateway, acme) -> None:  # noqa: ANN001
    content = chat_jsonl(20)
    created = acme.files.create(file=("my data.jsonl", content), purpose="fine-tune")
    assert created.id.startswith("file-")
    # "uploaded" until the ingest worker processes it (no worker runs in this module)
    assert (created.object, created.bytes, created.purpose, created.status) == ("file", len(content), "fine-tune",
                                                                                "uploaded")
    assert created.filename == "my data.jsonl"

    assert created.id in [item.id for item in acme.files.list()]
    assert acme.files.retrieve(created.id).bytes == len(content)
    assert acme.files.content(created.id).read() == content

    row = next(row for row in _rows(gateway, "acme") if row.id == created.id)
    assert row.object_key.startswith(f"files/acme/{created.id}/")
    import hashlib

    assert row.sha256 == hashlib.sha256(content).hexdigest()
    assert gateway.runtime.store.get_bytes(row.object_key) == content

    deleted = acme.files.delete(created.id)
    assert (deleted.id, deleted.deleted) == (created.id, True)
    assert not gateway.runtime.store.exists(row.object_key)
    with pytest.raises(openai.NotFoundError):
        acme.files.retrieve(created.id)


def test_multi_megabyte_upload_streams_through(gateway: Gateway, acme) -> None:  # noqa: ANN001
    line = json.dumps({"messages": [{"role": "user", "content": "x" * 900},
                                    {"role": "assistant", "content": "y" * 900}]}) + "\n"
    content = (line * 2000).encode()  # ~3.6 MB, several flushes of the spooler
    created = acme.files.create(file=("big.jsonl", content), purpose="fine-tune")
    assert created.bytes == len(content)
    assert acme.files.content(created.id).read() == content


@pytest.mark.parametrize(("name", "content"), [("data.csv", b"this is not json\n"), ("data.json", b"[1, 2, 3]\n"),
                                             ("data.jsonl", b"\n\n"), ("data.csv", b"col1,col2\n"),
                                             ("data.bin", bytes(range(256)) * 8)])
def test_no_dataset_upload_is_400_and_stores_nothing(gateway: Gateway, name: str, content: bytes) -> None:
    client = gateway.client("globex")  # a tenant with no files, so 'nothing stored' is easy to see
    before = gateway.runtime.store.list("files/globex/")
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=(name, content), purpose="fine-tune")
    assert caught.value.status_code == 400
    assert caught.value.body["param"] == "file"
    assert gateway.runtime.store.list("files/globex/") == before
    assert _rows(gateway, "globex") == []
    assert list((gateway.runtime.settings.resolved_work_dir / "uploads").glob("*")) == []


def test_oversize_upload_is_413_and_stores_nothing(gateway: Gateway, acme) -> None:  # noqa: ANN001
    limit = gateway.runtime.settings.max_upload_bytes
    line = b'{"messages": [{"role": "user", "content": "' + b"z" * 1000 + b'"}]}\n'
    content = line * (limit // len(line) + 2)
    rows_before = len(_rows(gateway, "acme"))
    with pytest.raises(openai.APIStatusError) as caught:
        acme.files.create(file=("huge.jsonl", content), purpose="fine-tune")
    assert caught.value.status_code == 413
    assert caught.value.body["code"] == "file_too_large"
    assert len(_rows(gateway, "acme")) == rows_before
    assert list((gateway.runtime.settings.resolved_work_dir / "uploads").glob("*")) == []


def test_oversize_by_declared_length_is_refused_before_reading(gateway: Gateway) -> None:
    """The body is never sent: the declared Content-Length alone earns the 413."""
    import socket

    limit = gateway.runtime.settings.max_upload_bytes
    head = (f"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {gateway.keys['acme']}\r\n"
            f"Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: {limit * 2}\r\n\r\n--xyz\r\n")
    with socket.create_connection(("127.0.0.1", gateway.served.port), timeout=10) as sock:
        sock.sendall(head.encode())
        status_line = sock.recv(4096).split(b"\r\n", 1)[0]
    assert status_line.split()[1] == b"413"


def test_purpose_must_be_fine_tune(gateway: Gateway, acme) -> None:  # noqa: ANN001
    with pytest.raises(openai.BadRequestError) as caught:
        acme.files.create(file=("train.jsonl", chat_jsonl()), purpose="assistants")
    assert caught.value.body["param"] == "purpose"
    response = httpx.post(f"{gateway.url}/v1/files", files={"file": ("a.jsonl", chat_jsonl())},
                          headers={"Authorization": f"Bearer {gateway.keys['acme']}"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "purpose"


def test_missing_file_field_is_400(gateway: Gateway) -> None:
    response = httpx.post(f"{gateway.url}/v1/files", data={"purpose": "fine-tune"},
                          files={"other": ("x", b"y")}, headers={"Authorization": f"Bearer {gateway.keys['acme']}"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "file"
    response = httpx.post(f"{gateway.url}/v1/files", json={"purpose": "fine-tune"},
                          headers={"Authorization": f"Bearer {gateway.keys['acme']}"})
    assert response.status_code == 400


def test_another_tenants_file_is_404(gateway: Gateway, acme, globex, upload) -> None:  # noqa: ANN001
    created = upload()
    with pytest.raises(openai.NotFoundError):
        globex.files.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        globex.files.content(created.id)
    with pytest.raises(openai.NotFoundError):
        globex.files.delete(created.id)
    assert created.id not in [item.id for item in globex.files.list()]
    assert acme.files.retrieve(created.id).id == created.id


def test_list_pages_with_after_and_limit(acme, upload) -> None:  # noqa: ANN001
    ids = {upload().id for _ in range(3)}
    first = acme.files.list(limit=2, order="desc")
    assert len(first.data) == 2 and first.has_more
    everything = [item.id for item in acme.files.list(limit=2)]
    assert ids <= set(everything) and len(everything) == len(set(everything))
