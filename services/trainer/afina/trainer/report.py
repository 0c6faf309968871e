"""The training report: Markdown and HTML pages a person reads, with charts, and the files a program reads.

Losses come from transformers' ``log_history``, which a resumed run restores from its
checkpoint, so the report covers every step, not only those of the last attempt; throughput
and memory come from ``training_metrics.jsonl`` and ``hardware_metrics.jsonl`` (which a
resumed attempt also continues). Both pages are rendered from one list of sections, so they
always say the same thing: the Markdown links the chart PNGs stored next to it, the HTML
embeds them (base64) so it opens standalone, and ``report.pdf`` is rendered from the HTML page
(``afina.core.report_pdf``; later stages render it again when they splice their sections in).
"""

from __future__ import annotations

import html
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from afina.core.artifacts.dataset import DatasetManifest
from afina.core.report_pdf import REPORT_PDF, report_pdf
from afina.core.reports import Block, html_blocks, markdown_blocks
from afina.trainer import charts
from afina.trainer.metrics_files import HARDWARE_METRICS_FILE, TRAINING_METRICS_FILE, parse_jsonl

REPORT_MARKDOWN = "report.md"
REPORT_HTML = "report.html"
STEP_METRICS_CSV = "step_metrics.csv"
CHART_LOSS = "chart_loss.png"
CHART_LEARNING_RATE = "chart_learning_rate.png"
CHART_MEMORY = "chart_memory.png"
MAX_STEP_ROWS = 100  # rows of the per-step table; the JSONL and CSV files have every step


