"""The key-value header of a GGUF file, read without llama.cpp, numpy or torch.

The catalog only needs a few keys (``general.architecture``, ``tokenizer.chat_template``, the context
length) to tell a GGUF's family before anything loads it; large arrays (the vocabulary) are skipped.
GGUF layout: magic ``GGUF``, version (u32), tensor count and key-value count (u64 each, u32 in v1),
then ``key (string), value type (u32), value`` pairs.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from afina.core.errors import InvalidRequest

MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# A header is user input (a .gguf path or store:// model): these bound what reading one may cost. Real
# models stay far below them (a 262k-token vocabulary, a few 100k merges, tens of MB of header in all).
MAX_STRING = 64 * 1024 * 1024  # bytes of one string (a chat template is a few KB)
MAX_ARRAY_ITEMS = 2 * 1024 * 1024  # items of one array (8x the largest vocabulary; bounds the time too)
MAX_ARRAY_DEPTH = 4  # arrays of arrays (the format allows nesting; no model uses more than one level)
MAX_PAIRS = 1024 * 1024  # key-value pairs
MAX_HEADER_BYTES = 256 * 1024 * 1024  # bytes read before the header ends
_SKIP_CHUNK = 1024 * 1024


class GgufMetadataError(ValueError):
    """The header is not one afina reads: malformed, or past a limit above."""


class _Reader:
    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.consumed = 0

    def _budget(self, size: int) -> None:
        self.consumed += size
        if self.consumed > MAX_HEADER_BYTES:
            raise GgufMetadataError(f"GGUF header is larger than {MAX_HEADER_BYTES // (1024 * 1024)} MiB")

    def take(self, size: int) -> bytes:
        self._budget(size)
        data = self.stream.read(size)
        if len(data) != size:
            raise GgufMetadataError("GGUF header ends early")
        return data

    def skip(self, size: int) -> None:
        """Move past ``size`` bytes in bounded reads (a huge count never becomes one huge allocation)."""
        self._budget(size)
        while size > 0:
            data = self.stream.read(min(size, _SKIP_CHUNK))
            if not data:
                raise GgufMetadataError("GGUF header ends early")
            size -= len(data)

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        size = self.unpack("<Q")
        if size > MAX_STRING:
            raise GgufMetadataError(f"GGUF string of {size} bytes (more than {MAX_STRING // (1024 * 1024)} MiB)")
        return self.take(size).decode("utf-8", errors="replace")

    def value(self, kind: int, keep: bool, depth: int = 0) -> Any:
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise GgufMetadataError(f"GGUF arrays nested more than {MAX_ARRAY_DEPTH} deep")
            item_kind, count = self.unpack("<I"), self.unpack("<Q")
            if count > MAX_ARRAY_ITEMS:
                raise GgufMetadataError(f"GGUF array of {count} items (more than {MAX_ARRAY_ITEMS})")
            if not keep and item_kind in _SCALARS:
                self.skip(count * struct.calcsize(_SCALARS[item_kind]))
                return count
            if not keep:
                for _ in range(count):
                    self.value(item_kind, keep, depth + 1)
                return count
            return [self.value(item_kind, keep, depth + 1) for _ in range(count)]
        raise GgufMetadataError(f"unknown GGUF value type {kind}")


def read_gguf_metadata(stream: BinaryIO, *, keep_arrays: bool = False) -> dict[str, Any]:
    """Every key-value pair of the header; an array is replaced by its length unless ``keep_arrays``.

    Raises ``GgufMetadataError`` (a ``ValueError``) for a header that is malformed or past a limit.
    """
    reader = _Reader(stream)
    try:
        if reader.take(4) != MAGIC:
            raise GgufMetadataError("not a GGUF file (bad magic)")
        version = reader.unpack("<I")
        count_format = "<I" if version == 1 else "<Q"
        reader.unpack(count_format)  # tensor count
        pairs = reader.unpack(count_format)
        if pairs > MAX_PAIRS:
            raise GgufMetadataError(f"GGUF header claims {pairs} key-value pairs (more than {MAX_PAIRS})")
        metadata: dict[str, Any] = {}
        for _ in range(pairs):
            key = reader.string()
            metadata[key] = reader.value(reader.unpack("<I"), keep_arrays)
    except struct.error as exc:
        raise GgufMetadataError(f"GGUF header is malformed ({exc})") from None
    return metadata


def read_gguf_stream(stream: BinaryIO, *, name: str) -> dict[str, Any]:
    """``read_gguf_metadata`` with a 400 naming the model (``name``, as the user gave it) when it is no readable
    GGUF; the message says what is wrong with the header, never where the file is."""
    try:
        return read_gguf_metadata(stream)
    except (ValueError, EOFError) as exc:
        raise InvalidRequest(f"model {name!r} is not a readable GGUF file: {exc}", param="model",
                             code="invalid_gguf") from None
    except OSError:  # its text may carry a path
        raise InvalidRequest(f"model {name!r} is not a readable GGUF file", param="model",
                             code="invalid_gguf") from None


def gguf_metadata(path: Path, *, name: str | None = None) -> dict[str, Any]:
    """``read_gguf_stream`` of a file; ``name`` is what the user called it (the file name by default)."""
    try:
        with path.open("rb") as handle:
            return read_gguf_stream(handle, name=name or path.name)
    except OSError:
        raise InvalidRequest(f"model {name or path.name!r} is not a readable GGUF file", param="model",
                             code="invalid_gguf") from None


class ChunkStream:
    """A read-only file-like view of an iterator of byte chunks (an object in the store, read from the start)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks = chunks
        self.buffer = b""
        self.position = 0  # of the next byte to read in buffer; small reads never copy the whole buffer

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self.buffer) - self.position < size:
            chunk = next(self.chunks, None)
            if chunk is None:
                break
            self.buffer = self.buffer[self.position:] + chunk
            self.position = 0
        end = len(self.buffer) if size < 0 else self.position + size
        data = self.buffer[self.position:end]
        self.position += len(data)
        return data


def config_from_gguf(metadata: dict[str, Any]) -> dict[str, Any]:
    """The ``config.json`` fields the catalog uses, from GGUF keys (``<arch>.context_length`` …)."""
    arch = str(metadata.get("general.architecture") or "")
    return {
        "model_type": arch,
        "max_position_embeddings": metadata.get(f"{arch}.context_length"),
        "hidden_size": metadata.get(f"{arch}.embedding_length"),
        "num_hidden_layers": metadata.get(f"{arch}.block_count"),
        "intermediate_size": metadata.get(f"{arch}.feed_forward_length"),
        "num_attention_heads": metadata.get(f"{arch}.attention.head_count"),
        "num_key_value_heads": metadata.get(f"{arch}.attention.head_count_kv"),
        "vocab_size": metadata.get("tokenizer.ggml.tokens"),
    }
