"""Token-level checks with the target base model's tokenizer: length, trained tokens, EOS.

What the trainer will see is decided here, before any GPU time is spent: each example is
rendered with the family's *training* template (the stock template plus ``{% generation %}``
markers around what the assistant says), tokenized whole with the fast tokenizer, and masked
exactly like ``afina.trainer.data.encode_example`` does — the tokens from the one holding a
generation span's first character to the one holding its last are trained, unless the reply
has ``weight: 0``; everything is cut at ``max_seq_len``. So an example reported here as having
no trainable token is one the trainer would drop ("all labels are -100").

Speed: rendering uses one compiled template per family (~20 µs a row) and tokenization one
``encode_batch`` call per batch, which the Rust tokenizer spreads over every core; masks come
from the encodings' offsets, never from a per-row ``apply_chat_template``.

Nothing here imports torch, nor transformers at run time: the tokenizer is the ``tokenizer.json``
of the base model's prepared transformers copy (``afina.core.hfmodels``) or, before one exists, a
tokenizer-only copy built once from the model's GGUF or tokenizer files (``load_tokenizer``).
"""

from __future__ import annotations

import fcntl
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from afina.core.catalog import BaseModelSpec, ChatFamily, StoreSource
from afina.core.catalog.rendering import TEMPLATE_TOKEN_KEYS, render_chat, reply_token_runs, template_tokens
from afina.core.catalog.template_refusal import first_refused_message, refused_where
from afina.core.errors import NotFound
from afina.core.hfmodels import COMPLETE_MARKER, base_model_dir
from afina.ingest.records import Example, RowIssue

if TYPE_CHECKING:
    from afina.core.store import ArtifactStore

LengthPolicy = Literal["drop", "truncate", "fail"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "config.json")


class TemplateMismatch(RuntimeError):
    """The training template marked a different number of assistant spans than there are replies (a template bug)."""


class TemplateRenderError(ValueError):
    """The family's template refused this conversation (its ``raise_exception``, or a value it cannot render)."""


@dataclass(frozen=True)
class IngestTokenizer:
    """A base model's fast tokenizer and the special tokens its chat templates may reference."""

    backend: Any  # tokenizers.Tokenizer
    special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token, eos_token, ... as transformers passes

    @classmethod
    def from_dir(cls, directory: Path) -> IngestTokenizer:
        """Load ``tokenizer.json`` (and the special tokens of ``tokenizer_config.json``) from a directory."""
        from tokenizers import Tokenizer

        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        special = {key: _token_text(config[key]) for key in TEMPLATE_TOKEN_KEYS if config.get(key)}
        return cls(Tokenizer.from_file(str(directory / "tokenizer.json")), special)

    @classmethod
    def from_transformers(cls, tokenizer: Any) -> IngestTokenizer:
        """Wrap a transformers fast tokenizer (tests, or a caller that already has one loaded)."""
        return cls(tokenizer.backend_tokenizer, template_tokens(tokenizer))

    def token_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)


def load_tokenizer(spec: BaseModelSpec, cache_dir: Path, store: ArtifactStore | None = None) -> IngestTokenizer:
    """The tokenizer of ``spec`` as the trainer will set it up, from the model cache, built once if needed.

    Order: the full transformers copy the trainer prepares (``<cache>/base/<key>/hf``), else a
    tokenizer-only copy in ``<cache>/base/<key>/tokenizer``, built once under a file lock so
    concurrent workers build it once: from a GGUF's vocabulary (~10 s, no torch), or from a
    transformers folder's tokenizer files (a store model's are downloaded alone; a GGUF in the
    store is downloaded whole). Either way it goes through ``prepare_tokenizer``, the same setup
    the trainer applies (the family's EOS and pad), so both tokenize and render identically.
    """
    hf_dir = base_model_dir(spec, cache_dir)
    if (hf_dir / COMPLETE_MARKER).exists():
        return IngestTokenizer.from_dir(hf_dir)
    target = hf_dir.parent / "tokenizer"
    if not (target / COMPLETE_MARKER).exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.parent / ".tokenizer.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (target / COMPLETE_MARKER).exists():
                partial = target.with_name(target.name + ".partial")
                shutil.rmtree(partial, ignore_errors=True)
                partial.mkdir()
                _save_prepared_tokenizer(spec, partial, store)
                (partial / COMPLETE_MARKER).write_text(spec.id)
                shutil.rmtree(target, ignore_errors=True)
                partial.rename(target)
    return IngestTokenizer.from_dir(target)


