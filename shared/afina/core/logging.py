"""Structured logging: one event per line (JSON or key=value), secrets scrubbed before they are written.

One scrubber serves every writer: ``redact`` for text (a log message, a traceback, a
message a user will read), ``scrub`` for structured values (a log record's fields, an
event's data), which walks dicts, lists and tuples and turns anything else (an exception,
a path, an object) into redacted text. Both formatters go through it, so a secret is
removed the same way whichever format the operator chose.

What counts as a secret: afina API keys, Hub tokens, bearer tokens, the password of a
URL (``postgresql+psycopg://user:PASS@host``, ``redis://:PASS@host``), values assigned to
secret-sounding names (``password=``, ``"api_key": "..."``, ``AFINA_S3_SECRET_KEY=``,
``*_KEY=`` in environment style), raw Fernet keys, AWS-style key pairs (an ``AKIA``/``ASIA``
key id and a 40-character secret next to it), and any value registered at runtime with
``register_secret`` (the settings' own secrets, whatever their shape).
"""

from __future__ import annotations

import logging
import re
import secrets
import sys
import threading
import time
from typing import Any

import orjson

REDACTED = "***"
# a registered secret shorter than this would redact ordinary words
MIN_REGISTERED_SECRET = 8
# how far (characters) from an AWS access key id a 40-character string counts as its secret key
AWS_PAIR_WINDOW = 200
# nesting past this depth is not walked (a cyclic or absurdly deep structure must not stop a log line)
MAX_SCRUB_DEPTH = 12

_SECRET_WORDS = (r"secret|password|passwd|pwd|token|api[_\-]?key|apikey|access[_\-]?key|secret[_\-]?key"
                 r"|private[_\-]?key|encryption[_\-]?key|fernet[_\-]?key|credentials?|auth[_\-]?token")
# a name is matched from its secret word on (what precedes it is kept as is): a pattern that starts at the
# name's first character backtracks quadratically on long runs of word characters
_SECRET_NAME = r"(?:" + _SECRET_WORDS + r")[\"']?\s*[=:]\s*"  # password= / "api_key": / s3_secret_key:
_ENV_KEY_NAME = r"(?<=[A-Z0-9])_KEY[\"']?\s*[=:]\s*"  # AFINA_DATA_ENCRYPTION_KEY=
_QUOTED = r"(?P<q>[\"'])[^\"'\n]{0,4096}(?P<end>(?P=q))"  # the whole quoted value, spaces and all
_BARE = r"[^\s\"',;}&)\]]+"

# a match is replaced by ``***``, keeping its ``keep`` group (the name, or the URL up to the password) and the
# quotes ``q`` and ``end`` around a quoted value
SECRET_PATTERNS: list[re.Pattern[str]] = [
    re.compile(r"afk-[A-Za-z0-9_\-]{8,}"),  # afina API keys
    re.compile(r"\bhf_[A-Za-z0-9]{20,}"),  # Hugging Face tokens
    re.compile(r"(?i)(?P<keep>\bbearer\s+)[A-Za-z0-9._~+/\-]{8,}=*"),
    re.compile(r"(?i)(?P<keep>\bauthorization[\"']?\s*[=:]\s*[\"']?(?:basic\s+|bearer\s+)?)[^\s\"',;}]+"),
    # a URL's password: scheme://user:PASS@host (the user may be empty, as in redis://:PASS@host)
    re.compile(r"(?i)(?P<keep>\b[a-z][a-z0-9+.\-]{0,30}://[^\s:/@]{0,256}:)[^\s@]{1,512}(?=@)"),
    # values of secret-sounding names, in any case: password=..., "api_key": "...", s3_secret_key: ...
    re.compile(r"(?i)(?P<keep>" + _SECRET_NAME + r")" + _QUOTED),
    re.compile(r"(?i)(?P<keep>" + _SECRET_NAME + r"[\"']?)" + _BARE),  # also an unclosed quote
    # environment-style *_KEY=...: ACME_FERNET_KEY=..., AFINA_S3_ACCESS_KEY="..."
    re.compile(r"(?P<keep>" + _ENV_KEY_NAME + r")" + _QUOTED),
    re.compile(r"(?P<keep>" + _ENV_KEY_NAME + r"[\"']?)" + _BARE),
    # a raw Fernet key: 32 bytes of url-safe base64 (44 characters, the last one '=')
    re.compile(r"(?<![A-Za-z0-9_\-])[A-Za-z0-9_\-]{43}=(?![A-Za-z0-9_\-=])"),
]
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")
_AWS_SECRET_CANDIDATE = re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")
# a structured field whose name says it holds a secret is replaced whatever its value (the word must end
# the name: prompt_tokens is a count, tokenizer a name)
_SECRET_KEY_NAME = re.compile(r"(?i)(?:^|[_\-])(?:" + _SECRET_WORDS + r"|authorization|cookie)$|^[A-Z0-9_]*_KEY$")

_registered: set[str] = set()
_registered_lock = threading.Lock()


def register_secret(value: str | None) -> None:
    """Redact ``value`` wherever it appears from now on (a secret whose shape no pattern knows).

    Values shorter than ``MIN_REGISTERED_SECRET`` are ignored: they would redact ordinary text.
    """
    if value and len(value) >= MIN_REGISTERED_SECRET:
        with _registered_lock:
            _registered.add(value)


