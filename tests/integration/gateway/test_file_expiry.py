"""File expiry as OpenAI's: ``expires_after`` on an upload and ``output_expires_after`` on a batch give files an
``expires_at``; past it a file is gone from list, retrieve and content at once, and the sweeper deletes its row
and its bytes from the store (a real SeaweedFS) once no active job needs it; two sweepers at once delete each
file once, and a store failure keeps the row for the next sweep. The registry is PostgreSQL (and SQLite for the
concurrent sweepers); the clock is moved by writing a past ``expires_at`` on the database's clock, never by
sleeping."""

from __future__ import annotations

import json
import secrets
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

import openai
import pytest
from pydantic import SecretStr
from sqlalchemy import select, update

from afina.core.db import repository as repo
from afina.core.db.clock import database_time
from afina.core.db.models import File
from afina.core.file_expiry import sweep_expired_files
from tests.integration.gateway.conftest import Gateway, chat_jsonl, make_settings, start_gateway
from tests.support.servers import SeaweedS3, fresh_postgres_database

pytestmark = pytest.mark.integration
CHAT = "/v1/chat/completions"
HOUR, THIRTY_DAYS = 3600, 30 * 24 * 3600


def s3_settings(home: Any, seaweedfs: SeaweedS3, database_url: str) -> Any:
    return make_settings(home, database_url=database_url, store_backend="s3", s3_endpoint=seaweedfs.endpoint,
                         s3_access_key=SecretStr(seaweedfs.access_key), s3_secret_key=SecretStr(seaweedfs.secret_key),
                         s3_bucket=f"expiry-{secrets.token_hex(4)}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, seaweedfs: SeaweedS3, postgres_admin_url: str) -> Iterator[Gateway]:
    """A gateway over PostgreSQL and SeaweedFS (no model is loaded: batch answers are stubbed)."""
    with fresh_postgres_database(postgres_admin_url) as database_url:
        gateway = start_gateway(s3_settings(tmp_path_factory.mktemp("expiry-home"), seaweedfs, database_url))
        try:
            yield gateway
        finally:
            gateway.served.stop()
            gateway.runtime.db.dispose()


@pytest.fixture
def acme(stack: Gateway) -> Any:
    return stack.client("acme")


def batch_line(custom_id: str) -> bytes:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": CHAT,
                       "body": {"model": "any", "messages": [{"role": "user", "content": "Hi."}]}}).encode()


def row_of(gateway: Gateway, file_id: str) -> File | None:
    with gateway.runtime.db.session() as session:
        return session.get(File, file_id)


def expire_now(gateway: Gateway, *file_ids: str) -> None:
    """Move the files' expiry to a second ago, on the database's clock (what an hour's wait would do)."""
    with gateway.runtime.db.session() as session:
        past = int(database_time(session)) - 1
        session.execute(update(File).where(File.id.in_(file_ids)).values(expires_at=past))


