"""Chat-log transcripts with speaker prefixes (seed 003's conversation.log, mojibake'd prefixes included)."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

from afina.core.datasets.options import IngestOptions, TranscriptOptions
from afina.ingest.formats import to_examples
from afina.ingest.records import Example, RowIssue
from afina.ingest.sources import open_rows

DATA = Path(__file__).parents[2] / "data" / "ingest"
LOG = DATA / "conversation.log"
NOISE = [r"^\[sistema\]", r"^=== "]


def convert(path: Path, name: str | None = None, **options: Any) -> list[Example | RowIssue]:
    ingest = IngestOptions(**options)
    return list(to_examples(open_rows(path, name or path.name, ingest), ingest))


def examples(items: list[Example | RowIssue]) -> list[Example]:
    return [item for item in items if isinstance(item, Example)]


def issues(items: list[Example | RowIssue]) -> list[tuple[int, str, str]]:
    return [(item.line, item.rule, item.action) for item in items if isinstance(item, RowIssue)]


def test_seed_003_log_is_detected_and_split_into_conversations() -> None:
    items = convert(LOG, transcript=TranscriptOptions(ignore_patterns=NOISE, max_turns_per_example=0))
    first, second = examples(items)
    assert first.line == 2 and second.line == 16
    assert first.messages == [
        {"role": "user", "content": "oi aeon tudo bem"},
        {"role": "assistant", "content": "E aí! Tudo joia aqui. E você, beleza?"},
        {"role": "user", "content": "coloca um timer em 5 minutos"},
        {"role": "assistant", "content": "Timer de 5 minutos definido!"},
        {"role": "user", "content": "me conta uma piada"},
        {"role": "assistant",
         "content": "Por que a programadora foi ao psicólogo?\nPorque tinha problemas de dependência!"},
        {"role": "user", "content": "esquece, qual a capital da Austrália?"},
        {"role": "assistant", "content": "A capital da Austrália é Camberra, não Sydney."},
    ]
    # "VOCÃŠ:" (the prefix in mojibake, as the seed shows it) still opens a user turn
    assert second.messages == [{"role": "user", "content": "quanto é 7 vezes 8?"},
                               {"role": "assistant", "content": "7 vezes 8 dá 56."}]
    assert [(issue.rule, issue.action) for issue in second.issues] == [("mojibake_speaker_prefix", "fixed")]
    assert issues(items) == [(1, "transcript_noise", "warning"), (10, "unanswered_turn", "dropped"),
                             (18, "unanswered_turn", "dropped")]


def test_auto_detection_without_options_keeps_unmatched_lines_in_the_turn() -> None:
    items = convert(LOG)
    second = examples(items)[1]
    assert second.messages[1] == {"role": "assistant",
                                  "content": "Timer de 5 minutos definido!\n[sistema] timer criado id=42"}


def test_by_default_each_answered_question_is_one_example() -> None:
    """As seed 003's own converter does it: every user turn with its answer is one example."""
    items = convert(LOG, transcript=TranscriptOptions(ignore_patterns=NOISE))
    found = examples(items)
    assert [example.line for example in found] == [2, 4, 7, 11, 16]
    assert all(len(example.messages) == 2 for example in found)


def test_custom_speakers_system_turns_and_merged_answers(tmp_path: Path) -> None:
    path = tmp_path / "atendimento.txt"
    path.write_text("Sistema: Você é o atendente da Padaria Pão Nosso.\n"
                    "Atendente: Bom dia! Em que posso ajudar?\n"
                    "Cliente: Vocês abrem domingo?\n"
                    "Atendente: Abrimos sim, das 7h às 12h.\n"
                    "Atendente: E temos pão de queijo fresquinho!\n"
                    "Cliente: Ótimo, obrigado.\n", encoding="utf-8")
    speakers = {"Cliente:": "user", "Atendente:": "assistant", "Sistema:": "system"}
    items = convert(path, format="transcript", transcript=TranscriptOptions(speakers=speakers))
    [example] = examples(items)
    assert example.messages == [
        {"role": "system", "content": "Você é o atendente da Padaria Pão Nosso."},
        {"role": "user", "content": "Vocês abrem domingo?"},
        {"role": "assistant", "content": "Abrimos sim, das 7h às 12h.\n\nE temos pão de queijo fresquinho!"},
    ]
    assert issues(items) == [(2, "unprompted_turn", "dropped"), (5, "merged_assistant_turns", "fixed"),
                             (6, "unanswered_turn", "dropped")]


def test_a_log_without_any_speaker_prefix_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "diario.txt"
    path.write_text("Hoje choveu o dia todo.\nAmanhã tem feira.\n", encoding="utf-8")
    items = convert(path, format="transcript")
    assert examples(items) == []
    assert ("transcript_no_turns", "error") in [(item.rule, item.action) for item in items]
    assert "'VOCÊ:'" in items[-1].detail


def test_each_log_in_a_zip_is_parsed_on_its_own(tmp_path: Path) -> None:
    path = tmp_path / "logs.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("janeiro/conversation.log", "VOCÊ: que dia é hoje?\nAEON: Hoje é segunda-feira.\n")
        archive.writestr("fevereiro/conversation.log", "VOCÊ: toca uma música\nAEON: Tocando samba.\n")
    found = examples(convert(path))
    assert [(example.source, example.line) for example in found] == [
        ("logs.zip:janeiro/conversation.log", 1), ("logs.zip:fevereiro/conversation.log", 1)]


def test_twice_mojibaked_prefixes_are_recognized_through_ftfy(tmp_path: Path) -> None:
    twice = "VOCÊ:".encode().decode("cp1252").encode().decode("cp1252")  # 'VOCÃƒÅ\xa0:'
    path = tmp_path / "log_antigo.txt"
    path.write_text(f"{twice} qual a senha do wi-fi?\nAEON: Está colada na geladeira.\n", encoding="utf-8")
    [example] = examples(convert(path))
    assert example.messages[0] == {"role": "user", "content": "qual a senha do wi-fi?"}
    assert [issue.rule for issue in example.issues] == ["mojibake_speaker_prefix"]
