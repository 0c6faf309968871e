"""A fine-tuned job as the evaluation stage finds it — committed dataset, adapter (with a word-level tokenizer),
export manifest, registered model — built in seconds without any real model, and scorers that answer from a
script, so the stage's bookkeeping (resume, gate, files, failures) is tested on exact, known figures.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from afina.core.artifacts import ExportManifest, FileEntry
from afina.core.artifacts.adapter import commit_adapter
from afina.core.artifacts.dataset import DATASET_MANIFEST, DatasetManifest, SplitFile
from afina.core.catalog import resolve_base_model
from afina.core.datasets.layout import adapter_prefix, dataset_prefix, model_prefix
from afina.core.db import repository as repo
from afina.core.db.models import Job
from afina.core.evaluation_jobs import add_evaluation_job
from afina.core.naming import fine_tuned_model_name
from afina.core.runtime import Runtime
from afina.evaluator.scoring import ModelPlan
from tests.support.jobs import create_job

TENANT = "acme"
SPECIALS = ("<unk>", "<pad>", "<|im_start|>", "<|im_end|>")


def conversation(user: str, answer: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


SENTIMENT_TEST = [conversation(f"avalie: produto {i} {'ótimo' if i % 2 else 'péssimo'}",
                               "positivo" if i % 2 else "negativo") for i in range(8)]
SENTIMENT_TRAIN = [conversation(f"avalie: item {i} {'bom' if i % 2 else 'ruim'}",
                                "positivo" if i % 2 else "negativo") for i in range(6)]
EXTRA_WORDS = ("não", "sei", "talvez", "acho", "que")


def save_word_tokenizer(out_dir: Path, texts: list[str]) -> None:
    """A word-level tokenizer knowing every whitespace-separated word of ``texts`` (so decoding gives the words
    back), with the SmolLM2 chat template and ``<|im_end|>`` as EOS."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    spaced = []
    for text in texts:  # the tokenizer splits its special tokens out first: they are words of their own
        for special in SPECIALS:
            text = text.replace(special, f" {special} ")
        spaced.append(text)
    words = list(dict.fromkeys([*SPECIALS, *(word for text in spaced for word in text.split())]))
    backend = Tokenizer(WordLevel({word: index for index, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>",
                                        pad_token="<pad>", additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = resolve_base_model("smollm2-135m-instruct").family.stock_template
    tokenizer.save_pretrained(str(out_dir))


def _rendered(records: list[dict[str, Any]]) -> list[str]:
    template = resolve_base_model("smollm2-135m-instruct").family.stock_template
    from jinja2 import Template

    return [Template(template).render(messages=r["messages"], add_generation_prompt=True) for r in records]


@dataclass
class EvaluatedJob:
    runtime: Runtime
    source: Job
    model_name: str
    evaluation_job_id: str
    variants: tuple[str, ...]


def build_evaluated_job(runtime: Runtime, tmp_path: Path, *, test: list[dict[str, Any]] | None = None,
                        validation: list[dict[str, Any]] | None = None,
                        train: list[dict[str, Any]] | None = None, labels: list[str] | None = None,
                        variants: tuple[str, ...] = ("f16", "q4_k_m"), adapter: Path | None = None,
                        gguf_files: dict[str, Path] | None = None) -> EvaluatedJob:
    """A succeeded fine-tuning job with its model registered and its evaluation job queued.

    By default its adapter is a stand-in with a word-level tokenizer and its GGUFs are placeholder bytes (for
    scripted scorers); ``adapter`` (a real PEFT adapter folder) and ``gguf_files`` (variant -> a real GGUF) make
    it a job real models can be evaluated on.
    """
    train = SENTIMENT_TRAIN if train is None else train
    test = SENTIMENT_TEST if test is None else test
    source = create_job(runtime, TENANT, "file-eval", stage="done", status="running")
    store = runtime.store
    prefix = dataset_prefix(TENANT, f"file-eval-{source.id}", None)
    splits: dict[str, SplitFile] = {}
    for name, records in (("train", train), ("validation", validation or []), ("test", test)):
        if records:
            info = store.put_bytes(f"{prefix}/{name}.jsonl", b"".join(orjson.dumps(r) + b"\n" for r in records))
            splits[name] = SplitFile(key=info.key, sha256=info.sha256 or "", bytes=info.size, examples=len(records))
    DatasetManifest.build(format="openai-chat", splits=splits, created_at=int(time.time()),
                          counts={name: entry.examples for name, entry in splits.items()}
                          ).write(store, f"{prefix}/{DATASET_MANIFEST}")
    adapter_dir = tmp_path / f"adapter-{source.id}"
    if adapter is not None:
        shutil.copytree(adapter, adapter_dir, ignore=shutil.ignore_patterns("afina-adapter-complete"))
    else:
        adapter_dir.mkdir(parents=True)
        (adapter_dir / "adapter_config.json").write_text(json.dumps(
            {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "peft_type": "LORA"}))
        (adapter_dir / "adapter_model.safetensors").write_bytes(b"not read by the scripted scorers")
        save_word_tokenizer(adapter_dir, _rendered([*train, *test, *(validation or [])])
                            + [" ".join(EXTRA_WORDS), *(labels or []), "positivo negativo neutro"])
    spec = resolve_base_model("smollm2-135m-instruct")
    commit_adapter(store, adapter_prefix(TENANT, source.id), adapter_dir, job_id=source.id, base=spec,
                   global_step=1, trained_tokens=1)
    name = fine_tuned_model_name(source.model, TENANT, source.suffix, source.id)
    models = model_prefix(TENANT, source.id)
    if gguf_files is not None:
        variants = tuple(gguf_files)
        gguf = {variant: FileEntry.of(store.put_file(f"{models}/model-{variant}.gguf", path))
                for variant, path in gguf_files.items()}
    else:
        gguf = {variant: FileEntry.of(store.put_bytes(f"{models}/model-{variant}.gguf", f"gguf {variant}".encode()))
                for variant in variants}
    manifest = ExportManifest.build(
        name=name, job_id=source.id, tenant_id=TENANT, base_model=spec.id, family=spec.family.name,
        serve=variants[-1], adapter=adapter_prefix(TENANT, source.id), gguf=gguf,
        modelfile=FileEntry.of(store.put_bytes(f"{models}/Modelfile", b"FROM x")),
        verification=FileEntry.of(store.put_bytes(f"{models}/verification.json", b"{}")), created_at=1)
    manifest.write(store, f"{models}/manifest.json")
    with runtime.db.session() as session:
        job = repo.get_job(session, None, source.id)
        job.dataset_key = prefix
        repo.register_model(session, name=name, tenant_id=TENANT, base_model=spec.id, job_id=source.id,
                            artifacts=manifest.served(adapter_prefix(TENANT, source.id),
                                                      f"{models}/manifest.json").model_dump(mode="json"))
        job.fine_tuned_model = name
        repo.set_status(session, job, "succeeded", message="ready")
        add_evaluation_job(session, job, name, labels=labels)
    with runtime.db.session() as session:
        evaluation = session.query(Job).filter(Job.kind == "evaluation").order_by(Job.created_at.desc()).first()
        assert evaluation is not None
        source = repo.get_job(session, None, source.id)
    return EvaluatedJob(runtime=runtime, source=source, model_name=name, evaluation_job_id=evaluation.id,
                        variants=variants)


@dataclass
class ScriptedScorer:
    """Answers from ``answer(user_text)``; every answer token has log-probability ``token_logprob``, and a label
    answer gets ``label_bonus`` more per token when ``answer`` would give that label (a confident model)."""

    tokenizer: Any
    answer: Callable[[str], str]
    token_logprob: float = -1.0
    label_bonus: float = 0.0
    closed: bool = False

    def _user(self, prompt_ids: list[int]) -> str:
        words = self.tokenizer.decode(prompt_ids).split()
        start = max(i for i in range(len(words) - 1) if words[i] == "<|im_start|>" and words[i + 1] == "user")
        return " ".join(words[start + 2:words.index("<|im_end|>", start)])

    def token_logprobs(self, prompt_ids: list[int], answer_ids: list[int]) -> list[float]:
        said = self.tokenizer.decode(answer_ids).replace("<|im_end|>", "").strip()
        bonus = self.label_bonus if said == self.answer(self._user(prompt_ids)) else 0.0
        return [self.token_logprob + bonus] * len(answer_ids)

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> str:
        return self.answer(self._user(prompt_ids))

    def close(self) -> None:
        self.closed = True


@dataclass
class ScriptedModels:
    """``plan_models`` for ``evaluate_job``: one scripted scorer per model key, with a count of loads."""

    scripts: dict[str, dict[str, Any]]
    loads: dict[str, int] = field(default_factory=dict)
    fail_on_load: str | None = None

    def __call__(self, *, tokenizer: Any, export: ExportManifest, **_: Any) -> list[ModelPlan]:
        keys = ["base", "fine_tuned", *(f"gguf:{variant}" for variant in export.gguf)]

        def loader(key: str) -> Callable[[], ScriptedScorer]:
            def load() -> ScriptedScorer:
                self.loads[key] = self.loads.get(key, 0) + 1
                if key == self.fail_on_load:
                    raise WorkerKilled(key)
                return ScriptedScorer(tokenizer=tokenizer, **self.scripts[key])
            return load

        return [ModelPlan(key=key, kind="gguf" if key.startswith("gguf:") else "hf", title=key,
                          identity=f"scripted:{key}", load=loader(key)) for key in keys]


class WorkerKilled(BaseException):
    """Stands for the worker dying mid-evaluation (not an Exception: nothing in the stage catches it)."""


def label_of(user: str) -> str:
    return "positivo" if ("ótimo" in user or "bom" in user) else "negativo"


def wrong_label_of(user: str) -> str:
    return "negativo" if label_of(user) == "positivo" else "positivo"
