"""From a prepared dataset in the store to token ids and labels the model trains on.

Labels come from the family's training template: it renders exactly like the
stock template (checked on a sample before training, token for token) but wraps
what each assistant says, and its end-of-turn token, in ``{% generation %}``
markers, so the assistant-token mask is the template's own and never a search
for marker strings (unsloth#2900: "all labels are -100"). Everything outside an
assistant reply is ``-100``; so is an assistant reply with ``weight: 0``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import SecretStr

from afina.core.artifacts.dataset import DATASET_MANIFEST, DatasetManifest, SplitFile, read_split_records
from afina.core.artifacts.manifest import ManifestInvalid
from afina.core.catalog.rendering import render_chat, reply_token_runs, template_tokens
from afina.core.errors import DatasetInvalid, TrainingFailed
from afina.core.store import ArtifactStore

IGNORE_INDEX = -100
PARITY_SAMPLE = 16


@dataclass(frozen=True)
class PreparedDataset:
    """A dataset as the ingest stage committed it: its manifest and the examples of each split."""

    manifest: DatasetManifest
    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]


@dataclass
class EncodedSplit:
    """Tokenized examples (``input_ids`` + ``labels``) and what happened on the way."""

    rows: list[dict[str, list[int]]] = field(default_factory=list)
    examples: int = 0
    dropped: int = 0  # no trained token left (all weight 0, or truncation cut every reply)
    truncated: int = 0
    tokens: int = 0
    trained_tokens: int = 0

    def summary(self) -> dict[str, int]:
        return {"examples": self.examples, "kept": len(self.rows), "dropped": self.dropped,
                "truncated": self.truncated, "tokens": self.tokens, "trained_tokens": self.trained_tokens}


def load_prepared_dataset(store: ArtifactStore, dataset_key: str | None,
                          data_key: SecretStr | None = None) -> PreparedDataset:
    """Read the ``DatasetManifest`` and its train and validation splits, each checked against its sha256.

    A split ingest encrypted at rest (``encryption`` in its manifest entry) is decrypted with
    ``data_key`` (``Settings.data_encryption_key``) after its sha256 is checked.
    """
    if not dataset_key:
        raise TrainingFailed("the job has no prepared dataset: the ingest stage has not committed one")
    manifest = DatasetManifest.read(store, f"{dataset_key}/{DATASET_MANIFEST}")
    if manifest is None:
        raise TrainingFailed(f"the job's prepared dataset {dataset_key} has no {DATASET_MANIFEST}: the ingest stage "
                             "did not commit it")
    splits = {name: _read_split(store, entry, data_key) for name, entry in manifest.splits.items()
              if name in ("train", "validation")}
    if not splits.get("train"):
        raise DatasetInvalid("the prepared dataset has no training examples", rule="empty_split",
                             param="training_file")
    return PreparedDataset(manifest=manifest, train=splits["train"], validation=splits.get("validation", []))


def _read_split(store: ArtifactStore, entry: SplitFile, data_key: SecretStr | None) -> list[dict[str, Any]]:
    try:
        return read_split_records(store, entry, data_key)
    except ManifestInvalid as exc:
        raise TrainingFailed(exc.message) from None


ENCODE_BATCH = 256  # conversations tokenized in one call: the tokenizer spreads a batch over the CPU's cores


def encode_example(tokenizer: Any, messages: list[dict[str, Any]], training_template: str,
                   max_seq_len: int, *, assistant_only: bool = True) -> tuple[dict[str, list[int]], bool] | None:
    """``({"input_ids", "labels"}, truncated)`` for one conversation; None when nothing is left to train on.

    ``assistant_only`` (``hyperparameters.assistant_only_loss``, the default) trains on the replies alone; off,
    every token is trained but the replies with ``weight: 0``."""
    ((input_ids, runs),) = encode_conversations(tokenizer, [messages], training_template)
    return _labelled(input_ids, runs, messages, max_seq_len, assistant_only=assistant_only)


def encode_conversations(tokenizer: Any, conversations: list[list[dict[str, Any]]],
                         training_template: str) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """Each conversation's token ids and the ``[start, end)`` token run of each assistant reply.

    What transformers' ``apply_chat_template(..., return_assistant_tokens_mask=True)`` gives, by the renderer ingest
    uses (``afina.core.catalog.rendering``), so ingest's verdicts are the trainer's by construction. Its per-token
    Python loop over every token of a batch was a third of a job's dataset phase."""
    special = template_tokens(tokenizer)
    rendered = [render_chat(training_template, messages, special) for messages in conversations]
    backend = tokenizer.backend_tokenizer  # a fast tokenizer: the mask needs its offsets, as transformers' does
    if backend.truncation is not None:
        backend.no_truncation()  # as transformers' own call without truncation leaves it
    if backend.padding is not None:
        backend.no_padding()
    encodings = backend.encode_batch([text for text, _ in rendered], add_special_tokens=False)
    return [(encoding.ids, reply_token_runs(encoding, spans, len(encoding.ids)))
            for (_, spans), encoding in zip(rendered, encodings, strict=True)]


