"""The report built from realistic ``log_history`` records (as transformers 5 + TRL write them) and metrics
files: a GPU run with validation, a resumed CPU run without validation, a long run — Markdown, standalone HTML,
charts, CSV."""

from __future__ import annotations

import base64
import io
import math
import re
from typing import Any

import orjson
import pytest

from afina.core.artifacts.dataset import DatasetManifest, SplitFile
from afina.trainer.report import (
    CHART_LEARNING_RATE,
    CHART_LOSS,
    CHART_MEMORY,
    MAX_STEP_ROWS,
    REPORT_HTML,
    REPORT_MARKDOWN,
    REPORT_PDF,
    STEP_METRICS_CSV,
    RunFacts,
    build_report,
    metric_records,
)

CONFIG = {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 2.0, "learning_rate": 0.0004,
          "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "max_seq_len": 1024, "save_steps": 6,
          "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "packing": False,
          "warmup_ratio": 0.03, "scheduler": "linear"}
DATASET = {"train": {"examples": 120, "kept": 118, "dropped": 2, "truncated": 3, "tokens": 61_440,
                     "trained_tokens": 20_480},
           "validation": {"examples": 12, "kept": 12, "dropped": 0, "truncated": 0, "tokens": 6_100,
                          "trained_tokens": 2_050}}
SPLIT_SHA256 = "0" * 64
# a dataset version as ingest commits it: the counts, and the summary's issues by rule and action
MANIFEST = DatasetManifest.build(
    format="openai-chat", created_at=1_790_000_000, version="v-0123456789abcdef",
    counts={"rows": 135, "duplicates": 3, "too_long": 0, "examples": 132, "train": 120, "validation": 12},
    splits={"train": SplitFile(key="datasets/acme/v-0123456789abcdef/splits/train.jsonl", bytes=90_000,
                               sha256=SPLIT_SHA256, examples=120),
            "validation": SplitFile(key="datasets/acme/v-0123456789abcdef/splits/validation.jsonl", bytes=9_000,
                                    sha256=SPLIT_SHA256, examples=12)},
    summary={"counts": {"rows": 135}, "issues": {"duplicate_exact": {"dropped": 3}, "fixed_whitespace": {"fixed": 7}}})
H100 = {"host": "trainer-0", "cpu_cores_logical": 16, "ram_total_gb": 125.7, "torch": "2.11.0+cu130",
        "gpus": [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_gb": 79.19}]}


def loss_at(step: int) -> float:
    return round(2.3 * math.exp(-step / 9) + 0.62 + 0.04 * math.sin(step * 1.7), 4)


def log_history(last_step: int, *, steps_per_epoch: int = 30, eval_every: int | None = None,
                first_step: int = 1, total_steps: int | None = None) -> list[dict[str, Any]]:
    """What ``trainer.state.log_history`` holds: TRL's training logs, evaluations, and the final summary."""
    total = total_steps or last_step
    entries: list[dict[str, Any]] = []
    for step in range(first_step, last_step + 1):
        warm = min(1.0, step / 3)
        entries.append({"loss": loss_at(step), "grad_norm": round(1.8 / math.sqrt(step), 4),
                        "learning_rate": 4e-4 * warm * (1 - (step - 1) / total), "entropy": 1.9,
                        "mean_token_accuracy": round(0.35 + 0.4 * (1 - math.exp(-step / 10)), 4),
                        "num_tokens": 512.0 * step, "epoch": round(step / steps_per_epoch, 4),
                        "num_input_tokens_seen": 512 * step, "train_runtime": 1.1 * step,
                        "train_tokens_per_second": 465.0, "step": step})
        if eval_every and step % eval_every == 0:
            entries.append({"eval_loss": round(loss_at(step) + 0.15, 4), "eval_runtime": 1.9,
                            "eval_samples_per_second": 6.3, "eval_steps_per_second": 1.6, "eval_entropy": 1.8,
                            "eval_mean_token_accuracy": round(0.33 + 0.38 * (1 - math.exp(-step / 10)), 4),
                            "eval_num_tokens": 512.0 * step, "epoch": round(step / steps_per_epoch, 4),
                            "num_input_tokens_seen": 512 * step, "step": step})
    entries.append({"train_runtime": 66.0, "train_samples_per_second": 3.6, "train_steps_per_second": 0.9,
                    "total_flos": 1.2e13, "train_loss": 1.1, "epoch": round(last_step / steps_per_epoch, 4),
                    "num_input_tokens_seen": 512 * last_step, "step": last_step})
    return entries


def training_file(steps: range, attempt_of: Any, total: int) -> bytes:
    lines = []
    for step in steps:
        lines.append({"type": "train", "timestamp": 1_790_000_000.0 + 2 * step, "step": step, "total_steps": total,
                      "epoch": step / 30, "attempt": attempt_of(step), "train_loss": loss_at(step),
                      "train_loss_avg_10": loss_at(step) + 0.02, "train_mean_token_accuracy": 0.5,
                      "learning_rate": 2e-4, "grad_norm": 0.9, "tokens_per_second": 4000.0 + step,
                      "tokens_seen": 512 * step, "progress_pct": 100 * step / total, "elapsed_s": 2.0 * step,
                      "eta_s": 2.0 * (total - step)})
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)


def hardware_file(samples: int, *, gpu: bool, attempt_of: Any = lambda index: 1) -> bytes:
    lines = []
    for index in range(samples):
        record: dict[str, Any] = {"timestamp": 1_790_000_000.0 + 10 * index, "elapsed_s": 10.0 * index,
                                  "attempt": attempt_of(index), "step": 3 * index, "epoch": index / 10,
                                  "phase": "train", "source": "timer", "cpu_percent": 35.0 + index % 7,
                                  "process_rss_gb": 2.4 + 0.01 * index, "ram_used_gb": 12.5 + 0.02 * index,
                                  "ram_total_gb": 125.7, "ram_percent": 10.0, "disk_free_gb": 410.5 - 0.1 * index}
        if gpu:
            record.update({"gpu0_allocated_gb": 3.4 + 0.2 * math.sin(index), "gpu0_reserved_gb": 4.6,
                           "gpu0_peak_gb": 5.1, "gpu0_total_gb": 79.19, "gpu0_utilization_percent": 96.0})
        lines.append(record)
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)


