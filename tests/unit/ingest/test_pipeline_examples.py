"""The per-example batch work of the pipeline: the same results in worker processes, the same dedup keys."""

from __future__ import annotations

import random
import string

import pytest

from afina.ingest.dedup import Deduplicator, normalized_key
from afina.ingest.examples import Prepared, _normalized_text, dedup_stand_in, fast_normalized_key
from afina.ingest.records import Example

TEXTS = ["Olá,  Mundo!", "HELLO___world", "  trailing\tand\nleading  ", "a_b-c.d", "", "!!!", "42 é a resposta",
         "Ação rápida: já!", "x\x00y\x1fz", "tabs\t\tand\r\nCRLF", "VOCÃŠ: oi", "emoji 🎉 party", "ﬁnal ligature"]


def random_text(rng: random.Random) -> str:
    """ASCII, all of Latin-1 (ª ² ¼ µ ß ÿ ...), and a few characters outside it."""
    alphabet = string.printable + "\x00\x01\x1c\x7f_" + "".join(map(chr, range(0x80, 0x100))) + "ĀŒ–“”…€🎉İﬁ"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))


@pytest.mark.parametrize("seed", range(5))
def test_the_latin1_fast_path_gives_dedups_own_key_byte_for_byte(seed: int) -> None:
    from afina.ingest.dedup import normalize_text

    rng = random.Random(seed)
    texts = TEXTS + [random_text(rng) for _ in range(500)]
    for text in texts:
        assert _normalized_text(text) == normalize_text(text), repr(text)
    for index in range(50):
        messages = [{"role": rng.choice(["user", "assistant", "system", None]),
                     "content": rng.choice(texts + [None, 7])} for _ in range(rng.randint(1, 4))]
        messages.append("not a message")  # skipped by both
        example = Example("f.jsonl", index, messages=messages)
        assert fast_normalized_key(example) == normalized_key(example)
        text_example = Example("f.txt", index, text=rng.choice(texts))
        assert fast_normalized_key(text_example) == normalized_key(text_example)


def test_the_stand_in_gets_the_verdict_and_issue_the_example_would() -> None:
    def prepared(line: int, content: str) -> Prepared:
        example = Example("aeon.jsonl", line, messages=[{"role": "user", "content": content},
                                                        {"role": "assistant", "content": "ok"}])
        import hashlib

        return Prepared(example, duplicate_key=hashlib.sha256(fast_normalized_key(example)).hexdigest()[:32])

    direct, via_stand_in = Deduplicator("normalized"), Deduplicator("normalized")
    rows = [prepared(1, "Olá, tudo bem?"), prepared(2, "olá tudo bem"), prepared(3, "outra coisa"),
            prepared(4, "OLÁ!!! Tudo bem")]
    for row in rows:
        expected = direct.check(row.example)
        got = via_stand_in.check(dedup_stand_in(row))
        assert got == expected
    assert via_stand_in.duplicates == 2