def register_settings_secrets(settings: Any) -> None:
    """Register every secret a ``Settings`` carries (store keys, the data key, URL passwords)."""
    from sqlalchemy.engine import make_url

    for name in ("s3_access_key", "s3_secret_key", "data_encryption_key"):
        secret = getattr(settings, name, None)
        if secret is not None:
            register_secret(secret.get_secret_value())
    for name in ("database_url", "broker_url"):
        url = getattr(settings, name, None)
        if not url:
            continue
        try:
            register_secret(make_url(url).password)
        except Exception:  # noqa: BLE001 - a URL SQLAlchemy cannot parse still gets the pattern's treatment
            continue


def new_error_id() -> str:
    """An id a user can quote and an operator can find in the log (``err_`` and 16 hex characters)."""
    return f"err_{secrets.token_hex(8)}"


def _redact_aws_pairs(text: str) -> str:
    key_ids = list(_AWS_KEY_ID.finditer(text))
    if not key_ids:
        return text
    windows = [(match.start() - AWS_PAIR_WINDOW, match.end() + AWS_PAIR_WINDOW) for match in key_ids]

    def near_a_key_id(match: re.Match[str]) -> str:
        inside = any(start <= match.start() and match.end() <= end for start, end in windows)
        return REDACTED if inside else match.group(0)

    text = _AWS_SECRET_CANDIDATE.sub(near_a_key_id, text)
    return _AWS_KEY_ID.sub(REDACTED, text)


def redact(text: str) -> str:
    """``text`` with anything that looks like a credential replaced by ``***``."""
    if not text:
        return text
    with _registered_lock:
        known = sorted(_registered, key=len, reverse=True)
    for value in known:
        if value in text:
            text = text.replace(value, REDACTED)
    text = _redact_aws_pairs(text)
    for pattern in SECRET_PATTERNS:
        text = pattern.sub(_replacement, text)
    return text


def _replacement(match: re.Match[str]) -> str:
    groups = match.groupdict()
    return (groups.get("keep") or "") + (groups.get("q") or "") + REDACTED + (groups.get("end") or "")


def _secret_key_name(key: object) -> bool:
    return isinstance(key, str) and bool(_SECRET_KEY_NAME.search(key))


def scrub(value: Any, _depth: int = 0) -> Any:
    """A JSON-ready copy of ``value`` with every secret redacted.

    Strings are redacted; dicts, lists, tuples and sets are walked (a dict entry whose key names a
    secret is replaced whole); numbers, booleans and None pass; anything else (an exception, a path,
    bytes, an object) becomes its redacted text.
    """
    if value is None or isinstance(value, bool | float):
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**64 else str(value)  # JSON writers stop at 64 bits
    if isinstance(value, str):
        return redact(value)
    if _depth >= MAX_SCRUB_DEPTH:
        return "…"
    if isinstance(value, dict):
        pair = _holds_aws_key_id(value.values())
        return {redact(str(key)): REDACTED if _secret_key_name(key) and item is not None
                else _scrub_item(item, pair, _depth) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        pair = _holds_aws_key_id(value)
        return [_scrub_item(item, pair, _depth) for item in value]
    if isinstance(value, bytes | bytearray | memoryview):
        return redact(bytes(value).decode(errors="replace"))
    if isinstance(value, BaseException):
        return redact(f"{type(value).__name__}: {value}")
    try:
        return redact(str(value))
    except Exception:  # noqa: BLE001 - a __str__ that raises must not lose the log line
        return f"<unprintable {type(value).__name__}>"


def _holds_aws_key_id(items: Any) -> bool:
    return any(isinstance(item, str) and _AWS_KEY_ID.search(item) for item in items)


def _scrub_item(item: Any, beside_aws_key_id: bool, depth: int) -> Any:
    """One member of a container; beside an AWS key id, a 40-character sibling is its secret key."""
    if beside_aws_key_id and isinstance(item, str):
        item = _AWS_SECRET_CANDIDATE.sub(REDACTED, item)
    return scrub(item, depth + 1)


def scrub_fields(fields: dict[str, Any] | None) -> dict[str, Any]:
    """A log record's ``fields`` scrubbed (see ``scrub``)."""
    return scrub(fields) if fields else {}


def _text_of(value: Any) -> str:
    """A scrubbed field value as key=value text: strings bare, structures as compact JSON."""
    return value if isinstance(value, str) else orjson.dumps(value).decode()


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, event, the record's fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": redact(record.getMessage()),
        }
        payload.update(scrub_fields(getattr(record, "fields", None)))
        if record.exc_info:
            payload["exc"] = redact(self.formatException(record.exc_info))
        if record.stack_info:
            payload["stack"] = redact(self.formatStack(record.stack_info))
        return orjson.dumps(payload, default=lambda value: redact(str(value))).decode()


class KeyValueFormatter(logging.Formatter):
    """``HH:MM:SS level logger event key=value ...`` for people reading a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        fields = scrub_fields(getattr(record, "fields", None))
        extra = " ".join(f"{key}={_text_of(value)}" for key, value in fields.items())
        line = f"{stamp} {record.levelname.lower():5} {record.name} {redact(record.getMessage())} {extra}".rstrip()
        if record.exc_info:
            line += "\n" + redact(self.formatException(record.exc_info))
        if record.stack_info:
            line += "\n" + redact(self.formatStack(record.stack_info))
        return line


def configure_logging(level: str = "INFO", as_json: bool = True) -> None:
    """Install one handler on the root logger (idempotent)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_afina", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._afina = True  # type: ignore[attr-defined]
    handler.setFormatter(JsonFormatter() if as_json else KeyValueFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper())


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: object) -> None:
    """Log ``event`` with key=value fields (``log_event(log, "job.started", job_id=...)``)."""
    logger.log(level, event, extra={"fields": fields})

