"""Text repairs applied to every example before validation, each one reported per row and field.

Users' files are messy in predictable ways (the seeds themselves carry "VOCÃŠ:" for "VOCÊ:"):
text decoded twice (mojibake), a BOM glued into the middle of a value when files were
concatenated, Windows line endings, control characters pasted from terminals or PDFs,
decomposed accents (macOS file names, some editors) and stray surrounding whitespace.
Each repair appends one ``RowIssue(action="fixed")`` per field and rule, so the report says
exactly what afina changed and where.

Speed: most rows need no repair, so each string is first checked with cheap tests
(``str.isascii``, precompiled regexes, ``unicodedata.is_normalized``) and ``ftfy`` runs only
on strings that contain a mojibake marker. A typical 1 KB chat row costs ~4 µs (ASCII) to ~10 µs
(Portuguese) on the 2-core dev machine; a row broken as a whole is re-decoded directly (~40 µs), and
only mixed or doubly broken text pays for ftfy (~0.5 ms).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from afina.ingest.records import Example, RowIssue

# C0 controls except \t \n (and \r, handled by the line-ending repair), DEL, C1 controls,
# lone surrogates (json.loads lets "\ud800" through; it cannot be written as UTF-8) and
# the noncharacters U+FFFE/U+FFFF.
_CONTROL_RE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff]")
_ASCII_CONTROLS = bytes(range(0x00, 0x09)) + b"\x0b\x0c\r" + bytes(range(0x0e, 0x20)) + b"\x7f"
# Vertical tab, form feed and NEL separate lines or pages: they become a newline, not nothing,
# so the words on either side stay apart.
_LINE_BREAK_CONTROLS = str.maketrans({"\x0b": "\n", "\x0c": "\n", "\x85": "\n"})

# Characters that UTF-8 text shows when it was decoded as Windows-1252, Latin-1 or MacRoman:
# a lead byte rendered as Ã/Â/Ð/Ñ/â/ð (2-, 3- and 4-byte sequences) or as √/‚ (MacRoman), followed
# by a continuation byte. Correct Portuguese never has "Ã" followed by one of these.
_MOJIBAKE_HINT_RE = re.compile(
    "[ÂÃ][\x80-\xbf€‚ƒ„…†‡ˆ‰Š‹ŒŽ‘’“”•–—˜™š›œžŸ]"  # Ã£ (ã), Ã© (é), ÃŠ (Ê), Â° (°), Ã\xa0 (à)
    "|â[€\x80-\xbf]"  # â€™ (’), â€œ (“): 3-byte punctuation
    "|[ÐÑ][\x80-\xbf‘’“”•–—]"  # Cyrillic decoded as cp1252
    "|ð[Ÿ\x9f][\x80-\xbf‚ƒ„…†‡ˆ‰Š‹ŒŽ‘’“”•–—˜™š›œžŸ]"  # 4-byte emoji: ðŸ˜€
    "|√[^\x00-\x7f]"  # MacRoman: √© (é), √£ (ã), √ß (ç); a real square root is followed by ASCII
    "|‚Ä[^\x00-\x7f]"  # MacRoman 3-byte punctuation: ‚Äô (’), ‚Äú (“)
    "|Ã(?:$| )"  # a continuation byte lost as a (non-breaking) space: "Ã " for "à"
    "|[a-zß-öø-ÿ]Ã"  # "Ã" after a lowercase letter: see _LOST_SOFT_HYPHEN_RE
)
# "í" is C3 AD in UTF-8; decoded as Windows-1252 it is "Ã" + a soft hyphen, and the invisible soft
# hyphen is often dropped on the way ("especÃficas", "E aÃ!" in the seeds). ftfy cannot undo a
# lost byte, but "Ã" right after a lowercase letter never occurs in correct Portuguese or Spanish
# (where "Ã" is only written in capitals: "SÃO", "IRMÃ"), and "í" is the only vowel it can stand for.
_LOST_SOFT_HYPHEN_RE = re.compile(r"(?<=[a-zß-öø-ÿ])Ã(?![A-ZÀ-ÖØ-Þ\x80-\xbf])")


def _redecode(text: str) -> str | None:
    """The common case, ~100x cheaper than ftfy: the whole string is UTF-8 that was decoded once as
    Windows-1252, Latin-1 or MacRoman. Encoding it back must give valid UTF-8 — which text that was
    not mojibake practically never does — and the result must carry no marker; anything else
    (mixed or doubly broken text, lost bytes) is left to ftfy."""
    for codec in ("cp1252", "latin-1", "mac_roman"):
        try:
            decoded = text.encode(codec).decode("utf-8")
        except UnicodeError:
            continue
        if decoded != text and not (_has_mojibake_lead(decoded) and _MOJIBAKE_HINT_RE.search(decoded)):
            return decoded
    return None


def _has_mojibake_lead(text: str) -> bool:
    # each `in` is a C-speed scan, ~20x faster than the regex below on a clean 1 KB string
    return ("Ã" in text or "Â" in text or "â" in text or "Ð" in text or "Ñ" in text or "ð" in text
            or "√" in text or "‚" in text)


@lru_cache(maxsize=1)
def _ftfy_fixer() -> Callable[[str], str]:
    # Imported lazily: ftfy builds its tables on import (~100 ms) and most runs never need it.
    import ftfy

    config = ftfy.TextFixerConfig(
        unescape_html=False,  # "&amp;" in a dataset may be intended (HTML training data)
        remove_terminal_escapes=False,  # control characters are our own repair, reported separately
        fix_encoding=True,
        restore_byte_a0=True,
        replace_lossy_sequences=True,
        decode_inconsistent_utf8=True,
        fix_c1_controls=True,
        fix_latin_ligatures=False,  # ligatures, full-width forms and curly quotes are the user's text,
        fix_character_width=False,  # not damage: never rewrite them
        uncurl_quotes=False,
        fix_line_breaks=False,
        fix_surrogates=True,
        remove_control_chars=False,
        normalization=None,  # NFC is its own reported repair
        explain=False,
    )

    def fix(text: str) -> str:
        return ftfy.fix_text(text, config)

    return fix


def repair_text(text: str) -> tuple[str, list[tuple[str, str]]]:
    """``(repaired text, [(rule, detail), ...])`` for one string; the list is empty when nothing changed."""
    repairs: list[tuple[str, str]] = []
    if text.isascii():
        # no mojibake, BOM, C1 control or non-NFC sequence can hide in pure ASCII; one C-speed
        # bytes.translate pass (5x faster than the regex) tells whether any control character is there
        if len(text.encode("ascii").translate(None, _ASCII_CONTROLS)) != len(text):
            if "\r" in text:
                text = _fix_line_endings(text, repairs)
            if _CONTROL_RE.search(text):
                text = _remove_controls(text, repairs)
        return _strip(text, repairs), repairs

    if "\ufeff" in text:
        count = text.count("\ufeff")
        text = text.replace("\ufeff", "")
        repairs.append(("bom", f"removed {count} byte order mark(s) (U+FEFF)"))
    if _has_mojibake_lead(text) and _MOJIBAKE_HINT_RE.search(text):
        fixed = _LOST_SOFT_HYPHEN_RE.sub("í", _redecode(text) or _ftfy_fixer()(text))
        if fixed != text:
            text = fixed
            repairs.append(("mojibake", "repaired mojibake: UTF-8 text that had been decoded as "
                                        "Windows-1252/Latin-1/MacRoman (e.g. 'VOCÃŠ' → 'VOCÊ')"))
    if "\r" in text:
        text = _fix_line_endings(text, repairs)
    if _CONTROL_RE.search(text):
        text = _remove_controls(text, repairs)
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
        repairs.append(("unicode_normalization", "composed characters to Unicode NFC (e.g. 'e' + '◌̂' → 'ê')"))
    if "\ufffd" in text:
        repairs.append(("replacement_character", f"{text.count(chr(0xFFFD))} U+FFFD replacement character(s): "
                                                 "characters were lost before upload and cannot be restored"))
    return _strip(text, repairs), repairs


def repair_example(example: Example) -> Example:
    """Repair every string of ``example.messages`` (``content``) or ``example.text``, in place.

    Returns the same object for chaining. Each rule that changed a field appends one
    ``RowIssue(action="fixed")`` naming the field (``messages[1].content``); a U+FFFD
    replacement character, which cannot be repaired, is noted as a ``warning``.
    Non-string values are left to validation.
    """
    if example.messages is not None:
        for index, message in enumerate(example.messages):
            if isinstance(message, dict):
                _repair_field(example, message, "content", f"messages[{index}].content")
    if isinstance(example.text, str):
        text, repairs = repair_text(example.text)
        if repairs:
            example.text = text
            _note(example, "text", repairs)
    return example


def _repair_field(example: Example, holder: dict[str, Any], key: str, field: str) -> None:
    value = holder.get(key)
    if not isinstance(value, str):
        return
    repaired, repairs = repair_text(value)
    if repairs:
        holder[key] = repaired
        _note(example, field, repairs)


def _note(example: Example, field: str, repairs: list[tuple[str, str]]) -> None:
    for rule, detail in repairs:
        action = "warning" if rule == "replacement_character" else "fixed"
        example.issues.append(RowIssue(example.source, example.line, field, rule, action, detail))


def _fix_line_endings(text: str, repairs: list[tuple[str, str]]) -> str:
    repairs.append(("crlf", "converted CRLF/CR line endings to LF"))
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _remove_controls(text: str, repairs: list[tuple[str, str]]) -> str:
    found = _CONTROL_RE.findall(text)
    text = _CONTROL_RE.sub("", text.translate(_LINE_BREAK_CONTROLS))
    shown = ", ".join(sorted({f"U+{ord(char):04X}" for char in found})[:5])
    repairs.append(("control_characters", f"removed {len(found)} control/invalid character(s) ({shown}); "
                                          "vertical tab, form feed and NEL became line breaks"))
    return text


def _strip(text: str, repairs: list[tuple[str, str]]) -> str:
    if text and (text[0].isspace() or text[-1].isspace()):
        stripped = text.strip()
        repairs.append(("whitespace", "removed surrounding whitespace"))
        return stripped
    return text
