"""The LLM judge: its prompt, its verdict checks, its aggregation, its retries, and the evaluation stage with a
judge that works and one that cannot be used (the other metrics stand, the failure is said without secrets)."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import openai
import orjson
import pytest

from afina.core.artifacts.evaluation import EvaluationManifest, ModelEvaluation
from afina.core.db import repository as repo
from afina.core.evaluation_jobs import DEFAULT_JUDGE_RUBRIC, EvaluationSpec, JudgeSpec
from afina.core.queue.jobs import run_stage
from afina.core.runtime import Runtime
from afina.core.settings import Settings
from afina.evaluator.examples import Example
from afina.evaluator.judge import (
    FIELD_MAX_CHARS,
    InvalidVerdict,
    Judge,
    aggregate,
    build_messages,
    judge_spec_for,
    open_judge,
    parse_verdict,
)
from afina.evaluator.pipeline import evaluate_job, evaluation_prefix
from tests.support.evaluation import TENANT, ScriptedModels, WorkerKilled, build_evaluated_job, label_of
from tests.support.jobs import context_for

QUESTION = Example(prompt=[{"role": "user", "content": "Qual é a capital de Portugal?"}], reference="Lisboa.")
SECRET_KEY = "sk-judge-very-secret-0123456789"


def reply(content: str | None, finish_reason: str = "stop") -> Any:
    return SimpleNamespace(choices=[SimpleNamespace(message=SimpleNamespace(content=content),
                                                    finish_reason=finish_reason)])


def status_error(cls: type[openai.APIStatusError], status: int, code: str = "x") -> openai.APIStatusError:
    request = httpx.Request("POST", "http://judge.internal:9/v1/chat/completions")
    return cls(f"Error code: {status}", response=httpx.Response(status, request=request),
               body={"error": {"message": "no", "code": code}})


def connection_error() -> openai.APIConnectionError:
    return openai.APIConnectionError(request=httpx.Request("POST", "http://judge.internal:9/v1/chat/completions"))


@dataclass
class FakeClient:
    """``openai.OpenAI`` as the judge uses it: each call takes the next scripted outcome (a reply or an error)."""

    outcomes: list[Any]
    requests: list[dict[str, Any]] = field(default_factory=list)

    @property
    def chat(self) -> Any:
        return SimpleNamespace(completions=SimpleNamespace(create=self.create))

    def create(self, **request: Any) -> Any:
        self.requests.append(request)
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def judge_with(client: FakeClient, **options: Any) -> tuple[Judge, list[float]]:
    slept: list[float] = []
    return Judge(JudgeSpec(model="judge-x"), client, sleep=slept.append, **options), slept


# the prompt


def test_the_prompt_carries_rubric_scale_question_reference_and_answer() -> None:
    system, user = build_messages("Be strict about Portuguese.", QUESTION, "Lisbon.")
    assert system["role"] == "system" and user["role"] == "user"
    assert "Be strict about Portuguese." in system["content"] and "from 1 (worst) to 5 (best)" in system["content"]
    assert '"score"' in system["content"] and '"reason"' in system["content"]
    content = user["content"]
    assert content.index("[QUESTION]\nQual é a capital de Portugal?") < content.index("[REFERENCE ANSWER]\nLisboa.")
    assert content.index("[REFERENCE ANSWER]") < content.index("[MODEL ANSWER]\nLisbon.") < content.index("[END]")
    assert "[CONVERSATION BEFORE THE QUESTION]" not in content


def test_the_prompt_keeps_earlier_turns_and_cuts_what_is_too_long() -> None:
    example = Example(prompt=[{"role": "system", "content": "Responda em português."},
                              {"role": "user", "content": "Oi"}, {"role": "assistant", "content": "Olá!"},
                              {"role": "user", "content": "x" * (FIELD_MAX_CHARS + 50)}], reference="ok")
    _system, user = build_messages(DEFAULT_JUDGE_RUBRIC, example, "y" * (FIELD_MAX_CHARS * 2))
    content = user["content"]
    assert "system: Responda em português.\nuser: Oi\nassistant: Olá!" in content
    assert "x" * FIELD_MAX_CHARS + " […]" in content and "x" * (FIELD_MAX_CHARS + 1) not in content
    assert "y" * (FIELD_MAX_CHARS + 1) not in content


def test_the_default_rubric_asks_for_the_questions_language() -> None:
    assert "Portuguese" in DEFAULT_JUDGE_RUBRIC and "reference" in DEFAULT_JUDGE_RUBRIC
    assert JudgeSpec(model="m").rubric == DEFAULT_JUDGE_RUBRIC


# the verdict


@pytest.mark.parametrize(("content", "expected"), [
    ('{"score": 4, "reason": "Certo, mas curto."}', (4, "Certo, mas curto.")),
    ('  {"reason": "ok", "score": 1}\n', (1, "ok")),
    ('```json\n{"score": 5, "reason": "igual"}\n```', (5, "igual")),
    ('{"score": 3.0, "reason": "parcial"}', (3, "parcial")),
])
def test_a_valid_verdict_is_read(content: str, expected: tuple[int, str]) -> None:
    assert parse_verdict(content) == expected


@pytest.mark.parametrize(("content", "why"), [
    (None, "empty answer"),
    ("   ", "empty answer"),
    ('{"score": 4, "reason": "cut sh', "not valid JSON"),
    ("The answer is good. Score: 4", "not valid JSON"),
    ("[4, \"ok\"]", "not a JSON object"),
    ('{"reason": "no score"}', "has no score"),
    ('{"score": 4}', "has no reason"),
    ('{"score": 0, "reason": "x"}', "score 0 is outside 1–5"),
    ('{"score": 6, "reason": "x"}', "score 6 is outside 1–5"),
    ('{"score": "4", "reason": "x"}', "is not an integer"),
    ('{"score": 3.5, "reason": "x"}', "is not an integer"),
    ('{"score": true, "reason": "x"}', "is not an integer"),
])
def test_a_bad_verdict_says_what_is_wrong(content: str | None, why: str) -> None:
    with pytest.raises(InvalidVerdict, match=why):
        parse_verdict(content)


def test_aggregation_counts_the_unscored_and_never_averages_them_in() -> None:
    assert aggregate([5, None, 3, None]) == (4.0, 2, 2)
    assert aggregate([None, None]) == (None, 0, 2)
    assert aggregate([2]) == (2.0, 1, 0)
    assert aggregate([]) == (None, 0, 0)


# the calls


def test_each_answer_is_graded_at_temperature_0_with_a_seed_and_a_schema() -> None:
    client = FakeClient([reply('{"score": 5, "reason": "igual"}'), reply('{"score": 9, "reason": "x"}'),
                         reply('{"score": 2, "reason": "em inglês"}')])
    judge, _slept = judge_with(client, max_tokens=64)
    result = judge.grade([QUESTION] * 3, ["Lisboa.", "Lisboa", "Lisbon."])
    assert result.scores == [5, None, 2]
    assert result.reasons == ["igual", "not graded: the judge's score 9 is outside 1–5", "em inglês"]
    assert (result.mean, result.scored, result.unscored, result.error) == (3.5, 2, 1, None)
    request = client.requests[0]
    assert request["model"] == "judge-x" and request["temperature"] == 0 and request["seed"] == 0
    assert request["max_tokens"] == 64
    schema = request["response_format"]["json_schema"]["schema"]
    assert request["response_format"]["type"] == "json_schema"
    assert schema["properties"]["score"]["enum"] == [1, 2, 3, 4, 5] and schema["required"] == ["score", "reason"]
    assert "Lisbon." in client.requests[2]["messages"][1]["content"]


def test_transient_failures_are_retried_a_bounded_number_of_times() -> None:
    client = FakeClient([connection_error(), status_error(openai.InternalServerError, 503),
                         reply('{"score": 4, "reason": "ok"}')])
    judge, slept = judge_with(client, retries=2, backoff_s=0.5)
    result = judge.grade([QUESTION], ["Lisboa."])
    assert result.scores == [4] and result.error is None
    assert len(client.requests) == 3 and slept == [0.5, 1.0]


def test_an_unreachable_judge_fails_once_and_every_example_is_counted_unscored() -> None:
    client = FakeClient([connection_error()])
    judge, slept = judge_with(client, retries=1)
    result = judge.grade([QUESTION] * 3, ["a", "b", "c"])
    assert len(client.requests) == 2 and slept == [1.0]  # one example, two tries; the rest not asked
    assert result.scores == [None, None, None] and (result.scored, result.unscored, result.mean) == (0, 3, None)
    assert result.error == "the gateway serving the judge could not be reached (2 tries)"
    assert all(reason == f"not graded: {result.error}" for reason in result.reasons)
    assert "judge.internal" not in orjson.dumps(result.model_dump()).decode()
    again = judge.grade([QUESTION], ["d"])  # the next model: not tried again
    assert len(client.requests) == 2 and again.error == result.error and again.unscored == 1


@pytest.mark.parametrize(("error", "words"), [
    (status_error(openai.AuthenticationError, 401, "invalid_api_key"), "refused the judge's API key (401)"),
    (status_error(openai.NotFoundError, 404, "model_not_found"), "does not serve the judge model 'judge-x'"),
    (status_error(openai.PermissionDeniedError, 403), "may not call chat completions (403)"),
])
def test_a_misconfigured_judge_fails_without_retrying(error: Exception, words: str) -> None:
    client = FakeClient([error])
    judge, slept = judge_with(client, retries=3)
    result = judge.grade([QUESTION] * 2, ["a", "b"])
    assert len(client.requests) == 1 and slept == []
    assert result.error is not None and words in result.error and result.unscored == 2


def test_an_example_the_gateway_refuses_or_a_cut_verdict_is_unscored_and_the_rest_graded() -> None:
    client = FakeClient([status_error(openai.BadRequestError, 400, "context_length_exceeded"),
                         reply('{"score": 4, "reason": "a very long', finish_reason="length"),
                         reply('{"score": 3, "reason": "ok"}')])
    judge, _slept = judge_with(client)
    result = judge.grade([QUESTION] * 3, ["a", "b", "c"])
    assert result.scores == [None, None, 3] and result.error is None
    assert result.reasons[0] == "not graded: the gateway refused this example (400 context_length_exceeded)"
    assert "cut at the token limit" in (result.reasons[1] or "")


def test_a_judge_without_an_api_key_is_misconfigured_and_says_which_setting() -> None:
    settings = Settings(evaluation_judge_model="judge-x", log_json=False)
    judge = open_judge(settings, JudgeSpec(model="judge-x"))
    result = judge.grade([QUESTION], ["a"])
    assert result.error == "no API key is set for the judge (AFINA_EVALUATION_JUDGE_API_KEY)"
    keyed = open_judge(Settings(evaluation_judge_api_key=SECRET_KEY, public_base_url="http://gw:8000/"),
                       JudgeSpec(model="judge-x"))
    assert keyed.failure is None and str(keyed.client.base_url).rstrip("/") == "http://gw:8000/v1"
    assert SECRET_KEY not in repr(Settings(evaluation_judge_api_key=SECRET_KEY))


def test_which_evaluations_get_the_judge() -> None:
    settings = Settings(evaluation_judge_model="judge-x", evaluation_judge_automatic=True)
    automatic = EvaluationSpec(model="ft:x", source_job_id="ftjob-1")
    assert judge_spec_for(automatic, settings) == JudgeSpec(model="judge-x")
    assert judge_spec_for(automatic, Settings(evaluation_judge_model="judge-x")) is None
    on_demand = EvaluationSpec(model="ft:x", source_job_id="ftjob-1", on_demand=True)
    assert judge_spec_for(on_demand, settings) is None
    asked = on_demand.model_copy(update={"judge": JudgeSpec(model="other", rubric="r")})
    assert judge_spec_for(asked, Settings()) == JudgeSpec(model="other", rubric="r")


# the evaluation stage with a judge


def verdict_by_answer(request: dict[str, Any]) -> Any:
    answer = request["messages"][1]["content"].split("[MODEL ANSWER]\n")[1].split("\n\n[END]")[0]
    return reply('{"score": 5, "reason": "igual"}' if answer in ("positivo", "negativo")
                 else '{"score": 1, "reason": "não responde"}')


@dataclass
class AnsweringClient(FakeClient):
    def create(self, **request: Any) -> Any:
        self.requests.append(request)
        return verdict_by_answer(request)


def evaluated(tmp_path: Path, **settings: Any) -> tuple[Runtime, Any]:
    runtime = Runtime(Settings(home=tmp_path / "home", log_json=False, evaluation_judge_model="judge-x",
                               evaluation_judge_automatic=True, **settings))
    return runtime, build_evaluated_job(runtime, tmp_path, variants=("q4_k_m",))


SCRIPTS = {"base": {"answer": lambda _user: "não sei", "token_logprob": -2.0},
           "fine_tuned": {"answer": label_of, "token_logprob": -0.5},
           "gguf:q4_k_m": {"answer": label_of, "token_logprob": -0.5}}


def test_the_judges_grades_reach_every_result_file(tmp_path: Path) -> None:
    runtime, job = evaluated(tmp_path)
    client = AnsweringClient([])
    run_stage(runtime, job.evaluation_job_id, "evaluate",
              lambda context: evaluate_job(context, plan_models=ScriptedModels(SCRIPTS), judge_client=client))
    with runtime.db.session() as session:
        assert repo.get_job(session, None, job.evaluation_job_id).status == "succeeded"
    assert len(client.requests) == 3 * 8
    prefix = evaluation_prefix(TENANT, job.source.id)
    manifest = EvaluationManifest.read(runtime.store, f"{prefix}/evaluation.json")
    assert manifest is not None and manifest.judge is not None
    assert manifest.judge.model == "judge-x" and manifest.judge.rubric == DEFAULT_JUDGE_RUBRIC
    base, tuned = manifest.models["base"].judge, manifest.models["fine_tuned"].judge
    assert base is not None and tuned is not None
    assert (base.mean, base.scored, base.unscored) == (1.0, 8, 0)
    assert (tuned.mean, tuned.unscored, tuned.error) == (5.0, 0, None)
    stored = ModelEvaluation.read(runtime.store, f"{prefix}/models/fine_tuned.json")
    assert stored is not None and stored.judge is not None and stored.judge.scores == [5] * 8
    rows = list(csv.DictReader(io.StringIO(runtime.store.get_bytes(f"{prefix}/evaluation_summary.csv").decode())))
    assert [(row["model"], row["judge_score_mean"], row["judge_unscored"]) for row in rows] == [
        ("base", "1.0", "0"), ("fine_tuned", "5.0", "0"), ("gguf:q4_k_m", "5.0", "0")]
    lines = [orjson.loads(line) for line in runtime.store.get_bytes(f"{prefix}/predictions.jsonl").splitlines()]
    assert lines[0]["judge"]["base"] == {"score": 1, "reason": "não responde"}
    assert lines[0]["judge"]["fine_tuned"] == {"score": 5, "reason": "igual"}
    page = runtime.store.get_bytes(f"{prefix}/evaluation.md").decode()
    assert "LLM judge" in page and "| judge score |" in page
    with runtime.db.session() as session:
        messages = [event.message for event in repo.list_events(session, job.evaluation_job_id, None, 1000)[0]]
    assert any(message.startswith("LLM judge (judge-x) on fine_tuned: mean score 5.0000") for message in messages)


def test_a_failing_judge_leaves_the_other_metrics_and_says_why_without_secrets(tmp_path: Path) -> None:
    runtime, job = evaluated(tmp_path, evaluation_judge_api_key=SECRET_KEY,
                             evaluation_judge_base_url="http://judge.internal:9/v1")
    client = FakeClient([status_error(openai.AuthenticationError, 401, "invalid_api_key")])
    run_stage(runtime, job.evaluation_job_id, "evaluate",
              lambda context: evaluate_job(context, plan_models=ScriptedModels(SCRIPTS), judge_client=client))
    with runtime.db.session() as session:
        row = repo.get_job(session, None, job.evaluation_job_id)
        messages = [event.message for event in repo.list_events(session, job.evaluation_job_id, None, 1000)[0]]
    assert row.status == "succeeded", row.error
    assert len(client.requests) == 1  # not asked again for the next examples or models
    prefix = evaluation_prefix(TENANT, job.source.id)
    manifest = EvaluationManifest.read(runtime.store, f"{prefix}/evaluation.json")
    assert manifest is not None
    tuned = manifest.models["fine_tuned"]
    assert tuned.text.exact_match == 1.0  # the other metrics stand
    assert tuned.judge is not None and tuned.judge.unscored == 8 and tuned.judge.mean is None
    assert tuned.judge.error is not None and "refused the judge's API key (401)" in tuned.judge.error
    assert any(message.startswith("The LLM judge failed for fine_tuned: the gateway refused") for message in messages)
    assert "The LLM judge failed" in runtime.store.get_bytes(f"{prefix}/evaluation.md").decode()
    everything = b"".join(runtime.store.get_bytes(f"{prefix}/{name}") for name in
                          ("evaluation.json", "evaluation_summary.csv", "predictions.jsonl", "evaluation.md"))
    everything += "\n".join(messages).encode()
    assert SECRET_KEY.encode() not in everything and b"judge.internal" not in everything


def test_a_resumed_evaluation_reuses_grades_and_asks_a_failed_judge_again(tmp_path: Path) -> None:
    runtime, job = evaluated(tmp_path, evaluation_judge_retries=0)
    prefix = evaluation_prefix(TENANT, job.source.id)

    def attempt(client: FakeClient, *, die_at: str | None) -> ScriptedModels:
        models = ScriptedModels(SCRIPTS, fail_on_load=die_at)
        context = context_for(runtime, job_row(runtime, job.evaluation_job_id), "evaluate")
        try:
            evaluate_job(context, plan_models=models, judge_client=client)
        except WorkerKilled:
            pass
        with runtime.db.session() as session:  # the lease of the dead worker runs out
            repo.release_lease(session, job.evaluation_job_id, context.owner)
        return models

    failing = FakeClient([connection_error()])
    attempt(failing, die_at="gguf:q4_k_m")  # base and fine-tuned scored, the judge unreachable
    first = ModelEvaluation.read(runtime.store, f"{prefix}/models/base.json")
    assert first is not None and first.judge is not None and first.judge.error is not None
    assert len(failing.requests) == 1
    working = AnsweringClient([])
    models = attempt(working, die_at="gguf:q4_k_m")  # the models reused, the failed judge asked again
    assert models.loads == {"gguf:q4_k_m": 1} and len(working.requests) == 16
    graded = ModelEvaluation.read(runtime.store, f"{prefix}/models/base.json")
    assert graded is not None and graded.judge is not None and graded.judge.error is None
    assert graded.judge.scored == 8
    last = AnsweringClient([])
    attempt(last, die_at=None)  # the grades reused: only the last model is graded
    assert len(last.requests) == 8
    assert job_row(runtime, job.evaluation_job_id).status == "succeeded"


def job_row(runtime: Runtime, job_id: str) -> Any:
    with runtime.db.session() as session:
        return repo.get_job(session, None, job_id)
