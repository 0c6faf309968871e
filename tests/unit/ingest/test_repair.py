"""Text repairs: each changes only what is broken and is reported once per field and rule."""

from __future__ import annotations

import pytest

from afina.ingest.records import Example
from afina.ingest.repair import repair_example, repair_text


def rules(text: str) -> list[str]:
    return [rule for rule, _ in repair_text(text)[1]]


@pytest.mark.parametrize(("broken", "fixed"), [
    ("VOCÃŠ: oi aeon tudo bem", "VOCÊ: oi aeon tudo bem"),
    ("nÃ£o sei se Ã© possÃ­vel", "não sei se é possível"),
    ("Recomenda√ß√£o: Voc√™ √© o Tech Lead", "Recomendação: Você é o Tech Lead"),  # MacRoman
    ("it‚Äôs done", "it’s done"),
    ("ðŸš€ Enviando para o Hugging Face", "🚀 Enviando para o Hugging Face"),
    ("Temperatura: 30Â°C", "Temperatura: 30°C"),
    # "í" whose invisible soft hyphen was lost on the way (the seeds show both)
    ("dados especÃficos do seu domÃnio", "dados específicos do seu domínio"),
    ("E aÃ! Tudo joia aqui.", "E aí! Tudo joia aqui."),
    ("Coração e nÃ£o", "Coração e não"),  # correct and broken text in one string: ftfy's job
    ("nÃƒÂ£o", "não"),  # decoded wrongly twice
])
def test_mojibake_is_repaired(broken: str, fixed: str) -> None:
    text, repairs = repair_text(broken)
    assert text == fixed
    assert [rule for rule, _ in repairs] == ["mojibake"]


@pytest.mark.parametrize("correct", [
    "Não sei, você é ótimo! Coração, ação, pão, avó, açúcar, À noite.",
    "SÃO PAULO É A MAIOR CIDADE; A IRMÃ DELA MORA LÁ",
    "IRMÃ",
    "√2 ≈ 1,41 e 50% de 30°C",
    "Preço: R$ 10,00 — “aspas curvas” e ﬁ ligadura e ＡＢＣ largos",
    "Ação: 'olá'\n\tindentado\nfim",
    "😀 emoji e 日本語",
])
def test_correct_text_is_left_alone(correct: str) -> None:
    assert repair_text(correct) == (correct, [])


def test_line_endings_controls_bom_nfc_and_whitespace() -> None:
    assert repair_text("linha 1\r\nlinha 2\rlinha 3") == ("linha 1\nlinha 2\nlinha 3", [
        ("crlf", "converted CRLF/CR line endings to LF")])
    text, repairs = repair_text("a\x00b\x07c\x0cpágina 2\x85fim\x9b")
    assert text == "abc\npágina 2\nfim"
    assert [rule for rule, _ in repairs] == ["control_characters"]
    assert "U+0000" in repairs[0][1]
    assert repair_text("oi\ud800 mundo")[0] == "oi mundo"  # a lone surrogate cannot be written as UTF-8
    assert repair_text("\ufeffolá\ufeff mundo") == ("olá mundo", [("bom", "removed 2 byte order mark(s) (U+FEFF)")])
    decomposed = "voce\u0302 e\u0301"  # ê and é as letter + combining accent
    assert repair_text(decomposed)[0] == "você é"
    assert rules(decomposed) == ["unicode_normalization"]
    assert repair_text("  \n Olá, tudo bem?\n\n ") == ("Olá, tudo bem?",
                                                     [("whitespace", "removed surrounding whitespace")])
    assert repair_text("  plain ascii \r\n") == ("plain ascii", [("crlf", "converted CRLF/CR line endings to LF"),
                                                                  ("whitespace", "removed surrounding whitespace")])


def test_a_replacement_character_is_noted_not_removed() -> None:
    text, repairs = repair_text("informa\ufffd\ufffdo perdida")
    assert text == "informa\ufffd\ufffdo perdida"
    assert [rule for rule, _ in repairs] == ["replacement_character"]
    assert "2 U+FFFD" in repairs[0][1]


def test_repairs_are_reported_once_per_field_and_rule() -> None:
    example = Example("aeon.jsonl", 12, messages=[
        {"role": "system", "content": "Você é AEON."},
        {"role": "user", "content": "VOCÃŠ: nÃ£o entendi\r\nexplica de novo\r\n"},
        {"role": "assistant", "content": "Claro! Ã‰ assim:\r\npasso 1"},
    ])
    assert repair_example(example) is example
    assert example.messages is not None
    assert example.messages[1]["content"] == "VOCÊ: não entendi\nexplica de novo"
    assert example.messages[2]["content"] == "Claro! É assim:\npasso 1"
    found = [(issue.field, issue.rule, issue.action, issue.line, issue.source) for issue in example.issues]
    assert found == [
        ("messages[1].content", "mojibake", "fixed", 12, "aeon.jsonl"),
        ("messages[1].content", "crlf", "fixed", 12, "aeon.jsonl"),
        ("messages[1].content", "whitespace", "fixed", 12, "aeon.jsonl"),
        ("messages[2].content", "mojibake", "fixed", 12, "aeon.jsonl"),
        ("messages[2].content", "crlf", "fixed", 12, "aeon.jsonl"),
    ]


def test_text_examples_and_odd_values() -> None:
    example = repair_example(Example("livro.txt", 1, text="\ufeffCapÃ­tulo 1\r\n"))
    assert example.text == "Capítulo 1"
    assert [(i.field, i.rule) for i in example.issues] == [("text", "bom"), ("text", "mojibake"), ("text", "crlf"),
                                                           ("text", "whitespace")]
    odd = Example("x.jsonl", 2, messages=[{"role": "user", "content": ["parte"]}, "não é um objeto"])  # type: ignore[list-item]
    assert repair_example(odd).issues == []  # left to validation, which names the problem


def test_a_clean_row_is_untouched() -> None:
    messages = [{"role": "user", "content": "Qual o horário da loja?"},
                {"role": "assistant", "content": "Abrimos às 9h e fechamos às 18h."}]
    example = repair_example(Example("loja.jsonl", 3, messages=[dict(m) for m in messages]))
    assert example.messages == messages and example.issues == []
