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
MAX_STRING = 64 * 1024 * 1024


class _Reader:
    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream

    def take(self, size: int) -> bytes:
        data = self.stream.read(size)
        if len(data) != size:
            raise EOFError("GGUF header ends early")
        return data

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        size = self.unpack("<Q")
        if size > MAX_STRING:
            raise ValueError(f"GGUF string of {size} bytes")
        return self.take(size).decode("utf-8", errors="replace")

    def value(self, kind: int, keep: bool) -> Any:
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind, count = self.unpack("<I"), self.unpack("<Q")
            if not keep and item_kind in _SCALARS:
                self.take(count * struct.calcsize(_SCALARS[item_kind]))
                return count
            items = [self.value(item_kind, keep) for _ in range(count)]
            return items if keep else count
        raise ValueError(f"unknown GGUF value type {kind}")


def read_gguf_metadata(stream: BinaryIO, *, keep_arrays: bool = False) -> dict[str, Any]:
    """Every key-value pair of the header; an array is replaced by its length unless ``keep_arrays``."""
    reader = _Reader(stream)
    if reader.take(4) != MAGIC:
        raise ValueError("not a GGUF file (bad magic)")
    version = reader.unpack("<I")
    count_format = "<I" if version == 1 else "<Q"
    reader.unpack(count_format)  # tensor count
    pairs = reader.unpack(count_format)
    metadata: dict[str, Any] = {}
    for _ in range(pairs):
        key = reader.string()
        metadata[key] = reader.value(reader.unpack("<I"), keep_arrays)
    return metadata


def gguf_metadata(path: Path) -> dict[str, Any]:
    """``read_gguf_metadata`` of a file, with a 400 naming ``model`` when it is no readable GGUF."""
    try:
        with path.open("rb") as handle:
            return read_gguf_metadata(handle)
    except (OSError, ValueError, EOFError, struct.error) as exc:
        raise InvalidRequest(f"{path} is not a readable GGUF file: {exc}", param="model") from None


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
