"""Duplicate removal that streams: a row seen before is dropped, naming the row it repeats.

Two modes:

- ``exact``: the canonical JSON of the record (sorted keys) — the same conversation byte for byte
  after repairs, weights included;
- ``normalized``: roles plus the text of each message, casefolded, with punctuation removed and
  whitespace collapsed — "Olá, tudo bem?" and "olá tudo bem" are the same question. Weights are
  ignored: a conversation does not become new by muting a reply.

Memory: each row keeps an 8-byte digest, its line and its file in an open-addressing table of
flat arrays (~32 bytes a row at the table's load), so 1M rows cost ~32 MB instead of the ~120 MB
a dict of digests would. With 64-bit digests, the chance that two different rows of a 1M-row
file collide is ~3e-8.
"""

from __future__ import annotations

import hashlib
import re
from array import array
from typing import Any, Literal

import orjson

from afina.ingest.records import Example, RowIssue

DedupMode = Literal["none", "exact", "normalized"]
_PUNCTUATION_AND_SPACE = re.compile(r"[\W_]+")
_INITIAL_SLOTS = 1 << 12


def exact_key(record: dict[str, Any]) -> bytes:
    """The canonical bytes of a record: equal records, and only they, give equal keys."""
    return orjson.dumps(record, option=orjson.OPT_SORT_KEYS)


def normalize_text(text: str) -> str:
    """Casefolded, punctuation-free, whitespace-collapsed text ("Olá,  Mundo!" -> "olá mundo")."""
    return _PUNCTUATION_AND_SPACE.sub(" ", text.casefold()).strip()


def normalized_key(example: Example) -> bytes:
    """The text that decides whether two examples say the same thing, whatever their formatting."""
    if example.messages is not None:
        parts = []
        for message in example.messages:
            if isinstance(message, dict):
                content = message.get("content")
                parts.append(f"{message.get('role')}\x1f{normalize_text(content) if isinstance(content, str) else ''}")
        return "\x1e".join(parts).encode()
    return normalize_text(example.text or "").encode()


def _zeros(typecode: str, count: int) -> array:
    return array(typecode, bytes(array(typecode).itemsize * count))


class DigestTable:
    """A set of 64-bit digests, each remembering where it was first seen; grows by doubling."""

    def __init__(self) -> None:
        self._allocate(_INITIAL_SLOTS)

    def __len__(self) -> int:
        return self._size

    def add(self, digest: int, source: int, line: int) -> tuple[int, int] | None:
        """Insert ``digest``; ``(source, line)`` of its first occurrence when it was already there."""
        digest = digest or 1
        keys, mask = self._keys, self._mask
        slot = digest & mask
        while True:
            current = keys[slot]
            if current == 0:
                break
            if current == digest:
                return self._sources[slot], self._lines[slot]
            slot = (slot + 1) & mask
        keys[slot] = digest
        self._lines[slot] = min(line, 0xFFFFFFFF)
        self._sources[slot] = source
        self._size += 1
        if self._size * 2 > len(keys):
            self._grow()
        return None

    def _grow(self) -> None:
        old = zip(self._keys, self._sources, self._lines, strict=True)
        self._allocate(len(self._keys) * 2)
        for digest, source, line in old:
            if digest:
                self.add(digest, source, line)

    def _allocate(self, slots: int) -> None:
        self._keys = _zeros("Q", slots)  # 0 = empty slot
        self._lines = _zeros("I", slots)
        self._sources = _zeros("H", slots)
        self._mask = slots - 1
        self._size = 0

    def nbytes(self) -> int:
        return sum(len(a) * a.itemsize for a in (self._keys, self._lines, self._sources))


class Deduplicator:
    """Drop rows already seen in this upload (``mode="none"`` keeps everything)."""

    def __init__(self, mode: DedupMode) -> None:
        self.mode = mode
        self.duplicates = 0
        self._table = DigestTable()
        self._source_ids: dict[str, int] = {}
        self._source_names: list[str] = []

    def check(self, example: Example) -> RowIssue | None:
        """None for a first occurrence; a ``dropped`` issue naming the row it repeats otherwise."""
        if self.mode == "none":
            return None
        key = exact_key(example.record()) if self.mode == "exact" else normalized_key(example)
        digest = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
        first = self._table.add(digest, self._source_id(example.source), example.line)
        if first is None:
            return None
        self.duplicates += 1
        source, line = self._source_names[first[0]], first[1]
        where = f"line {line}" if source == example.source else f"{source}, line {line}"
        how = "an exact duplicate" if self.mode == "exact" else \
            "a duplicate (ignoring case, punctuation and whitespace)"
        return RowIssue(example.source, example.line, "messages" if example.messages is not None else "text",
                        f"duplicate_{self.mode}", "dropped", f"{how} of {where}; dropped")

    def memory_bytes(self) -> int:
        """The digest table's size: what deduplicating costs in memory so far."""
        return self._table.nbytes()

    def _source_id(self, source: str) -> int:
        found = self._source_ids.get(source)
        if found is None:
            # an archive with more than 65,535 members shares the last id: only the name in the message suffers
            found = min(len(self._source_names), 0xFFFF)
            if found == len(self._source_names):
                self._source_names.append(source)
            self._source_ids[source] = found
        return found