def _labelled(input_ids: list[int], spans: list[tuple[int, int]], messages: list[dict[str, Any]], max_seq_len: int,
              *, assistant_only: bool) -> tuple[dict[str, list[int]], bool] | None:
    """One rendered conversation's labels from its assistant token runs, truncated to ``max_seq_len``."""
    replies = [message for message in messages if message.get("role") == "assistant"]
    if len(spans) != len(replies):
        # each assistant message renders one generation block ending in the EOS token; anything else is a
        # template bug, and training on a wrong mask would silently teach the wrong thing
        raise TrainingFailed(f"the training template marked {len(spans)} assistant span(s) for "
                             f"{len(replies)} assistant message(s); the family's training template is broken")
    labels = [IGNORE_INDEX] * len(input_ids) if assistant_only else list(input_ids)
    for (start, end), reply in zip(spans, replies, strict=True):
        if reply.get("weight", 1) != 0:
            labels[start:end] = input_ids[start:end]
        elif not assistant_only:
            labels[start:end] = [IGNORE_INDEX] * (end - start)
    truncated = len(input_ids) > max_seq_len
    input_ids, labels = input_ids[:max_seq_len], labels[:max_seq_len]
    if labels.count(IGNORE_INDEX) == len(labels):
        return None
    return {"input_ids": input_ids, "labels": labels}, truncated


def encode_split(tokenizer: Any, examples: list[dict[str, Any]], training_template: str,
                 max_seq_len: int, *, assistant_only: bool = True) -> EncodedSplit:
    """Every example encoded as ``encode_example`` does, in batches (a job's start waits on this)."""
    split = EncodedSplit(examples=len(examples))
    for first in range(0, len(examples), ENCODE_BATCH):
        conversations = [example["messages"] for example in examples[first:first + ENCODE_BATCH]]
        encoded = encode_conversations(tokenizer, conversations, training_template)
        for messages, (input_ids, runs) in zip(conversations, encoded, strict=True):
            result = _labelled(input_ids, runs, messages, max_seq_len, assistant_only=assistant_only)
            if result is None:
                split.dropped += 1
                continue
            row, truncated = result
            split.truncated += int(truncated)
            split.tokens += len(row["input_ids"])
            split.trained_tokens += len(row["labels"]) - row["labels"].count(IGNORE_INDEX)
            split.rows.append(row)
    return split


def encode_training_split(tokenizer: Any, examples: list[dict[str, Any]], training_template: str,
                          max_seq_len: int, *, assistant_only: bool = True) -> EncodedSplit:
    """Like ``encode_split``, but a training split with nothing left to learn from fails the job."""
    split = encode_split(tokenizer, examples, training_template, max_seq_len, assistant_only=assistant_only)
    if not split.rows:
        raise DatasetInvalid(f"none of the {split.examples} training example(s) has an assistant token to train "
                             f"on within max_seq_len={max_seq_len} (replies with weight 0 are not trained); "
                             f"raise hyperparameters.max_seq_len or shorten the prompts",
                             rule="no_trainable_tokens", param="training_file")
    return split


def check_template_parity(tokenizer: Any, examples: list[dict[str, Any]], training_template: str,
                          sample: int = PARITY_SAMPLE) -> int:
    """Fail unless the training template tokenizes like the tokenizer's (stock) template; returns examples checked.

    The exported model carries the stock template: if the two rendered differently, the
    model would be trained on one format and served with another.
    """
    checked = 0
    for example in examples[:sample]:
        messages = example["messages"]
        stock = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        training = tokenizer.apply_chat_template(messages, chat_template=training_template, tokenize=True,
                                                 return_dict=True)["input_ids"]
        if list(stock) != list(training):
            raise TrainingFailed("the training chat template renders differently from the model's stock template "
                                 f"(example {checked + 1}: {len(training)} vs {len(stock)} tokens); the exported "
                                 "model would be served in a format it was not trained on")
        checked += 1
    return checked
