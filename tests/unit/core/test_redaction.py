"""Redaction before capture: e-mails, phones (Brazilian and international), CPF and CNPJ become placeholders in
Portuguese conversations, check digits decide for bare digit runs, and ordinary numbers (prices, years,
quantities, order numbers, dates, CEPs) are left exactly as they were."""

from __future__ import annotations

import pytest

from afina.core.redaction import REDACTION_KINDS, check_kinds, is_valid_cnpj, is_valid_cpf, redact

VALID_CPF, VALID_CNPJ = "12345678909", "12345678000195"


@pytest.mark.parametrize("text, expected", [
    ("Meu e-mail é joao.silva+pedidos@empresa.com.br, pode mandar o boleto?",
     "Meu e-mail é [email], pode mandar o boleto?"),
    ("Escreva para MARIA_souza@gmail.com ou contato@loja-afina.com.", "Escreva para [email] ou [email]."),
    ("O e-mail é ana@sub.dominio.gov.br.", "O e-mail é [email]."),
])
def test_emails(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize("phone", [
    "+55 11 91234-5678", "+55 (11) 91234-5678", "+5511912345678", "+55 21 3456-7890",  # Brazil, international
    "(11) 91234-5678", "(11)91234-5678", "(011) 3456-7890", "11 91234-5678", "21 3456 7890", "(21) 3456-7890",
    "91234-5678", "9 1234-5678",  # a mobile without its area code
    "+1 415 555 0100", "+1-415-555-0100", "+1 (415) 555-0100", "+44 20 7946 0958", "+351 912 345 678",
    "(415) 555-0100", "415-555-0100",  # North American without the country code
])
def test_phones(phone: str) -> None:
    assert redact(f"Pode me ligar no {phone} amanhã?") == "Pode me ligar no [phone] amanhã?"
    assert redact(f"Telefone: {phone}.") == "Telefone: [phone]."


def test_a_number_after_a_phone_is_not_part_of_it() -> None:
    assert redact("Liguei para +55 11 91234-5678 2 vezes") == "Liguei para [phone] 2 vezes"
    assert redact("+55 11 91234-5678 em 2024") == "[phone] em 2024"


@pytest.mark.parametrize("text, expected", [
    ("Meu CPF é 123.456.789-09.", "Meu CPF é [cpf]."),
    ("CPF 123456789-09", "CPF [cpf]"),
    (f"CPF: {VALID_CPF}", "CPF: [cpf]"),
    # formatted, it is a CPF whatever its check digits (someone wrote it as one)
    ("CPF 111.222.333-44 (digitado errado)", "CPF [cpf] (digitado errado)"),
    ("A empresa tem CNPJ 12.345.678/0001-95.", "A empresa tem CNPJ [cnpj]."),
    ("CNPJ 12345678/0001-95 ou 12.345.678/000195", "CNPJ [cnpj] ou 12.345.678/000195"),
    (f"CNPJ {VALID_CNPJ}", "CNPJ [cnpj]"),
])
def test_cpf_and_cnpj(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_bare_digit_runs_need_valid_check_digits() -> None:
    assert is_valid_cpf(VALID_CPF) and is_valid_cpf("529.982.247-25")
    assert not is_valid_cpf("12345678900") and not is_valid_cpf("11111111111") and not is_valid_cpf("123")
    assert is_valid_cnpj(VALID_CNPJ) and is_valid_cnpj("11.222.333/0001-81")
    assert not is_valid_cnpj("12345678000100") and not is_valid_cnpj("00000000000000")
    # an order or protocol number of 11 or 14 digits with wrong check digits is kept
    text = "Protocolo 12345678900, pedido 12345678000100, nota 00000000000."
    assert redact(text) == text


@pytest.mark.parametrize("text", [
    "O pedido 7001 custa R$ 1.234,56 e chega em 3 dias úteis.",
    "Em 2024 vendemos 1.000.000 de unidades; em 2023, 987.654.",
    "O frete é R$ 12.345.678,90? Parcelo em 12x de R$ 49,90.",
    "A promoção vale de 1990-2000 e de 2024-05-01 a 2024-05-31, às 10:30.",
    "Meu CEP é 01310-100, apartamento 1203, bloco 4.",
    "Nota 9.5, temperatura 36,7, versão 3.11.4, pedido nº 98765432101.",
    "Páginas 123-456; ramal 4321; senha de 6 dígitos 123456.",
    "Código de rastreio BR123456789BR e o lote 2024/0001-95.",
])
def test_ordinary_numbers_are_left_alone(text: str) -> None:
    assert redact(text) == text


def test_kinds_are_chosen_per_route() -> None:
    text = "Sou a Ana, ana@exemplo.com, (11) 91234-5678, CPF 123.456.789-09, CNPJ 12.345.678/0001-95."
    assert redact(text) == "Sou a Ana, [email], [phone], CPF [cpf], CNPJ [cnpj]."
    assert redact(text, ["cpf"]) == "Sou a Ana, ana@exemplo.com, (11) 91234-5678, CPF [cpf], CNPJ 12.345.678/0001-95."
    assert redact(text, []) == text
    assert check_kinds(["cnpj", "email", "cnpj"]) == ("email", "cnpj")
    assert check_kinds(REDACTION_KINDS) == REDACTION_KINDS
    with pytest.raises(ValueError, match="got ssn"):
        check_kinds(["ssn"])


def test_a_whole_conversation() -> None:
    text = ("Olá! Quero trocar o endereço do pedido 7001 (R$ 259,90). Meus dados: João Pereira, CPF 529.982.247-25, "
            "joao.pereira@uol.com.br, celular +55 (21) 99876-5432. A nota saiu no CNPJ 11222333000181.")
    assert redact(text) == ("Olá! Quero trocar o endereço do pedido 7001 (R$ 259,90). Meus dados: João Pereira, CPF "
                            "[cpf], [email], celular [phone]. A nota saiu no CNPJ [cnpj].")
