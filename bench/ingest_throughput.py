"""Ingest throughput and memory: afina's streaming pipeline against Hugging Face ``datasets``, same run.

Run: ``.venv/bin/python bench/ingest_throughput.py`` (or ``make bench-ingest``); ``--rows 100000``
for a quick run. For each size (100k and 1M synthetic chat records: 30% with a system prompt,
20% multi-turn, 20% Portuguese, as in MEASURED.md) two child processes run one after the other
on the same JSONL file, so each one's peak RSS is its own (``getrusage`` of the child itself):

- afina: ``pipeline.ingest_file`` on a local store, exactly as the ingest worker runs it:
  read, convert, repair, validate, deduplicate, render with the training template, tokenize,
  mask, length policy, hash split, write the split files, report, stats, preview, manifest.
- baseline: the same work done the usual way with ``datasets``: ``load_dataset("json")``,
  ``.map`` to normalize and validate, ``.map`` (batched) to render the chat template with the
  same SmolLM2 tokenizer and tokenize, a length filter, ``train_test_split``, and the splits
  written as JSONL. ``num_proc=1`` (the fast tokenizer already uses every core).

Both load the same tokenizer (the one ingest builds from the catalog's GGUF) inside the timed
span. afina runs with the ingest worker's settings (``AFINA_INGEST_PROCESSES``, default 2 worker
processes for files over 32 MB); its peak RSS is the main process's plus each worker's. Sizes
up to 200k rows run ``--rounds`` alternating rounds (the median is reported, every round kept),
because this machine is shared and one round can be slowed by someone else's job; the load
average around each run is recorded. Results go to bench/results/ingest_throughput-<time>.json;
bench/RESULTS.md has the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
MAX_SEQ_LEN = 2048
VALIDATION_SHARE = 0.1

EN_WORDS = ("the system should answer each question with care and keep the customer informed about the order "
            "status shipping delays refunds product details warranty coverage and any other topic they raise "
            "while staying polite concise accurate and helpful in every single reply they receive from support "
            "please check configure restart install update verify schedule cancel confirm describe explain").split()
PT_WORDS = ("você pode me ajudar com o pedido atrasado a entrega não chegou ainda e preciso saber quando vai "
            "chegar obrigado pela paciência vamos verificar o status do envio e retornar em breve com uma "
            "solução para o seu problema ação informação configuração manutenção garantia produto cliente "
            "atenção também já está então próximo período horário endereço").split()
SYSTEM_PROMPTS = ("You are a helpful support assistant for an online store.",
                  "Você é o Aeon, assistente da casa. Responda em português, de forma breve.",
                  "Answer as a senior engineer: precise, short, no speculation.")


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem_gb:.0f} GiB RAM, Python {platform.python_version()}"


# -- synthetic data -----------------------------------------------------------------------------


def _sentence(rng: random.Random, words: tuple[str, ...] | list[str], low: int, high: int) -> str:
    text = " ".join(rng.choice(words) for _ in range(rng.randint(low, high)))
    return text[0].upper() + text[1:] + rng.choice((".", "?", "!", "."))


def synthetic_record(rng: random.Random) -> dict:
    """One chat: 30% with a system prompt, 20% multi-turn (2-3 exchanges), 20% Portuguese."""
    words = PT_WORDS if rng.random() < 0.2 else EN_WORDS
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for _ in range(rng.choice((2, 3)) if rng.random() < 0.2 else 1):
        messages.append({"role": "user", "content": " ".join(_sentence(rng, words, 6, 18)
                                                             for _ in range(rng.randint(1, 4)))})
        messages.append({"role": "assistant", "content": " ".join(_sentence(rng, words, 8, 24)
                                                                  for _ in range(rng.randint(2, 7)))})
    return {"messages": messages}


def write_dataset(path: Path, rows: int, seed: int = 1234) -> Path:
    """``rows`` records to ``path`` (kept between runs: the same file for the same size and seed)."""
    if path.exists():
        return path
    rng = random.Random(seed)
    partial = path.with_suffix(".partial")
    with open(partial, "w", encoding="utf-8") as handle:
        for _ in range(rows):
            handle.write(json.dumps(synthetic_record(rng), ensure_ascii=False) + "\n")
    partial.rename(path)
    return path


# -- the two children ---------------------------------------------------------------------------


def _rss() -> dict[str, int]:
    """Peak RSS of this process and of its largest (reaped) child process, and their sum over all of them.

    ``peak_rss_bytes`` is the whole footprint: this process's peak plus every worker process's
    (each worker counted at the largest child's peak, an upper bound).
    """
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    workers = _WORKERS_SEEN[0]
    cpu = sum(getattr(resource.getrusage(who), field) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for field in ("ru_utime", "ru_stime"))
    return {"main_peak_rss_bytes": own, "worker_peak_rss_bytes": child if workers else 0, "worker_processes": workers,
            "peak_rss_bytes": own + workers * child, "cpu_seconds": round(cpu, 1)}


_WORKERS_SEEN = [0]


def _tokenizer_dir(cache_dir: Path) -> Path:
    """Where ingest keeps the tokenizer it measures with (built from the GGUF once, outside the timing)."""
    from afina.core.catalog import resolve_base_model
    from afina.core.hfmodels import COMPLETE_MARKER, base_model_dir
    from afina.ingest.tokens import load_tokenizer

    spec = resolve_base_model(MODEL)
    load_tokenizer(spec, cache_dir)
    hf_dir = base_model_dir(spec, cache_dir)
    return hf_dir if (hf_dir / COMPLETE_MARKER).exists() else hf_dir.parent / "tokenizer"


def child_afina(data: Path, work: Path, cache_dir: Path) -> dict:
    from afina.core.datasets.options import IngestOptions
    from afina.core.settings import Settings
    from afina.core.store.local import LocalStore
    from afina.ingest.pipeline import IngestSource, ingest_file

    store = LocalStore(work / "store")
    info = store.put_file("files/bench/file-bench/data.jsonl", data)  # the upload: not timed
    source = IngestSource(tenant_id="bench", raw_key=info.key, filename=data.name, sha256=info.sha256 or "")
    options = IngestOptions(max_seq_len=MAX_SEQ_LEN, split={"proportions": {"train": 1 - VALIDATION_SHARE,
                                                                            "validation": VALIDATION_SHARE}})
    processes = Settings().ingest_processes  # what the ingest worker uses (AFINA_INGEST_PROCESSES)
    started = time.monotonic()
    result = ingest_file(store, source, options, work_dir=work / "tmp", model_cache_dir=cache_dir,
                         progress_every=100_000, processes=processes)
    seconds = time.monotonic() - started
    _WORKERS_SEEN[0] = result.processes
    counts = result.manifest.counts
    return {"seconds": seconds, "rows_in": counts["rows"], "rows_out": counts["examples"],
            "splits": {name: split.examples for name, split in result.manifest.splits.items()},
            "truncated_or_dropped": counts["too_long"], "processes": processes, **_rss()}


def child_baseline(data: Path, work: Path, cache_dir: Path) -> dict:
    import unicodedata

    from datasets import disable_progress_bars, load_dataset
    from transformers import AutoTokenizer

    from afina.core.catalog import resolve_base_model

    disable_progress_bars()
    template = resolve_base_model(MODEL).family.stock_template
    tokenizer_dir = _tokenizer_dir(cache_dir)
    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    dataset = load_dataset("json", data_files=str(data), split="train", cache_dir=str(work / "hf-cache"))
    rows_in = len(dataset)

    def normalize(batch: dict) -> dict:
        messages_out, valid = [], []
        for messages in batch["messages"]:
            clean = [{"role": m["role"], "content": unicodedata.normalize("NFC", (m["content"] or "").strip())}
                     for m in messages]
            roles = [m["role"] for m in clean if m["role"] != "system"]
            ok = bool(roles) and roles[0] == "user" and roles[-1] == "assistant" and all(
                a != b for a, b in zip(roles, roles[1:], strict=False)) and all(m["content"] for m in clean)
            messages_out.append(clean)
            valid.append(ok)
        return {"messages": messages_out, "valid": valid}

    def tokenize(batch: dict) -> dict:
        texts = [tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
                 for messages in batch["messages"]]
        encoded = tokenizer(texts, add_special_tokens=False)
        return {"n_tokens": [len(ids) for ids in encoded["input_ids"]]}

    dataset = dataset.map(normalize, batched=True, batch_size=1000)
    dataset = dataset.filter(lambda batch: batch["valid"], batched=True, batch_size=1000)
    dataset = dataset.map(tokenize, batched=True, batch_size=1000)
    dataset = dataset.filter(lambda batch: [n <= MAX_SEQ_LEN for n in batch["n_tokens"]], batched=True,
                             batch_size=1000)
    splits = dataset.train_test_split(test_size=VALIDATION_SHARE, seed=0)
    for name, split in splits.items():
        split.select_columns(["messages"]).to_json(str(work / f"{name}.jsonl"), lines=True, force_ascii=False)
    seconds = time.monotonic() - started
    return {"seconds": seconds, "rows_in": rows_in, "rows_out": len(dataset),
            "splits": {name: len(split) for name, split in splits.items()}, **_rss()}


def run_child(kind: str, data: Path, cache_dir: Path) -> dict:
    """One measurement in a fresh process; its last stdout line is the JSON result."""
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix=f"afina-bench-{kind}-", dir=data.parent) as work:
        command = [sys.executable, __file__, "--child", kind, "--data", str(data), "--work", work,
                   "--cache-dir", str(cache_dir)]
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise SystemExit(f"{kind} child failed ({completed.returncode}):\n{completed.stderr[-4000:]}")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    result["rows_per_s"] = result["rows_in"] / result["seconds"]
    result["load_average_before"], result["load_average_after"] = round(load_before, 2), round(os.getloadavg()[0], 2)
    return result


def median_run(runs: list[dict]) -> dict:
    """The round with the median rows/s (each round's figures stay together)."""
    return sorted(runs, key=lambda run: run["rows_per_s"])[len(runs) // 2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="100000,1000000", help="comma-separated dataset sizes")
    parser.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "afina-bench-ingest")
    parser.add_argument("--cache-dir", type=Path,
                        default=Path(os.environ.get("AFINA_MODEL_CACHE_DIR", Path.home() / ".cache/afina/models")))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per size up to 200k rows (median)")
    parser.add_argument("--child", choices=("afina", "baseline"), help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if args.child:
        child = child_afina if args.child == "afina" else child_baseline
        print(json.dumps(child(args.data, args.work, args.cache_dir)))
        return 0

    sizes = [int(size) for size in args.rows.split(",")]
    args.data_dir.mkdir(parents=True, exist_ok=True)
    _tokenizer_dir(args.cache_dir)  # build the tokenizer cache once, outside every measurement
    runs: dict[str, dict] = {}
    for rows in sizes:
        data = write_dataset(args.data_dir / f"chat-{rows}.jsonl", rows)
        rounds = args.rounds if rows <= 200_000 else 1  # 1M rows take ~20 min a round
        afina_runs, baseline_runs = [], []
        for _ in range(rounds):  # alternating, so both see the same machine over time
            afina_runs.append(run_child("afina", data, args.cache_dir))
            baseline_runs.append(run_child("baseline", data, args.cache_dir))
        afina, baseline = median_run(afina_runs), median_run(baseline_runs)
        runs[str(rows)] = {"bytes": data.stat().st_size, "rounds": rounds, "afina": afina, "baseline": baseline,
                           "speedup": round(afina["rows_per_s"] / baseline["rows_per_s"], 2),
                           "all_rounds": {"afina_rows_per_s": [round(r["rows_per_s"]) for r in afina_runs],
                                          "baseline_rows_per_s": [round(r["rows_per_s"]) for r in baseline_runs]}}
        print(f"{rows:>9} rows  afina {afina['rows_per_s']:8.0f} rows/s {afina['peak_rss_bytes'] / 2**20:7.0f} MiB"
              f"   datasets {baseline['rows_per_s']:8.0f} rows/s {baseline['peak_rss_bytes'] / 2**20:7.0f} MiB"
              f"   speedup {runs[str(rows)]['speedup']:.2f}x", flush=True)
    result: dict = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine(),
                    "command": f"python bench/ingest_throughput.py --rows {args.rows} --rounds {args.rounds}",
                    "max_seq_len": MAX_SEQ_LEN,
                    "runs": runs}
    if len(sizes) > 1:
        small, large = str(min(sizes)), str(max(sizes))
        result["afina_rss_growth"] = round(runs[large]["afina"]["peak_rss_bytes"]
                                           / runs[small]["afina"]["peak_rss_bytes"], 3)
        result["baseline_rss_growth"] = round(runs[large]["baseline"]["peak_rss_bytes"]
                                              / runs[small]["baseline"]["peak_rss_bytes"], 3)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"ingest_throughput-{datetime.now(UTC):%Y%m%dT%H%M%S}.json"
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
