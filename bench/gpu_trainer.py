"""GPU benchmark of the trainer's own code path (the ``train`` stage of a real job) against bare training loops.

Run on a CUDA machine (the ``device`` tool's H100; no network there, so the models are
random-initialised in the real Llama-3.2-1B and Qwen2.5-1.5B shapes and the tokenizer is
SmolLM2's, carried along). Every measured configuration runs in its own process, so
Unsloth's patches of transformers never leak into the ``hf`` backend's numbers.

    python bench/gpu_trainer.py all --tokenizer DIR --out-dir OUT [--only NAME,...]

Each afina run creates a job in an embedded runtime (SQLite + local store), writes a
prepared dataset, and calls ``run_stage(runtime, job, "train", train_job)`` — exactly what
the trainer worker's Celery task does. Tokens/s is measured over the steady-state steps
(the first ``--warmup`` steps compile and are excluded), from the per-step metric events'
nanosecond timestamps. The baselines are bare loops (random token ids, AdamW, gradient clipping) on the
same LoRA: one on Unsloth's ``FastLanguageModel``, one on plain transformers + PEFT; ``paired`` alternates a
baseline and afina's job on the same backend in one process. Useful tokens are non-padding tokens (the Trainer's
``num_input_tokens_seen``). MFU = 4·N·tokens/s ÷ 989 TFLOP/s (H100 SXM dense bf16), N
the model's parameter count (LoRA: no weight gradients for the frozen base, hence 4 not 6).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROCESS_STARTED = time.monotonic()
H100_BF16_FLOPS = 989e12
SHAPES: dict[str, dict[str, Any]] = {
    # config.json of meta-llama/Llama-3.2-1B-Instruct
    "llama-3.2-1b": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 2048,
                     "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "max_position_embeddings": 131072,
                     "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
                     "hidden_act": "silu"},
    # config.json of Qwen/Qwen2.5-1.5B-Instruct
    "qwen2.5-1.5b": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 1536,
                     "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
                     "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768,
                     "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
                     "hidden_act": "silu"},
    # config.json of Qwen/Qwen2.5-7B-Instruct (the shape seed 000_* trains, with QLoRA)
    "qwen2.5-7b": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 3584,
                   "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                   "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 32768,
                   "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                   "hidden_act": "silu"},
    # a smoke-test shape for checking this script on a CPU
    "tiny-llama": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
                   "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 49152, "max_position_embeddings": 4096,
                   "tie_word_embeddings": True, "hidden_act": "silu"},
}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WORDS_PT = ("o modelo responde com clareza e sem rodeios sobre produtos pedidos entregas e prazos da loja "
            "cliente quer saber quando chega a encomenda e se pode trocar o tamanho").split()
WORDS_EN = ("the assistant answers briefly and kindly about orders deliveries refunds and the store opening "
            "hours while keeping the tone friendly and the facts straight").split()


# models and data -------------------------------------------------------------

def build_model(shape: str, tokenizer_dir: Path, out_dir: Path) -> Path:
    """A random-initialised model of a real shape, bf16 safetensors, with the carried tokenizer."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target = out_dir / shape
    if (target / "config.json").exists():
        return target
    values = dict(SHAPES[shape])
    model_type = values.pop("model_type")
    config = AutoConfig.for_model(model_type, **values)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.bos_token_id = tokenizer.bos_token_id
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(str(target), safe_serialization=True)
    del model  # the runs are child processes: a model left on the GPU here shrinks what their plans see
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    tokenizer.save_pretrained(str(target))
    for extra in ("chat_template.jinja",):
        if (tokenizer_dir / extra).exists():
            shutil.copy(tokenizer_dir / extra, target / extra)
    return target


def _words(rng: random.Random, count: int) -> str:
    pool = WORDS_PT if rng.random() < 0.5 else WORDS_EN
    return " ".join(rng.choice(pool) for _ in range(count))