def facts(**changes: Any) -> RunFacts:
    values: dict[str, Any] = {"job_id": "ftjob-0123456789abcdef01234567", "base_model": "llama-3.2-1b-instruct",
                              "device": "cuda", "backend": "unsloth", "config": CONFIG, "dataset": DATASET,
                              "manifest": MANIFEST, "log_history": log_history(60, eval_every=15),
                              "global_step": 60, "max_steps": 60, "trained_tokens": 30_720, "wall_seconds": 125.4,
                              "hardware": H100, "finished_at": 1_790_000_600.0}
    values.update(changes)
    return RunFacts(**values)


def png_image(png: bytes) -> Any:
    from PIL import Image

    picture = Image.open(io.BytesIO(png))
    assert picture.format == "PNG"
    picture.load()
    return picture


def test_a_gpu_run_with_validation(tmp_path: Any) -> None:
    files = build_report(facts(), training_file(range(1, 61), lambda step: 1, 60), hardware_file(40, gpu=True))
    assert list(files) == [REPORT_MARKDOWN, REPORT_HTML, REPORT_PDF, CHART_LOSS, CHART_LEARNING_RATE, CHART_MEMORY,
                           STEP_METRICS_CSV, "training_metrics.jsonl", "hardware_metrics.jsonl"]
    markdown = files[REPORT_MARKDOWN].decode()
    assert markdown.startswith("# Training report — ftjob-0123456789abcdef01234567\n")
    for expected in ("| base model | `llama-3.2-1b-instruct` |", "| backend | unsloth |",
                     "| optimizer steps | 60 of 60 (2.00 epochs) |",
                     "| tokens trained | 30,720 (non-padding, all epochs) |",
                     "| duration of this attempt | 2 min 5 s |",
                     "| resumed | no: trained from the start in one attempt |",
                     "| throughput | 4,030 tokens/s (median of the logged intervals) |",
                     "| finished | 2026-09-21 14:23:20 UTC |",
                     "![Loss](chart_loss.png)", "![Learning rate](chart_learning_rate.png)",
                     "![Memory over time](chart_memory.png)",
                     "| batch_size | 4 |", "| learning_rate | 0.0004 |",
                     "| target_modules | q_proj, k_proj, v_proj, o_proj |",
                     "| packing | no |",
                     "| train | 120 | 118 | 2 | 3 | 61,440 | 20,480 |", "| duplicates | 3 |",
                     "| duplicate_exact.dropped | 3 |", "| fixed_whitespace.fixed | 7 |",
                     "Format detected by ingest: `openai-chat`.",
                     "| GPU 0 | NVIDIA H100 80GB HBM3, 79.19 GiB |", "| GPU 0 allocated, peak (GiB) | 5.100 |",
                     "| GPU 0 utilization, mean (%) | 96.000 |",
                     "| free disk in the work directory, lowest (GiB) | 406.600 |",
                     "## Loss per step"):
        assert expected in markdown, expected
    # final and best, each with its step
    losses = {step: loss_at(step) for step in range(1, 61)}
    best_step = min(losses, key=losses.get)
    assert f"| training loss | {losses[60]:.4f} (step 60) | {losses[best_step]:.4f} (step {best_step}) |" in markdown
    valid = {step: round(loss_at(step) + 0.15, 4) for step in (15, 30, 45, 60)}
    best_valid = min(valid, key=valid.get)
    assert (f"| validation loss | {valid[60]:.4f} (step 60) | {valid[best_valid]:.4f} (step {best_valid}) |"
            in markdown)
    assert "nan" not in markdown.lower() and "no validation split" not in markdown
    assert len([line for line in markdown.splitlines() if re.match(r"\| \d+ \| \d", line)]) == 60

    # the HTML embeds exactly the PNG files, so it opens standalone
    page = files[REPORT_HTML].decode()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    embedded = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)">', page)
    assert [(alt, base64.b64decode(data)) for alt, data in embedded] == [
        ("Loss", files[CHART_LOSS]), ("Learning rate", files[CHART_LEARNING_RATE]),
        ("Memory over time", files[CHART_MEMORY])]
    assert "<td><code>llama-3.2-1b-instruct</code></td>" in page
    assert "http://" not in page.replace("http://www.w3.org", "") and "src=\"chart" not in page  # nothing external
    for name in (CHART_LOSS, CHART_LEARNING_RATE, CHART_MEMORY):
        picture = png_image(files[name])
        assert picture.size[0] == 990 and len(picture.convert("RGB").getcolors(1 << 20)) > 50
    (tmp_path / "report.html").write_bytes(files[REPORT_HTML])  # for a person to open while debugging

    # the PDF is the HTML page: its headings, its cells, its three charts
    from pypdf import PdfReader

    reader = PdfReader(io.BytesIO(files[REPORT_PDF]))
    text = "\n".join(pdf_page.extract_text() for pdf_page in reader.pages)
    for expected in ("Training report — ftjob-0123456789abcdef01234567", "Summary", "Charts", "Loss per step",
                     "llama-3.2-1b-instruct", "NVIDIA H100 80GB HBM3, 79.19 GiB", "30,720 (non-padding, all epochs)"):
        assert expected in text, expected
    assert [image.image.size for pdf_page in reader.pages for image in pdf_page.images] == [
        png_image(files[name]).size for name in (CHART_LOSS, CHART_LEARNING_RATE, CHART_MEMORY)]

    csv = files[STEP_METRICS_CSV].decode().splitlines()
    assert csv[0] == "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy"
    assert len(csv) == 61 and csv[15].startswith("15,") and csv[15].split(",")[3] == str(valid[15])


