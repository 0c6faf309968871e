"""Check each exported GGUF against the trained model before anyone can serve it.

A GGUF with the wrong chat template or end-of-sequence token makes Ollama and
llama.cpp format prompts differently from training: the model "talks gibberish
or never stops". Every file is therefore loaded with llama.cpp and checked for:

- its ``tokenizer.chat_template`` being exactly the family's stock template,
  and its EOS token being the family's;
- prompt tokens: chats rendered with the GGUF's own template and tokenized by
  llama.cpp give the same ids as the trained model's transformers tokenizer;
- a sane greedy answer: non-empty, not one token repeated, no chat-markup
  leaking into the text, and (preferably) stopping on its own.

The results are a report (``verification.json``); any failed check fails the export.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from afina.core.catalog import ChatFamily
from afina.core.errors import ExportFailed

N_CTX = 512
# the probes are a few dozen tokens: half the cores is as fast, and llama.cpp's spinning thread barriers slow down
# by 10-50x when every core is asked for while another process (a trainer on the same host) is busy
VERIFY_THREADS = max(1, min(4, (os.cpu_count() or 2) // 2))
MAX_COMPLETION_TOKENS = 96
MARKUP_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")

# chats whose prompt tokens must match: no system (the stock template adds its default one),
# an explicit system with several turns, and non-ASCII text
TOKEN_PROBES: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Olá! Quanto é 2+2?"},
     {"role": "assistant", "content": "4."},
     {"role": "user", "content": "And in words, with an emoji 🙂?"}],
]
COMPLETION_PROBE: list[dict[str, str]] = TOKEN_PROBES[0]


@dataclass
class GgufCheck:
    """The verification of one GGUF file; ``problems`` empty means it passed."""

    file: str
    variant: str
    bytes: int
    chat_template_matches: bool = False
    eos_token: str | None = None
    eos_matches: bool = False
    prompt_tokens_match: bool = False
    prompt_tokens: int = 0
    completion: str = ""
    completion_tokens: int = 0
    finish_reason: str | None = None
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems


def load_hf_tokenizer(tokenizer_dir: Path, chat_template: str) -> Any:
    """The trained model's tokenizer, with the stock template the export promises."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer.chat_template = chat_template
    return tokenizer


def verify_gguf(path: Path, variant: str, *, family: ChatFamily, hf_tokenizer: Any) -> GgufCheck:
    """Load ``path`` with llama.cpp and run every check; never raises for a bad model, reports it."""
    from llama_cpp import Llama

    check = GgufCheck(file=path.name, variant=variant, bytes=path.stat().st_size)
    started = time.monotonic()
    try:
        llm = Llama(model_path=str(path), n_ctx=N_CTX, n_threads=VERIFY_THREADS, n_threads_batch=VERIFY_THREADS,
                    seed=0, verbose=False)
    except Exception as exc:  # llama.cpp could not read it: nothing else can be checked
        check.problems.append(f"llama.cpp cannot load it: {exc}")
        return check
    try:
        _check_metadata(llm, check, family)
        _check_prompt_tokens(llm, check, hf_tokenizer)
        _check_completion(llm, check, family)
    finally:
        llm.close()
    check.seconds = round(time.monotonic() - started, 2)
    return check


def verify_all(paths: dict[str, Path], *, family: ChatFamily, hf_tokenizer: Any) -> dict[str, Any]:
    """Verify every GGUF (``variant -> path``) and return the report; ``ExportFailed`` if any failed."""
    checks = [verify_gguf(path, variant, family=family, hf_tokenizer=hf_tokenizer) for variant, path in paths.items()]
    report = build_report(checks, family)
    failed = [check for check in checks if not check.passed]
    if failed:
        details = "; ".join(f"{check.file}: {' / '.join(check.problems)}" for check in failed)
        raise VerificationFailed(f"GGUF verification failed: {details}", report=report)
    return report


