"""Packing: many short examples share one ``max_seq_len`` row, so a step trains on tokens, not on padding.

Chat datasets are mostly short conversations; padded to the longest in each batch, a
large share of every step is spent on pad tokens (measured in bench/RESULTS.md). With
``packing: true`` the encoded examples are put into bins of at most ``max_seq_len``
tokens by best-fit decreasing (deterministic, so a resumed run sees the same bins), and
every micro-batch is handed to the model padding-free: one row holding the bins' examples
back to back, with ``position_ids`` restarting at 0 for each example and no attention
mask. transformers builds a block-diagonal causal mask from such position ids and Unsloth
reads the same ids as packed sequence lengths, so no example ever attends to another.
The first label of each example is ignored: nothing before it belongs to the same example.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

from afina.core.errors import TrainingFailed

IGNORE_INDEX = -100


@dataclass(frozen=True)
class PackingSummary:
    examples: int
    rows: int
    tokens: int
    capacity: int

    @property
    def fill(self) -> float:
        """Share of the packed rows' capacity holding real tokens."""
        return self.tokens / self.capacity if self.capacity else 0.0


def pack_rows(rows: list[dict[str, list[int]]], max_seq_len: int) -> tuple[list[dict[str, list[int]]], PackingSummary]:
    """Bins of examples (best-fit decreasing by length; ties keep dataset order), each bin one row.

    A packed row carries ``input_ids``, ``labels``, ``position_ids`` (restarting per example) and
    ``seq_lengths``. Rows longer than ``max_seq_len`` are a caller bug (encoding already truncates).
    """
    order = sorted(range(len(rows)), key=lambda index: (-len(rows[index]["input_ids"]), index))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, bin index), kept sorted for the best-fit search
    for index in order:
        length = len(rows[index]["input_ids"])
        if length > max_seq_len:
            raise TrainingFailed(f"an encoded example has {length} tokens, more than max_seq_len={max_seq_len}")
        slot = bisect.bisect_left(free, (length, -1))
        if slot < len(free):
            space, bin_index = free.pop(slot)
            bins[bin_index].append(index)
            bisect.insort(free, (space - length, bin_index))
        else:
            bins.append([index])
            bisect.insort(free, (max_seq_len - length, len(bins) - 1))
    packed = [_concatenate([rows[index] for index in sorted(members)]) for members in bins]
    tokens = sum(len(row["input_ids"]) for row in rows)
    return packed, PackingSummary(examples=len(rows), rows=len(packed), tokens=tokens,
                                  capacity=len(packed) * max_seq_len)


def _concatenate(members: list[dict[str, list[int]]]) -> dict[str, list[int]]:
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    seq_lengths: list[int] = []
    for row in members:
        length = len(row["input_ids"])
        input_ids.extend(row["input_ids"])
        labels.extend(row["labels"])
        position_ids.extend(range(length))
        seq_lengths.append(length)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "seq_lengths": seq_lengths}


class PaddingFreeCollator:
    """A micro-batch as one row: examples back to back, ``position_ids`` restarting at each, no padding.

    Takes packed rows (with ``position_ids``) or plain encoded rows (positions are made here), so
    the same collator serves ``packing: true`` and plain padding-free batching. Refuses a batch with no
    trainable token: its loss would be 0/0 (the "all labels are -100" failure).
    """

    def __init__(self, *, with_seq_lengths: bool = False) -> None:
        # Unsloth also accepts the lengths directly; transformers models would reject the extra key
        self.with_seq_lengths = with_seq_lengths

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        input_ids: list[int] = []
        labels: list[int] = []
        position_ids: list[int] = []
        seq_lengths: list[int] = []
        for feature in features:
            ids = list(feature["input_ids"])
            row_labels = list(feature["labels"])
            positions = list(feature.get("position_ids") or range(len(ids)))
            lengths = list(feature.get("seq_lengths") or [len(ids)])
            start = 0
            for length in lengths:
                row_labels[start] = IGNORE_INDEX  # predicted from the previous example's last token
                start += length
            input_ids.extend(ids)
            labels.extend(row_labels)
            position_ids.extend(positions)
            seq_lengths.extend(lengths)
        if all(label == IGNORE_INDEX for label in labels):
            raise TrainingFailed("a training batch has no trainable token (every label is masked); the dataset "
                                 "has examples whose assistant replies are empty, weight 0 or truncated away")
        batch = {"input_ids": torch.tensor([input_ids], dtype=torch.long),
                 "labels": torch.tensor([labels], dtype=torch.long),
                 "position_ids": torch.tensor([position_ids], dtype=torch.long)}
        if self.with_seq_lengths:
            batch["packed_seq_lengths"] = torch.tensor(seq_lengths, dtype=torch.int32)
        return batch
