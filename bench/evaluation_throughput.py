"""Evaluation throughput: the evaluator's batched path against one call at a time, on the same backend.

Run: ``.venv/bin/python bench/evaluation_throughput.py [--examples 32] [--tokens 64] [--threads 1]`` (``make
bench-eval``) on SmolLM2-135M-Instruct, the catalog's base: through transformers (float32, as the base and
fine-tuned models are scored) and through llama.cpp (the catalog's Q4_1 GGUF, as the GGUF variants are).

Each side does the evaluator's whole per-example work, what ``score_model`` does: the reference's loss, each
label's score when there are labels (``--labels``; the bundled sample's free-text answers have none, as the
evaluator would detect), and the greedy answer of ``--tokens`` new tokens at most (the evaluator's default 64):

- one call at a time: ``token_logprobs`` for the reference and each label, then ``generate``, example after
  example; for llama.cpp twice: every call from a fresh context (``reset()``), and with the scorer's prompt cache
  (the reference, labels and answer of an example continue from its evaluated prompt: the evaluator's GGUF path
  before batching);
- the evaluator's path: ``score_model`` itself (``score_many`` in batches of ``GENERATION_BATCH``, sorted by
  prompt length).

Both sides' answers and losses are compared (they should be equal). Examples/s of each side, all in one run, go
to bench/results/evaluation_throughput-<time>.json; bench/RESULTS.md has the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "cli" / "afina" / "cli" / "data" / "aeon_sample.jsonl"


def one_call_at_a_time(scorer: Any, inputs: Any, *, fresh: bool = False) -> tuple[list[str], list[float | None]]:
    """Each example's reference log-probabilities, label scores and greedy answer, one scorer call each."""
    answers, losses = [], []

    def call(method: Any, *args: Any) -> Any:
        if fresh:
            scorer.llm.reset()
        return method(*args)

    for i, item in enumerate(inputs.examples):
        logprobs = call(scorer.token_logprobs, item.prompt_ids, item.answer_ids) if item.answer_ids else []
        losses.append(-sum(logprobs) / len(logprobs) if logprobs else None)
        for ids in (inputs.label_answers[i].values() if inputs.label_answers else ()):
            call(scorer.token_logprobs, item.prompt_ids, ids)
        answers.append(call(scorer.generate, item.prompt_ids, inputs.max_new_tokens))
    return answers, losses


