"""Reading a job's evaluation through the API and printing its comparison table (``make demo``, ``afina``).

The evaluation is a job of its own: the fine-tuning job's event whose data names ``evaluation_job_id`` says
which; when it succeeds, ``evaluation.json`` is among the fine-tuning job's result files. Figures print with
six significant digits (``evaluation.json`` and the summary CSV keep them exact).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

EVALUATION_JOB_EVENT_KEY = "evaluation_job_id"
EVALUATION_FILE = "evaluation.json"
COLUMNS = (("loss", "loss"), ("perplexity", "ppl"), ("exact_match", "EM"), ("normalized_exact_match", "normEM"),
           ("token_f1", "tokF1"), ("rouge_l", "ROUGE-L"), ("bleu", "BLEU"), ("chrf", "chrF"),
           ("accuracy", "acc"), ("macro_f1", "macroF1"), ("macro_auc", "AUC"), ("judge", "judge"))


def evaluation_job_id(client: Any, job_id: str) -> str | None:
    """The id of the evaluation the export queued for ``job_id`` (None when evaluation is off)."""
    for event in client.fine_tuning.jobs.list_events(job_id, limit=100).data:
        data = dict(event.data or {}) if getattr(event, "data", None) else {}
        if data.get(EVALUATION_JOB_EVENT_KEY):
            return str(data[EVALUATION_JOB_EVENT_KEY])
    return None


def wait_for_evaluation_job(client: Any, job_id: str, timeout_s: float = 60.0) -> str | None:
    """The evaluation job id, waiting a little for the export's event (it lands with the registration)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = evaluation_job_id(client, job_id)
        if found is not None or time.monotonic() > deadline:
            return found
        time.sleep(1.0)


def read_evaluation(client: Any, job_id: str) -> dict[str, Any] | None:
    """``evaluation.json`` of the fine-tuning job, from its result files; None before the evaluation committed."""
    job = client.fine_tuning.jobs.retrieve(job_id)
    for file_id in job.result_files or []:
        if client.files.retrieve(file_id).filename == EVALUATION_FILE:
            return json.loads(client.files.content(file_id).read())
    return None


def _metric(figures: dict[str, Any], name: str) -> float | None:
    if name in ("loss", "perplexity"):
        return figures.get(name)
    if name in ("accuracy", "macro_f1", "macro_auc"):
        return (figures.get("classification") or {}).get(name)
    if name == "judge":  # the LLM judge's mean score (1-5), when the evaluation asked for one
        return (figures.get("judge") or {}).get("mean")
    return (figures.get("text") or {}).get(name)


def comparison_table(evaluation: dict[str, Any]) -> str:
    """One row per model (base, fine-tuned, each GGUF), the columns that have a figure, then the gate."""
    models: dict[str, dict[str, Any]] = evaluation["models"]
    asked = evaluation.get("metrics")
    shown = [(name, title) for name, title in COLUMNS if any(_metric(f, name) is not None for f in models.values())
             and (not asked or name in asked or name == "judge")]
    rows = [["model", *[title for _name, title in shown]]]
    for figures in models.values():
        rows.append([str(figures["title"]),
                     *[("-" if (v := _metric(figures, name)) is None else f"{v:.6g}") for name, _title in shown]])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                       for i, (cell, width) in enumerate(zip(row, widths, strict=True))) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    gate = evaluation["quality_gate"]
    verdict = "passed" if gate["passed"] else ("FAILED (blocks serving)" if gate["enforced"] else "FAILED")
    where = (f"examples of {evaluation.get('file_id') or 'the file'}" if evaluation["split"] == "file"
             else f"held-out examples ({evaluation['split']} split)")
    header = f"{evaluation['examples']} {where}, task {evaluation['task']}, main metric {evaluation['main_metric']}"
    footer = [f"quality gate: {verdict}"]
    footer += [f"  - {check['message']}" for check in gate["checks"] if not check["passed"]]
    if evaluation.get("judge"):
        footer.append(f"judge: {evaluation['judge']['model']} (score 1-5)")
        footer += [f"  - {figures['title']}: {judge['unscored']} example(s) unscored"
                   + (f" ({judge['error']})" if judge.get("error") else "")
                   for figures in models.values() if (judge := figures.get("judge")) and judge.get("unscored")]
    gap = evaluation.get("loss_gap")
    if gap:
        footer.append(f"train/held-out loss gap: {gap['gap']:.6g}" + (" (overfitting)" if gap["overfitting"] else ""))
    return "\n".join([header, *lines, *footer])


def run_evaluation(base_url: str, api_key: str, model: str, *, data: Path | None, compare: list[str] | None,
                   metrics: list[str] | None, labels: list[str] | None, judge: bool | str = False,
                   rubric: str | None = None, out: TextIO | None = None,
                   poll_s: float = 1.0, timeout_s: float = 24 * 3600) -> dict[str, Any]:
    """``afina eval``: upload ``data`` (when given) and wait for its ingest, ask for the evaluation of ``model``
    against ``compare`` (base, GGUF variants), print its events, return its ``evaluation.json``. ``judge``: True
    grades the answers with the operator's LLM judge, a name with that model; ``rubric`` replaces the default
    rubric."""
    from afina.cli.datasets import CliError, push_file, wait_for_ingest
    from afina.cli.models import _checked, _client, follow

    out = out or sys.stdout  # read now: a default bound at import would keep a replaced stdout

    body: dict[str, Any] = {}
    if data is not None:
        uploaded = push_file(base_url, api_key, data, None)
        status = wait_for_ingest(base_url, api_key, uploaded["id"], out=out)
        if status["status"] != "processed":
            raise CliError(f"{data} could not be ingested: {status.get('status_details') or status['status']}")
        body["file"] = uploaded["id"]
    if compare:
        body["models"] = list(dict.fromkeys(["fine_tuned", *compare]))
    if metrics:
        body["metrics"] = metrics
    if labels:
        body["labels"] = labels
    if judge or rubric:
        body["judge"] = {key: value for key, value in
                         (("model", judge if isinstance(judge, str) else None), ("rubric", rubric)) if value}
    with _client(base_url, api_key) as client:
        evaluation = _checked(client.post(f"/v1/models/{model}/evaluations", json=body))
        source = evaluation["fine_tuning_job_id"]
        print(f"evaluation {evaluation['id']} of {model} queued", file=out)
        evaluation = follow(client, f"/v1/fine_tuning/jobs/{evaluation['id']}/events",
                            f"/v1/fine_tuning/jobs/{source}/evaluations/{evaluation['id']}", out=out,
                            timeout_s=timeout_s, poll_s=poll_s)
        if evaluation["status"] != "succeeded":
            error = (evaluation.get("error") or {}).get("message") or evaluation["status"]
            raise CliError(f"evaluation {evaluation['id']} {evaluation['status']}: {error}")
        for file_id in evaluation["result_files"]:
            if _checked(client.get(f"/v1/files/{file_id}"))["filename"] == EVALUATION_FILE:
                return json.loads(client.get(f"/v1/files/{file_id}/content").content)
    raise CliError(f"evaluation {evaluation['id']} succeeded but lists no {EVALUATION_FILE}")

