"""The run's observers (``observe_run``) and their forwarding callback, driven by real trainers on CPU: TRL's
``SFTTrainer`` (as both backends train) and a plain ``transformers.Trainer`` (a backend whose logs carry no
token accuracy), a tiny random Llama over the real SmolLM2 tokenizer, the embedded runtime (SQLite + local store)
and the real Prometheus registry."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY

from afina.core.datasets.layout import job_prefix
from afina.core.db import repository as repo
from afina.core.runtime import Runtime
from afina.core.settings import Settings
from afina.trainer.accuracy import TokenAccuracyMeter
from afina.trainer.callbacks import observe_run
from afina.trainer.metrics_files import HARDWARE_METRICS_FILE, TRAINING_METRICS_FILE
from tests.support.jobs import context_for, create_job

PAIRS = [
    ("Qual é a capital de Portugal?", "A capital de Portugal é Lisboa."),
    ("Quanto é 7 vezes 8?", "Sete vezes oito é cinquenta e seis."),
    ("Como se diz 'obrigado' em inglês?", "Diz-se 'thank you'."),
    ("Que dia vem depois de sexta-feira?", "Depois de sexta-feira vem o sábado."),
    ("Qual é a cor do céu num dia limpo?", "O céu num dia limpo é azul."),
    ("Quantas estações tem o ano?", "O ano tem quatro estações: primavera, verão, outono e inverno."),
    ("Quem escreveu 'Os Lusíadas'?", "'Os Lusíadas' foi escrito por Luís Vaz de Camões."),
    ("Qual é o maior oceano?", "O maior oceano é o Pacífico."),
]


def encode(tokenizer: Any, question: str, answer: str) -> dict[str, list[int]]:
    prompt = tokenizer(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    reply = tokenizer(f"{answer}<|im_end|>")["input_ids"]
    return {"input_ids": prompt + reply, "labels": [-100] * len(prompt) + reply}


@pytest.fixture(scope="module")
def rows(tokenizer: Any) -> list[dict[str, list[int]]]:
    return [encode(tokenizer, question, answer) for question, answer in PAIRS]


def tiny_model(tokenizer: Any) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    return LlamaForCausalLM(config)


class Published:
    """The recipe's checkpoint publisher, recording what it was handed."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, Path, dict[str, Any]]] = []

    def __call__(self, step: int, local_dir: Path, metrics: dict[str, Any]) -> None:
        assert local_dir.is_dir(), local_dir  # the Trainer wrote it before the callback runs
        self.calls.append((step, local_dir, metrics))


def make_job(tmp_path: Path) -> tuple[Runtime, Any]:
    runtime = Runtime(Settings(home=tmp_path / "home", log_json=False))
    job = create_job(runtime, "acme", "file-test", stage="train", status="running")
    return runtime, context_for(runtime, job, "train")


def sft_trainer(tokenizer: Any, rows: list[dict[str, list[int]]], output_dir: Path, callback: Any,
                *, max_steps: int = 8, eval_steps: int | None = 4, save_steps: int = 4) -> Any:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(output_dir), seed=7, data_seed=7, max_steps=max_steps,
                     per_device_train_batch_size=2, per_device_eval_batch_size=2, learning_rate=5e-3,
                     lr_scheduler_type="linear", warmup_steps=2, logging_steps=1, logging_first_step=True,
                     eval_strategy="steps" if eval_steps else "no", eval_steps=eval_steps, save_strategy="steps",
                     save_steps=save_steps, max_length=128, dataset_kwargs={"skip_prepare_dataset": True},
                     include_num_input_tokens_seen="non_padding", use_cpu=True, report_to=[],
                     disable_tqdm=True, log_level="warning", dataloader_num_workers=0)
    return SFTTrainer(model=tiny_model(tokenizer), args=args, processing_class=tokenizer,
                      train_dataset=Dataset.from_list(rows[:6]),
                      eval_dataset=Dataset.from_list(rows[6:]) if eval_steps else None, callbacks=[callback])


