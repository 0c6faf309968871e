"""Every family's training template renders exactly like its stock template, and its ``{% generation %}``
spans hold exactly each assistant reply and the end-of-turn token (what the model learns to write).

Rendered with transformers' own Jinja renderer, the one ``apply_chat_template`` and TRL use."""

from __future__ import annotations

from typing import Any

import pytest
from jinja2.exceptions import TemplateError
from transformers.utils.chat_template_utils import render_jinja_template

from afina.core.catalog import FAMILIES, ChatFamily

SYSTEM = {"role": "system", "content": "Você é o assistente da Padaria Pão Quente. Responda em português."}
CONVERSATIONS: dict[str, list[dict[str, Any]]] = {
    "single": [
        {"role": "user", "content": "Qual é o horário de funcionamento?"},
        {"role": "assistant", "content": "Abrimos todos os dias, das 6h às 20h."},
    ],
    "with_system": [
        SYSTEM,
        {"role": "user", "content": "Vocês têm pão sem glúten?"},
        {"role": "assistant", "content": "Sim! Às terças e sextas assamos pão sem glúten."},
    ],
    "multi_turn": [
        {"role": "user", "content": "Quanto custa o pão francês?"},
        {"role": "assistant", "content": "R$ 0,90 a unidade."},
        {"role": "user", "content": "E a dúzia?"},
        {"role": "assistant", "content": "A dúzia sai por R$ 9,90 — uma economia de R$ 0,90."},
    ],
    "multi_turn_with_system": [
        SYSTEM,
        {"role": "user", "content": "Vocês entregam?"},
        {"role": "assistant", "content": "Entregamos num raio de 3 km, das 7h às 11h."},
        {"role": "user", "content": "Aceitam Pix?"},
        {"role": "assistant", "content": "Aceitamos Pix, cartão e dinheiro."},
    ],
    "multiline_and_whitespace": [
        {"role": "user", "content": "  Liste os sabores de bolo, por favor.  "},
        {"role": "assistant", "content": "Temos:\n- cenoura com chocolate\n- fubá\n- laranja\n\nQual você prefere?  "},
    ],
    "reasoning": [
        {"role": "user", "content": "Se um bolo custa R$ 25 e levo 3, quanto pago?"},
        {"role": "assistant", "content": "<think>\n3 × 25 = 75\n</think>\n\nVocê paga R$ 75,00."},
    ],
}
DATE = {"date_string": "26 Jul 2024"}  # Llama 3.2 writes today's date otherwise


def render(family: ChatFamily, template: str, messages: list[dict[str, Any]], **options: Any) -> tuple[str, list]:
    rendered, indices = render_jinja_template(
        [messages], chat_template=template, return_assistant_tokens_mask=True, bos_token=family.bos_token,
        eos_token=family.eos_token, **DATE, **options)
    return rendered[0], indices[0]


def _cases() -> list[Any]:
    return [pytest.param(family, name, id=f"{family.name}-{name}") for family in FAMILIES.values()
            for name in CONVERSATIONS]


@pytest.mark.parametrize(("family", "name"), _cases())
def test_training_template_renders_like_the_stock_one_and_marks_each_reply(family: ChatFamily, name: str) -> None:
    messages = CONVERSATIONS[name]
    if messages[0]["role"] == "system" and not family.supports_system_role:
        for template in (family.stock_template, family.training_template):
            with pytest.raises(TemplateError, match="System role not supported"):
                render(family, template, messages)
        return
    stock, _ = render(family, family.stock_template, messages)
    training, spans = render(family, family.training_template, messages)
    assert training == stock

    replies = [message["content"] for message in messages if message["role"] == "assistant"]
    assert len(spans) == len(replies)
    for (start, end), reply in zip(spans, replies, strict=True):
        marked = training[start:end]
        assert marked.endswith(family.eos_token), marked
        said = marked.removesuffix(family.eos_token)
        # templates may trim a reply, and reasoning ones keep (or drop) the think block before it; the span never
        # starts with more blank than the reply itself has (no template text leaks into it)
        shown = reply.split("</think>")[-1]
        assert len(said) - len(said.lstrip()) <= len(shown) - len(shown.lstrip()), "the span starts before the reply"
        answer = shown.strip()
        assert said.strip().endswith(answer), (said, answer)
        assert family.response_part.strip() not in said and family.instruction_part.strip() not in said
    # nothing outside the spans is an assistant reply
    bounds = [0, *(index for span in spans for index in span), len(training)]
    outside = "".join(training[bounds[i]:bounds[i + 1]] for i in range(0, len(bounds), 2))
    for reply in replies:
        assert reply.split("</think>")[-1].strip() not in outside


@pytest.mark.parametrize("family", FAMILIES.values(), ids=lambda family: family.name)
def test_generation_prompt_is_the_same_and_ends_where_a_reply_starts(family: ChatFamily) -> None:
    messages = CONVERSATIONS["multi_turn"][:3]
    stock, _ = render(family, family.stock_template, messages, add_generation_prompt=True)
    training, spans = render(family, family.training_template, messages, add_generation_prompt=True)
    assert training == stock
    assert len(spans) == 1  # the one assistant turn in the history; the prompt itself is not trained
    assert stock.rstrip().endswith(family.response_part.strip()) or "<think>" in stock[-12:]


@pytest.mark.parametrize("family", FAMILIES.values(), ids=lambda family: family.name)
def test_markers_and_special_tokens_appear_where_the_template_puts_them(family: ChatFamily) -> None:
    text, _ = render(family, family.stock_template, CONVERSATIONS["multi_turn"])
    assert text.count(family.eos_token) >= 2  # at least one per assistant reply
    assert family.instruction_part.strip() in text and family.response_part.strip() in text
    assert family.pad_token not in text and family.pad_token != family.eos_token
    assert family.eos_token in family.stop


def test_qwen3_trains_on_the_think_block_of_the_last_reply_only() -> None:
    family = FAMILIES["qwen3"]
    messages = [*CONVERSATIONS["reasoning"], {"role": "user", "content": "E se forem 4?"},
                {"role": "assistant", "content": "<think>\n4 × 25 = 100\n</think>\n\nR$ 100,00."}]
    text, spans = render(family, family.training_template, messages)
    first, last = (text[start:end] for start, end in spans)
    assert "<think>" not in first and first == "Você paga R$ 75,00.<|im_end|>"
    assert last == "<think>\n4 × 25 = 100\n</think>\n\nR$ 100,00.<|im_end|>"


def test_llama_3_2_header_carries_the_date_given() -> None:
    family = FAMILIES["llama3.2"]
    text, _ = render(family, family.stock_template, CONVERSATIONS["single"])
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
                           "December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>")