def metric_records(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per training log and per evaluation, with OpenAI's metric names."""
    records = []
    for entry in log_history:
        if "loss" in entry:
            records.append({"type": "train", "step": entry.get("step"), "epoch": entry.get("epoch"),
                            "train_loss": _finite(entry["loss"]),
                            "train_mean_token_accuracy": _finite(entry.get("mean_token_accuracy")),
                            "learning_rate": _finite(entry.get("learning_rate")),
                            "grad_norm": _finite(entry.get("grad_norm")),
                            "tokens_seen": entry.get("num_input_tokens_seen")})
        elif "eval_loss" in entry:
            records.append({"type": "validation", "step": entry.get("step"), "epoch": entry.get("epoch"),
                            "full_valid_loss": _finite(entry["eval_loss"]),
                            "full_valid_mean_token_accuracy": _finite(entry.get("eval_mean_token_accuracy"))})
    return records


STEP_METRICS_COLUMNS = ("step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy")


def step_metrics_csv(records: list[dict[str, Any]]) -> bytes:
    """OpenAI's result file: one row per logged step, validation figures on the steps that were evaluated."""
    evaluations = {r["step"]: r for r in records if r["type"] == "validation"}
    lines = [",".join(STEP_METRICS_COLUMNS)]
    for record in records:
        if record["type"] != "train":
            continue
        evaluation = evaluations.get(record["step"], {})
        values = (record["step"], record.get("train_loss"), record.get("train_mean_token_accuracy"),
                  evaluation.get("full_valid_loss"), evaluation.get("full_valid_mean_token_accuracy"))
        lines.append(",".join("" if value is None else str(value) for value in values))
    return ("\n".join(lines) + "\n").encode()


def metrics_jsonl(records: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(record) + b"\n" for record in records)


@dataclass(frozen=True)
class RunFacts:
    """What the recipe knows about a finished run; everything else the report reads from the metrics files."""

    job_id: str
    base_model: str
    device: str
    config: dict[str, Any]  # the resolved hyperparameters
    dataset: dict[str, dict[str, int]]  # split name -> EncodedSplit.summary()
    log_history: list[dict[str, Any]]
    global_step: int
    max_steps: int
    trained_tokens: int
    wall_seconds: float  # this attempt, setup to report
    resumed_from: int | None = None
    backend: str | None = None
    manifest: DatasetManifest | None = None  # the prepared dataset's manifest (ingest counts and issues)
    hardware: dict[str, Any] = field(default_factory=dict)  # monitor.describe_hardware()
    # how the run was sized and started (throughput plan, estimate vs measured peak, kernels, start-up), in order
    speed: list[tuple[str, str]] = field(default_factory=list)
    finished_at: float = field(default_factory=time.time)


def build_report(facts: RunFacts, training_jsonl: bytes, hardware_jsonl: bytes) -> dict[str, bytes]:
    """Every result file of the run, by file name, in the order they are listed: the two pages and the PDF
    rendered from the HTML one, the charts there is data for, the step CSV and the two metrics files."""
    records = metric_records(facts.log_history)
    training = parse_jsonl(training_jsonl)
    hardware = parse_jsonl(hardware_jsonl)
    resumed_at = _resume_steps(facts, training)
    images = {name: png for name, png in ((CHART_LOSS, charts.loss_chart(records, resumed_at)),
                                          (CHART_LEARNING_RATE, charts.learning_rate_chart(records, resumed_at)),
                                          (CHART_MEMORY, charts.memory_chart(hardware))) if png is not None}
    sections = report_sections(facts, records, training, hardware, list(images))
    title = f"Training report — {facts.job_id}"
    page = render_html(title, sections, images)
    files = {REPORT_MARKDOWN: render_markdown(title, sections).encode(), REPORT_HTML: page.encode()}
    pdf = report_pdf(page)  # None (logged) when it cannot be made: the run still has its report pages
    if pdf is not None:
        files[REPORT_PDF] = pdf
    files.update(images)
    files[STEP_METRICS_CSV] = step_metrics_csv(records)
    files[TRAINING_METRICS_FILE] = training_jsonl
    files[HARDWARE_METRICS_FILE] = hardware_jsonl
    return files


# content -------------------------------------------------------------------

# a section is (title, blocks); a block is ("text", str), ("table", headers, rows) or ("images", [(alt, file)])
Section = tuple[str, list[Block]]

CHART_TITLES = {CHART_LOSS: "Loss", CHART_LEARNING_RATE: "Learning rate", CHART_MEMORY: "Memory over time"}


def report_sections(facts: RunFacts, records: list[dict[str, Any]], training: list[dict[str, Any]],
                    hardware: list[dict[str, Any]], chart_files: list[str]) -> list[Section]:
    train = [r for r in records if r["type"] == "train"]
    valid = [r for r in records if r["type"] == "validation"]
    sections: list[Section] = [
        ("Summary", [("table", ("run", ""), _summary_rows(facts, train, training, hardware))]),
        ("Results", [("table", ("metric", "final", "best"), _result_rows(train, valid, training))]),
    ]
    if facts.speed:
        sections.append(("Speed and memory", [("table", ("", ""), list(facts.speed))]))
    if chart_files:
        sections.append(("Charts", [("images", [(CHART_TITLES[name], name) for name in chart_files])]))
    sections.append(("Configuration", [("table", ("hyperparameter", "value"),
                                        [(name, _setting(value)) for name, value in facts.config.items()])]))
    sections.append(("Dataset", _dataset_blocks(facts)))
    sections.append(("Hardware", _hardware_blocks(facts.hardware, hardware)))
    sections.append(("Loss per step", _step_blocks(train, valid)))
    return sections


def _summary_rows(facts: RunFacts, train: list[dict[str, Any]], training: list[dict[str, Any]],
                  hardware: list[dict[str, Any]]) -> list[tuple[str, str]]:
    epochs = train[-1]["epoch"] if train and train[-1].get("epoch") is not None else None
    rows = [("base model", f"`{facts.base_model}`")]
    if facts.backend:
        rows.append(("backend", facts.backend))
    rows += [("device", facts.device),
             ("optimizer steps", f"{facts.global_step} of {facts.max_steps}"
                                 + (f" ({_fmt(epochs, 2)} epochs)" if epochs is not None else "")),
             ("tokens trained", f"{facts.trained_tokens:,} (non-padding, all epochs)"),
             ("duration of this attempt", _duration(facts.wall_seconds))]
    attempts = sorted({int(s.get("attempt") or 1) for s in hardware})
    stamps = [s["timestamp"] for s in hardware if s.get("timestamp") is not None]
    if len(attempts) > 1 and stamps:
        rows.append(("duration of the whole run", f"{_duration(max(stamps) - min(stamps))} over "
                                                  f"{len(attempts)} attempts"))
    speeds = [r["tokens_per_second"] for r in training if r.get("type") == "train" and r.get("tokens_per_second")]
    if speeds:
        rows.append(("throughput", f"{statistics.median(speeds):,.0f} tokens/s (median of the logged intervals)"))
    rows.append(("resumed", f"from the checkpoint at step {facts.resumed_from}" if facts.resumed_from is not None
                 else "no: trained from the start in one attempt" if len(attempts) <= 1
                 else "no checkpoint to resume from: trained again from the start"))
    rows.append(("finished", time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(facts.finished_at))))
    return rows