def metrics_events(runtime: Runtime, job_id: str) -> dict[int, dict[str, Any]]:
    with runtime.db.session() as session:
        rows, _ = repo.list_events(session, job_id, None, 10_000)
    return {event.data["step"]: event.data for event in reversed(rows) if event.type == "metrics"}


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def wait_for(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_a_sft_run_reports_events_files_metrics_and_checkpoints(tokenizer: Any, rows: Any, tmp_path: Path) -> None:
    runtime, context = make_job(tmp_path)
    published = Published()
    observers = observe_run(context, published, metrics_dir=tmp_path / "work" / "metrics",
                            hardware_every_steps=4, hardware_interval_s=0.2, upload_every_s=0.0)
    steps_before = sample("afina_train_step_seconds_count")
    trainer = sft_trainer(tokenizer, rows, tmp_path / "work" / "output", observers.callback())
    trainer.train()

    # one OpenAI metrics event per logged step, validation folded into the evaluated steps
    events = metrics_events(runtime, context.job_id)
    assert sorted(events) == list(range(1, 9))
    history = {entry["step"]: entry for entry in trainer.state.log_history if "loss" in entry}
    for step, data in events.items():
        assert data["total_steps"] == 8 and data["epoch"] > 0
        assert data["train_loss"] == pytest.approx(history[step]["loss"])
        assert data["train_mean_token_accuracy"] == pytest.approx(history[step]["mean_token_accuracy"])
        assert data["learning_rate"] == pytest.approx(history[step]["learning_rate"])
        assert data["tokens_per_second"] > 0 and data["elapsed_s"] >= 0 and data["eta_s"] >= 0
        assert not any(key.startswith("gpu_") for key in data)  # CPU run: no GPU figures, not zeros
    assert events[8]["eta_s"] == 0
    assert [step for step, data in events.items() if data["full_valid_loss"] is not None] == [4, 8]
    assert events[4]["valid_loss"] == events[4]["full_valid_loss"] > 0
    assert 0 <= events[8]["valid_mean_token_accuracy"] <= 1
    assert not observers.reporter.accuracy.attached  # TRL reports the accuracy: the meter stepped aside

    # training_metrics.jsonl: every logged step and evaluation, with the moving average and progress
    observers.close()
    training = [orjson.loads(line) for line in (tmp_path / "work" / "metrics" / TRAINING_METRICS_FILE).read_bytes()
                .splitlines()]
    train = [r for r in training if r["type"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 9))
    assert [r["step"] for r in training if r["type"] == "validation"] == [4, 8]
    losses = [history[step]["loss"] for step in range(1, 9)]
    assert train[2]["train_loss_avg_10"] == pytest.approx(sum(losses[:3]) / 3, rel=1e-5)
    assert train[-1]["progress_pct"] == 100.0 and train[0]["progress_pct"] == 12.5
    assert train[-1]["tokens_seen"] == trainer.state.num_input_tokens_seen
    assert all(r["grad_norm"] > 0 and r["attempt"] == 1 for r in train)

    # hardware_metrics.jsonl: at train begin, every 4 steps, on the timer, at the end
    hardware = [orjson.loads(line) for line in (tmp_path / "work" / "metrics" / HARDWARE_METRICS_FILE).read_bytes()
                .splitlines()]
    sources = [r["source"] for r in hardware]
    assert sources[0] == "train_begin" and sources[-1] == "close" and "train_end" in sources
    assert "timer" in sources  # the 0.2 s sampler ran while the 8 steps trained (seconds on CPU)
    assert [r["step"] for r in hardware if r["source"] == "step"] == [4, 8]
    for record in hardware:
        assert record["process_rss_gb"] > 0.05 and record["ram_total_gb"] >= record["ram_used_gb"] > 0
        assert record["disk_free_gb"] > 0 and 0 <= record["cpu_percent"] <= 100 * 64
    assert not observers.sampler.running

    # both files are in the store, identical to the local ones
    prefix = f"{job_prefix(context.tenant_id, context.job_id)}/report"
    for name in (TRAINING_METRICS_FILE, HARDWARE_METRICS_FILE):
        assert runtime.store.get_bytes(f"{prefix}/{name}") == (tmp_path / "work" / "metrics" / name).read_bytes()

    # checkpoints at 4 and 8, with OpenAI's checkpoint metrics
    assert [step for step, _, _ in published.calls] == [4, 8]
    assert published.calls[1][2]["full_valid_loss"] == events[8]["full_valid_loss"]

    # Prometheus: every step timed, the last loss and throughput
    assert sample("afina_train_step_seconds_count") - steps_before == 8
    assert sample("afina_train_loss") == pytest.approx(events[8]["train_loss"])
    assert sample("afina_train_tokens_per_second") > 0


def test_files_reach_the_store_while_training_runs(tokenizer: Any, rows: Any, tmp_path: Path) -> None:
    """A crash leaves the files behind: they are uploaded at each checkpoint, not only at the end."""
    runtime, context = make_job(tmp_path)
    prefix = f"{job_prefix(context.tenant_id, context.job_id)}/report"
    seen_at_checkpoint: dict[int, list[int]] = {}

    def publish(step: int, local_dir: Path, metrics: dict[str, Any]) -> None:
        key = f"{prefix}/{TRAINING_METRICS_FILE}"
        if runtime.store.exists(key):  # the upload of the previous checkpoint
            seen_at_checkpoint[step] = [orjson.loads(line)["step"] for line in runtime.store.get_bytes(key).splitlines()
                                        if orjson.loads(line)["type"] == "train"]

    observers = observe_run(context, publish, metrics_dir=tmp_path / "metrics", hardware_interval_s=60,
                            upload_every_s=3600)
    sft_trainer(tokenizer, rows, tmp_path / "output", observers.callback(), max_steps=6, eval_steps=None,
                save_steps=3).train()
    assert seen_at_checkpoint == {6: [1, 2, 3]}  # step 3's upload happened right after its checkpoint
    observers.close()


def test_a_resumed_run_continues_the_files_of_the_earlier_attempt(tokenizer: Any, rows: Any, tmp_path: Path) -> None:
    runtime, context = make_job(tmp_path)
    first = observe_run(context, Published(), metrics_dir=tmp_path / "a1" / "metrics", hardware_interval_s=60,
                        upload_every_s=3600)
    sft_trainer(tokenizer, rows, tmp_path / "a1" / "output", first.callback(), max_steps=8, save_steps=4).train()
    first.close()  # the store now has steps 1..8 of attempt 1; the worker "dies", checkpoint-4 survives

    # another worker: new observers on a new folder, continuing from the store's copy
    second = observe_run(context, Published(), metrics_dir=tmp_path / "a2" / "metrics", hardware_interval_s=60,
                         upload_every_s=3600)
    trainer = sft_trainer(tokenizer, rows, tmp_path / "a2" / "output", second.callback(), max_steps=8, save_steps=4)
    trainer.train(resume_from_checkpoint=str(tmp_path / "a1" / "output" / "checkpoint-4"))
    second.close()
    assert second.reporter.resumed_from_step == 4 and second.reporter.attempt == 2

    training = second.files.records(TRAINING_METRICS_FILE)
    train = [(r["step"], r["attempt"]) for r in training if r["type"] == "train"]
    assert train == [(1, 1), (2, 1), (3, 1), (4, 1), (5, 2), (6, 2), (7, 2), (8, 2)]  # steps 5-8 once, retrained
    assert [r["step"] for r in training if r["type"] == "validation"] == [4, 8]
    attempts = [r["attempt"] for r in second.files.records(HARDWARE_METRICS_FILE)]
    assert attempts == sorted(attempts) and set(attempts) == {1, 2}
    # the moving average carries on across the resume (attempt 1's first four losses are in its window)
    train_records = [r for r in training if r["type"] == "train"]
    losses = [r["train_loss"] for r in train_records]
    assert train_records[-1]["train_loss_avg_10"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)


def plain_trainer(tokenizer: Any, rows: list[dict[str, list[int]]], output_dir: Path, callback: Any) -> Any:
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(output_dir), seed=7, max_steps=4, per_device_train_batch_size=2,
                             per_device_eval_batch_size=2, learning_rate=5e-3, logging_steps=1, eval_strategy="steps",
                             eval_steps=4, save_strategy="no", include_num_input_tokens_seen="non_padding",
                             use_cpu=True, report_to=[], disable_tqdm=True, log_level="warning",
                             remove_unused_columns=False)
    return Trainer(model=tiny_model(tokenizer), args=args, train_dataset=Dataset.from_list(rows[:6]),
                   eval_dataset=Dataset.from_list(rows[6:]), processing_class=tokenizer,
                   data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100), callbacks=[callback])