def test_a_resumed_cpu_run_without_validation() -> None:
    # attempt 1 died after the checkpoint at step 12 (its log history came back with the checkpoint);
    # attempt 2 trained steps 13-20
    history = [entry for entry in log_history(12, total_steps=20) if "loss" in entry]
    history += log_history(20, first_step=13, total_steps=20)
    files = build_report(
        facts(device="cpu", backend="hf", log_history=history, global_step=20, max_steps=20, trained_tokens=10_240,
              resumed_from=12, hardware={"host": "laptop", "cpu_cores_logical": 2, "ram_total_gb": 7.7, "gpus": []},
              dataset={"train": DATASET["train"], "validation": {"examples": 0, "kept": 0, "dropped": 0,
                                                                 "truncated": 0, "tokens": 0, "trained_tokens": 0}},
              manifest=None),
        training_file(range(1, 21), lambda step: 1 if step <= 12 else 2, 20),
        hardware_file(30, gpu=False, attempt_of=lambda index: 1 if index < 14 else 2))
    markdown = files[REPORT_MARKDOWN].decode()
    assert "| resumed | from the checkpoint at step 12 |" in markdown
    assert "| duration of the whole run | 4 min 50 s over 2 attempts |" in markdown
    assert "| validation loss | — | — |" in markdown and "no validation split" in markdown
    assert "| backend | hf |" in markdown and "| device | cpu |" in markdown
    assert "GPU" not in markdown and "ingest counts" not in markdown
    assert [r["step"] for r in metric_records(history) if r["type"] == "train"] == list(range(1, 21))
    assert set(files) >= {CHART_LOSS, CHART_LEARNING_RATE, CHART_MEMORY}
    page = files[REPORT_HTML].decode()
    assert page.count("data:image/png;base64,") == 3
    # the loss chart marks the resume (gray dashed line) and has no validation line
    from tests.unit.trainer.test_charts import image, pixels_of

    loss = image(files[CHART_LOSS])
    assert pixels_of(loss, "#7f7f7f") > 100 and pixels_of(loss, "#d62728") == 0


