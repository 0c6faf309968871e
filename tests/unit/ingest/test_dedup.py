"""Duplicate removal: exact and normalized, naming the row repeated, in bounded memory."""

from __future__ import annotations

from typing import Any

from afina.ingest.dedup import Deduplicator, DigestTable, normalize_text
from afina.ingest.records import Example


def chat(line: int, question: str, answer: str, source: str = "faq.jsonl", **reply: Any) -> Example:
    return Example(source, line, messages=[{"role": "user", "content": question},
                                           {"role": "assistant", "content": answer, **reply}])


def test_exact_mode_drops_byte_identical_records_and_names_the_first() -> None:
    dedup = Deduplicator("exact")
    assert dedup.check(chat(1, "Qual o prazo de entrega?", "5 dias úteis.")) is None
    assert dedup.check(chat(2, "Qual o prazo de entrega ?", "5 dias úteis.")) is None  # differs by a space
    issue = dedup.check(chat(9, "Qual o prazo de entrega?", "5 dias úteis."))
    assert issue is not None
    assert (issue.source, issue.line, issue.field, issue.rule, issue.action) == \
        ("faq.jsonl", 9, "messages", "duplicate_exact", "dropped")
    assert "line 1" in issue.detail
    assert dedup.check(chat(10, "Qual o prazo de entrega?", "5 dias úteis.", weight=0)) is None  # weight differs
    assert dedup.duplicates == 1


def test_normalized_mode_ignores_case_punctuation_whitespace_and_weights() -> None:
    dedup = Deduplicator("normalized")
    assert dedup.check(chat(1, "Olá, qual o prazo de entrega?", "São 5 dias úteis.")) is None
    issue = dedup.check(chat(2, "  olá qual o PRAZO de entrega ", "são 5 dias úteis", weight=0))
    assert issue is not None and issue.rule == "duplicate_normalized" and "line 1" in issue.detail
    # accents are meaning, not formatting: "pão" and "pao" differ; so do roles
    assert dedup.check(chat(3, "Olá, qual o prazo de entrega?", "Sao 5 dias uteis.")) is None
    swapped = Example("faq.jsonl", 4, messages=[{"role": "assistant", "content": "Olá, qual o prazo de entrega?"},
                                                {"role": "user", "content": "São 5 dias úteis."}])
    assert dedup.check(swapped) is None


def test_duplicates_across_files_name_the_file() -> None:
    dedup = Deduplicator("exact")
    dedup.check(chat(4, "Oi", "Olá!", source="pares.zip:inputs/a.txt"))
    issue = dedup.check(chat(1, "Oi", "Olá!", source="pares.zip:inputs/b.txt"))
    assert issue is not None and "pares.zip:inputs/a.txt, line 4" in issue.detail


def test_text_examples_and_mode_none() -> None:
    dedup = Deduplicator("normalized")
    assert dedup.check(Example("livro.txt", 1, text="Era uma vez.")) is None
    issue = dedup.check(Example("livro.txt", 2, text="era uma vez"))
    assert issue is not None and issue.field == "text"
    keep_all = Deduplicator("none")
    assert keep_all.check(chat(1, "a", "b")) is None and keep_all.check(chat(2, "a", "b")) is None


def test_normalize_text() -> None:
    assert normalize_text("Olá,   Mundo!\n\nTudo_bem?") == "olá mundo tudo bem"


def test_the_table_grows_keeps_every_first_occurrence_and_stays_small() -> None:
    dedup = Deduplicator("exact")
    rows = 20_000
    for line in range(1, rows + 1):
        assert dedup.check(chat(line, f"Pergunta número {line}", "Resposta.")) is None
    for line in (1, 777, rows):
        issue = dedup.check(chat(rows + line, f"Pergunta número {line}", "Resposta."))
        assert issue is not None and issue.detail.endswith(f"line {line}; dropped")
    # 14 bytes a slot at <= 50% load: ~56 bytes a row at worst, 32 MB at 1M rows after the last doubling
    assert dedup.memory_bytes() <= 56 * rows


def test_digest_table_handles_zero_and_collisions_in_probing() -> None:
    table = DigestTable()
    assert table.add(0, 0, 1) is None
    assert table.add(0, 0, 2) == (0, 1)
    # same low bits: linear probing must keep both
    assert table.add(5, 0, 3) is None and table.add(5 + (1 << 40), 0, 4) is None
    assert table.add(5 + (1 << 40), 0, 5) == (0, 4) and len(table) == 3
