"""The examples an evaluation scores: the held-out split of the job's committed dataset, as token ids.

An example is a conversation cut before its last assistant turn (the prompt) and that turn's text (the
reference). Every model is scored on the same token ids, made once with the fine-tuned model's tokenizer
and its stock chat template (what the GGUFs carry), so losses of transformers and llama.cpp models compare.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from afina.core.artifacts.dataset import DATASET_MANIFEST, DatasetManifest, read_split_records
from afina.core.errors import EvaluationFailed
from afina.core.runtime import Runtime


@dataclass(frozen=True)
class Example:
    prompt: list[dict[str, str]]
    reference: str


@dataclass(frozen=True)
class TokenizedExample:
    """``prompt_ids`` then ``answer_ids`` is the rendered conversation with the reference as the answer."""

    example: Example
    prompt_ids: list[int]
    answer_ids: list[int]


def split_examples(records: list[dict[str, Any]]) -> list[Example]:
    """Every record that ends in (or holds) an assistant answer after at least one other message."""
    examples = []
    for record in records:
        messages = record.get("messages")
        if not isinstance(messages, list):
            continue
        last = max((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"),
                   default=None)
        if not last:  # None, or an assistant message with nothing before it
            continue
        prompt = [{"role": str(m.get("role")), "content": str(m.get("content") or "")} for m in messages[:last]]
        examples.append(Example(prompt=prompt, reference=str(messages[last].get("content") or "")))
    return examples


def held_out_examples(runtime: Runtime, dataset_key: str | None, limit: int,
                      ) -> tuple[Literal["test", "validation"], list[Example]]:
    """The first ``limit`` examples of the test split, else of the validation split; ``EvaluationFailed`` naming
    what is missing when there is none."""
    manifest = DatasetManifest.read(runtime.store, f"{dataset_key}/{DATASET_MANIFEST}") if dataset_key else None
    if manifest is None:
        raise EvaluationFailed("the job has no committed dataset to take held-out examples from",
                               code="no_held_out_split")
    for split in ("test", "validation"):
        entry = manifest.splits.get(split)  # type: ignore[call-overload]
        if entry is None or entry.examples == 0:
            continue
        examples = split_examples(read_split_records(runtime.store, entry, runtime.settings.data_encryption_key))
        if examples:
            return split, examples[:limit]  # type: ignore[return-value]
        raise EvaluationFailed(f"the {split} split holds {entry.examples} record(s) but none is a conversation "
                               "with an assistant answer to compare with", code="empty_split")
    raise EvaluationFailed("the job's dataset has no test or validation split (both are empty), so there is "
                           "nothing held out to evaluate on; upload with a test split (e.g. --split "
                           "treino=0.8,validacao=0.1,teste=0.1)", code="empty_split")


def file_examples(runtime: Runtime, dataset_key: str, limit: int, file_name: str) -> list[Example]:
    """Every example of an uploaded file's committed dataset (all its splits, in order), up to ``limit``."""
    manifest = DatasetManifest.read(runtime.store, f"{dataset_key}/{DATASET_MANIFEST}")
    if manifest is None:
        raise EvaluationFailed(f"the file {file_name} has no committed dataset (its ingest has not finished)",
                               code="file_not_ready")
    records: list[dict[str, Any]] = []
    for split in ("train", "validation", "test"):
        entry = manifest.splits.get(split)  # type: ignore[call-overload]
        if entry is not None:
            records += read_split_records(runtime.store, entry, runtime.settings.data_encryption_key)
    examples = split_examples(records)
    if not examples:
        raise EvaluationFailed(f"the file {file_name} holds no conversation with an assistant answer to compare "
                               "with", code="empty_split")
    return examples[:limit]


def train_examples(runtime: Runtime, dataset_key: str | None, limit: int) -> list[Example]:
    """The first ``limit`` training examples (for the train/held-out loss gap); none when there is no split."""
    if limit == 0 or not dataset_key:
        return []
    manifest = DatasetManifest.read(runtime.store, f"{dataset_key}/{DATASET_MANIFEST}")
    entry = manifest.splits.get("train") if manifest is not None else None
    if entry is None:
        return []
    return split_examples(read_split_records(runtime.store, entry, runtime.settings.data_encryption_key))[:limit]


def tokenize(tokenizer: Any, example: Example, *, answer: str | None = None) -> TokenizedExample:
    """Token ids of the prompt (with the generation prompt) and of ``answer`` (the reference by default) as the
    template renders it, end-of-turn included."""
    text = example.reference if answer is None else answer
    prompt_text = str(tokenizer.apply_chat_template(example.prompt, tokenize=False, add_generation_prompt=True))
    full_text = str(tokenizer.apply_chat_template([*example.prompt, {"role": "assistant", "content": text}],
                                                  tokenize=False))
    prompt_ids = _encode(tokenizer, prompt_text)
    full_ids = _encode(tokenizer, full_text)
    if full_ids[:len(prompt_ids)] == prompt_ids:
        answer_ids = full_ids[len(prompt_ids):]
    elif full_text.startswith(prompt_text):  # a merge across the boundary: tokenize the answer on its own
        answer_ids = _encode(tokenizer, full_text[len(prompt_text):])
    else:
        raise EvaluationFailed("the chat template renders a conversation that does not start with its own "
                               "prompt; the answer tokens cannot be told apart", code="template_mismatch")
    return TokenizedExample(example=example, prompt_ids=prompt_ids, answer_ids=answer_ids)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
