"""Ingest statistics: stage and issue counts, token histogram, roles, languages, and the PNG."""

from __future__ import annotations

import orjson

from afina.ingest.records import Example, RowIssue
from afina.ingest.stats import StatsCollector, detect_language
from afina.ingest.tokens import TokenResult


def chat(line: int, *turns: str, system: str | None = None) -> Example:
    messages = [{"role": "system", "content": system}] if system else []
    for index, content in enumerate(turns):
        messages.append({"role": "user" if index % 2 == 0 else "assistant", "content": content})
    return Example("suporte.jsonl", line, messages=messages)


def issue(line: int, rule: str, action: str) -> RowIssue:
    return RowIssue("suporte.jsonl", line, "messages", rule, action, "…")  # type: ignore[arg-type]


def test_counts_issues_splits_and_roles() -> None:
    stats = StatsCollector(max_seq_len=2048)
    stats.count("read", 5)
    stats.count("converted", 5)
    stats.add_issues([issue(1, "mojibake", "fixed"), issue(1, "crlf", "fixed")])
    stats.add_issues([issue(2, "duplicate_normalized", "dropped")])
    stats.add_issues([issue(3, "missing_content", "error")])
    stats.add_issues([])
    stats.add_example(chat(1, "Oi, meu pedido atrasou.", "Sinto muito! Qual o número?", system="Você é o suporte."),
                      "train")
    stats.add_example(chat(4, "Quero trocar o tamanho da camiseta.", "Claro, qual tamanho você quer?",
                           "M, por favor.", "Pronto, troca registrada."), "validation")
    stats.add_example(Example("livro.txt", 5, text="Era uma vez um modelo pequeno."), "train")
    result = stats.as_dict()
    assert result["stages"] == {"read": 5, "converted": 5}
    assert result["rows_with_fixes"] == 1
    assert result["issues"] == {"dropped": {"duplicate_normalized": 1}, "error": {"missing_content": 1},
                                "fixed": {"mojibake": 1, "crlf": 1}}
    assert result["duplicates"] == 1
    assert result["examples"] == 3 and result["splits"] == {"train": 2, "validation": 1}
    roles = result["roles"]
    assert roles["chat_examples"] == 2 and roles["text_examples"] == 1
    assert roles["messages"] == {"system": 1, "user": 3, "assistant": 3}
    assert roles["turns_per_example"] == {"2": 1, "4": 1}
    assert roles["system_prompt_share"] == 0.5
    assert orjson.loads(orjson.dumps(result)) == result  # JSON-ready


def test_token_histogram_and_percentiles() -> None:
    stats = StatsCollector(max_seq_len=512)
    lengths = [10, 20, 40, 100, 100, 300, 700]
    for line, length in enumerate(lengths, start=1):
        stats.add_example(chat(line, "pergunta", "resposta"), "train",
                          TokenResult(length, length // 2, length > 512, True))
    stats.add_example(chat(99, "pergunta", "resposta"), "train", TokenResult(None, None, False, True))
    tokens = stats.as_dict()["tokens"]
    assert tokens["count"] == 7 and tokens["uncounted"] == 1 and tokens["truncated"] == 1
    assert (tokens["min"], tokens["max"], tokens["total"]) == (10, 700, sum(lengths))
    assert tokens["p50"] == 100 and tokens["p99"] == 700
    assert tokens["trained"]["max"] == 350
    histogram = {bucket["label"]: bucket["count"] for bucket in tokens["histogram"]}
    assert histogram == {"0-15": 1, "16-31": 1, "32-63": 1, "64-127": 2, "128-255": 0, "256-511": 1,
                         "512-1023": 1}
    png = stats.histogram_png()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5_000


def test_empty_stats_are_valid() -> None:
    result = StatsCollector().as_dict()
    assert result["tokens"]["count"] == 0 and result["tokens"]["histogram"] == []
    assert StatsCollector().histogram_png().startswith(b"\x89PNG")


def test_languages_are_detected_offline() -> None:
    assert detect_language("Olá, tudo bem? Você pode me explicar como funciona o ajuste fino?") == "pt"
    assert detect_language("Hello, how are you doing today? I need help with my order.") == "en"
    assert detect_language("¿Hola, cómo estás? Necesito ayuda con mi cuenta bancaria.") == "es"
    assert detect_language("oi") == "und"
    assert detect_language("DESCREVA O PRODUTO. TÍTULO: CAMISETA BÁSICA DE ALGODÃO ORGÂNICO") == "pt"


def test_languages_are_sampled_after_the_head() -> None:
    stats = StatsCollector(language_sample_every=100)
    for line in range(1, 1_201):
        stats.add_example(chat(line, "Qual é o horário de funcionamento da loja?",
                               "Funcionamos de segunda a sexta, das nove às dezoito horas."), "train")
    languages = stats.as_dict()["languages"]
    assert languages["sampled"] == 1_000 + 2  # the first 1,000, then rows 1,100 and 1,200
    assert languages["counts"] == {"pt": 1_002} and languages["shares"] == {"pt": 1.0}