def test_a_long_run_shows_a_sample_of_steps_and_keeps_every_step_in_the_files() -> None:
    steps = 450
    files = build_report(facts(log_history=log_history(steps, steps_per_epoch=225), global_step=steps,
                               max_steps=steps), training_file(range(1, steps + 1), lambda step: 1, steps),
                         hardware_file(200, gpu=True))
    markdown = files[REPORT_MARKDOWN].decode()
    rows = [line for line in markdown.splitlines() if re.match(r"\| \d+ \| \d", line)]
    assert len(rows) <= MAX_STEP_ROWS + 1 and rows[-1].startswith(f"| {steps} |")
    assert f"Every 5th of {steps} logged steps" in markdown
    assert len(files[STEP_METRICS_CSV].decode().splitlines()) == steps + 1


def test_no_steps_logged_still_gives_a_readable_report() -> None:
    files = build_report(facts(log_history=[], global_step=0, trained_tokens=0), b"", b"")
    markdown = files[REPORT_MARKDOWN].decode()
    assert "No training step was logged." in markdown and "No hardware samples were recorded." in markdown
    assert CHART_LOSS not in files and CHART_MEMORY not in files and "## Charts" not in markdown
    assert files[STEP_METRICS_CSV] == b"step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy\n"


def test_values_are_escaped_in_both_pages() -> None:
    hostile = {**CONFIG, "suffix": "<script>alert('x')</script> | pipe"}
    files = build_report(facts(config=hostile), b"", b"")
    page = files[REPORT_HTML].decode()
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "| suffix | <script>alert('x')</script> \\| pipe |" in files[REPORT_MARKDOWN].decode()


@pytest.mark.parametrize("value, shown", [(float("nan"), "—"), (float("inf"), "—")])
def test_non_finite_losses_are_not_reported_as_numbers(value: float, shown: str) -> None:
    history = log_history(4)
    history[1]["loss"] = value
    records = metric_records(history)
    assert records[1]["train_loss"] is None
    markdown = build_report(facts(log_history=history, global_step=4, max_steps=4), b"", b"")[REPORT_MARKDOWN]
    assert b"| 2 | 0.07 | \xe2\x80\x94 |" in markdown  # the step row shows a dash


def test_a_job_combining_two_dataset_versions_names_them() -> None:
    combined = DatasetManifest.build(
        format="openai-chat", created_at=1_790_000_000, counts={"train": 120, "validation": 9, "test": 0},
        versions={"training": "datasets/acme/v-aaaa", "validation": "datasets/acme/v-bbbb"},
        splits={"train": MANIFEST.splits["train"], "validation": MANIFEST.splits["validation"]})
    files = build_report(facts(manifest=combined), training_file(range(1, 61), lambda step: 1, 60),
                         hardware_file(5, gpu=True))
    markdown = files[REPORT_MARKDOWN].decode()
    assert "| ingest counts | value |" in markdown and "| validation | 9 |" in markdown
    assert "ingest issues" not in markdown  # a combination has no ingest summary of its own
    assert ("Training examples from dataset version `datasets/acme/v-aaaa`, validation examples from "
            "`datasets/acme/v-bbbb`.") in markdown