def _result_rows(train: list[dict[str, Any]], valid: list[dict[str, Any]],
                 training: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    def final_and_best(rows: list[dict[str, Any]], key: str, best: Any) -> tuple[str, str]:
        known = [r for r in rows if r.get(key) is not None]
        if not known:
            return "—", "—"
        top = best(known, key=lambda r: r[key])
        return f"{_fmt(known[-1][key])} (step {known[-1]['step']})", f"{_fmt(top[key])} (step {top['step']})"

    average_key = next((k for r in training for k in r if k.startswith("train_loss_avg_")), None)
    rows = [("training loss", *final_and_best(train, "train_loss", min))]
    if average_key:
        window = average_key.rsplit("_", 1)[-1]
        rows.append((f"training loss, moving average of {window} logs",
                     *final_and_best([r for r in training if r.get("type") == "train"], average_key, min)))
    rows += [("training token accuracy", *final_and_best(train, "train_mean_token_accuracy", max)),
             ("validation loss", *final_and_best(valid, "full_valid_loss", min)),
             ("validation token accuracy", *final_and_best(valid, "full_valid_mean_token_accuracy", max))]
    if not valid:
        rows.append(("", "no validation split: validation figures are not available", ""))
    return rows


def _dataset_blocks(facts: RunFacts) -> list[Block]:
    blocks: list[Block] = []
    if facts.dataset:
        headers = ("split", "examples", "kept", "dropped", "truncated", "tokens", "trained tokens")
        rows = [(name, *(f"{counts.get(key, 0):,}" for key in ("examples", "kept", "dropped", "truncated", "tokens",
                                                                  "trained_tokens")))
                for name, counts in facts.dataset.items()]
        blocks.append(("table", headers, rows))
    manifest = facts.manifest
    if manifest is not None:
        # a version's summary has the issues by rule; a job's combination of two versions has counts only
        issues = (manifest.summary or {}).get("issues")
        for title, values in (("ingest counts", manifest.counts), ("ingest issues", issues)):
            flat = _flatten(values) if isinstance(values, dict) else []
            if flat:
                blocks.append(("table", (title, "value"), [(name, _fmt(value)) for name, value in flat]))
        blocks.append(("text", f"Format detected by ingest: `{manifest.format}`."))
        if manifest.versions is not None:
            blocks.append(("text", f"Training examples from dataset version `{manifest.versions.training}`, "
                                   f"validation examples from `{manifest.versions.validation}`."))
    return blocks or [("text", "No dataset statistics were recorded.")]


def _hardware_blocks(machine: dict[str, Any], samples: list[dict[str, Any]]) -> list[Block]:
    rows = [(name.replace("_", " "), _fmt(value)) for name, value in machine.items()
            if name != "gpus" and value is not None]
    for gpu in machine.get("gpus") or []:
        rows.append((f"GPU {gpu['index']}", f"{gpu['name']}, {_fmt(gpu['memory_gb'], 2)} GiB"))
    blocks: list[Block] = [("table", ("machine", ""), rows)] if rows else []
    measures: list[tuple[str, str, Any]] = [
        ("process_rss_gb", "RAM of the training process, peak (GiB)", max),
        ("ram_used_gb", "RAM used on the machine, peak (GiB)", max),
        ("cpu_percent", "CPU use, peak (%)", max),
        ("disk_free_gb", "free disk in the work directory, lowest (GiB)", min)]
    for index in charts.gpu_indices(samples):
        measures += [(f"gpu{index}_peak_gb", f"GPU {index} allocated, peak (GiB)", max),
                     (f"gpu{index}_reserved_gb", f"GPU {index} reserved, highest (GiB)", max),
                     (f"gpu{index}_utilization_percent", f"GPU {index} utilization, mean (%)", statistics.mean)]
    peaks = []
    for key, label, summarise in measures:
        values = [s[key] for s in samples if s.get(key) is not None]
        if values:
            peaks.append((label, _fmt(float(summarise(values)), 3)))
    if peaks:
        blocks.append(("table", ("during training", f"over {len(samples)} samples"), peaks))
    else:
        blocks.append(("text", "No hardware samples were recorded."))
    return blocks


def _step_blocks(train: list[dict[str, Any]], valid: list[dict[str, Any]]) -> list[Block]:
    if not train:
        return [("text", "No training step was logged.")]
    valid_by_step = {r["step"]: r for r in valid}
    shown = train
    blocks: list[Block] = []
    if len(train) > MAX_STEP_ROWS:
        every = math.ceil(len(train) / MAX_STEP_ROWS)
        shown = [r for i, r in enumerate(train) if i % every == 0 or i == len(train) - 1]
        blocks.append(("text", f"Every {every}th of {len(train)} logged steps; `{TRAINING_METRICS_FILE}` and "
                               f"`{STEP_METRICS_CSV}` have them all."))
    rows = [(str(r["step"]), _fmt(r.get("epoch"), 2), _fmt(r.get("train_loss")),
             _fmt(r.get("train_mean_token_accuracy")), _fmt(r.get("learning_rate"), 3),
             _fmt(valid_by_step.get(r["step"], {}).get("full_valid_loss"))) for r in shown]
    blocks.append(("table", ("step", "epoch", "training loss", "token accuracy", "learning rate", "validation loss"),
                   rows))
    return blocks


def _resume_steps(facts: RunFacts, training: list[dict[str, Any]]) -> list[int]:
    """Steps where a later attempt took over (from the attempt numbers in the training records)."""
    steps = set()
    for before, after in zip(training, training[1:], strict=False):
        if after.get("attempt") != before.get("attempt") and before.get("step") is not None:
            steps.add(int(before["step"]))
    if facts.resumed_from:
        steps.add(facts.resumed_from)
    return sorted(steps)


# rendering -----------------------------------------------------------------

def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(item, digits) for item in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v, digits)}" for k, v in value.items())
    return str(value)


