"""Personal data taken out of text before it is kept: e-mail addresses, phone numbers, CPF and CNPJ.

Capture for retraining (``afina.core.routing.RouteCapture``) stores what users said to a model
and what it answered; what identifies a person is replaced by a placeholder first (``[email]``,
``[phone]``, ``[cpf]``, ``[cnpj]``), so the dataset teaches the shape of a conversation without
the people in it.

What is matched, and what is left alone on purpose (ordinary numbers are most of the digits in
a conversation: prices, years, quantities, order numbers):

- e-mail: ``local@domain.tld``.
- CPF: ``123.456.789-09`` or ``123456789-09`` always; 11 bare digits only when their check
  digits are valid (and they are not one digit repeated), so an 11-digit order number is kept.
- CNPJ: ``12.345.678/0001-95`` (dots and slash optional, the dash not) always; 14 bare digits
  only when valid.
- phone: international numbers written with ``+`` (``+55 11 91234-5678``, ``+1 415 555 0100``,
  ``+44 20 7946 0958``: Brazil's and North America's national lengths, else 8 to 15 digits);
  Brazilian numbers with an area code (``(11) 91234-5678``, ``11 3456-7890``, ``(011) 3456 7890``)
  and mobiles without one (``91234-5678``, ``9 1234-5678``); North American ``(415) 555-0100``
  and ``415-555-0100``. A landline without its area code
  (``3456-7890``) is not matched: it reads like a range of years or of pages.

Not matched: CNPJs of the alphanumeric form announced for 2026, numbers with their digits spelled
out, and a bare digit run of a phone without separators (``11912345678``), indistinguishable from
an order number. Redaction is a safety net for the data afina keeps, not an anonymization guarantee.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Literal, get_args

RedactionKind = Literal["email", "phone", "cpf", "cnpj"]
REDACTION_KINDS: tuple[RedactionKind, ...] = get_args(RedactionKind)
PLACEHOLDERS: dict[RedactionKind, str] = {"email": "[email]", "phone": "[phone]", "cpf": "[cpf]", "cnpj": "[cnpj]"}

E164_MIN_DIGITS, E164_MAX_DIGITS = 8, 15
_NOT_DIGIT_BEFORE = r"(?<![0-9])"
_NOT_NUMBER_AFTER = r"(?![0-9]|[.,][0-9])"  # not the integer part of 1.234,56 or 12345678909.5

EMAIL = re.compile(r"(?<![\w.+-])[\w.%+-]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                   r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.[A-Za-z]{2,24}(?![\w-])")
CNPJ_FORMATTED = re.compile(_NOT_DIGIT_BEFORE + r"[0-9]{2}\.?[0-9]{3}\.?[0-9]{3}/?[0-9]{4}-[0-9]{2}"
                            + _NOT_NUMBER_AFTER)
CNPJ_BARE = re.compile(r"(?<![0-9.,/-])[0-9]{14}" + _NOT_NUMBER_AFTER)
CPF_FORMATTED = re.compile(_NOT_DIGIT_BEFORE + r"[0-9]{3}\.?[0-9]{3}\.?[0-9]{3}-[0-9]{2}" + _NOT_NUMBER_AFTER)
CPF_BARE = re.compile(r"(?<![0-9.,/-])[0-9]{11}" + _NOT_NUMBER_AFTER)
# ``+`` and a country code, then groups of digits (some in parentheses) with at most one separator between
PHONE_INTERNATIONAL = re.compile(r"(?<![\w+])\+[0-9]{1,3}(?:[ .-]?(?:\([0-9]{1,4}\)|[0-9]{1,5})){1,6}(?![0-9])")
_AREA = r"(?:\(0?[1-9][0-9]\)[ ]?|0?[1-9][0-9][ .-])"  # (11) 11 011- (011)
PHONE_BRAZIL = re.compile(
    r"(?<![\w+(.,/-])(?:"
    + _AREA + r"(?:9[ .]?[0-9]{4}[ .-]?[0-9]{4}|[2-5][0-9]{3}[ .-]?[0-9]{4})"  # with an area code
    + r"|9[ .]?[0-9]{4}-[0-9]{4}"  # a mobile without one: 91234-5678, 9 1234-5678
    + r")(?![0-9]|[.,-][0-9])")
PHONE_NORTH_AMERICA = re.compile(r"(?<![\w+(.,/-])(?:\([2-9][0-9]{2}\)[ ]?|[2-9][0-9]{2}[.-])[2-9][0-9]{2}[.-][0-9]{4}"
                                 r"(?![0-9]|[.,-][0-9])")


def _digits(text: str) -> list[int]:
    return [int(character) for character in text if "0" <= character <= "9"]


def _check_digit(digits: list[int], weights: list[int]) -> int:
    remainder = sum(digit * weight for digit, weight in zip(digits, weights, strict=True)) % 11
    return 0 if remainder < 2 else 11 - remainder


def is_valid_cpf(text: str) -> bool:
    """Whether the 11 digits of ``text`` are a CPF with valid check digits (one digit repeated is no CPF)."""
    digits = _digits(text)
    if len(digits) != 11 or len(set(digits)) == 1:
        return False
    first = _check_digit(digits[:9], list(range(10, 1, -1)))
    second = _check_digit(digits[:10], list(range(11, 1, -1)))
    return digits[9:] == [first, second]


def is_valid_cnpj(text: str) -> bool:
    """Whether the 14 digits of ``text`` are a CNPJ with valid check digits (one digit repeated is no CNPJ)."""
    digits = _digits(text)
    if len(digits) != 14 or len(set(digits)) == 1:
        return False
    first = _check_digit(digits[:12], [5, 4, 3, 2, 9, 8, 7, 6, 5, 4, 3, 2])
    second = _check_digit(digits[:13], [6, 5, 4, 3, 2, 9, 8, 7, 6, 5, 4, 3, 2])
    return digits[12:] == [first, second]


def _when(valid: Callable[[str], bool], placeholder: str) -> Callable[[re.Match[str]], str]:
    return lambda match: placeholder if valid(match.group()) else match.group()


# national numbers by country code, where they have one length: +55 (2-digit area, 8 or 9 digits), +1 (10)
NATIONAL_DIGITS: dict[str, tuple[int, ...]] = {"55": (10, 11), "1": (10,)}


def _international(match: re.Match[str]) -> str:
    """``[phone]`` for the longest start of the match, ending between two groups of digits, that is a whole
    number: for +55 and +1 a national number of their length, else 8 to 15 digits (E.164). A number written
    after a phone number (``+55 11 91234-5678 2 vezes``) stays out of it."""
    text = match.group()
    ends: list[tuple[int, int]] = []  # (digits so far, where that group ends in the text)
    digits = 0
    for group in re.finditer(r"[0-9]+", text):
        digits += len(group.group())
        ends.append((digits, group.end()))
    number = "".join(character for character in text if "0" <= character <= "9")
    country = next((code for code in NATIONAL_DIGITS if number.startswith(code)), None)
    for count, end in reversed(ends):
        whole = (count - len(country) in NATIONAL_DIGITS[country]) if country is not None \
            else E164_MIN_DIGITS <= count <= E164_MAX_DIGITS
        if whole:
            return PLACEHOLDERS["phone"] + text[end:]
    return text


# in this order: an e-mail may hold digits, a CNPJ holds a CPF-sized run, a formatted CPF looks like a phone
_STEPS: tuple[tuple[RedactionKind, re.Pattern[str], Callable[[re.Match[str]], str] | str], ...] = (
    ("email", EMAIL, PLACEHOLDERS["email"]),
    ("cnpj", CNPJ_FORMATTED, PLACEHOLDERS["cnpj"]),
    ("cnpj", CNPJ_BARE, _when(is_valid_cnpj, PLACEHOLDERS["cnpj"])),
    ("cpf", CPF_FORMATTED, PLACEHOLDERS["cpf"]),
    ("cpf", CPF_BARE, _when(is_valid_cpf, PLACEHOLDERS["cpf"])),
    ("phone", PHONE_INTERNATIONAL, _international),
    ("phone", PHONE_BRAZIL, PLACEHOLDERS["phone"]),
    ("phone", PHONE_NORTH_AMERICA, PLACEHOLDERS["phone"]),
)


def check_kinds(kinds: Iterable[str]) -> tuple[RedactionKind, ...]:
    """The kinds, deduplicated in a fixed order; ValueError naming an unknown one."""
    given = list(kinds)
    unknown = [kind for kind in given if kind not in REDACTION_KINDS]
    if unknown:
        raise ValueError(f"redaction kinds are some of {', '.join(REDACTION_KINDS)}; got {', '.join(unknown)}")
    return tuple(kind for kind in REDACTION_KINDS if kind in given)


def redact(text: str, kinds: Iterable[RedactionKind] = REDACTION_KINDS) -> str:
    """``text`` with every match of ``kinds`` replaced by its placeholder (``[email]``, ``[phone]``, ...)."""
    wanted = set(kinds)
    for kind, pattern, replacement in _STEPS:
        if kind in wanted:
            text = pattern.sub(replacement, text)
    return text
