"""Capture for retraining without HTTP: the JSONL an exchange becomes (feedback filters, corrections), which
original training files captured lines can be appended to, what the observer keeps (only routes with capture
on, redacted), feedback by completion id, the claim that lets exactly one of several triggers start a job, and
the job itself (its model, ``init_from``, metadata and training file) — on SQLite, a local store and the
filesystem broker."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from afina.core.datasets.options import IngestOptions
from afina.core.db import repository as repo
from afina.core.errors import Conflict, InvalidRequest, NotFound
from afina.core.keys import KeyGrant
from afina.core.naming import fine_tuned_model_name
from afina.core.routing import RouteSpec, RouteTarget
from afina.core.runtime import Runtime
from afina.core.settings import Settings
from afina.gateway.captures import dataset, retrain, service
from afina.gateway.captures.protocol import CapturedExchangeObject, FeedbackRequest
from afina.gateway.inference.base import Generation, GenerationRequest, ServedModel
from afina.gateway.serving.capture import CaptureObserver
from afina.gateway.serving.exchange import Exchange, new_exchange_id
from afina.gateway.serving.resolve import Plan, plan_for_route
from tests.support.jobs import create_job, upload_file

SMOLLM2 = "smollm2-135m-instruct"
QUESTION = "Meu CPF é 123.456.789-09 e meu e-mail é ana@exemplo.com.br; o pedido 7001 chegou?"


@dataclass
class Row:
    messages: list[dict[str, Any]]
    answer: str
    feedback: str | None = None
    correction: str | None = None


def chat(user: str) -> list[dict[str, Any]]:
    return [{"role": "system", "content": "Você é a Aeon."}, {"role": "user", "content": user}]


# --- the JSONL ----------------------------------------------------------------------------------------------


def test_an_exchange_is_its_messages_and_one_assistant_answer() -> None:
    rows = [Row(chat("Oi"), "Olá!"), Row(chat("Tchau"), "Até logo.", feedback="up"),
            Row(chat("Preço?"), "Não sei.", feedback="down", correction="R$ 10,00.")]
    content, examples = dataset.chat_jsonl(rows)
    lines = [orjson.loads(line) for line in content.splitlines()]
    assert examples == len(lines) == 3 and content.endswith(b"\n")
    assert lines[0] == {"messages": [{"role": "system", "content": "Você é a Aeon."}, {"role": "user", "content": "Oi"},
                                     {"role": "assistant", "content": "Olá!"}]}
    assert lines[2]["messages"][-1] == {"role": "assistant", "content": "R$ 10,00."}  # the correction replaces it
    assert "Preço".encode() in content  # UTF-8, not \\u escapes


def test_positive_leaves_out_answers_thumbed_down_without_a_correction() -> None:
    rows = [Row(chat("a"), "1"), Row(chat("b"), "2", feedback="down"), Row(chat("c"), "3", feedback="up"),
            Row(chat("d"), "4", feedback="down", correction="quatro")]
    everything, _ = dataset.chat_jsonl(rows, "all")
    positive, examples = dataset.chat_jsonl(rows, "positive")
    assert len(everything.splitlines()) == 4
    answers = [orjson.loads(line)["messages"][-1]["content"] for line in positive.splitlines()]
    assert (answers, examples) == (["1", "3", "quatro"], 3)
    assert dataset.chat_jsonl([], "all") == (b"", 0)


def test_a_message_without_content_becomes_empty_text() -> None:
    example = dataset.training_example(Row([{"role": "user", "content": None}], "ok"))
    assert example == {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "ok"}]}


def test_appending_keeps_every_line() -> None:
    assert dataset.append_jsonl(b'{"a": 1}', b'{"b": 2}\n') == b'{"a": 1}\n{"b": 2}\n'
    assert dataset.append_jsonl(b'{"a": 1}\n', b'{"b": 2}\n') == b'{"a": 1}\n{"b": 2}\n'
    assert dataset.append_jsonl(b"", b'{"b": 2}\n') == b'{"b": 2}\n'
    assert dataset.count_lines(b'{"a": 1}\n\n  \n{"b": 2}\n') == 2


CHAT_LINE = orjson.dumps({"messages": [{"role": "user", "content": "oi"}, {"role": "assistant", "content": "olá"}]})


@pytest.mark.parametrize("data, filename, options", [
    (CHAT_LINE + b"\n", "train.jsonl", {}),
    (b"\xef\xbb\xbf" + CHAT_LINE + b"\r\n", "dados.jsonl", {"format": "openai", "system_prompt": "Seja breve."}),
    (b"\n" + CHAT_LINE, "train.jsonl", {"container": "jsonl"}),
])
def test_a_chat_jsonl_file_takes_appended_lines(data: bytes, filename: str, options: dict[str, Any]) -> None:
    dataset.check_appendable(data, filename, IngestOptions.model_validate(options), "file-1", "capture.training_file")


@pytest.mark.parametrize("data, filename, options, reason", [
    ("pergunta,resposta\noi,olá\n".encode(), "train.csv", {}, "it is a csv file, not JSONL"),
    (b"PK\x03\x04rest", "train.zip", {}, "it is a zip file"),
    (orjson.dumps({"instruction": "oi", "output": "olá"}) + b"\n", "train.jsonl", {}, "not OpenAI chat examples"),
    (CHAT_LINE + b"\n", "train.jsonl", {"format": "sharegpt"}, "ingest options change how its records are read"),
    (CHAT_LINE + b"\n", "train.jsonl", {"field_map": {"conversa": "messages"}}, "ingest options change"),
])
def test_other_training_files_are_refused_naming_the_setting(data: bytes, filename: str, options: dict[str, Any],
                                                            reason: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        dataset.check_appendable(data, filename, IngestOptions.model_validate(options), "file-1",
                                 "capture.training_file")
    assert reason in caught.value.message and caught.value.param == "capture.training_file"
    assert "Name a JSONL file of chat examples in capture.training_file" in caught.value.message


def test_names_and_ids() -> None:
    assert retrain.suffix_for("aeon-custom") == "aeon-custom"
    assert retrain.suffix_for("support/v2:prod") == "support-v2-prod"
    assert retrain.suffix_for("x" * 128) == "x" * 64
    assert service.exchange_id_of("chatcmpl-abc123") == service.exchange_id_of("abc123") == "abc123"


# --- the registry ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Runtime:
    home = tmp_path_factory.mktemp("capture-home")
    runtime = Runtime(Settings(home=home, log_json=False, database_url=None, broker_url=None, store_backend="local",
                               store_root=None, work_dir=None))
    yield runtime
    runtime.db.dispose()


_counter = iter(range(10_000))


def tenant() -> str:
    """A tenant of its own for each test (the registry is shared by the module)."""
    return f"tenant-{next(_counter)}"


def put_route(runtime: Runtime, tenant_id: str, name: str, capture: dict[str, Any] | None,
              model: str = SMOLLM2) -> None:
    spec = RouteSpec.model_validate({"targets": [{"model": model}], "capture": capture})
    with runtime.db.session() as session:
        repo.put_route(session, tenant_id, name, spec.to_row())


def plan(runtime: Runtime, tenant_id: str, route: str | None) -> Plan:
    """What the resolver plans for the name: the route as stored now (a missing one: a route without capture)."""
    with runtime.db.session() as session:
        row = repo.get_route(session, tenant_id, route) if route is not None else None
        spec = RouteSpec.from_row(row.spec) if row is not None else None
    if spec is not None and route is not None:
        return plan_for_route(route, spec, None)
    return Plan(requested=route or SMOLLM2, candidates=[RouteTarget(model=SMOLLM2)], route=route)


def exchange(runtime: Runtime, tenant_id: str, route: str | None, user: str = QUESTION,
             answer: str = "Chegou sim, ana@exemplo.com.br!", *, prompt: bool = False) -> Exchange:
    served = ServedModel(name=SMOLLM2)
    request = GenerationRequest(model=served, prompt=user) if prompt else \
        GenerationRequest(model=served, messages=chat(user))
    return Exchange(id=new_exchange_id(), caller=KeyGrant(tenant_id=tenant_id, prefix="afk-test"),
                    plan=plan(runtime, tenant_id, route), target=SMOLLM2, model=SMOLLM2, prompt_tokens=5,
                    completion_tokens=3, seconds=0.1, request=request,
                    generation=Generation(text=answer, finish_reason="stop"))


def kept(runtime: Runtime, tenant_id: str, route: str) -> list[Any]:
    with runtime.db.session() as session:
        return repo.captured_exchanges_for_dataset(session, tenant_id, route)


def test_only_chats_of_a_capturing_route_are_kept_and_they_are_redacted(runtime: Runtime) -> None:
    owner = tenant()
    put_route(runtime, owner, "aeon", {})
    put_route(runtime, owner, "quiet", None)
    put_route(runtime, owner, "paused", {"enabled": False})
    put_route(runtime, owner, "cpf-only", {"redact": ["cpf"]})
    for route in ("aeon", "quiet", "paused", "cpf-only", "deleted", None):
        assert service.capture_exchange(runtime, exchange(runtime, owner, route)) is None
    # a raw prompt is no chat: nothing to train on
    assert service.capture_exchange(runtime, exchange(runtime, owner, "aeon", prompt=True)) is None
    [row] = kept(runtime, owner, "aeon")
    assert row.messages == [
        {"role": "system", "content": "Você é a Aeon."},
        {"role": "user", "content": "Meu CPF é [cpf] e meu e-mail é [email]; o pedido 7001 chegou?"}]
    assert (row.answer, row.finish_reason, row.target, row.model) == ("Chegou sim, [email]!", "stop", SMOLLM2, SMOLLM2)
    assert (row.feedback, row.correction, row.used_in_job) == (None, None, None)
    [partial] = kept(runtime, owner, "cpf-only")
    assert partial.messages[1]["content"] == "Meu CPF é [cpf] e meu e-mail é ana@exemplo.com.br; o pedido 7001 chegou?"
    assert kept(runtime, owner, "quiet") == kept(runtime, owner, "paused") == []


def test_an_exchange_told_twice_is_kept_once(runtime: Runtime) -> None:
    owner = tenant()
    put_route(runtime, owner, "aeon", {"retrain_after": 10})
    once = exchange(runtime, owner, "aeon")
    service.capture_exchange(runtime, once)
    service.capture_exchange(runtime, once)
    assert len(kept(runtime, owner, "aeon")) == 1


def test_a_retraining_is_due_at_retrain_after(runtime: Runtime) -> None:
    owner = tenant()
    put_route(runtime, owner, "aeon", {"retrain_after": 10})
    due = [service.capture_exchange(runtime, exchange(runtime, owner, "aeon")) for _ in range(11)]
    assert due[:9] == [None] * 9
    assert due[9] is not None and due[9].retrain_after == 10 and due[10] is not None


def test_feedback_by_completion_id(runtime: Runtime) -> None:
    owner, other = tenant(), tenant()
    put_route(runtime, owner, "aeon", {"redact": ["email"]})
    first, second = exchange(runtime, owner, "aeon"), exchange(runtime, owner, "aeon")
    for each in (first, second):
        service.capture_exchange(runtime, each)
    up = service.post_feedback(runtime, owner, f"chatcmpl-{first.id}", FeedbackRequest(rating="up"))
    assert (up.id, up.completion_id, up.feedback, up.correction) == (first.id, f"chatcmpl-{first.id}", "up", None)
    corrected = service.post_feedback(runtime, owner, second.id, FeedbackRequest(
        rating="down", correction="Chegou ontem; confirme em suporte@loja.com.br."))
    assert (corrected.feedback, corrected.correction) == ("down", "Chegou ontem; confirme em [email].")
    again = service.post_feedback(runtime, owner, first.id, FeedbackRequest(rating="down"))  # replaces it
    assert again.feedback == "down"
    for caller, completion in ((other, f"chatcmpl-{first.id}"), (owner, "chatcmpl-" + "0" * 24), (owner, "")):
        with pytest.raises(NotFound) as caught:
            service.post_feedback(runtime, caller, completion, FeedbackRequest(rating="up"))
        assert caught.value.param == "completion_id"


def test_listing_pages_newest_first_and_the_jsonl_follows_the_route(runtime: Runtime) -> None:
    owner = tenant()
    put_route(runtime, owner, "aeon", {"include_feedback": "positive"})
    exchanges = [exchange(runtime, owner, "aeon", user=f"pergunta {index}", answer=f"resposta {index}")
                 for index in range(5)]
    for each in exchanges:
        service.capture_exchange(runtime, each)
    service.post_feedback(runtime, owner, exchanges[1].id, FeedbackRequest(rating="down"))
    seen: list[str] = []
    after = None
    while True:
        page = service.list_captures(runtime, owner, "aeon", after, 2)
        seen += [item.id for item in page.data]
        if not page.has_more:
            break
        after = page.last_id
    assert sorted(seen) == sorted(each.id for each in exchanges) and len(seen) == 5
    answers = [orjson.loads(line)["messages"][-1]["content"]
               for line in service.captures_jsonl(runtime, owner, "aeon").splitlines()]
    assert sorted(answers) == ["resposta 0", "resposta 2", "resposta 3", "resposta 4"]  # the route's "positive"
    assert len(service.captures_jsonl(runtime, owner, "aeon", include_feedback="all").splitlines()) == 5
    for call in (lambda: service.list_captures(runtime, tenant(), "aeon", None, 10),
                 lambda: service.captures_jsonl(runtime, tenant(), "aeon"),
                 lambda: service.list_captures(runtime, owner, "aeon", "0" * 24, 10)):
        with pytest.raises(NotFound):
            call()


def test_a_claim_in_progress_shows_as_unused() -> None:
    row = type("R", (), dict(id="x", route="r", created_at=1, seq=1, target="t", model="m", messages=[], answer="a",
                             finish_reason="stop", feedback=None, correction=None,
                             used_in_job=repo.new_capture_claim()))()
    assert CapturedExchangeObject.from_row(row).used_in_job is None  # type: ignore[arg-type]


def test_of_concurrent_claims_one_takes_every_row(runtime: Runtime) -> None:
    owner = tenant()
    put_route(runtime, owner, "aeon", {})
    for _ in range(12):
        service.capture_exchange(runtime, exchange(runtime, owner, "aeon"))
    barrier, taken = threading.Barrier(4), []

    def claim() -> None:
        barrier.wait()
        with runtime.db.session() as session:
            taken.append(repo.claim_unused_captures(session, owner, "aeon", repo.new_capture_claim(),
                                                    stale_after_s=3600))

    threads = [threading.Thread(target=claim) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(taken) == [0, 0, 0, 12]


def test_a_stale_claim_is_released(runtime: Runtime) -> None:
    owner = tenant()
    put_route(runtime, owner, "aeon", {})
    service.capture_exchange(runtime, exchange(runtime, owner, "aeon"))
    with runtime.db.session() as session:
        row = repo.captured_exchanges_for_dataset(session, owner, "aeon")[0]
        row.used_in_job = "claim-0000000001-abcdef012345"  # a gateway died holding it, long ago
    with runtime.db.session() as session:
        assert repo.claim_unused_captures(session, owner, "aeon", repo.new_capture_claim(), stale_after_s=3600) == 1


# --- retraining --------------------------------------------------------------------------------------------


def fine_tune(runtime: Runtime, owner: str, original: bytes) -> tuple[str, str, str]:
    """(model name, its job, the job's training file): a fine-tune as a finished job leaves it."""
    training = upload_file(runtime, owner, original)
    job = create_job(runtime, owner, training.id, status="succeeded", stage="done", suffix="aeon")
    name = fine_tuned_model_name(SMOLLM2, owner, "aeon", job.id)
    with runtime.db.session() as session:
        repo.register_model(session, name=name, tenant_id=owner, base_model=SMOLLM2, job_id=job.id, artifacts={})
    return name, job.id, training.id


def original_examples(count: int) -> bytes:
    return b"".join(orjson.dumps({"messages": [{"role": "user", "content": f"{i} + {i}?"},
                                               {"role": "assistant", "content": str(2 * i)}]}) + b"\n"
                    for i in range(count))


def test_a_retraining_continues_the_fine_tune_on_its_data_and_the_captured(runtime: Runtime) -> None:
    owner = tenant()
    model, parent_job, original_file = fine_tune(runtime, owner, original_examples(12))
    put_route(runtime, owner, "support/v2", {"include_feedback": "positive"}, model=model)
    exchanges = [exchange(runtime, owner, "support/v2", user=f"pergunta {i}", answer=f"resposta {i}")
                 for i in range(3)]
    for each in exchanges:
        service.capture_exchange(runtime, each)
    service.post_feedback(runtime, owner, exchanges[0].id, FeedbackRequest(rating="down"))
    job = service.retrain_now(runtime, owner, "support/v2")
    assert (job.model, job.status, job.user_provided_suffix) == (SMOLLM2, "validating_files", "support-v2")
    assert job.method["supervised"]["init_from"] == {"model": model, "job_id": parent_job}
    assert job.metadata == {"afina_route": "support/v2", "afina_captured": "2"}
    with runtime.db.session() as session:
        uploaded = repo.get_file(session, owner, job.training_file)
        assert (uploaded.purpose, uploaded.status) == ("fine-tune", "uploaded")  # its ingest is queued
        content = runtime.store.get_bytes(uploaded.object_key)
        used = {row.used_in_job for row in repo.captured_exchanges_for_dataset(session, owner, "support/v2")}
        # the route is unchanged: the alias moves when an operator moves it
        assert RouteSpec.from_row(repo.get_route(session, owner, "support/v2").spec).targets[0].model == model
    assert uploaded.id != original_file and content.startswith(original_examples(12))
    assert [orjson.loads(line)["messages"][-1]["content"] for line in content.splitlines()[12:]] == \
        ["resposta 1", "resposta 2"]
    assert used == {job.id}  # every claimed exchange, the one left out by its feedback too
    with pytest.raises(Conflict, match="nothing to retrain on"):
        service.retrain_now(runtime, owner, "support/v2")


def test_a_default_training_file_of_no_chat_examples_is_left_out_and_the_job_says_so(runtime: Runtime) -> None:
    owner = tenant()
    model, _job, _file = fine_tune(runtime, owner, "pergunta,resposta\noi,olá\n".encode())
    put_route(runtime, owner, "aeon", {}, model=model)
    for index in range(10):
        service.capture_exchange(runtime, exchange(runtime, owner, "aeon", user=f"pergunta {index}"))
    job = service.retrain_now(runtime, owner, "aeon")
    with runtime.db.session() as session:
        content = runtime.store.get_bytes(repo.get_file(session, owner, job.training_file).object_key)
        events = [event.message for event in repo.list_events(session, job.id, None, 10)[0]]
    assert len(content.splitlines()) == 10 and all(b'"messages"' in line for line in content.splitlines())
    assert any("on 10 captured example(s) alone" in message and "not OpenAI chat examples" in message
               for message in events), events


def test_a_retraining_that_cannot_start_releases_its_exchanges(runtime: Runtime) -> None:
    owner = tenant()
    put_route(runtime, owner, "aeon", {})  # a catalog target: no training file of its own
    for _ in range(3):
        service.capture_exchange(runtime, exchange(runtime, owner, "aeon"))
    with pytest.raises(InvalidRequest, match="3 captured example"):  # ingest wants 10
        service.retrain_now(runtime, owner, "aeon")
    with runtime.db.session() as session:
        assert repo.count_unused_captures(session, owner, "aeon") == 3
        assert repo.list_files(session, owner) == []
    csv = upload_file(runtime, owner, b"pergunta,resposta\noi,ola\n", filename="train.csv")
    put_route(runtime, owner, "aeon", {"training_file": csv.id})
    with pytest.raises(InvalidRequest, match="it is a csv file, not JSONL") as caught:
        service.retrain_now(runtime, owner, "aeon")
    assert caught.value.param == "capture.training_file"
    put_route(runtime, owner, "cloud", {}, model="gpt-4o")
    with runtime.db.session() as session:
        repo.put_route(session, owner, "cloud", RouteSpec.model_validate(
            {"targets": [{"model": "gpt-4o", "upstream": "openai"}], "capture": {}}).to_row())
    with pytest.raises(InvalidRequest, match="model of an upstream"):
        service.retrain_now(runtime, owner, "cloud")
    with pytest.raises(NotFound):
        service.retrain_now(runtime, tenant(), "aeon")


def test_the_observer_starts_one_job_per_retrain_after_exchanges(runtime: Runtime) -> None:
    owner = tenant()
    training = upload_file(runtime, owner, original_examples(4))
    put_route(runtime, owner, "aeon", {"retrain_after": 10, "training_file": training.id})
    observer = CaptureObserver(runtime)

    async def chats(count: int) -> None:
        await asyncio.gather(*(observer(exchange(runtime, owner, "aeon")) for _ in range(count)))

    asyncio.run(chats(13))  # at once: whichever answers cross 10, one job takes what was kept by then
    with runtime.db.session() as session:
        jobs, _ = repo.list_jobs(session, owner, None, 10)
        unused = repo.count_unused_captures(session, owner, "aeon")
    assert len(jobs) == 1 and int(jobs[0].user_metadata["afina_captured"]) + unused == 13 and unused < 10
    assert jobs[0].user_metadata["afina_route"] == "aeon"
    assert jobs[0].method == {"type": "supervised"}  # a catalog base model starts fresh
    for _ in range(9 - unused):
        asyncio.run(chats(1))
    with runtime.db.session() as session:
        assert len(repo.list_jobs(session, owner, None, 10)[0]) == 1
    asyncio.run(chats(1))  # the tenth unused one
    with runtime.db.session() as session:
        assert len(repo.list_jobs(session, owner, None, 10)[0]) == 2


def test_a_failed_trigger_waits_before_trying_again(runtime: Runtime, monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    owner = tenant()
    put_route(runtime, owner, "aeon", {"retrain_after": 10, "include_feedback": "positive"})
    observer = CaptureObserver(runtime, retry_after_failure_s=3600)
    calls: list[str] = []
    real = retrain.start_retraining

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(retrain, "start_retraining", counted)
    first = [exchange(runtime, owner, "aeon") for _ in range(10)]
    for each in first[:9]:
        asyncio.run(observer(each))
    for each in first[:9]:  # thumbed down: too few examples are left
        service.post_feedback(runtime, owner, each.id, FeedbackRequest(rating="down"))
    asyncio.run(observer(first[9]))
    asyncio.run(observer(exchange(runtime, owner, "aeon")))
    assert calls == ["aeon"]  # the second exchange waited instead of failing again
    assert "capture.retraining_failed" in caplog.text
    with runtime.db.session() as session:
        assert repo.count_unused_captures(session, owner, "aeon") == 11
        assert repo.list_jobs(session, owner, None, 10)[0] == []


def test_the_observer_skips_what_it_cannot_keep_without_a_database_call(tmp_path: Path) -> None:
    """A route without capture (its plan says so), a model named directly, a raw prompt: no thread, no query."""
    broken = Runtime(Settings(home=tmp_path, log_json=False, database_url="sqlite:////nonexistent/dir/x.db"))
    observer = CaptureObserver(broken)
    capturing = plan_for_route("aeon", RouteSpec.model_validate({"targets": [{"model": SMOLLM2}], "capture": {}}), None)
    quiet = plan_for_route("quiet", RouteSpec.model_validate({"targets": [{"model": SMOLLM2}]}), None)
    served = ServedModel(name=SMOLLM2)
    for route_plan, request in ((quiet, GenerationRequest(model=served, messages=chat("oi"))),
                                (Plan(requested=SMOLLM2, candidates=[RouteTarget(model=SMOLLM2)]),
                                 GenerationRequest(model=served, messages=chat("oi"))),
                                (capturing, GenerationRequest(model=served, prompt="1, 2, 3,"))):
        asyncio.run(observer(Exchange(id=new_exchange_id(), caller=KeyGrant(tenant_id="t", prefix="afk-test"),
                                      plan=route_plan, target=SMOLLM2, model=SMOLLM2, prompt_tokens=1,
                                      completion_tokens=1, seconds=0.1, request=request,
                                      generation=Generation(text="4"))))
    assert capturing.capture is not None and quiet.capture is None