def test_a_backend_without_token_accuracy_gets_it_measured(tokenizer: Any, rows: Any, tmp_path: Path) -> None:
    runtime, context = make_job(tmp_path)
    observers = observe_run(context, Published(), metrics_dir=tmp_path / "metrics", hardware_interval_s=60)
    trainer = plain_trainer(tokenizer, rows, tmp_path / "output", observers.callback())
    trainer.train()
    observers.close()
    assert not any("mean_token_accuracy" in entry for entry in trainer.state.log_history)  # the backend's logs
    events = metrics_events(runtime, context.job_id)
    assert sorted(events) == [1, 2, 3, 4]
    for data in events.values():
        assert 0 <= data["train_mean_token_accuracy"] <= 1
    assert 0 <= events[4]["valid_mean_token_accuracy"] <= 1 and events[4]["full_valid_loss"] > 0
    assert not observers.reporter.accuracy.attached  # hooks removed when training ended


def test_the_meter_matches_a_direct_computation(tokenizer: Any, rows: Any) -> None:
    import torch

    model = tiny_model(tokenizer)
    batch = [rows[0], rows[1]]
    width = max(len(row["input_ids"]) for row in batch)
    input_ids = torch.tensor([r["input_ids"] + [tokenizer.pad_token_id] * (width - len(r["input_ids"])) for r in batch])
    labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in batch])
    meter = TokenAccuracyMeter()
    assert meter.attach(model)
    model.train()
    logits = model(input_ids=input_ids, labels=labels).logits
    model.eval()
    with torch.no_grad():
        model(input_ids=input_ids, labels=labels)
    meter.detach()
    model(input_ids=input_ids, labels=labels)  # detached: not counted
    predictions, targets = logits[:, :-1].argmax(-1), labels[:, 1:]
    mask = targets != -100
    expected = ((predictions == targets) & mask).sum().item() / mask.sum().item()
    assert meter.take("train") == pytest.approx(expected)
    assert meter.take("eval") == pytest.approx(expected)  # same weights, dropout off in both
    assert meter.take("train") is None  # read once