@pytest.fixture
def answered(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch requests answered without a model: the expiry of the files is under test, not the serving."""
    from afina.gateway.batches import runner

    async def answer(_dispatcher: Any, _caller: Any, _endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        return {"id": "chatcmpl-stub", "object": "chat.completion", "model": body["model"], "choices": [],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    monkeypatch.setattr(runner, "answer", answer)


def run_batch_worker(gateway: Gateway, batch_id: str) -> str:
    from afina.core.queue.jobs import run_stage
    from afina.gateway.batches.runner import run_batch

    return run_stage(gateway.runtime, batch_id, "batch", run_batch)


def test_an_upload_with_expires_after_gets_expires_at(stack: Gateway, acme: Any) -> None:
    created = acme.files.create(file=("requests.jsonl", batch_line("a") + b"\n"), purpose="batch",
                                expires_after={"anchor": "created_at", "seconds": HOUR})
    assert created.expires_at == created.created_at + HOUR
    with stack.runtime.db.session() as session:  # created_at (so expires_at) is the database's clock
        assert abs(created.created_at - database_time(session)) < 60
    assert acme.files.retrieve(created.id).expires_at == created.expires_at
    assert next(item for item in acme.files.list() if item.id == created.id).expires_at == created.expires_at
    week = acme.files.create(file=("train.jsonl", chat_jsonl()), purpose="fine-tune",
                             expires_after={"anchor": "created_at", "seconds": 7 * 24 * HOUR})
    assert week.expires_at == week.created_at + 7 * 24 * HOUR
    # OpenAI's defaults: a batch file expires after 30 days, any other file is kept until deleted
    batch_default = acme.files.create(file=("requests.jsonl", batch_line("a") + b"\n"), purpose="batch")
    assert batch_default.expires_at == batch_default.created_at + THIRTY_DAYS
    assert acme.files.create(file=("train.jsonl", chat_jsonl()), purpose="fine-tune").expires_at is None


@pytest.mark.parametrize(("expires_after", "param"), [
    ({"anchor": "created_at", "seconds": HOUR - 1}, "expires_after.seconds"),
    ({"anchor": "created_at", "seconds": THIRTY_DAYS + 1}, "expires_after.seconds"),
    ({"anchor": "created_at", "seconds": "an hour"}, "expires_after.seconds"),
    ({"anchor": "created_at", "seconds": 3600.5}, "expires_after.seconds"),
    ({"anchor": "created_at"}, "expires_after.seconds"),
    ({"anchor": "last_active_at", "seconds": HOUR}, "expires_after.anchor"),
    ({"seconds": HOUR}, "expires_after.anchor"),
    ({"anchor": "created_at", "seconds": HOUR, "days": 1}, "expires_after.days"),
])
def test_a_bad_expires_after_is_400_naming_the_param_and_stores_nothing(stack: Gateway, acme: Any,
                                                                        expires_after: dict[str, Any],
                                                                        param: str) -> None:
    before = len(stack.runtime.store.list("files/acme/"))
    with pytest.raises(openai.BadRequestError) as caught:
        acme.files.create(file=("requests.jsonl", batch_line("a") + b"\n"), purpose="batch",
                          expires_after=expires_after)  # type: ignore[arg-type]
    assert caught.value.body["param"] == param, caught.value.body
    assert len(stack.runtime.store.list("files/acme/")) == before


def test_a_batchs_output_and_error_files_carry_output_expires_after(stack: Gateway, acme: Any,
                                                                    answered: None) -> None:
    content = batch_line("good") + b"\n{not json\n"
    input_file = acme.files.create(file=("requests.jsonl", content), purpose="batch")
    batch = acme.batches.create(input_file_id=input_file.id, endpoint=CHAT, completion_window="24h",
                                output_expires_after={"anchor": "created_at", "seconds": 2 * HOUR})
    assert run_batch_worker(stack, batch.id) == "done"
    done = acme.batches.retrieve(batch.id)
    assert done.status == "completed" and done.output_file_id and done.error_file_id
    for file_id in (done.output_file_id, done.error_file_id):
        made = acme.files.retrieve(file_id)
        assert made.purpose == "batch_output" and made.expires_at == made.created_at + 2 * HOUR
    # without output_expires_after they are kept until deleted
    plain = acme.batches.create(input_file_id=input_file.id, endpoint=CHAT, completion_window="24h")
    assert run_batch_worker(stack, plain.id) == "done"
    kept = acme.batches.retrieve(plain.id)
    assert acme.files.retrieve(kept.output_file_id).expires_at is None
    assert acme.files.retrieve(kept.error_file_id).expires_at is None


def test_an_expired_file_is_gone_and_the_sweeper_deletes_its_bytes(stack: Gateway, acme: Any) -> None:
    created = acme.files.create(file=("requests.jsonl", batch_line("a") + b"\n"), purpose="batch",
                                expires_after={"anchor": "created_at", "seconds": HOUR})
    object_key = row_of(stack, created.id).object_key
    assert stack.runtime.store.exists(object_key)
    assert sweep_expired_files(stack.runtime) == []  # not expired yet: kept

    expire_now(stack, created.id)
    assert created.id not in [item.id for item in acme.files.list()]
    assert created.id not in [item.id for item in acme.files.list(purpose="batch")]
    for call in (acme.files.retrieve, acme.files.content, acme.files.delete):
        with pytest.raises(openai.NotFoundError):
            call(created.id)
    with pytest.raises(openai.NotFoundError):  # nor can a new batch name it
        acme.batches.create(input_file_id=created.id, endpoint=CHAT, completion_window="24h")

    assert sweep_expired_files(stack.runtime) == [created.id]
    assert row_of(stack, created.id) is None
    assert not stack.runtime.store.exists(object_key)
    assert sweep_expired_files(stack.runtime) == []


def test_a_file_an_active_batch_needs_is_kept_until_the_batch_ends(stack: Gateway, acme: Any,
                                                                   answered: None) -> None:
    input_file = acme.files.create(file=("requests.jsonl", batch_line("a") + b"\n"), purpose="batch",
                                   expires_after={"anchor": "created_at", "seconds": HOUR})
    batch = acme.batches.create(input_file_id=input_file.id, endpoint=CHAT, completion_window="24h")
    object_key = row_of(stack, input_file.id).object_key
    expire_now(stack, input_file.id)
    with pytest.raises(openai.NotFoundError):
        acme.files.retrieve(input_file.id)
    assert input_file.id not in sweep_expired_files(stack.runtime)  # the queued batch still reads it
    assert stack.runtime.store.exists(object_key)

    assert run_batch_worker(stack, batch.id) == "done"  # and its worker can
    assert acme.batches.retrieve(batch.id).request_counts.completed == 1
    assert input_file.id in sweep_expired_files(stack.runtime)  # the batch ended: now it goes
    assert not stack.runtime.store.exists(object_key)


def test_a_store_failure_keeps_the_row_for_the_next_sweep(stack: Gateway, acme: Any,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    created = acme.files.create(file=("requests.jsonl", batch_line("a") + b"\n"), purpose="batch",
                                expires_after={"anchor": "created_at", "seconds": HOUR})
    object_key = row_of(stack, created.id).object_key
    expire_now(stack, created.id)
    store = stack.runtime.store
    with monkeypatch.context() as patch:
        def unavailable(_key: str) -> None:
            raise ConnectionError("the store is down")

        patch.setattr(store, "delete", unavailable)
        assert created.id not in sweep_expired_files(stack.runtime)
    assert row_of(stack, created.id) is not None and store.exists(object_key)  # still tracked, still there
    with pytest.raises(openai.NotFoundError):  # and still gone for the API
        acme.files.retrieve(created.id)
    assert created.id in sweep_expired_files(stack.runtime)
    assert row_of(stack, created.id) is None and not store.exists(object_key)


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
def test_two_sweepers_at_once_delete_each_file_once(database: str, tmp_path: Any, seaweedfs: SeaweedS3,
                                                    postgres_admin_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from afina.core.runtime import Runtime

    fresh = fresh_postgres_database(postgres_admin_url) if database == "postgresql" \
        else nullcontext(f"sqlite:///{tmp_path / 'afina.db'}")
    with fresh as url:
        runtime = Runtime(s3_settings(tmp_path / "home", seaweedfs, url))
        try:
            with runtime.db.session() as session:
                repo.ensure_tenant(session, "acme")
                past = int(database_time(session)) - 1
                for index in range(8):
                    key = f"files/acme/file-sweep{index}/r.jsonl"
                    runtime.store.put_bytes(key, b"{}\n")
                    session.add(File(id=f"file-sweep{index}", tenant_id="acme", filename="r.jsonl", purpose="batch",
                                     bytes=3, sha256="", object_key=key, expires_at=past))
            deletes: Counter[str] = Counter()
            real_delete = runtime.store.delete
            gate = threading.Barrier(2)

            def counted_delete(key: str) -> None:
                deletes[key] += 1
                threading.Event().wait(0.05)  # the row stays claimed a while: the other sweeper meets it
                real_delete(key)

            monkeypatch.setattr(runtime.store, "delete", counted_delete)
            swept: list[list[str]] = []
            failures: list[BaseException] = []

            def sweeper() -> None:
                gate.wait()
                try:
                    swept.append(sweep_expired_files(runtime))
                except BaseException as exc:  # noqa: BLE001 - reported below
                    failures.append(exc)

            threads = [threading.Thread(target=sweeper) for _ in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=120)
            assert failures == [] and len(swept) == 2
            deleted = swept[0] + swept[1]
            assert sorted(deleted) == [f"file-sweep{index}" for index in range(8)]  # each once, by one sweeper
            assert set(deletes.values()) == {1} and len(deletes) == 8
            with runtime.db.session() as session:
                assert session.scalars(select(File.id)).all() == []
            assert runtime.store.list("files/acme/") == []
        finally:
            runtime.db.dispose()
