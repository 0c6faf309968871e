"""Structured logging: one JSON object per line, secrets scrubbed before they are written."""

from __future__ import annotations

import logging
import re
import sys
import time

import orjson

SECRET_PATTERNS = [
    re.compile(r"afk-[A-Za-z0-9_\-]{8,}"),        # afina API keys
    re.compile(r"hf_[A-Za-z0-9]{20,}"),            # Hugging Face tokens
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._\-]{8,}"),
    re.compile(r"(?i)((?:secret|password|token|access_key|secret_key)[\"']?\s*[=:]\s*[\"']?)[^\s\"',}]+"),
]


def redact(text: str) -> str:
    """Replace anything that looks like a credential with ``***``."""
    for pattern in SECRET_PATTERNS:
        if pattern.groups:
            text = pattern.sub(lambda m: m.group(1) + "***", text)
        else:
            text = pattern.sub("***", text)
    return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": redact(record.getMessage()),
        }
        fields = getattr(record, "fields", None)
        if fields:
            payload.update({key: redact(str(value)) if isinstance(value, str) else value
                            for key, value in fields.items()})
        if record.exc_info:
            payload["exc"] = redact(self.formatException(record.exc_info))
        return orjson.dumps(payload, default=str).decode()


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        fields = getattr(record, "fields", None) or {}
        extra = " ".join(f"{key}={value}" for key, value in fields.items())
        line = f"{stamp} {record.levelname.lower():5} {record.name} {record.getMessage()} {extra}".rstrip()
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return redact(line)


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
