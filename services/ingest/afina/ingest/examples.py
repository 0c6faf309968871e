"""The per-example half of ingest, in batches, in this process or spread over worker processes.

Reading and converting a file is sequential (a transcript or a paired archive spans rows),
and so is deduplicating it (the first occurrence wins). Everything between is per example
and independent: repair, validation, rendering with the chat template, tokenizing, and
serializing the record with the digest its split is drawn from. ``prepare_batch`` does that
for a batch; ``BatchRunner`` runs it here (small files) or in worker processes (large files:
the machine's other cores), always handing results back in input order, so the output is
the same bytes either way.

Token statistics are sampled per batch position (a fresh ``LengthChecker`` per batch), which
makes the sample independent of which process did a batch.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import re
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import orjson

from afina.core.catalog import ChatFamily
from afina.core.datasets.options import IngestOptions
from afina.core.logging import log_event
from afina.ingest import tokens
from afina.ingest.dedup import normalize_text
from afina.ingest.records import Example, RowIssue
from afina.ingest.repair import repair_example
from afina.ingest.validate import check_example

Item = Example | RowIssue
log = logging.getLogger("afina.ingest")


@dataclass(slots=True)
class Prepared:
    """One example after the per-example stages.

    ``found`` are validation issues (repairs are already on ``example.issues``); ``token`` is None
    when the example is invalid; ``line`` is the record as written to its split file, and
    ``digest`` its sha256 (``split.record_digest``), from which the hash split is drawn.
    """

    example: Example
    found: list[RowIssue] = field(default_factory=list)
    token: tokens.TokenResult | None = None
    line: bytes | None = None
    digest: str | None = None
    duplicate_key: str | None = None  # a digest of the deduplicator's key (see ``dedup_stand_in``)

    @property
    def valid(self) -> bool:
        return not any(issue.action in ("error", "dropped") for issue in (*self.example.issues, *self.found))


@dataclass(frozen=True)
class BatchContext:
    """What ``prepare_batch`` needs; sent once to each worker process."""

    options: IngestOptions
    tokenizer: tokens.IngestTokenizer
    family: ChatFamily
    count_every: int


def prepare_batch(context: BatchContext, items: list[Item]) -> list[Prepared | RowIssue]:
    """Repair, validate, token-check and serialize every example of ``items``; issues pass through in place."""
    out: list[Prepared | RowIssue] = []
    to_check: list[Prepared] = []
    for item in items:
        if isinstance(item, RowIssue):
            out.append(item)
            continue
        example = repair_example(item) if context.options.repairs else item
        prepared = Prepared(example, check_example(example))
        out.append(prepared)
        if prepared.valid:
            to_check.append(prepared)
    if to_check:
        checker = tokens.LengthChecker(context.tokenizer, context.family, context.options.max_seq_len,
                                       context.options.length_policy, count_every=context.count_every)
        for prepared, result in zip(to_check, checker.check_batch([p.example for p in to_check]), strict=True):
            prepared.token = result
            prepared.line = orjson.dumps(prepared.example.record(), option=orjson.OPT_SORT_KEYS)
            prepared.digest = hashlib.sha256(prepared.line).hexdigest()
            prepared.duplicate_key = _duplicate_key(context.options.deduplicate, prepared)
    return out


def _duplicate_key(mode: str, prepared: Prepared) -> str | None:
    """128 bits of the deduplicator's own key for this example (computed here, off the main process)."""
    if mode == "none":
        return None
    if mode == "exact":  # dedup.exact_key is the record's sorted-keys JSON: exactly ``line``
        return prepared.digest[:32] if prepared.digest else None
    return hashlib.sha256(fast_normalized_key(prepared.example)).hexdigest()[:32]


# bytes.translate table over Latin-1: letters and digits (str.isalnum, what the regex's \\w means) kept,
# everything else a space
_LATIN1_NON_WORD = bytes(c if chr(c).isalnum() else 32 for c in range(256))
_SPACE_RUNS = re.compile(rb"  +")


def _normalized_text(text: str) -> str:
    """``dedup.normalize_text``, several times faster on Latin text (most rows), the same string always.

    ``[\\W_]`` in a str pattern is "not ``str.isalnum``", so once casefolded text fits Latin-1,
    mapping those characters to spaces byte-wise and collapsing the runs gives exactly what the
    regular expression does; any other text goes through ``normalize_text`` itself. A test holds
    the two equal.
    """
    folded = text.casefold()
    try:
        raw = folded.encode("latin-1")
    except UnicodeEncodeError:
        return normalize_text(text)
    return _SPACE_RUNS.sub(b" ", raw.translate(_LATIN1_NON_WORD)).strip(b" ").decode("latin-1")


def fast_normalized_key(example: Example) -> bytes:
    """``dedup.normalized_key``, byte for byte, with the Latin-1 fast path (normalizing is dedup's main cost)."""
    if example.messages is not None:
        parts = []
        for message in example.messages:
            if isinstance(message, dict):
                content = message.get("content")
                text = _normalized_text(content) if isinstance(content, str) else ""
                parts.append(f"{message.get('role')}\x1f{text}")
        return "\x1e".join(parts).encode()
    return _normalized_text(example.text or "").encode()


