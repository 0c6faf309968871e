"""An exported model served by Ollama must see the prompt it was trained on: each family's Ollama (Go)
template renders a chat exactly as its stock Jinja template does with the generation prompt (less the BOS
token, which Ollama's tokenizer adds)."""

from __future__ import annotations

from typing import Any

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from afina.core.catalog import CHATML, FAMILIES, ChatFamily
from tests.support.gotemplate import ollama_prompt, render_go_template

SYSTEM = {"role": "system", "content": "Você atende clientes da Livraria Sebo Azul, em português."}
CHATS: dict[str, list[dict[str, Any]]] = {
    "first_question": [{"role": "user", "content": "Vocês compram livros usados?"}],
    "with_system": [SYSTEM, {"role": "user", "content": "Qual o horário de sábado?"}],
    "follow_up": [
        {"role": "user", "content": "Têm 'Dom Casmurro'?"},
        {"role": "assistant", "content": "Temos duas edições, a partir de R$ 18."},
        {"role": "user", "content": "Separa a mais barata pra mim?"},
    ],
    "follow_up_with_system": [
        SYSTEM,
        {"role": "user", "content": "Fazem troca?"},
        {"role": "assistant", "content": "Fazemos: dois livros usados valem um crédito de R$ 10."},
        {"role": "user", "content": "E revistas contam?"},
    ],
}


def jinja_prompt(family: ChatFamily, messages: list[dict[str, Any]]) -> str:
    rendered, _ = render_jinja_template([messages], chat_template=family.stock_template, add_generation_prompt=True,
                                        bos_token=family.bos_token, eos_token=family.eos_token,
                                        date_string="26 Jul 2024")
    return rendered[0].removeprefix(family.bos_token)


def _cases() -> list[Any]:
    return [pytest.param(family, name, id=f"{family.name}-{name}") for family in FAMILIES.values()
            for name in CHATS if family.supports_system_role or CHATS[name][0]["role"] != "system"]


@pytest.mark.parametrize(("family", "name"), _cases())
def test_ollama_template_builds_the_prompt_the_model_was_trained_on(family: ChatFamily, name: str) -> None:
    assert ollama_prompt(family.ollama_template, CHATS[name]) == jinja_prompt(family, CHATS[name])


def test_chatml_system_turn_ends_with_a_newline() -> None:
    # the template once trimmed it ({{- else }}), gluing <|im_end|> to the next <|im_start|>
    prompt = ollama_prompt(CHATML.ollama_template, CHATS["with_system"])
    assert "<|im_end|>\n<|im_start|>user\n" in prompt


def test_the_interpreter_follows_go_semantics() -> None:
    data = {"System": "", "Messages": [{"Role": "user", "Content": "a"}, {"Role": "assistant", "Content": "b"}]}
    template = ("{{- range $i, $_ := .Messages }}\n{{- $last := eq (len (slice $.Messages $i)) 1 }}"
                "[{{ $i }}:{{ .Role }}{{ if $last }} last{{ end }}]\n{{- end }}"
                "{{ if .System }}S{{ else if not .System }}no system{{ end }}")
    assert render_go_template(template, data) == "[0:user][1:assistant last]no system"
    with pytest.raises(ValueError, match="end"):
        render_go_template("{{ if .System }}x", data)
