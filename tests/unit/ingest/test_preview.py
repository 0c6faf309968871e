"""The preview shows the training text with exactly the trained tokens marked."""

from __future__ import annotations

import re

import pytest

from afina.core.catalog import CHATML, resolve_base_model
from afina.ingest.preview import render_preview, render_preview_html
from afina.ingest.records import Example
from afina.ingest.tokens import IngestTokenizer, LengthChecker, load_tokenizer
from tests.support.models import SMOLLM2, materialized_base_model, shared_model_cache


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> IngestTokenizer:
    materialized_base_model(tmp_path_factory)
    return load_tokenizer(resolve_base_model(SMOLLM2), shared_model_cache(tmp_path_factory))


EXAMPLES = [
    Example("aeon.jsonl", 3, messages=[{"role": "user", "content": "oi aeon, tudo bem?"},
                                       {"role": "assistant", "content": "E aí! Tudo joia. «Beleza»?"}]),
    Example("aeon.jsonl", 8, messages=[
        {"role": "system", "content": "Você é AEON."},
        {"role": "user", "content": "qual a capital da França?"},
        {"role": "assistant", "content": "Paris.", "weight": 0},
        {"role": "user", "content": "e da Itália?"},
        {"role": "assistant", "content": "Roma, a cidade eterna, com mais de dois mil anos de história."}]),
    Example("livro.txt", 1, text="Capítulo 1 <b>negrito</b>"),
]


def trained_spans(preview: str) -> list[str]:
    # «» doubled inside the data are literal; single ones delimit trained text
    return [span.replace("««", "«").replace("»»", "»")
            for span in re.findall(r"(?<!«)«((?:[^«»]|««|»»)*)»(?!»)", preview)]


def test_text_preview_marks_the_trained_replies(tokenizer: IngestTokenizer) -> None:
    preview = render_preview(EXAMPLES, tokenizer, CHATML, n=5)
    results = LengthChecker(tokenizer, CHATML, 4096).check_batch(EXAMPLES)
    headers = re.findall(r"── example (\d) · (.*) ──", preview)
    assert [number for number, _ in headers] == ["1", "2", "3"]
    for (_, header), example, result in zip(headers, EXAMPLES, results, strict=True):
        assert f"{example.source} line {example.line} · {result.tokens} tokens, {result.trained_tokens} trained" \
            == header
    assert trained_spans(preview) == ["E aí! Tudo joia. «Beleza»?<|im_end|>",
                                      "Roma, a cidade eterna, com mais de dois mil anos de história.<|im_end|>",
                                      "Capítulo 1 <b>negrito</b><|im_end|>"]
    assert "<|im_start|>assistant\nParis.<|im_end|>" in preview  # weight 0: shown, not marked
    assert "<|im_start|>system\nYou are a helpful AI assistant named SmolLM" in preview  # the template's default


def test_preview_shows_where_max_seq_len_cuts(tokenizer: IngestTokenizer) -> None:
    preview = render_preview(EXAMPLES[1:2], tokenizer, CHATML, n=1, max_seq_len=62)
    assert "cut at max_seq_len 62" in preview
    before, after = preview.split("✂")
    assert trained_spans(before) and trained_spans(before)[0].startswith("Roma")
    assert "história.<|im_end|>" in after and "«" not in after


def test_html_preview_escapes_and_marks(tokenizer: IngestTokenizer) -> None:
    html = render_preview_html(EXAMPLES, tokenizer, CHATML, n=2)
    assert html.count('<section class="example">') == 2
    assert '<mark class="trained">E aí! Tudo joia. «Beleza»?&lt;|im_end|&gt;</mark>' in html
    assert "<b>" not in html.split("</style>")[1]


def test_n_limits_and_empty_input(tokenizer: IngestTokenizer) -> None:
    assert render_preview(EXAMPLES, tokenizer, CHATML, n=1).count("── example") == 1
    assert render_preview([], tokenizer, CHATML, n=5) == ""
