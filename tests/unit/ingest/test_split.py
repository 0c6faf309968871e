"""Deterministic split: named proportions, the record's own split, stability when rows are appended."""

from __future__ import annotations

from collections import Counter

import pytest

from afina.core.datasets.options import SplitOptions
from afina.ingest.records import Example
from afina.ingest.split import BUCKETS, Splitter, bucket_of, record_digest


def examples(count: int, start: int = 0) -> list[Example]:
    return [Example("vendas.jsonl", i + 1, messages=[{"role": "user", "content": f"Pedido {i}: qual o status?"},
                                                     {"role": "assistant", "content": f"O pedido {i} foi enviado."}])
            for i in range(start, start + count)]


def test_portuguese_proportions_split_as_asked() -> None:
    splitter = Splitter(SplitOptions(proportions=[{"treino": 0.7}, {"validacao": 0.1}, {"teste": 0.2}]))
    counts = Counter(splitter.assign(example) for example in examples(5000))
    assert set(counts) == {"train", "validation", "test"}
    assert abs(counts["train"] / 5000 - 0.7) < 0.03
    assert abs(counts["validation"] / 5000 - 0.1) < 0.02
    assert abs(counts["test"] / 5000 - 0.2) < 0.03


def test_appending_rows_never_moves_an_old_row() -> None:
    splitter = Splitter(SplitOptions(proportions={"train": 0.8, "validation": 0.1, "test": 0.1}))
    first_upload = examples(1000)
    before = [splitter.assign(example) for example in first_upload]
    reupload = examples(1000) + examples(500, start=1000)  # same rows, more appended
    after = [Splitter(SplitOptions(proportions={"train": 0.8, "validation": 0.1, "test": 0.1})).assign(example)
             for example in reupload]
    assert after[:1000] == before


def test_the_records_own_split_wins_with_portuguese_names() -> None:
    splitter = Splitter(SplitOptions())
    own = examples(3)
    for example, name, expected in zip(own, ["teste", " Validação", "treino"], ["test", "validation", "train"],
                                       strict=True):
        example.split = name
        assert splitter.assign(example) == expected
    own[0].split = "treinamento"
    with pytest.raises(ValueError, match="treinamento"):
        splitter.assign(own[0])


def test_without_test_share_validation_is_the_low_buckets() -> None:
    # the cut is validation first: a 90/10 split keeps each row where the earlier two-way split put it
    splitter = Splitter(SplitOptions(proportions={"train": 0.9, "validation": 0.1}))
    for example in examples(300):
        digest = record_digest(example.record())
        assert (splitter.assign(example) == "validation") == (bucket_of(digest) < 0.1 * BUCKETS)


def test_minimum_sizes() -> None:
    splitter = Splitter(SplitOptions(min_examples={"treino": 10, "validacao": 2}))
    assert splitter.check_minimums({"train": 10, "validation": 2}) == []
    problems = splitter.check_minimums({"train": 4})
    assert len(problems) == 2
    assert "train split has 4" in problems[0] and "at least 10" in problems[0]
    assert "validation split has 0" in problems[1]