def _setting(value: Any) -> str:
    """A configuration value as a person wrote it: 2, 0.05, 0.0004, not 2.000000."""
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_setting(item) for item in value)
    return _fmt(value)


def _flatten(values: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested statistics as ``a.b`` rows; lists of numbers are kept whole, long lists summarised by length."""
    rows: list[tuple[str, Any]] = []
    for name, value in values.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            rows += _flatten(value, key + ".")
        elif isinstance(value, list) and len(value) > 12:
            rows.append((key, f"{len(value)} values"))
        else:
            rows.append((key, value))
    return rows


def _duration(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {rest} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def render_markdown(title: str, sections: list[Section]) -> str:
    lines = [f"# {title}", ""]
    for heading, blocks in sections:
        lines += [f"## {heading}", "", *markdown_blocks(blocks)]
    return "\n".join(lines).rstrip("\n") + "\n"


_CSS = """body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;
color:#222}h1{font-size:1.6em}h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0}th,td{border:1px solid #ddd;padding:.3em .6em;text-align:left}
th{background:#f5f5f5}td:not(:first-child){font-variant-numeric:tabular-nums}figure{margin:1em 0}
img{max-width:100%;height:auto;border:1px solid #eee}code{background:#f5f5f5;padding:0 .2em}"""


def render_html(title: str, sections: list[Section], images: dict[str, bytes]) -> str:
    """A standalone page: styles inline, charts embedded as base64 PNGs."""
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    for heading, blocks in sections:
        out += [f"<h2>{html.escape(heading)}</h2>", *html_blocks(blocks, images)]
    out.append("</body></html>")
    return "\n".join(out) + "\n"
