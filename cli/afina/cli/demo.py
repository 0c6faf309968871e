"""``make demo``: the whole afina path on one machine, driven by the official ``openai`` client.

Starts the embedded stack, uploads the bundled Aeon sample (80 Portuguese/English
chats in one recognisable style), fine-tunes SmolLM2-135M-Instruct with LoRA,
follows the job's events, then asks the base model and the fine-tuned model the
same question so the difference is visible, and prints the evaluation's base vs
fine-tuned vs GGUF variants (Q4_K_M among them) comparison on held-out data.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

SAMPLE = Path(__file__).parent / "data" / "aeon_sample.jsonl"
QUESTION = "aeon, coloca um timer de 3 minutos pro macarrão"


def _ask(client, model: str, question: str) -> str:  # noqa: ANN001
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                           max_tokens=60, temperature=0.0, seed=0)
    return (reply.choices[0].message.content or "").strip()


def _print_evaluation(client, job_id: str) -> None:  # noqa: ANN001
    """Follow the job's evaluation (its own job) and print base vs fine-tuned vs each GGUF, Q4_K_M included."""
    from afina.cli.evaluation import comparison_table, read_evaluation, wait_for_evaluation_job
    from afina.cli.watch import watch_job

    evaluation_id = wait_for_evaluation_job(client, job_id)
    if evaluation_id is None:
        print("[6/6] no evaluation was queued (AFINA_EVALUATION_ENABLED is off)", flush=True)
        return
    print(f"[6/6] evaluating base, fine-tuned and the GGUF variants on held-out data ({evaluation_id}) ...",
          flush=True)
    evaluation_job = watch_job(client, evaluation_id)
    evaluation = read_evaluation(client, job_id) if evaluation_job.status == "succeeded" else None
    if evaluation is None:
        message = evaluation_job.error.message if evaluation_job.error else "no evaluation.json"
        print(f"      the evaluation ended {evaluation_job.status}: {message}", flush=True)
        return
    print("\n" + comparison_table(evaluation) + "\n", flush=True)


def run(home: Path, keep_running: bool, epochs: int) -> int:
    from openai import OpenAI

    from afina.cli.watch import watch_job
    from afina.deploy.runner import down, load_state, up_embedded

    started = time.monotonic()
    if load_state(home) is not None:
        down(home)
    print(f"[1/6] starting the embedded stack in {home} ...", flush=True)
    state = up_embedded(home)
    print(f"      gateway {state.base_url} (API key {state.api_key[:10]}...)", flush=True)
    try:
        client = OpenAI(base_url=state.base_url, api_key=state.api_key, max_retries=2, timeout=600)
        print(f"[2/6] uploading {SAMPLE.name} with the openai client ...", flush=True)
        with open(SAMPLE, "rb") as handle:
            training_file = client.files.create(file=handle, purpose="fine-tune")
        print(f"      {training_file.id}: {training_file.bytes} bytes", flush=True)
        print("[3/6] creating a fine-tuning job on smollm2-135m-instruct ...", flush=True)
        job = client.fine_tuning.jobs.create(model="smollm2-135m-instruct", training_file=training_file.id,
                                             suffix="aeon", seed=42,
                                             hyperparameters={"n_epochs": epochs, "batch_size": 4,
                                                              "learning_rate_multiplier": 2})
        print(f"      {job.id} ({job.status})", flush=True)
        job = watch_job(client, job.id)
        if job.status != "succeeded":
            message = job.error.message if job.error else "no error recorded"
            print(f"job {job.id} ended {job.status}: {message}", file=sys.stderr)
            return 1
        print(f"[4/6] job succeeded: {job.fine_tuned_model} ({job.trained_tokens} trained tokens)", flush=True)
        print(f"[5/6] asking both models: {QUESTION!r}", flush=True)
        print(f"      base model  : {_ask(client, 'smollm2-135m-instruct', QUESTION)}")
        print(f"      fine-tuned  : {_ask(client, job.fine_tuned_model, QUESTION)}")
        _print_evaluation(client, job.id)
        from afina.core.datasets.layout import adapter_prefix, job_prefix, model_prefix

        store_root = Path(state.home) / "store"
        tenant = job.organization_id
        print()
        print(f"model name : {job.fine_tuned_model}")
        job_dir = store_root / job_prefix(tenant, job.id)
        print(f"artifacts  : {store_root / model_prefix(tenant, job.id)}")
        print(f"adapter    : {store_root / adapter_prefix(tenant, job.id)}")
        print(f"report     : {job_dir / 'report' / 'report.md'} (also .html and .pdf)")
        print(f"evaluation : {job_dir / 'evaluation'}")
        print(f"total time : {time.monotonic() - started:.0f} s")
        if keep_running:
            print(f"\nstill running: OPENAI_BASE_URL={state.base_url} OPENAI_API_KEY={state.api_key}; "
                  f"stop with `afina --home {home} down`")
        return 0
    finally:
        if not keep_running:
            down(home)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("AFINA_DEMO_HOME", ".afina/demo")))
    parser.add_argument("--keep-running", action="store_true")
    parser.add_argument("--epochs", type=int, default=int(os.environ.get("AFINA_DEMO_EPOCHS", "2")))
    args = parser.parse_args()
    os.environ.setdefault("AFINA_MODEL_CACHE_DIR", str(Path.home() / ".cache" / "afina" / "models"))
    return run(args.home.resolve(), args.keep_running, args.epochs)


if __name__ == "__main__":
    sys.exit(main())