def dedup_stand_in(prepared: Prepared) -> Example:
    """What the main process hands ``Deduplicator.check``: the example's place, its key already digested.

    Normalizing a conversation for deduplication is the costliest step of the sequential part
    (casefolding and stripping punctuation from every message); the workers do it, and the
    deduplicator sees a stand-in whose whole content is that digest. Equal keys give equal
    digests, so the verdict, the row it names and the issue it reports are the ones the real
    example would get (field ``messages`` or ``text`` as the example has).
    """
    example, key = prepared.example, prepared.duplicate_key
    if example.messages is not None:
        return Example(example.source, example.line, messages=[{"role": "key", "content": key}])
    return Example(example.source, example.line, text=key)


# -- in worker processes ------------------------------------------------------------------------

_worker_context: BatchContext | None = None


def _init_worker(context: BatchContext) -> None:
    global _worker_context
    _worker_context = context


def _prepare_in_worker(items: list[Item]) -> list[Any]:
    assert _worker_context is not None, "worker not initialized"
    return [_pack(prepared) for prepared in prepare_batch(_worker_context, items)]


def _pack(prepared: Prepared | RowIssue) -> Any:
    """A flat tuple for the trip back: a valid example travels as its serialized record (``line``), which
    unpickles and parses much faster than its nested dicts would unpickle."""
    if isinstance(prepared, RowIssue) or prepared.line is None:
        return prepared
    example = prepared.example
    return (example.source, example.line, example.split, example.messages is not None, example.issues,
            prepared.found, prepared.token, prepared.line, prepared.digest, prepared.duplicate_key)


def _unpack(packed: Any) -> Prepared | RowIssue:
    if not isinstance(packed, tuple):
        return packed
    source, line_number, split, is_chat, issues, found, token, line, digest, duplicate_key = packed
    record = orjson.loads(line)
    example = Example(source, line_number, messages=record["messages"] if is_chat else None,
                      text=None if is_chat else record["text"], split=split, issues=issues)
    return Prepared(example, found, token, line, digest, duplicate_key)


class BatchRunner:
    """Runs ``prepare_batch`` over a stream of items, in order, with at most a few batches in flight.

    ``processes`` of 0 or 1 runs everything in this process. Worker processes are spawned (not
    forked: the tokenizer's thread pool and the caller's threads do not survive a fork); if they
    cannot be started here (a daemonic parent, a sandbox), the runner falls back to this process.
    """

    def __init__(self, context: BatchContext, *, processes: int = 0, batch_size: int = 512) -> None:
        self.context = context
        self.batch_size = batch_size
        self.processes = processes if processes > 1 else 0
        self._pool: ProcessPoolExecutor | None = None
        self._saved_config: dict[str, Any] = {}

    def __enter__(self) -> BatchRunner:
        if self.processes:
            self._allow_children()
            try:
                self._pool = ProcessPoolExecutor(max_workers=self.processes,
                                                 mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_init_worker, initargs=(self.context,))
                self._pool.submit(int).result()  # start one now: a failure to spawn shows here
            except Exception as exc:  # noqa: BLE001 - any failure to start workers: do the work here instead
                log_event(log, "ingest.processes_unavailable", logging.WARNING, processes=self.processes,
                          error=f"{type(exc).__name__}: {exc}")
                self.close()
                self.processes = 0
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._saved_config:
            multiprocessing.current_process()._config.update(self._saved_config)  # noqa: SLF001
            self._saved_config = {}

    def _allow_children(self) -> None:
        """Let a Celery prefork child start the pool, for as long as the pool runs.

        Such a child is daemonic, and multiprocessing refuses children to daemonic processes so none
        outlives its parent: here the pool is shut down before the runner returns, and a worker whose
        parent dies reads EOF on its task queue and exits, so the rule's purpose holds. Its authkey is
        billiard's, which multiprocessing cannot hand to a spawned child; the pool's pipes never use
        it, so the pool gets a fresh one. Both are put back in ``close``.
        """
        config = multiprocessing.current_process()._config  # noqa: SLF001 - neither has a public setter
        if config.get("daemon"):
            self._saved_config["daemon"] = config["daemon"]
            config["daemon"] = False
        authkey = config.get("authkey")
        if authkey is not None and type(authkey) is not multiprocessing.process.AuthenticationString:
            self._saved_config["authkey"] = authkey
            config["authkey"] = multiprocessing.process.AuthenticationString(os.urandom(32))

    def run(self, items: Iterable[Item]) -> Iterator[Prepared | RowIssue]:
        """Everything ``prepare_batch`` makes of ``items``, in their order."""
        if self._pool is None:
            for batch in _batches(items, self.batch_size):
                yield from prepare_batch(self.context, batch)
            return
        in_flight: deque[Future[list[Any]]] = deque()
        window = 2 * self.processes
        for batch in _batches(items, self.batch_size):
            in_flight.append(self._pool.submit(_prepare_in_worker, batch))
            if len(in_flight) >= window:
                yield from map(_unpack, in_flight.popleft().result())
        while in_flight:
            yield from map(_unpack, in_flight.popleft().result())


def _batches(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    batch: list[Item] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
