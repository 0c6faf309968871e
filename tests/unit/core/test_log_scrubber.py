"""The log scrubber: every kind of secret afina handles leaves no trace in either log format.

Each canary is a realistic secret of its kind; a test fails if any canary, or the secret part of it,
survives ``redact``, ``scrub`` or a formatted log line (JSON and key=value alike).
"""

from __future__ import annotations

import logging
import secrets
import time

import orjson
import pytest
from cryptography.fernet import Fernet

from afina.core.logging import (
    JsonFormatter,
    KeyValueFormatter,
    new_error_id,
    redact,
    register_secret,
    register_settings_secrets,
    scrub,
)

API_KEY = "afk-" + secrets.token_urlsafe(32)
HUB_TOKEN = "hf_" + secrets.token_hex(17)
FERNET_KEY = Fernet.generate_key().decode()
DB_PASSWORD = "Pg-" + secrets.token_hex(8)
REDIS_PASSWORD = "Rd" + secrets.token_hex(8)
AMQP_PASSWORD = "Mq" + secrets.token_hex(8)
AWS_KEY_ID = "AKIA" + "".join(secrets.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") for _ in range(16))
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCY" + secrets.token_hex(5)  # 40 characters, mixed case, a '/'
ENV_KEY_VALUE = "env" + secrets.token_hex(10)
PLAIN_PASSWORD = "pw" + secrets.token_hex(6)

# (text containing a canary, the canary that must vanish)
CASES = [
    (f"using key {API_KEY} for acme", API_KEY),
    (f"HF_TOKEN={HUB_TOKEN}", HUB_TOKEN),
    (f"hub said 401 for token {HUB_TOKEN}", HUB_TOKEN),
    (f"Authorization: Bearer {API_KEY}", API_KEY),
    (f"connect to postgresql+psycopg://afina:{DB_PASSWORD}@db.internal:5432/afina failed", DB_PASSWORD),
    (f"(psycopg.OperationalError) connection to 'postgresql://u:{DB_PASSWORD}@10.0.0.5/x' refused",
     DB_PASSWORD),
    (f"broker redis://:{REDIS_PASSWORD}@127.0.0.1:6379/0 unreachable", REDIS_PASSWORD),
    (f"amqp://guest:{AMQP_PASSWORD}@rabbit:5672//", AMQP_PASSWORD),
    (f"AFINA_DATA_ENCRYPTION_KEY={FERNET_KEY}", FERNET_KEY),
    (f"ACME_ENCRYPTION_KEY={ENV_KEY_VALUE} set", ENV_KEY_VALUE),
    (f"export AFINA_S3_SECRET_KEY='{ENV_KEY_VALUE}'", ENV_KEY_VALUE),
    (f'ACME_FERNET_KEY="{ENV_KEY_VALUE}"', ENV_KEY_VALUE),
    (f"decrypting with {FERNET_KEY} failed: InvalidToken", FERNET_KEY),
    (f"credentials {AWS_KEY_ID} / {AWS_SECRET} rejected", AWS_SECRET),
    (f"credentials {AWS_KEY_ID} / {AWS_SECRET} rejected", AWS_KEY_ID),
    (f"aws_access_key_id={AWS_KEY_ID}\naws_secret_access_key = {AWS_SECRET}", AWS_SECRET),
    (f"api_key={PLAIN_PASSWORD}&model=x", PLAIN_PASSWORD),
    (f'{{"api_key": "{PLAIN_PASSWORD}", "model": "x"}}', PLAIN_PASSWORD),
    (f"{{'apiKey': '{PLAIN_PASSWORD}'}}", PLAIN_PASSWORD),
    (f'"password": "two words {PLAIN_PASSWORD}"', PLAIN_PASSWORD),
    (f"s3_secret_key: {PLAIN_PASSWORD}", PLAIN_PASSWORD),
    (f"password={PLAIN_PASSWORD}", PLAIN_PASSWORD),
    (f'password="{PLAIN_PASSWORD}', PLAIN_PASSWORD),  # a truncated line: the quote never closes
]


@pytest.mark.parametrize(("text", "canary"), CASES)
def test_redact_removes_every_kind_of_secret(text: str, canary: str) -> None:
    cleaned = redact(text)
    assert canary not in cleaned
    assert "***" in cleaned


def test_redact_keeps_what_an_operator_needs() -> None:
    kept = ("max_tokens=5 prompt_tokens: 12 tokenizer=smollm2 object_key=jobs/ftjob-1/model.gguf "
            "sha1=da39a3ee5e6b4b0d3255bfef95601890afd80709 http://127.0.0.1:8000/v1/models "
            "postgresql+psycopg://postgres@127.0.0.1:5432/test key_env=ACME_KEY prefix=afk-AbC123")
    assert redact(kept) == kept
    # the name, the URL and the quotes stay; only the secret goes
    assert redact(f"redis://:{REDIS_PASSWORD}@h:6379/0") == "redis://:***@h:6379/0"
    assert redact(f'"api_key": "{PLAIN_PASSWORD}"') == '"api_key": "***"'
    assert redact(f"AFINA_DATA_ENCRYPTION_KEY={FERNET_KEY} next") == "AFINA_DATA_ENCRYPTION_KEY=*** next"
    # a 40-character string far from any access key id is not a secret key (a hash, a name)
    lone = "ab/" + "Ab" * 18 + "c"
    assert redact(lone) == lone


def test_redact_is_idempotent_and_bounded_on_hostile_text() -> None:
    once = redact(CASES[4][0])
    assert redact(once) == once
    started = time.monotonic()
    for hostile in ("a-" * 100_000, "A_" * 100_000, "x://" * 25_000, "password=" * 20_000):
        redact(hostile)
    assert time.monotonic() - started < 10


def test_registered_secrets_of_any_shape_are_redacted(embedded_settings) -> None:  # noqa: ANN001
    shapeless = "plain" + secrets.token_hex(6)
    register_secret(shapeless)
    register_secret("short")  # too short to register: would redact ordinary words
    assert shapeless not in redact(f"store said no to {shapeless}")
    assert redact("a short note") == "a short note"

    s3_secret, db_password = "s3" + secrets.token_hex(8), "db" + secrets.token_hex(8)
    settings = embedded_settings.model_copy(update={"s3_secret_key": type(embedded_settings.s3_secret_key)(s3_secret),
                                                    "database_url": f"postgresql://u:{db_password}@h/d"})
    register_settings_secrets(settings)
    assert s3_secret not in redact(f"signature mismatch for {s3_secret}")
    assert db_password not in redact(f"auth failed: {db_password}")


def test_scrub_walks_nested_structures_and_stringifies_the_rest() -> None:
    value = {
        "request": {"headers": {"Authorization": f"Bearer {API_KEY}"}, "body": [f"token={HUB_TOKEN}", 3]},
        "s3_secret_key": PLAIN_PASSWORD,  # a secret-named field goes whole, whatever it holds
        "hf_token": {"nested": PLAIN_PASSWORD},
        "error": ValueError(f"cannot connect to redis://:{REDIS_PASSWORD}@h:6379"),
        "raw": f"AFINA_DATA_ENCRYPTION_KEY={FERNET_KEY}".encode(),
        "pair": (AWS_KEY_ID, AWS_SECRET),
        "prompt_tokens": 12,
        "ok": True,
        "nothing": None,
    }
    cleaned = scrub(value)
    text = orjson.dumps(cleaned).decode()
    for canary in (API_KEY, HUB_TOKEN, PLAIN_PASSWORD, REDIS_PASSWORD, FERNET_KEY, AWS_KEY_ID, AWS_SECRET):
        assert canary not in text
    assert cleaned["prompt_tokens"] == 12 and cleaned["ok"] is True and cleaned["nothing"] is None
    assert cleaned["s3_secret_key"] == "***" and cleaned["hf_token"] == "***"
    assert cleaned["error"].startswith("ValueError: cannot connect to redis://:***@h")
    assert cleaned["request"]["body"][1] == 3


def test_scrub_survives_cycles_and_unprintable_objects() -> None:
    loop: list = []
    loop.append(loop)

    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no")

    cleaned = scrub({"loop": loop, "odd": Unprintable(), "huge": 10**30})
    assert cleaned["odd"] == "<unprintable Unprintable>" and cleaned["huge"] == str(10**30)
    orjson.dumps(cleaned)


def _record(message: str, *args: object, fields: dict | None = None, exc: BaseException | None = None
            ) -> logging.LogRecord:
    record = logging.LogRecord("afina.test", logging.ERROR, __file__, 1, message, args,
                               (type(exc), exc, exc.__traceback__) if exc else None)
    if fields is not None:
        record.fields = fields
    return record


@pytest.mark.parametrize("formatter", [JsonFormatter(), KeyValueFormatter()], ids=["json", "key-value"])
def test_both_formatters_scrub_message_fields_and_traceback_alike(formatter: logging.Formatter) -> None:
    try:
        raise ConnectionError(f"postgresql+psycopg://afina:{DB_PASSWORD}@db/afina: api_key={PLAIN_PASSWORD}")
    except ConnectionError as caught:
        exc = caught
    record = _record("stage failed for %s with %s", API_KEY, {"token": HUB_TOKEN}, exc=exc, fields={
        "trace": f"AFINA_DATA_ENCRYPTION_KEY={FERNET_KEY}",
        "settings": {"s3": {"secret_key": AWS_SECRET, "access_key": AWS_KEY_ID}, "hf_token": HUB_TOKEN},
        "attempts": [1, {"url": f"redis://:{REDIS_PASSWORD}@h"}],
        "error": exc,
        "aws": f"{AWS_KEY_ID} {AWS_SECRET}",
    })
    line = formatter.format(record)
    for canary in (API_KEY, HUB_TOKEN, DB_PASSWORD, PLAIN_PASSWORD, FERNET_KEY, AWS_SECRET, AWS_KEY_ID,
                   REDIS_PASSWORD):
        assert canary not in line, canary
    assert "ConnectionError" in line and "stage failed for ***" in line
    if isinstance(formatter, JsonFormatter):
        payload = orjson.loads(line)
        assert payload["settings"]["s3"]["secret_key"] == "***" and payload["attempts"][0] == 1
    else:
        assert 'attempts=[1,{"url":"redis://:***@h"}]' in line


def test_error_ids_are_distinct_and_quotable() -> None:
    ids = {new_error_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(error_id.startswith("err_") and len(error_id) == 20 and redact(error_id) == error_id
               for error_id in ids)
