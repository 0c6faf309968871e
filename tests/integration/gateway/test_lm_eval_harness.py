"""EleutherAI's lm-evaluation-harness runs against afina: ``local-completions`` (its OpenAI-compatible model)
scores a small multiple-choice task, defined over a local JSONL file, through the real gateway's
``/v1/completions`` (``echo``, ``logprobs``, token-id prompts), with SmolLM2 served by llama.cpp in process.

Nothing is downloaded: the task's data is a file this test writes, the harness' tokenizer is the local SmolLM2
checkpoint, and the hubs are offline (tests/conftest.py). The harness' log-likelihood of every choice is
checked against llama.cpp's own logits on the same token ids, and its accuracy against the argmax of those.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.gateway.conftest import SMOLLM2, Gateway, make_settings, start_gateway
from tests.support.models import materialized_base_model

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TASK = "afina_capitals"
DOCS = [
    {"question": "The capital of France is", "choices": [" Paris", " Berlin", " Madrid"], "answer": 0},
    {"question": "The capital of Germany is", "choices": [" Rome", " Berlin", " Lisbon"], "answer": 1},
    {"question": "The capital of Italy is", "choices": [" Oslo", " Vienna", " Rome"], "answer": 2},
    {"question": "One, two, three, four,", "choices": [" five", " blue", " table"], "answer": 0},
    {"question": "The opposite of hot is", "choices": [" cold", " green", " seven"], "answer": 0},
]


@pytest.fixture(scope="module")
def scoring_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway of its own with a short context: a ``logprobs`` request keeps the logits of every position of
    the context, and llama-cpp-python turns all of them into log probabilities for each answer."""
    gateway = start_gateway(make_settings(tmp_path_factory.mktemp("lm-eval-home"), inference_n_ctx=256))
    yield gateway
    gateway.served.stop()
    gateway.runtime.db.dispose()


def write_task(folder: Path) -> Path:
    """A task YAML (``dataset_path: json`` over a local file), as a user would put in ``--include_path``."""
    data = folder / "capitals.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {folder / 'datasets-cache'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: answer\n"
        "target_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n")
    return folder


def llama_cpp_loglikelihoods(tokenizer: Any, requests: list[tuple[str, str]]) -> list[float]:
    """The log-probability of each continuation after its context, from llama.cpp's logits on the token ids the
    harness sends (its ``_encode_pair``: the whole text encoded, the context's tokens cut off the front)."""
    import llama_cpp
    import numpy as np

    from afina.core.catalog import resolve_base_model

    llm = llama_cpp.Llama(model_path=str(resolve_base_model(SMOLLM2).gguf_path()), n_ctx=256, logits_all=True,
                          verbose=False)
    try:
        values = []
        for context, continuation in requests:
            whole = tokenizer.encode(context + continuation, add_special_tokens=False)
            context_length = len(tokenizer.encode(context, add_special_tokens=False))
            llm.reset()
            llm.eval(whole)
            logits = np.asarray(llm.scores[: len(whole)], dtype=np.float64)
            total = 0.0
            for position in range(context_length, len(whole)):
                row = logits[position - 1]
                total += float(row[whole[position]] - (row.max() + np.log(np.exp(row - row.max()).sum())))
            values.append(total)
        return values
    finally:
        llm.close()


def test_lm_eval_local_completions_scores_a_local_task_through_afina(
        scoring_gateway: Gateway, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    gateway = scoring_gateway
    tokenizer_dir = materialized_base_model(tmp_path_factory)
    task_manager = TaskManager(include_path=str(write_task(tmp_path)), include_defaults=False)
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={"model": SMOLLM2, "base_url": f"{gateway.url}/v1/completions",
                    "tokenizer_backend": "huggingface", "tokenizer": str(tokenizer_dir), "tokenized_requests": True,
                    "num_concurrent": 1, "max_retries": 1, "max_length": 256,
                    "header": {"Authorization": f"Bearer {gateway.keys['acme']}"}},
        tasks=[TASK], task_manager=task_manager, num_fewshot=0, log_samples=True, random_seed=0,
        numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)

    accuracy = results["results"][TASK]["acc,none"]
    assert math.isfinite(accuracy) and 0 <= accuracy <= 1
    samples = sorted(results["samples"][TASK], key=lambda sample: sample["doc_id"])
    assert len(samples) == len(DOCS)
    harness = [[float(response[0]) for response in sample["filtered_resps"]] for sample in samples]
    assert all(math.isfinite(value) and value < 0 for row in harness for value in row)

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    direct = llama_cpp_loglikelihoods(tokenizer, [(doc["question"], choice) for doc in DOCS
                                                  for choice in doc["choices"]])
    assert [value for row in harness for value in row] == pytest.approx(direct, abs=2e-3)
    rows = [direct[index * 3:index * 3 + 3] for index in range(len(DOCS))]
    expected_accuracy = sum(max(range(3), key=row.__getitem__) == doc["answer"]
                            for row, doc in zip(rows, DOCS, strict=True)) / len(DOCS)
    assert accuracy == pytest.approx(expected_accuracy)  # the harness chose what llama.cpp's logits choose
    assert accuracy >= 0.6  # SmolLM2 knows most of these: the answers are the model's, not noise
