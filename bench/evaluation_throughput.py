"""Evaluation throughput: the evaluator's batched/cached paths against one-by-one calls to the same backend.

Run: ``.venv/bin/python bench/evaluation_throughput.py [--examples 16] [--tokens 32]`` on SmolLM2-135M:

- transformers (the base and fine-tuned models): ``HfScorer.generate_many`` (left-padded batches of 8) against
  ``generate`` called once per prompt, same prompts, greedy, same token budget;
- llama.cpp (the GGUF variants): scoring an example's reference, its answer and two labels with the prompt kept
  in the context cache (``GgufScorer`` as the evaluator uses it) against a reset before every call.

Prompts are the bundled Aeon sample's held-out-style conversations. Examples/s of each side, both in one run,
go to bench/results/evaluation_throughput-<time>.json; bench/RESULTS.md has the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "cli" / "afina" / "cli" / "data" / "aeon_sample.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of both backends (1: a shared machine)")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from afina.core.catalog import resolve_base_model
    from afina.core.hfmodels import materialize_base_model
    from afina.evaluator.examples import split_examples, tokenize
    from afina.evaluator.gguf import GgufScorer
    from afina.evaluator.hf import HfScorer

    spec = resolve_base_model("smollm2-135m-instruct")
    cache = Path(os.environ.get("AFINA_MODEL_CACHE_DIR", Path.home() / ".cache" / "afina" / "models"))
    base_dir = materialize_base_model(spec, cache)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    tokenizer.chat_template = spec.family.stock_template
    records = [json.loads(line) for line in SAMPLE.read_text().splitlines() if line.strip()]
    examples = [tokenize(tokenizer, example) for example in split_examples(records)[:args.examples]]
    prompts = [item.prompt_ids for item in examples]
    stop = [tokenizer.convert_tokens_to_ids(token) for token in spec.family.stop]
    results: dict[str, float] = {}

    scorer = HfScorer.load(base_dir, tokenizer, stop, threads=args.threads)
    started = time.perf_counter()
    for prompt in prompts:
        scorer.generate(prompt, args.tokens)
    results["hf_sequential_examples_per_s"] = len(prompts) / (time.perf_counter() - started)
    started = time.perf_counter()
    for start in range(0, len(prompts), 8):
        scorer.generate_many(prompts[start:start + 8], args.tokens)
    results["hf_batched_examples_per_s"] = len(prompts) / (time.perf_counter() - started)
    scorer.close()

    labels = [tokenize(tokenizer, item.example, answer=text).answer_ids for item in examples[:1]
              for text in ("Beleza!", "Sure thing!")]
    gguf = GgufScorer(spec.gguf_path(), 2048, args.threads)

    def score(item, fresh: bool) -> None:  # noqa: ANN001
        for answer in (item.answer_ids, *labels):
            if fresh:
                gguf.llm.reset()
            gguf.token_logprobs(item.prompt_ids, answer)
        if fresh:
            gguf.llm.reset()
        gguf.generate(item.prompt_ids, args.tokens)

    for name, fresh in (("gguf_reset_each_call_examples_per_s", True), ("gguf_cached_prompt_examples_per_s", False)):
        started = time.perf_counter()
        for item in examples:
            score(item, fresh)
        results[name] = len(examples) / (time.perf_counter() - started)
    gguf.close()
    results["hf_speedup"] = results["hf_batched_examples_per_s"] / results["hf_sequential_examples_per_s"]
    results["gguf_speedup"] = (results["gguf_cached_prompt_examples_per_s"]
                               / results["gguf_reset_each_call_examples_per_s"])
    record = {"when": datetime.now(UTC).isoformat(), "machine": platform.machine(), "cpus": os.cpu_count(),
              "examples": len(examples), "tokens": args.tokens, "threads": args.threads, **results}
    out = ROOT / "bench" / "results" / f"evaluation_throughput-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