def _save_prepared_tokenizer(spec: BaseModelSpec, out_dir: Path, store: ArtifactStore | None) -> None:
    from afina.core.hfmodels import prepare_tokenizer

    source = spec.source
    if isinstance(source, StoreSource):
        if store is None:
            raise NotFound(f"{spec.id} is in the object store, and no store was given to read its tokenizer",
                           param="base_model")
        download = out_dir / "source"
        download.mkdir()
        if source.format == "gguf":
            tokenizer = _tokenizer_from_gguf(source.fetch(store, download))
        else:
            for name in TOKENIZER_FILES:
                if store.exists(f"{source.prefix}/{name}"):
                    store.download_file(f"{source.prefix}/{name}", download / name)
            tokenizer = _tokenizer_from_folder(download)
    else:
        located = source.locate()
        tokenizer = _tokenizer_from_gguf(located) if located.is_file() else _tokenizer_from_folder(located)
    # pad: a tokenizer-only copy may add one where the trainer would refuse the model; it never changes
    # how text is tokenized, and the trainer's own check still applies when it runs
    prepare_tokenizer(tokenizer, spec.family, can_add_tokens=True)
    tokenizer.save_pretrained(str(out_dir))
    shutil.rmtree(out_dir / "source", ignore_errors=True)


def _tokenizer_from_folder(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def _tokenizer_from_gguf(gguf_path: Path) -> Any:
    """A transformers fast tokenizer converted from a GGUF's vocabulary.

    transformers' own GGUF loader reads the file with torch; this reads the metadata with the
    ``gguf`` package instead and hands it to the same converter (``convert_gguf_tokenizer``), so
    the result is the tokenizer ``AutoTokenizer.from_pretrained(..., gguf_file=...)`` makes.
    """
    from gguf import GGUFReader
    from transformers import PreTrainedTokenizerFast

    try:  # transformers >= 5
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_TOKENIZER_MAPPING,
            convert_gguf_tokenizer,
        )
    except ImportError:  # transformers 4.x kept the same converter in integrations.ggml
        from transformers.integrations.ggml import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer  # type: ignore

    reader = GGUFReader(str(gguf_path))
    metadata = {name: reader_field.contents() for name, reader_field in reader.fields.items()
                if name.startswith("tokenizer.") or name == "general.architecture"}
    grouped = {group: {name: metadata[f"tokenizer.{key}"] for key, name in renames.items()
                       if f"tokenizer.{key}" in metadata}
               for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    tokenizer_dict, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        if token_id is not None:
            tokenizer_config[name] = tokenizer_dict["tokens"][token_id]
    backend, extra = convert_gguf_tokenizer(metadata["general.architecture"], tokenizer_dict)
    tokenizer_config.pop("chat_template", None)  # prepare_tokenizer sets the family's own
    return PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)


def _token_text(value: Any) -> str:
    return value["content"] if isinstance(value, dict) else str(value)


# -- masking ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class EncodedChat:
    """One rendered, tokenized example and which of its tokens are trained (before truncation)."""

    text: str
    ids: list[int]
    trained_runs: list[tuple[int, int]]  # [start, end) token ranges trained on (weight 0 replies excluded)
    reply_runs: list[tuple[int, int]]  # every assistant reply's token range, trained or not
    encoding: Any  # the tokenizers.Encoding, for offsets when a preview needs them

    @property
    def offsets(self) -> list[tuple[int, int]]:
        """Character span of each token in ``text``."""
        return self.encoding.offsets


