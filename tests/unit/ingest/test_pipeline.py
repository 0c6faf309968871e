"""``pipeline.ingest_file`` end to end on a local store, with SmolLM2's real tokenizer."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography.fernet import Fernet
from pydantic import SecretStr

from afina.core.catalog import resolve_base_model
from afina.core.datasets.options import IngestOptions
from afina.core.errors import InvalidRequest
from afina.core.store.local import LocalStore
from afina.ingest import pipeline
from afina.ingest.pipeline import IngestFailed, IngestProgress, IngestResult, IngestSource, ingest_file, version_key
from afina.ingest.tokens import IngestTokenizer, load_tokenizer
from afina.trainer.data import load_prepared_dataset
from tests.support.models import SMOLLM2, shared_model_cache

PERGUNTAS = ["como faço para trocar a senha do roteador?", "qual o horário de funcionamento da loja?",
             "o pedido 4521 já foi enviado?", "vocês entregam em Belo Horizonte?", "posso parcelar em 10 vezes?",
             "a garantia cobre tela quebrada?", "como cancelo minha assinatura?", "tem cupom de primeira compra?",
             "qual o prazo de troca?", "o produto vem com nota fiscal?", "aceitam pix?", "onde vejo meu boleto?",
             "a caneca vai no micro-ondas?", "tem tamanho GG?", "como falo com um atendente?",
             "vocês têm loja física?", "o frete é grátis acima de quanto?", "posso retirar na loja?",
             "a bateria dura quanto tempo?", "como rastreio a encomenda?"]


def manifest_of(result: IngestResult) -> dict:
    """The committed manifest as the JSON it is stored as."""
    return result.manifest.model_dump()


def chat(i: int, question: str | None = None, answer: str | None = None) -> dict[str, Any]:
    question = question or PERGUNTAS[i % len(PERGUNTAS)] + f" (cliente {i})"
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": answer or f"Claro! Resposta número {i}: já verifiquei."}]}


def jsonl(records: list[Any]) -> bytes:
    return b"".join(orjson.dumps(record) + b"\n" for record in records)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> IngestTokenizer:
    return load_tokenizer(resolve_base_model(SMOLLM2), shared_model_cache(tmp_path_factory))


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


class Ingest:
    """Upload bytes to the store and ingest them, as the worker does."""

    def __init__(self, store: LocalStore, tmp_path: Path, tokenizer: IngestTokenizer) -> None:
        self.store, self.tmp_path, self.tokenizer = store, tmp_path, tokenizer

    def source(self, content: bytes, filename: str = "aeon.jsonl") -> IngestSource:
        digest = hashlib.sha256(content).hexdigest()
        key = f"files/acme/file-{digest[:8]}/{filename}"
        info = self.store.put_bytes(key, content)
        return IngestSource(tenant_id="acme", raw_key=key, filename=filename, sha256=info.sha256 or digest)

    def __call__(self, content: bytes, options: IngestOptions | None = None, filename: str = "aeon.jsonl",
                 **kwargs: Any) -> pipeline.IngestResult:
        return ingest_file(self.store, self.source(content, filename), options or IngestOptions(),
                           work_dir=self.tmp_path / "work", model_cache_dir=self.tmp_path / "unused",
                           tokenizer=self.tokenizer, **kwargs)


@pytest.fixture
def ingest(store: LocalStore, tmp_path: Path, tokenizer: IngestTokenizer) -> Ingest:
    return Ingest(store, tmp_path, tokenizer)


def report_lines(store: LocalStore, key: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in store.get_bytes(f"{key}/report.jsonl").splitlines()]


def split_records(store: LocalStore, info: dict[str, Any]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in store.get_bytes(info["key"]).splitlines()]


def test_a_clean_file_becomes_a_committed_version(ingest: Ingest, store: LocalStore) -> None:
    options = IngestOptions(split={"proportions": {"treino": 0.7, "validacao": 0.2, "teste": 0.1}})
    result = ingest(jsonl([chat(i) for i in range(60)]), options)
    manifest = result.manifest.model_dump()
    assert not result.reused and result.version_key.startswith("datasets/acme/v-")
    assert manifest["counts"]["examples"] == 60 and manifest["counts"]["rows"] == 60
    assert {name: info["examples"] for name, info in manifest["splits"].items()} == \
        {name: manifest["counts"][name] for name in manifest["splits"]}
    assert sum(info["examples"] for info in manifest["splits"].values()) == 60
    assert set(manifest["splits"]) == {"train", "validation", "test"}
    for info in manifest["splits"].values():  # each split object is what the manifest says it is
        data = store.get_bytes(info["key"])
        assert hashlib.sha256(data).hexdigest() == info["sha256"] and len(data.splitlines()) == info["examples"]
    for name in ("report.jsonl", "stats.json", "preview.txt", "preview.html", "token_lengths.png"):
        assert store.exists(f"{result.version_key}/{name}"), name
    stats = orjson.loads(store.get_bytes(f"{result.version_key}/stats.json"))
    assert stats["tokens"]["count"] == 60 and stats["tokens"]["max"] < 100
    assert stats["languages"]["counts"].get("pt", 0) > 0
    assert store.get_bytes(f"{result.version_key}/token_lengths.png").startswith(b"\x89PNG")
    preview = store.get_bytes(f"{result.version_key}/preview.txt").decode()
    assert "<|im_start|>assistant" in preview and "«" in preview
    # the trainer reads it through its own contract
    prepared = load_prepared_dataset(store, result.version_key)
    assert len(prepared.train) == manifest["splits"]["train"]["examples"]
    assert prepared.train[0]["messages"][0]["role"] == "user"


def test_the_same_input_and_options_reuse_the_version(ingest: Ingest) -> None:
    content = jsonl([chat(i) for i in range(20)])
    first = ingest(content)
    again = ingest(content)
    assert again.reused and again.version_key == first.version_key
    other = ingest(content, IngestOptions(system_prompt="Você é o assistente da loja."))
    assert not other.reused and other.version_key != first.version_key
    records = [record for info in manifest_of(other)["splits"].values() for record in
               [json.loads(line) for line in ingest.store.get_bytes(info["key"]).splitlines()]]
    assert all(record["messages"][0] == {"role": "system", "content": "Você é o assistente da loja."}
               for record in records)


def test_appended_rows_never_move_an_old_row_to_another_split(ingest: Ingest, store: LocalStore) -> None:
    first = ingest(jsonl([chat(i) for i in range(40)]))
    grown = ingest(jsonl([chat(i) for i in range(80)]))

    def where(result: pipeline.IngestResult) -> dict[str, str]:
        return {json.dumps(record, sort_keys=True): name for name, info in manifest_of(result)["splits"].items()
                for record in split_records(store, info)}

    before, after = where(first), where(grown)
    assert all(after[record] == name for record, name in before.items())


def test_an_unfinished_attempt_is_started_over(ingest: Ingest, store: LocalStore) -> None:
    content = jsonl([chat(i) for i in range(20)])
    key = version_key(ingest.source(content), IngestOptions())
    store.put_bytes(f"{key}/splits/train-0000000000000000.jsonl", b"half written")  # a crashed attempt
    result = ingest(content)
    assert not result.reused and result.version_key == key
    assert store.exists(f"{key}/manifest.json")
    assert all(info["key"] != f"{key}/splits/train-0000000000000000.jsonl"
               for info in manifest_of(result)["splits"].values())


BAD_ROWS = [
    (3, b'{"messages": [{"role": "user", "content": "cortado', "line", "invalid_json"),
    (5, orjson.dumps({"messages": [{"role": "bot", "content": "oi"}, {"role": "assistant", "content": "olá"}]}),
     "messages[0].role", "unrecognized_role"),
    (7, orjson.dumps({"messages": [{"role": "user", "content": "sem resposta"}]}), "messages",
     "example_missing_assistant_message"),
    (9, orjson.dumps({"messages": [{"role": "user", "content": "oi"}, {"role": "assistant", "content": "  "}]}),
     "messages[1].content", "missing_content"),
]


def file_with_bad_rows(total: int = 30) -> bytes:
    lines = [orjson.dumps(chat(i)) for i in range(total)]
    for line_number, raw, _, _ in BAD_ROWS:
        lines[line_number - 1] = raw
    return b"\n".join(lines) + b"\n"


def test_lenient_mode_drops_bad_rows_and_reports_each(ingest: Ingest, store: LocalStore) -> None:
    result = ingest(file_with_bad_rows())
    assert manifest_of(result)["counts"]["examples"] == 30 - len(BAD_ROWS)
    lines = report_lines(store, result.version_key)
    for line_number, _, field, rule in BAD_ROWS:
        match = [entry for entry in lines if entry["line"] == line_number and entry["rule"] == rule]
        assert match, (line_number, rule, lines)
        assert match[0]["file"] == "aeon.jsonl" and match[0]["action"] == "dropped"
        assert match[0]["field"] == field and match[0]["detail"]
    assert result.summary["issues"]["unrecognized_role"] == {"dropped": 1}


def test_strict_mode_fails_naming_the_first_errors_and_still_writes_the_report(ingest: Ingest,
                                                                               store: LocalStore) -> None:
    with pytest.raises(IngestFailed) as caught:
        ingest(file_with_bad_rows(), IngestOptions(mode="strict"))
    failure = caught.value
    assert failure.line == 3 and failure.rule == "invalid_json"
    assert "aeon.jsonl, line 3" in failure.message and "line 5, field messages[0].role" in failure.message
    assert "[unrecognized_role]" in failure.message and "strict" in failure.message
    assert failure.summary["counts"]["rows"] == 30
    actions = {entry["action"] for entry in report_lines(store, failure.version_key)}
    assert "error" in actions and "dropped" not in actions  # strict: errors stay errors (row 9 was also trimmed)
    assert not store.exists(f"{failure.version_key}/manifest.json")
    assert store.list(f"{failure.version_key}/splits/") == []  # no split is stored for a failed file


def test_too_few_examples_and_split_minimums_fail(ingest: Ingest) -> None:
    with pytest.raises(IngestFailed) as caught:
        ingest(jsonl([chat(i) for i in range(9)]))
    assert caught.value.rule == "too_few_examples" and "at least 10" in caught.value.message
    options = IngestOptions(split={"proportions": {"train": 0.8, "validation": 0.2},
                                   "min_examples": {"train": 10, "validation": 50}})
    with pytest.raises(IngestFailed) as caught:
        ingest(jsonl([chat(i) for i in range(30)]), options)
    assert caught.value.rule == "split_too_small" and "validation split" in caught.value.message


def test_repairs_and_duplicates_are_reported_per_row(ingest: Ingest, store: LocalStore) -> None:
    records = [chat(i) for i in range(20)]
    records[4] = chat(4, question="VOCÃŠ pode ligar a luz da sala?")  # mojibake, as in the seeds
    records[6] = chat(6, question="  espaço antes e depois  ")
    records.append(records[2])  # an exact duplicate, line 21
    records.append(chat(2, question=PERGUNTAS[2].upper() + " (CLIENTE 2)!"))  # the same, normalized: line 22
    result = ingest(jsonl(records))
    lines = report_lines(store, result.version_key)
    by_rule = {(entry["line"], entry["rule"]): entry for entry in lines}
    assert by_rule[(5, "mojibake")]["action"] == "fixed" and by_rule[(5, "mojibake")]["field"] == \
        "messages[0].content"
    assert by_rule[(7, "whitespace")]["action"] == "fixed"
    assert by_rule[(21, "duplicate_normalized")]["action"] == "dropped"
    assert "line 3" in by_rule[(21, "duplicate_normalized")]["detail"]
    assert by_rule[(22, "duplicate_normalized")]["action"] == "dropped"
    texts = [record["messages"][0]["content"] for info in manifest_of(result)["splits"].values()
             for record in split_records(store, info)]
    assert "VOCÊ pode ligar a luz da sala?" in texts and "espaço antes e depois" in texts
    assert manifest_of(result)["counts"]["duplicates"] == 2


def test_length_policies(ingest: Ingest, store: LocalStore) -> None:
    records = [chat(i) for i in range(20)]
    records[10] = chat(10, answer="palavra " * 400)  # ~800 tokens
    dropped = ingest(jsonl(records), IngestOptions(max_seq_len=256))
    assert manifest_of(dropped)["counts"]["too_long"] == 1 and manifest_of(dropped)["counts"]["examples"] == 19
    truncated = ingest(jsonl(records), IngestOptions(max_seq_len=256, length_policy="truncate"))
    assert manifest_of(truncated)["counts"]["truncated"] == 1 and manifest_of(truncated)["counts"]["examples"] == 20
    with pytest.raises(IngestFailed) as caught:  # "fail" fails the file even in lenient mode
        ingest(jsonl(records), IngestOptions(max_seq_len=256, length_policy="fail"))
    assert caught.value.rule == "too_long" and caught.value.line == 11


def test_progress_is_reported_every_n_rows(ingest: Ingest) -> None:
    events: list[IngestProgress] = []
    ingest(jsonl([chat(i) for i in range(25)]), progress=events.append, progress_every=10)
    assert [event.rows for event in events if event.stage == "reading"] == [10, 20]
    assert [event.stage for event in events[-2:]] == ["writing", "done"]
    assert events[-1].examples == 25


def test_encryption_at_rest(ingest: Ingest, store: LocalStore) -> None:
    key = SecretStr(Fernet.generate_key().decode())
    options = IngestOptions(encrypt_at_rest=True)
    result = ingest(jsonl([chat(i) for i in range(20)]), options, data_key=key)
    for info in manifest_of(result)["splits"].values():
        assert info["encryption"] == "fernet-blocks-v1"
        assert b"cliente" not in store.get_bytes(info["key"])
    prepared = load_prepared_dataset(store, result.version_key, key)
    assert len(prepared.train) + len(prepared.validation) == 20
    assert "cliente" in prepared.train[0]["messages"][0]["content"]
    with pytest.raises(InvalidRequest) as caught:  # no key: refused before any work, and the key never shown
        ingest(jsonl([chat(i) for i in range(21)]), options, data_key=None)
    assert caught.value.code == "encryption_key_missing"
    assert key.get_secret_value() not in store.get_bytes(f"{result.version_key}/manifest.json").decode()


def test_a_file_level_problem_fails_with_the_report_written(ingest: Ingest, store: LocalStore) -> None:
    with pytest.raises(IngestFailed) as caught:
        ingest(bytes(range(256)) * 64, filename="random.bin")
    lines = report_lines(store, caught.value.version_key)
    assert lines[0]["file"] == "random.bin" and lines[0]["action"] == "error" and lines[0]["field"] == "file"


def test_a_big_file_samples_token_statistics_but_judges_every_row(ingest: Ingest, store: LocalStore,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "EXACT_TOKEN_COUNT_BYTES", 0)
    records = [chat(i) for i in range(40)]
    records[17] = chat(17, answer="palavra " * 400)
    result = ingest(jsonl(records), IngestOptions(max_seq_len=256))
    assert manifest_of(result)["counts"]["too_long"] == 1  # the long row was tokenized and dropped
    stats = orjson.loads(store.get_bytes(f"{result.version_key}/stats.json"))
    assert stats["tokens"]["uncounted"] > 0 and stats["tokens"]["count"] < 39


def test_worker_processes_write_the_same_bytes_as_one_process(tmp_path: Path, tokenizer: IngestTokenizer,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "EXACT_TOKEN_COUNT_BYTES", 0)  # sampled statistics must match too
    records = [chat(i) for i in range(700)]
    records[100] = {"messages": [{"role": "user", "content": "sem resposta"}]}
    records[650] = records[3]
    content = jsonl(records)
    outputs = []
    for processes in (0, 2):
        store = LocalStore(tmp_path / f"store-{processes}")
        run = Ingest(store, tmp_path / f"run-{processes}", tokenizer)
        result = run(content, processes=processes, parallel_min_bytes=0)
        assert result.processes == processes  # the workers really ran (no silent fallback)
        objects = {info.key.rsplit("/", 1)[-1]: store.get_bytes(info.key)
                   for info in store.list(result.version_key + "/") if not info.key.endswith("manifest.json")}
        outputs.append(objects)
    assert outputs[0].keys() == outputs[1].keys() and len(outputs[0]) >= 7
    for name in outputs[0]:
        assert outputs[0][name] == outputs[1][name], name