def measure(name: str, scorer: Any, inputs: Any, baselines: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Examples/s of each one-call-at-a-time baseline and of ``score_model``, and whether their figures agree."""
    from afina.evaluator.scoring import ModelPlan, score_model

    figures: dict[str, Any] = {}
    results: dict[str, tuple[list[str], list[float | None]]] = {}
    for baseline, options in baselines.items():
        started = time.perf_counter()
        results[baseline] = one_call_at_a_time(scorer, inputs, **options)
        figures[f"{baseline}_examples_per_s"] = len(inputs.examples) / (time.perf_counter() - started)
    plan = ModelPlan(key=name, kind=name, title=name, identity=name, load=lambda: scorer)
    started = time.perf_counter()
    evaluation = score_model(scorer, plan, inputs, fingerprint="bench", check_continue=lambda: None)
    figures["evaluator_examples_per_s"] = len(inputs.examples) / (time.perf_counter() - started)
    for baseline in baselines:
        figures[f"speedup_vs_{baseline}"] = (figures["evaluator_examples_per_s"]
                                             / figures[f"{baseline}_examples_per_s"])
    for baseline, (answers, losses) in results.items():
        figures[f"answers_equal_to_{baseline}"] = sum(
            a == b for a, b in zip(answers, evaluation.answers, strict=True))
        figures[f"max_example_loss_difference_to_{baseline}"] = max(
            (abs(a - b) for a, b in zip(losses, evaluation.example_losses, strict=True)
             if a is not None and b is not None), default=0.0)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64, help="greedy tokens per answer at most")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of both backends (1: a shared machine)")
    parser.add_argument("--labels", default="", help="comma-separated label answers scored for every example")
    parser.add_argument("--backends", default="transformers,llama_cpp", help="which of the two to measure")
    parser.add_argument("--variants", default="",
                        help="comma-separated GGUF variants the exporter makes (q8_0, q4_k_m, ...) measured besides "
                             "the catalog's file: converted and quantized from the base with afina's exporter")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from afina.core.catalog import resolve_base_model
    from afina.core.hfmodels import materialize_base_model
    from afina.evaluator.examples import split_examples, tokenize
    from afina.evaluator.gguf import GgufScorer
    from afina.evaluator.hf import HfScorer
    from afina.evaluator.scoring import GENERATION_BATCH, ScoringInputs

    spec = resolve_base_model("smollm2-135m-instruct")
    cache = Path(os.environ.get("AFINA_MODEL_CACHE_DIR", Path.home() / ".cache" / "afina" / "models"))
    base_dir = materialize_base_model(spec, cache)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    tokenizer.chat_template = spec.family.stock_template
    records = [json.loads(line) for line in SAMPLE.read_text().splitlines() if line.strip()]
    examples = [tokenize(tokenizer, example) for example in split_examples(records)[:args.examples]]
    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    inputs = ScoringInputs(
        examples=examples, labels=labels or None,
        label_answers=[{label: tokenize(tokenizer, item.example, answer=label).answer_ids for label in labels}
                       for item in examples] if labels else None,
        train=[], max_new_tokens=args.tokens)
    stop = [tokenizer.convert_tokens_to_ids(token) for token in spec.family.stop]
    record: dict[str, Any] = {
        "when": datetime.now(UTC).isoformat(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "load_average_before": os.getloadavg(), "model": spec.id, "gguf": spec.gguf_path().name,
        "examples": len(examples), "prompt_tokens_mean": sum(len(e.prompt_ids) for e in examples) / len(examples),
        "tokens": args.tokens, "labels": labels, "threads": args.threads, "batch": GENERATION_BATCH}

    backends = {name.strip() for name in args.backends.split(",")}
    if "transformers" in backends:
        scorer = HfScorer.load(base_dir, tokenizer, stop, threads=args.threads)
        record["transformers"] = measure("hf", scorer, inputs, {"one_call_at_a_time": {}})
        scorer.close()
    ggufs = {"llama_cpp": spec.gguf_path()} if "llama_cpp" in backends else {}
    ggufs.update({f"llama_cpp_{variant}": path for variant, path in exported_variants(base_dir, args.variants)})
    for key, path in ggufs.items():
        gguf = GgufScorer(path, 2048, args.threads)
        record[key] = {"gguf": path.name, **measure("gguf", gguf, inputs, {
            "one_call_at_a_time_fresh_context": {"fresh": True}, "one_call_at_a_time_prompt_cache": {}})}
        record[key]["batched_context_shape"] = list(gguf._batched_shape)
        gguf.close()
    record["load_average_after"] = os.getloadavg()
    record["peak_rss_mb"] = _peak_rss_mb()
    out = ROOT / "bench" / "results" / f"evaluation_throughput-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


def exported_variants(base_dir: Path, variants: str) -> list[tuple[str, Path]]:
    """The GGUF of each named variant, as the exporter makes it from the base (kept between runs: the base does
    not change): llama.cpp's converter to f16, then its quantizer."""
    from afina.exporter.gguf import convert_to_gguf, quantize_gguf, resolve_quantizations

    names = resolve_quantizations(variants.split(",")) if variants.strip() else []
    if not names:
        return []
    cache = Path(os.environ.get("TMPDIR", "/tmp")) / "afina-bench-gguf"
    cache.mkdir(parents=True, exist_ok=True)
    f16 = cache / "smollm2-f16.gguf"
    if not f16.is_file():
        convert_to_gguf(base_dir, f16, log_path=cache / "convert.log")
    paths = []
    for name in names:
        path = cache / f"smollm2-{name}.gguf"
        if not path.is_file():
            quantize_gguf(f16, path, name)
        paths.append((name, path))
    return paths


def _peak_rss_mb() -> float:
    import resource

    return math.floor(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


if __name__ == "__main__":
    main()