def build_report(checks: list[GgufCheck], family: ChatFamily) -> dict[str, Any]:
    return {
        "passed": all(check.passed for check in checks),
        "family": family.name,
        "stock_template_sha256": hashlib.sha256(family.stock_template.encode()).hexdigest(),
        "eos_token": family.eos_token,
        "completion_probe": COMPLETION_PROBE,
        "checks": {check.variant: {**asdict(check), "passed": check.passed} for check in checks},
    }


class VerificationFailed(ExportFailed):
    """A GGUF failed verification; ``report`` holds every check for the user to read."""

    code = "export_verification_failed"

    def __init__(self, message: str, *, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


def _check_metadata(llm: Any, check: GgufCheck, family: ChatFamily) -> None:
    template = llm.metadata.get("tokenizer.chat_template")
    check.chat_template_matches = template == family.stock_template
    if template is None:
        check.problems.append("the GGUF carries no tokenizer.chat_template")
    elif not check.chat_template_matches:
        check.problems.append(f"the GGUF's tokenizer.chat_template differs from the stock {family.name} template "
                              f"(at character {_first_difference(template, family.stock_template)}); clients "
                              "would format prompts differently from training")
    check.eos_token = llm.detokenize([llm.token_eos()], special=True).decode("utf-8", errors="replace")
    check.eos_matches = check.eos_token == family.eos_token
    if not check.eos_matches:
        check.problems.append(f"the GGUF's EOS token is {check.eos_token!r}, not {family.eos_token!r}: "
                              "generation would not stop at the end of a turn")


def _check_prompt_tokens(llm: Any, check: GgufCheck, hf_tokenizer: Any) -> None:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if template is None:
        return
    bos = llm.detokenize([llm.token_bos()], special=True).decode("utf-8", errors="replace")
    eos = llm.detokenize([llm.token_eos()], special=True).decode("utf-8", errors="replace")
    for number, messages in enumerate(TOKEN_PROBES, start=1):
        expected_text = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        expected_ids = list(hf_tokenizer(expected_text, add_special_tokens=False)["input_ids"])
        try:
            rendered = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)(messages=messages)
        except Exception as exc:  # a template llama.cpp's Jinja cannot render
            check.problems.append(f"the GGUF's chat template does not render probe chat {number}: {exc}")
            return
        # add_bos=True asks llama.cpp to add BOS only where the GGUF says so, as its chat handler does
        actual_ids = llm.tokenize(rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True)
        if number == 1:
            check.prompt_tokens = len(actual_ids)
        if actual_ids != expected_ids:
            at = _first_difference(actual_ids, expected_ids)
            check.problems.append(f"prompt tokens of probe chat {number} differ from the trained tokenizer's at "
                                  f"position {at} ({len(actual_ids)} vs {len(expected_ids)} tokens)")
            return
    check.prompt_tokens_match = True


def _check_completion(llm: Any, check: GgufCheck, family: ChatFamily) -> None:
    result = llm.create_chat_completion(messages=COMPLETION_PROBE, temperature=0.0, max_tokens=MAX_COMPLETION_TOKENS,
                                        seed=0)
    choice = result["choices"][0]
    text = choice["message"]["content"] or ""
    check.completion = text
    check.finish_reason = choice.get("finish_reason")
    check.completion_tokens = int(result.get("usage", {}).get("completion_tokens", 0))
    if not text.strip():
        check.problems.append("the greedy answer to a short chat is empty")
        return
    leaked = [marker for marker in (*MARKUP_TOKENS, *family.stop) if marker in text]
    if leaked:
        check.problems.append(f"the greedy answer contains chat markup {sorted(set(leaked))}: the template or the "
                              "stop tokens are wrong")
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    if len(tokens) >= 4 and len(set(tokens)) == 1:
        check.problems.append(f"the greedy answer is one token repeated ({text[:40]!r}...)")
    if check.finish_reason != "stop":
        check.warnings.append(f"the greedy answer did not stop within {MAX_COMPLETION_TOKENS} tokens")


def _first_difference(left: Any, right: Any) -> int:
    for index, (a, b) in enumerate(zip(left, right, strict=False)):
        if a != b:
            return index
    return min(len(left), len(right))