def full_length_chats(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Conversations longer than 2048 tokens: truncated to max_seq_len, every row is exactly full."""
    rng = random.Random(seed)
    return [{"messages": [{"role": "user", "content": _words(rng, 20)},
                          {"role": "assistant", "content": _words(rng, 2600)}]} for _ in range(n)]


def realistic_chats(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Many short chats: reply lengths log-normal (median ~120 words, long tail), 20% multi-turn, 30% system."""
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        messages: list[dict[str, str]] = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": _words(rng, rng.randint(8, 30))})
        for _turn in range(2 if rng.random() < 0.2 else 1):
            messages.append({"role": "user", "content": _words(rng, rng.randint(5, 60))})
            words = int(min(1400, max(8, rng.lognormvariate(math.log(120), 0.9))))
            messages.append({"role": "assistant", "content": _words(rng, words)})
        examples.append({"messages": messages})
    return examples


# one afina run ---------------------------------------------------------------

def run_afina(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from afina.core import ids
    from afina.core.db import repository as repo
    from afina.core.db.models import Job, JobEvent
    from afina.core.queue.jobs import run_stage
    from afina.core.runtime import Runtime
    from afina.core.settings import Settings
    from afina.trainer.recipe import train_job

    home = Path(tempfile.mkdtemp(prefix="afina-bench-"))
    settings = Settings(home=home, log_json=False, trainer_device=args.device,
                        allowed_model_dirs=[Path(args.model_dir).resolve().parent])
    preload_s = None
    if getattr(args, "preload", False):
        # what a trainer worker does when its process starts (AFINA_WORKER_PRELOAD): imports, and compile caches
        # on a volume (--cache-dir), so a second process on the same directory is a restarted worker
        from afina.trainer.warmup import compile_cache_env, warm_up

        for name, value in compile_cache_env(Path(args.cache_dir)).items():
            os.environ[name] = value
        started = time.monotonic()
        warm_up(settings)
        preload_s = round(time.monotonic() - started, 2)
    runtime = Runtime(settings)
    data = full_length_chats(args.examples) if args.data == "full" else realistic_chats(args.examples)
    hyperparameters = {"n_epochs": 1, "batch_size": args.batch, "learning_rate_multiplier": 1.0,
                       "max_seq_len": args.seq, "max_steps": args.steps, "save_steps": 100_000,
                       "logging_steps": 1, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
                       "backend": args.backend, "packing": bool(args.packing), "chat_family": "chatml",
                       "warmup_ratio": 0.0, "speed": args.speed, "quantization": args.quantization}
    if args.accumulation > 1:
        hyperparameters["gradient_accumulation_steps"] = args.accumulation
    results = []
    if getattr(args, "profile", False):
        profile_steps(20, 22, PROFILES)
    if getattr(args, "profile_startup", False):
        profile_startup(STARTUPS)
    for attempt in range(args.jobs):
        profiled_before, startups_before = len(PROFILES), len(STARTUPS)
        job_id = _new_job(runtime, ids, repo, Job, args.model_dir, data, hyperparameters)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        stage_started_ns = time.time_ns()
        stage_started = time.monotonic()
        outcome = run_stage(runtime, job_id, "train", train_job)
        wall = time.monotonic() - stage_started
        with runtime.db.session() as session:
            job = repo.get_job(session, None, job_id)
            events = session.query(JobEvent).filter(JobEvent.job_id == job_id).order_by(JobEvent.seq).all()
            steps = {e.data["step"]: e.seq for e in events if e.type == "metrics" and e.data and "step" in e.data}
            messages = [e.message for e in events]
            trained_tokens, error, parameters = job.trained_tokens, job.error, None
        if outcome not in ("done", "succeeded") or not steps:
            results.append({"attempt": attempt, "outcome": outcome, "error": error, "events": messages[-8:]})
            continue
        last = max(steps)
        first_measured = min(args.warmup, last - 1)
        durations = sorted((steps[n] - steps[n - 1]) / 1e9 for n in range(first_measured + 1, last + 1)
                           if n in steps and n - 1 in steps)
        seconds = (steps[last] - steps[first_measured]) / 1e9
        tokens_per_step = (trained_tokens or 0) / last
        tokens_per_second = tokens_per_step * (last - first_measured) / seconds
        parameters = _parameter_count(args.model_dir)
        first_step_s = (steps[min(steps)] - stage_started_ns) / 1e9
        results.append({
            "attempt": attempt, "outcome": outcome, "steps": last, "tokens_per_step": round(tokens_per_step, 1),
            "tokens_per_second": round(tokens_per_second, 1),
            "step_time_s": round(seconds / (last - first_measured), 4),
            "median_step_s": round(durations[len(durations) // 2], 4),
            "median_tokens_per_second": round(tokens_per_step / durations[len(durations) // 2], 1),
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available()
            else None,
            "mfu": round(4 * parameters * tokens_per_second / H100_BF16_FLOPS, 4), "parameters": parameters,
            "stage_start_to_first_step_s": round(first_step_s, 2),
            "process_start_to_first_step_s": round(first_step_s + stage_started - PROCESS_STARTED, 2),
            "stage_wall_s": round(wall, 1),
            "preflight": next((m for m in messages if m.startswith("Preflight")), None),
            "packing": next((m for m in messages if m.startswith("Packed")), None),
            "plan": next((m for m in messages if m.startswith("Throughput plan")), None),
            "memory_check": next((m for m in messages if m.startswith("Memory check")), None),
            "start_up": next((m for m in messages if m.startswith("First optimizer step")), None),
            "kernels": next((m for m in messages if m.startswith("Fused kernels")), None),
            # every step's duration, in order: a slow phase inside a job shows here, not in a mean
            "profile": PROFILES[profiled_before:],
            "startup_profile": STARTUPS[startups_before:],
            "step_seconds": [round((steps[n] - steps[n - 1]) / 1e9, 4) for n in sorted(steps) if n - 1 in steps],
        })
    return {"kind": "afina", "backend": args.backend, "model": Path(args.model_dir).name, "data": args.data,
            "preload_s": preload_s,
            "packing": bool(args.packing), "batch": args.batch, "seq": args.seq, "runs": results}


def _new_job(runtime: Any, ids: Any, repo: Any, job_model: Any, model_dir: str, data: list[dict[str, Any]],
             hyperparameters: dict[str, Any]) -> str:
    import time

    import orjson

    from afina.core.artifacts.dataset import DATASET_MANIFEST, DatasetManifest, SplitFile

    job_id = ids.job_id()
    prefix = f"datasets/bench/{job_id}"
    body = b"".join(orjson.dumps(example) + b"\n" for example in data)
    info = runtime.store.put_bytes(f"{prefix}/train.jsonl", body)
    split = SplitFile(key=info.key, sha256=info.sha256, bytes=info.size, examples=len(data))
    DatasetManifest.build(format="openai-chat", counts={"train": len(data), "validation": 0},
                          splits={"train": split}, created_at=int(time.time())).write(
        runtime.store, f"{prefix}/{DATASET_MANIFEST}")
    with runtime.db.session() as session:
        repo.ensure_tenant(session, "bench")
        session.add(job_model(id=job_id, tenant_id="bench", model=str(model_dir), training_file="file-bench",
                              seed=1234, hyperparameters=dict(hyperparameters), method={"type": "supervised"},
                              status="queued", stage="train", dataset_key=prefix))
    return job_id


def _parameter_count(model_dir: str) -> int:
    from afina.trainer.preflight import ModelShape

    return ModelShape.from_config_file(Path(model_dir) / "config.json").parameters


PROFILES: list[dict[str, Any]] = []  # one entry a profiled job, in order (profile_steps installs it once)


def profile_steps(first: int, last: int, sink: list[dict[str, Any]]) -> None:
    """Make every afina job of this process profile optimizer steps ``first``..``last`` with torch.profiler and
    append the top kernels and ops (CUDA and CPU self time) to ``sink``: the first job in a process against the
    next, kernel by kernel (issue 15's first-job dip)."""
    import torch
    from transformers import TrainerCallback

    from afina.trainer import recipe

    class StepProfiler(TrainerCallback):
        def __init__(self) -> None:
            self.profiler: Any = None

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == first - 1 and self.profiler is None:
                activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
                self.profiler = torch.profiler.profile(activities=activities)
                self.profiler.__enter__()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.profiler is not None and state.global_step == last:
                torch.cuda.synchronize()
                self.profiler.__exit__(None, None, None)
                events = self.profiler.key_averages()
                top = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:12]
                cpu = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
                sink.append({
                    "steps": [first, last],
                    "device_ms_total": round(sum(e.self_device_time_total for e in events) / 1e3, 1),
                    "cpu_ms_total": round(sum(e.self_cpu_time_total for e in events) / 1e3, 1),
                    "top_device": [[e.key[:80], round(e.self_device_time_total / 1e3, 2), e.count] for e in top],
                    "top_cpu": [[e.key[:80], round(e.self_cpu_time_total / 1e3, 2), e.count] for e in cpu]})
                self.profiler = None

    real_setup = recipe.LoRAFinetuneRecipe._setup_trainer
    if getattr(real_setup, "profiled", False):
        return

    def setup_with_profiler(self: Any, *args: Any, **kwargs: Any) -> Any:
        trainer = real_setup(self, *args, **kwargs)
        trainer.add_callback(StepProfiler())
        return trainer

    setup_with_profiler.profiled = True  # type: ignore[attr-defined]
    recipe.LoRAFinetuneRecipe._setup_trainer = setup_with_profiler


STARTUPS: list[dict[str, Any]] = []  # one entry a job whose start-up was profiled (--profile-startup)


def profile_startup(sink: list[dict[str, Any]]) -> None:
    """Make every afina job of this process run under cProfile from its recipe's setup to its first optimizer
    step, and append the functions that took the most time (cumulative and own) to ``sink``: where the
    warm-start seconds go (issue 15), function by function, not only phase by phase."""
    import cProfile
    import pstats

    from afina.trainer import recipe

    real_setup, real_first_step = recipe.LoRAFinetuneRecipe.setup, recipe.LoRAFinetuneRecipe._first_step_done
    if getattr(real_setup, "profiled", False):
        return
    state: dict[str, Any] = {}

    def setup(self: Any) -> None:
        state["profiler"] = cProfile.Profile()
        state["profiler"].enable()
        real_setup(self)

    def first_step_done(self: Any) -> None:
        real_first_step(self)
        profiler = state.pop("profiler", None)
        if profiler is None:
            return
        profiler.disable()
        stats = pstats.Stats(profiler)
        rows = [(f"{func[0].split('site-packages/')[-1]}:{func[1]}({func[2]})", calls, own, cumulative)
                for func, (_, calls, own, cumulative, _) in stats.stats.items()]  # type: ignore[attr-defined]
        def top(index: int) -> list[list[Any]]:
            return [[name[-110:], calls, round(own, 3), round(cumulative, 3)]
                    for name, calls, own, cumulative in sorted(rows, key=lambda r: r[index], reverse=True)[:30]]
        sink.append({"phases": self.phases.summary(), "by_cumulative_s": top(3), "by_own_s": top(2)})

    setup.profiled = True  # type: ignore[attr-defined]
    recipe.LoRAFinetuneRecipe.setup = setup
    recipe.LoRAFinetuneRecipe._first_step_done = first_step_done


# the bare loops (the baselines) ------------------------------------------------

def run_bare_unsloth(args: argparse.Namespace) -> dict[str, Any]:
    from unsloth import FastLanguageModel  # noqa: I001 - Unsloth first, as its docs require

    import torch

    model, _ = FastLanguageModel.from_pretrained(model_name=args.model_dir, max_seq_length=args.seq,
                                                 dtype=torch.bfloat16, load_in_4bit=False, local_files_only=True)
    # Unsloth's defaults, as its notebooks set them: offloaded ("unsloth") gradient checkpointing; off with
    # --no-checkpointing (the hand-tuned setting: what the GPU allows when the memory is known)
    checkpointing = "unsloth" if getattr(args, "checkpointing", True) else False
    model = FastLanguageModel.get_peft_model(
        model, r=16, lora_alpha=32, lora_dropout=0.0, bias="none", use_gradient_checkpointing=checkpointing,
        target_modules=list(LORA_TARGETS), random_state=1234, max_seq_length=args.seq)
    return _bare_loop(model, args, "bare-unsloth" if checkpointing else "bare-unsloth-no-checkpointing")


def run_bare_hf(args: argparse.Namespace) -> dict[str, Any]:
    """The same loop on plain transformers + PEFT: what the ``hf`` backend is to be compared with. Activation
    checkpointing (non-reentrant) is on unless ``--no-checkpointing``, as afina's ``auto`` has it on CUDA."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16, device_map={"": 0})
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, bias="none",
                                             target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM"))
    kind = "bare-hf" if args.checkpointing else "bare-hf-no-checkpointing"
    return _bare_loop(model, args, kind)


def _bare_loop(model: Any, args: argparse.Namespace, kind: str) -> dict[str, Any]:
    """AdamW with gradient clipping on random token ids, every optimizer step (``--accumulation`` micro-batches of
    ``--batch`` rows) synchronised and timed."""
    import torch

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    model.train()
    generator = torch.Generator(device="cuda").manual_seed(0)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        micro_batches = [torch.randint(100, 40000, (args.batch, args.seq), device="cuda", generator=generator)
                         for _ in range(args.accumulation)]
        torch.cuda.synchronize()
        started = time.perf_counter()
        for ids in micro_batches:
            loss = model(input_ids=ids, labels=ids).loss / args.accumulation
            loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    measured = times[args.warmup:]
    median = sorted(measured)[len(measured) // 2]
    tokens_per_step = args.batch * args.seq * args.accumulation
    tokens_per_second = tokens_per_step * len(measured) / sum(measured)
    parameters = _parameter_count(args.model_dir)
    peak = torch.cuda.max_memory_allocated()
    loss_last = round(float(loss.detach()), 4)
    del model, optimizer, loss
    _free_gpu()
    torch.cuda.reset_peak_memory_stats()
    return {"kind": kind, "model": Path(args.model_dir).name, "batch": args.batch, "seq": args.seq,
            "accumulation": args.accumulation,
            "runs": [{"tokens_per_second": round(tokens_per_second, 1),
                      "median_step_s": round(median, 4),
                      "median_tokens_per_second": round(tokens_per_step / median, 1),
                      "step_time_s": round(sum(measured) / len(measured), 4),
                      "peak_gpu_gib": round(peak / 2**30, 2),
                      "mfu": round(4 * parameters * tokens_per_second / H100_BF16_FLOPS, 4),
                      "parameters": parameters, "loss_last": loss_last}]}


def _free_gpu() -> None:
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache()


def run_paired(args: argparse.Namespace) -> dict[str, Any]:
    """A bare loop and afina's job on the same backend alternated in one process, ``--rounds`` times: the
    machine's drift (clocks, neighbours) hits both sides of each pair alike, so the per-pair ratio is the figure
    to trust. ``--backend unsloth`` pairs with the bare Unsloth loop, ``hf`` with the bare transformers+PEFT one
    (each in its own process: Unsloth's patches of transformers must not reach the ``hf`` side)."""
    if args.backend == "unsloth":
        from unsloth import FastLanguageModel  # noqa: F401, I001 - Unsloth first, as its docs require
    bare_loop = run_bare_unsloth if args.backend == "unsloth" else run_bare_hf
    args.data, args.packing, args.jobs, args.device, args.checkpointing = "full", False, 1, "cuda", True
    effective = args.batch * args.accumulation
    bare_args = argparse.Namespace(**{**vars(args), "batch": min(args.bare_batch, effective),
                                      "accumulation": max(1, effective // args.bare_batch)})
    pairs = []
    for _ in range(args.rounds):
        bare = bare_loop(bare_args)["runs"][0]
        _free_gpu()
        afina = run_afina(args)["runs"][0]
        _free_gpu()
        ratio = afina.get("tokens_per_second", 0) / bare["tokens_per_second"]
        median_ratio = afina.get("median_tokens_per_second", 0) / bare["median_tokens_per_second"]
        pairs.append({"bare": bare, "afina": afina, "afina_over_bare": round(ratio, 4),
                      "afina_over_bare_median": round(median_ratio, 4)})
    return {"kind": "paired", "backend": args.backend, "model": Path(args.model_dir).name, "batch": args.batch,
            "accumulation": args.accumulation, "bare_batch": bare_args.batch,
            "bare_accumulation": bare_args.accumulation, "speed": args.speed, "seq": args.seq, "pairs": pairs}


# orchestration -----------------------------------------------------------------

PLAN: dict[str, list[str]] = {
    # issue 15: afina's speed: auto (effective batch 16 in one micro-batch when it fits) vs the bare Unsloth loop at
    # Unsloth's defaults (micro-batch 4 × 4 accumulation, offloaded checkpointing), same effective batch
    "auto-pairs-unsloth-llama": ["paired", "--shape", "llama-3.2-1b", "--backend", "unsloth", "--rounds", "3",
                                 "--batch", "16", "--bare-batch", "4", "--speed", "auto"],
    "auto-pairs-unsloth-qwen": ["paired", "--shape", "qwen2.5-1.5b", "--backend", "unsloth", "--rounds", "2",
                                "--batch", "16", "--bare-batch", "4", "--speed", "auto"],
    "bare-unsloth-default-llama": ["bare-unsloth", "--shape", "llama-3.2-1b", "--batch", "4", "--accumulation", "4"],
    # the best hand-tuned bare setting of the issue (micro-batch 16, no checkpointing): the card's ceiling for MFU
    "bare-unsloth-tuned-llama": ["bare-unsloth", "--shape", "llama-3.2-1b", "--batch", "16", "--no-checkpointing"],
    # where a warm job's start-up goes, function by function (cProfile slows the Python it profiles: its
    # seconds are not the warm-start figures; warm-start-unsloth-llama has those)
    "startup-profile-unsloth-llama": ["afina", "--shape", "llama-3.2-1b", "--backend", "unsloth", "--batch", "16",
                                      "--speed", "auto", "--jobs", "2", "--preload", "--profile-startup"],
    "afina-hf-auto-llama": ["afina", "--shape", "llama-3.2-1b", "--backend", "hf", "--batch", "16",
                            "--speed", "auto"],
    "afina-unsloth-auto-llama-chat-unpacked": ["afina", "--shape", "llama-3.2-1b", "--backend", "unsloth", "--data",
                                               "chat", "--examples", "4000", "--batch", "16", "--speed", "auto"],
    "afina-unsloth-auto-llama-chat-packed": ["afina", "--shape", "llama-3.2-1b", "--backend", "unsloth", "--data",
                                             "chat", "--examples", "4000", "--packing", "--batch", "16",
                                             "--speed", "auto"],
    # warm start: a worker process that preloaded, two jobs; then a restarted worker on the same cache volume
    "warm-start-unsloth-llama": ["afina", "--shape", "llama-3.2-1b", "--backend", "unsloth", "--batch", "16",
                                 "--speed", "auto", "--jobs", "2", "--preload", "--profile"],
    "warm-start-unsloth-llama-restarted": ["afina", "--shape", "llama-3.2-1b", "--backend", "unsloth", "--batch",
                                           "16", "--speed", "auto", "--jobs", "2", "--preload"],
    "qlora-unsloth-qwen7b": ["afina", "--shape", "qwen2.5-7b", "--backend", "unsloth", "--quantization", "4bit",
                             "--batch", "8", "--speed", "auto"],
    "qlora-hf-qwen7b": ["afina", "--shape", "qwen2.5-7b", "--backend", "hf", "--quantization", "4bit",
                        "--batch", "8", "--speed", "auto"],
    "paired-unsloth-llama": ["paired", "--shape", "llama-3.2-1b", "--backend", "unsloth", "--rounds", "2"],
    "paired-hf-llama": ["paired", "--shape", "llama-3.2-1b", "--backend", "hf", "--rounds", "2"],
    "bare-hf-no-checkpointing-llama": ["bare-hf", "--shape", "llama-3.2-1b", "--no-checkpointing"],
    "bare-unsloth-llama": ["bare-unsloth", "--shape", "llama-3.2-1b"],
    "afina-unsloth-llama": ["afina", "--shape", "llama-3.2-1b", "--backend", "unsloth", "--jobs", "2"],
    "afina-hf-llama": ["afina", "--shape", "llama-3.2-1b", "--backend", "hf"],
    "afina-unsloth-qwen": ["afina", "--shape", "qwen2.5-1.5b", "--backend", "unsloth"],
    "afina-hf-qwen": ["afina", "--shape", "qwen2.5-1.5b", "--backend", "hf"],
    "afina-unsloth-llama-chat-unpacked": ["afina", "--shape", "llama-3.2-1b", "--backend", "unsloth", "--data",
                                          "chat", "--examples", "4000"],
    "afina-unsloth-llama-chat-packed": ["afina", "--shape", "llama-3.2-1b", "--backend", "unsloth", "--data",
                                        "chat", "--examples", "4000", "--packing"],
}


def run_all(args: argparse.Namespace) -> None:
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    models_dir = Path(args.models_dir)
    names = args.only.split(",") if args.only else list(PLAN)
    summary: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "runs": {}}
    for shape in sorted({PLAN[name][PLAN[name].index("--shape") + 1] for name in names}):
        build_model(shape, Path(args.tokenizer), models_dir)
    for name in names:
        command = PLAN[name]
        shape = command[command.index("--shape") + 1]
        result_file = out_dir / f"{name}.json"
        argv = [sys.executable, __file__, *[c for c in command if c not in ("--shape", shape)],
                "--model-dir", str(models_dir / shape), "--steps", str(args.steps), "--warmup", str(args.warmup),
                "--out", str(result_file)]
        started = time.monotonic()
        with open(out_dir / f"{name}.log", "w") as log:
            code = subprocess.call(argv, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout)
        result = json.loads(result_file.read_text()) if result_file.exists() else {"error": f"exit {code}"}
        result["process_wall_s"] = round(time.monotonic() - started, 1)
        summary["runs"][name] = result
        print(name, json.dumps(result)[:600], flush=True)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    every = argparse.ArgumentParser(add_help=False)
    every.add_argument("--model-dir")
    every.add_argument("--steps", type=int, default=60)
    every.add_argument("--warmup", type=int, default=10)
    every.add_argument("--batch", type=int, default=4)
    every.add_argument("--seq", type=int, default=2048)
    every.add_argument("--accumulation", type=int, default=1, help="micro-batches per optimizer step")
    every.add_argument("--out")
    afina = sub.add_parser("afina", parents=[every])
    afina.add_argument("--backend", default="unsloth")
    afina.add_argument("--data", choices=["full", "chat"], default="full")
    afina.add_argument("--examples", type=int, default=400)
    afina.add_argument("--packing", action="store_true")
    afina.add_argument("--device", default="cuda")
    afina.add_argument("--jobs", type=int, default=1, help="jobs in one process: the first cold, the rest warm")
    afina.add_argument("--speed", choices=["auto", "off"], default="off")
    afina.add_argument("--preload", action="store_true", help="warm the process up first, as a worker does")
    afina.add_argument("--profile", action="store_true", help="torch.profiler over steps 20-22 of every job")
    afina.add_argument("--profile-startup", action="store_true",
                       help="cProfile from each job's setup to its first optimizer step")
    afina.add_argument("--cache-dir", default="/tmp/afina-bench-cache", help="the compile caches' volume")
    afina.add_argument("--quantization", choices=["none", "4bit"], default="none")
    bare_unsloth = sub.add_parser("bare-unsloth", parents=[every])
    bare_unsloth.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    bare_hf = sub.add_parser("bare-hf", parents=[every])
    bare_hf.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    paired = sub.add_parser("paired", parents=[every])
    paired.add_argument("--backend", choices=["unsloth", "hf"], default="unsloth")
    paired.add_argument("--rounds", type=int, default=2)
    paired.add_argument("--examples", type=int, default=600)
    paired.add_argument("--speed", choices=["auto", "off"], default="off")
    paired.add_argument("--profile", action="store_true", help="torch.profiler over steps 20-22 of every job")
    paired.add_argument("--bare-batch", type=int, default=4, help="the bare loop's micro-batch (Unsloth's default)")
    paired.set_defaults(quantization="none")
    everything = sub.add_parser("all")
    everything.add_argument("--tokenizer", required=True)
    everything.add_argument("--out-dir", required=True)
    everything.add_argument("--models-dir", default="/tmp/afina-bench-models")
    everything.add_argument("--only", default="")
    everything.add_argument("--steps", type=int, default=60)
    everything.add_argument("--warmup", type=int, default=10)
    everything.add_argument("--timeout", type=int, default=400)
    args = parser.parse_args()
    if args.command == "all":
        run_all(args)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    runs = {"afina": run_afina, "bare-unsloth": run_bare_unsloth, "bare-hf": run_bare_hf, "paired": run_paired}
    result = runs[args.command](args)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
