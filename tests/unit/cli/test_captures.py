"""``afina routes set`` capture flags and ``afina routes captures|retrain|feedback``: what the flags become (the
server checks the result) and how an exchange is shown."""

from __future__ import annotations

import argparse
from pathlib import Path

from afina.cli.captures import add_capture_flags, add_commands, capture_spec, describe, run, with_capture


def parser() -> argparse.ArgumentParser:
    """The ``routes`` part of ``afina``'s parser with this module's additions (as main.py wires them)."""
    root = argparse.ArgumentParser()
    routes_commands = root.add_subparsers(dest="routes_command", required=True)
    put = routes_commands.add_parser("set")
    put.add_argument("name")
    add_capture_flags(put)
    add_commands(routes_commands)
    return root


def test_capture_flags_become_the_capture_section() -> None:
    args = parser().parse_args(["set", "aeon", "--capture", "--retrain-after", "1000", "--capture-training-file",
                                "file-abc", "--include-feedback", "positive", "--redact", "cpf", "email"])
    assert with_capture({"targets": [{"model": "m"}]}, args)["capture"] == {
        "enabled": True, "retrain_after": 1000, "training_file": "file-abc", "include_feedback": "positive",
        "redact": ["cpf", "email"]}
    plain = parser().parse_args(["set", "aeon"])
    assert with_capture({"targets": [{"model": "m"}]}, plain) == {"targets": [{"model": "m"}]}
    # a route file's section is kept and the flags win over it
    from_file = {"targets": [{"model": "m"}], "capture": {"retrain_after": 50, "include_feedback": "positive"}}
    assert with_capture(from_file, parser().parse_args(["set", "aeon", "--retrain-after", "20"]))["capture"] == {
        "retrain_after": 20, "include_feedback": "positive"}
    assert capture_spec(False, None, None, None, None) == {"enabled": False}
    assert capture_spec(True, None, None, None, ["none"]) == {"enabled": True, "redact": []}


def test_the_subcommands_parse() -> None:
    listing = parser().parse_args(["captures", "support/v2", "-o", "out.jsonl", "--unused"])
    assert (listing.name, listing.output, listing.unused, listing.run) == ("support/v2", Path("out.jsonl"), True, run)
    assert parser().parse_args(["retrain", "aeon"]).name == "aeon"
    rated = parser().parse_args(["feedback", "chatcmpl-abc", "down", "--correction", "Chega amanhã."])
    assert (rated.completion_id, rated.rating, rated.correction) == ("chatcmpl-abc", "down", "Chega amanhã.")


def test_an_exchange_on_one_line() -> None:
    item = {"completion_id": "chatcmpl-abc", "messages": [{"role": "system", "content": "Você é a Aeon."},
                                                          {"role": "user", "content": "Meu pedido\n[cpf] chegou?"}],
            "answer": "Ainda não.", "correction": "Chegou ontem.", "feedback": "down", "used_in_job": None}
    assert describe(item) == "chatcmpl-abc - -  Meu pedido [cpf] chegou? => Chegou ontem."
    long = {**item, "correction": None, "feedback": None, "used_in_job": "ftjob-1", "answer": "x" * 100}
    assert describe(long).endswith("=> " + "x" * 59 + "…") and " ftjob-1 " in describe(long)