def render_example(example: Example, family: ChatFamily,
                   special_tokens: dict[str, str] | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The text the trainer tokenizes for ``example`` and the character spans it trains on.

    A text example (continued pretraining) is its text followed by the family's EOS token, all trained.
    A conversation the template refuses is a ``TemplateRenderError`` naming the message it refused
    (``messages[0]``: Gemma 2 and a system message) and the template's reason.
    """
    if example.messages is not None:
        try:
            return render_chat(family.training_template, example.messages, special_tokens)
        except Exception as exc:  # jinja2 errors, or a TypeError from a value the template adds to a str
            index = first_refused_message(
                lambda prefix: render_chat(family.training_template, prefix, special_tokens), example.messages)
            raise TemplateRenderError(f"the {family.name} chat template cannot render {refused_where(index)}: "
                                      f"{exc}") from exc
    text = (example.text or "") + family.eos_token
    return text, [(0, len(text))]


def encode_examples(tokenizer: IngestTokenizer, family: ChatFamily, examples: Sequence[Example],
                    rendered: Sequence[tuple[str, list[tuple[int, int]]]] | None = None) -> list[EncodedChat]:
    """Render (unless ``rendered`` is given) and tokenize a batch in one ``encode_batch`` call.

    Raises ``TemplateMismatch`` when the template marks a different number of assistant spans
    than there are replies (the trainer refuses such a template too).
    """
    if rendered is None:
        rendered = [render_example(example, family, tokenizer.special_tokens) for example in examples]
    encodings = tokenizer.backend.encode_batch([text for text, _ in rendered], add_special_tokens=False)
    encoded: list[EncodedChat] = []
    for example, (text, spans), encoding in zip(examples, rendered, encodings, strict=True):
        ids = encoding.ids
        runs = reply_token_runs(encoding, spans, len(ids))
        if example.messages is not None:
            weights = _reply_weights(example)
            if len(runs) != len(weights):
                raise TemplateMismatch(f"the training template marked {len(runs)} assistant span(s) for "
                                       f"{len(weights)} assistant message(s) ({example.source}, line {example.line})")
            trained = [run for run, weight in zip(runs, weights, strict=True) if weight != 0]
        else:
            trained = runs
        encoded.append(EncodedChat(text, ids, trained, runs, encoding))
    return encoded


def _reply_weights(example: Example) -> list[Any]:
    return [message.get("weight", 1) for message in example.messages or () if message.get("role") == "assistant"]


# -- the per-example verdict ------------------------------------------------------------------------

# tokens <= UTF-8 bytes for byte-level BPE and byte-fallback tokenizers (each token covers at least one
# byte of the text); the margins cover a SentencePiece normalizer's word marker ("▁"), which may be
# prepended to the text and to each segment between special tokens (a few per message)
_BYTE_BOUND_MARGIN = 8
_BYTE_BOUND_MARGIN_PER_MESSAGE = 4


@dataclass(slots=True)
class TokenResult:
    """What the tokenizer says about one example, and what the length policy decided.

    ``tokens``/``trained_tokens`` are None for a row that was not tokenized because it provably
    fits (see ``LengthChecker``'s ``count_every``); its verdict is exact all the same.
    """

    tokens: int | None  # the whole rendered example
    trained_tokens: int | None  # tokens the trainer learns from, within max_seq_len
    truncated: bool  # longer than max_seq_len
    eos_trained: bool  # every trained reply within max_seq_len keeps its end-of-turn token
    issues: list[RowIssue] = field(default_factory=list)

    @property
    def keep(self) -> bool:
        """False when an issue removes the row (``dropped``) or makes it invalid (``error``)."""
        return not any(issue.action in ("dropped", "error") for issue in self.issues)


class LengthChecker:
    """Token counts, trained tokens after masking, EOS and the length policy for batches of examples.

    Issue actions: ``dropped`` (policy ``drop``: too long), ``fixed`` (policy ``truncate``: the
    trainer will cut it), ``error`` (policy ``fail`` — the file must fail, whatever the mode — and
    ``no_trainable_tokens``, a row the trainer would drop), ``warning`` (EOS cut from a trained reply).

    Tokenizing is most of ingest's time. With ``count_every=1`` (the default) every row is
    tokenized and every count is exact. With ``count_every=k`` a row is tokenized only when it
    could exceed ``max_seq_len`` (its rendered UTF-8 size, plus a margin, is above it: a token is
    at least one byte) or is every k-th row (a sample for the length statistics); the others provably fit, so
    their verdict needs no tokenizer: a non-empty reply with weight 1 renders at least one
    trained token, its end-of-turn token included, all within the limit.
    """

    def __init__(self, tokenizer: IngestTokenizer, family: ChatFamily, max_seq_len: int,
                 policy: LengthPolicy = "drop", count_every: int = 1) -> None:
        if count_every < 1:
            raise ValueError("count_every must be at least 1")
        self.tokenizer = tokenizer
        self.family = family
        self.max_seq_len = max_seq_len
        self.policy = policy
        self.count_every = count_every
        self.eos_id = tokenizer.token_id(family.eos_token)
        self._seen = 0

    def check_batch(self, examples: Sequence[Example]) -> list[TokenResult]:
        """One ``TokenResult`` per example, in order; pass batches of ~1,000 for the tokenizer's best speed."""
        results: list[TokenResult | None] = [None] * len(examples)
        rendered: list[tuple[str, list[tuple[int, int]]]] = []
        counted: list[int] = []
        for index, example in enumerate(examples):
            try:
                rendered.append(render_example(example, self.family, self.tokenizer.special_tokens))
            except TemplateRenderError as exc:
                rendered.append(("", []))
                results[index] = failed = TokenResult(None, None, False, False)
                self._issue(failed, example, "template_error", "error", str(exc))
                continue
            self._seen += 1
            if self.count_every == 1 or self._seen % self.count_every == 0 or \
                    not self._surely_fits(rendered[-1][0], len(example.messages or ())):
                counted.append(index)
        if counted:
            encoded = encode_examples(self.tokenizer, self.family, [examples[i] for i in counted],
                                      [rendered[i] for i in counted])
            for index, chat in zip(counted, encoded, strict=True):
                results[index] = self._verdict(examples[index], chat)
        return [result if result is not None else self._verdict_without_tokens(example)
                for example, result in zip(examples, results, strict=True)]

    def _surely_fits(self, text: str, messages: int) -> bool:
        budget = self.max_seq_len - _BYTE_BOUND_MARGIN - _BYTE_BOUND_MARGIN_PER_MESSAGE * messages
        # a character is at most 4 UTF-8 bytes: most rows are decided without encoding them
        return len(text) * 4 <= budget or (len(text) <= budget and len(text.encode()) <= budget)

    def _verdict(self, example: Example, encoded: EncodedChat) -> TokenResult:
        limit = self.max_seq_len
        total = len(encoded.ids)
        kept_runs = [(start, min(end, limit)) for start, end in encoded.trained_runs if start < limit]
        trained = sum(end - start for start, end in kept_runs)
        eos_trained = self.eos_id is not None and all(
            self.eos_id in encoded.ids[start:end] for start, end in kept_runs)
        result = TokenResult(total, trained, total > limit, eos_trained)
        if total > limit:
            if self.policy == "drop":
                self._issue(result, example, "too_long", "dropped",
                            f"{total} tokens > max_seq_len {limit}; dropped "
                            "(length_policy drop: raise max_seq_len or use truncate)")
                return result
            if self.policy == "fail":
                self._issue(result, example, "too_long", "error",
                            f"{total} tokens > max_seq_len {limit} (length_policy fail)")
                return result
            if trained:
                self._issue(result, example, "truncated", "fixed",
                            f"{total} tokens > max_seq_len {limit}: training sees the first {limit} "
                            f"({trained} trained token(s) kept)")
        if not trained:
            why = (f"after truncation to max_seq_len {limit}, no assistant token is left to train on"
                   if encoded.trained_runs else "no assistant token to train on (every reply has weight 0)")
            self._issue(result, example, "no_trainable_tokens", "error", f"{why}: every label would be -100")
        elif not eos_trained:
            self._issue(result, example, "eos_not_trained", "warning",
                        f"a trained reply does not end with {self.family.eos_token!r} within max_seq_len {limit}: "
                        "the model would not learn to stop there")
        return result

    def _verdict_without_tokens(self, example: Example) -> TokenResult:
        result = TokenResult(None, None, False, True)
        if example.messages is not None and not any(weight != 0 for weight in _reply_weights(example)):
            self._issue(result, example, "no_trainable_tokens", "error",
                        "no assistant token to train on (every reply has weight 0): every label would be -100")
        return result

    @staticmethod
    def _issue(result: TokenResult, example: Example, rule: str, action: Any, detail: str) -> None:
        field_name = "messages" if example.messages is not None else "text"
        result.issues.append(RowIssue(example.source, example.line, field_name, rule, action, detail))
