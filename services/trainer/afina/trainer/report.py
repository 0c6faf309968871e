"""The training report: a Markdown page a person reads, and the metrics as JSONL a program reads.

Both are built from transformers' ``log_history``, which a resumed run restores from its
checkpoint, so a report covers every step, not only those of the last attempt.
"""

from __future__ import annotations

from typing import Any

import orjson


def metric_records(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per training log and per evaluation, with OpenAI's metric names."""
    records = []
    for entry in log_history:
        if "loss" in entry:
            records.append({"type": "train", "step": entry.get("step"), "epoch": entry.get("epoch"),
                            "train_loss": entry["loss"],
                            "train_mean_token_accuracy": entry.get("mean_token_accuracy"),
                            "learning_rate": entry.get("learning_rate"), "grad_norm": entry.get("grad_norm"),
                            "tokens_seen": entry.get("num_input_tokens_seen")})
        elif "eval_loss" in entry:
            records.append({"type": "validation", "step": entry.get("step"), "epoch": entry.get("epoch"),
                            "full_valid_loss": entry["eval_loss"],
                            "full_valid_mean_token_accuracy": entry.get("eval_mean_token_accuracy")})
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


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"
    return str(value)


def render_report(*, job_id: str, base_model: str, device: str, config: dict[str, Any],
                  dataset: dict[str, Any], records: list[dict[str, Any]], global_step: int,
                  trained_tokens: int, wall_seconds: float, resumed_from: int | None) -> str:
    """The Markdown report of one finished run."""
    train = [r for r in records if r["type"] == "train"]
    valid = [r for r in records if r["type"] == "validation"]
    valid_by_step = {r["step"]: r for r in valid}
    lines = [f"# Training report — {job_id}", "",
             f"- base model: `{base_model}`", f"- device: {device}", f"- optimizer steps: {global_step}",
             f"- tokens processed (non-padding, all epochs): {trained_tokens:,}",
             f"- wall time of the final attempt: {wall_seconds:.1f} s"]
    if resumed_from is not None:
        lines.append(f"- resumed from the checkpoint at step {resumed_from}")
    lines += ["", "## Final losses", "",
              f"- training loss: {_fmt(train[-1]['train_loss']) if train else '—'}",
              f"- training token accuracy: {_fmt(train[-1]['train_mean_token_accuracy']) if train else '—'}",
              f"- validation loss: {_fmt(valid[-1]['full_valid_loss']) if valid else '—'}",
              f"- validation token accuracy: {_fmt(valid[-1]['full_valid_mean_token_accuracy']) if valid else '—'}",
              "", "## Configuration", "", "| hyperparameter | value |", "| --- | --- |"]
    lines += [f"| {name} | {_fmt(value, 6)} |" for name, value in config.items()]
    lines += ["", "## Dataset", "", "| split | examples | kept | dropped | truncated | tokens | trained tokens |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, counts in dataset.items():
        lines.append(f"| {name} | {counts['examples']} | {counts['kept']} | {counts['dropped']} | "
                     f"{counts['truncated']} | {counts['tokens']:,} | {counts['trained_tokens']:,} |")
    lines += ["", "## Loss per step", "",
              "| step | epoch | training loss | token accuracy | learning rate | validation loss |",
              "| --- | --- | --- | --- | --- | --- |"]
    for record in train:
        validation = valid_by_step.get(record["step"], {})
        lines.append(f"| {record['step']} | {_fmt(record['epoch'], 2)} | {_fmt(record['train_loss'])} | "
                     f"{_fmt(record['train_mean_token_accuracy'])} | {_fmt(record['learning_rate'], 3)} | "
                     f"{_fmt(validation.get('full_valid_loss'))} |")
    return "\n".join(lines) + "\n"