class OutOfMemoryAt:
    """Fails the run at one step, the way a CUDA out-of-memory error escapes ``trainer.train``."""

    def __init__(self, step: int) -> None:
        from transformers import TrainerCallback

        outer = self

        class Callback(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                if state.global_step == outer.step:
                    raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

        self.step = step
        self.callback = Callback()


def test_a_retry_in_the_same_worker_keeps_the_observers_and_continues_its_files(
        tokenizer: Any, rows: Any, tmp_path: Path) -> None:
    runtime, context = make_job(tmp_path)
    observers = observe_run(context, Published(), metrics_dir=tmp_path / "work" / "metrics", hardware_interval_s=0.05,
                            upload_every_s=3600)
    failing = sft_trainer(tokenizer, rows, tmp_path / "work" / "output", observers.callback(), max_steps=6,
                          eval_steps=None, save_steps=2)
    failing.add_callback(OutOfMemoryAt(3).callback)
    with pytest.raises(RuntimeError, match="out of memory"):
        failing.train()
    assert observers.sampler.running  # nothing told it the run died

    # the recipe's retry builds a new trainer, with a new callback over the same observers, resuming from checkpoint-2
    sft_trainer(tokenizer, rows, tmp_path / "work" / "output", observers.callback(), max_steps=6, eval_steps=None,
                save_steps=2).train(resume_from_checkpoint=str(tmp_path / "work" / "output" / "checkpoint-2"))
    assert observers.sampler.running  # one sampler for the run, never two writing the same files
    observers.close()
    assert not observers.sampler.running
    assert observers.reporter.attempt == 2 and observers.reporter.resumed_from_step == 2
    train = [(r["step"], r["attempt"]) for r in observers.files.records(TRAINING_METRICS_FILE) if r["type"] == "train"]
    assert train == [(1, 1), (2, 1), (3, 2), (4, 2), (5, 2), (6, 2)]
    hardware = observers.files.records(HARDWARE_METRICS_FILE)
    assert {r["attempt"] for r in hardware} == {1, 2}
    assert [r["source"] for r in hardware if r["attempt"] == 2][0] == "train_begin"
    assert hardware[-1]["source"] == "close" and hardware[-1]["attempt"] == 2
    # one metrics event a logged step: 1-2 from attempt 1 (it died before logging step 3), 3-6 from attempt 2
    with runtime.db.session() as session:
        events, _ = repo.list_events(session, context.job_id, None, 10_000)
    assert sorted(event.data["step"] for event in events if event.type == "metrics") == [1, 2, 3, 4, 5, 6]
