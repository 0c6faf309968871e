"""Safetensors files read and written one tensor at a time, without mapping them into memory.

``safetensors.safe_open`` maps the whole file: every page it touches stays in the process's resident set
while the file is open, so streaming a 2.5 GB checkpoint through it ends with ~2.5 GB resident. Here a
file is its header (8-byte little-endian length, then JSON naming each tensor's dtype, shape and byte
range) plus raw bytes: the header is parsed once, a tensor that must change is read with ``readinto``
into a fresh tensor, and a tensor that passes through unchanged is copied file to file by the kernel
(``os.copy_file_range``) and never enters this process at all.

The format is the one documented at https://huggingface.co/docs/safetensors (header padded with spaces
to 8 bytes, offsets relative to the end of the header, little-endian data).
"""

from __future__ import annotations

import errno
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from afina.core.errors import ExportFailed

if TYPE_CHECKING:
    import torch

HEADER_LENGTH_BYTES = 8
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's own limit
HEADER_ALIGNMENT = 8
COPY_CHUNK_BYTES = 64 * 1024 * 1024
ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
              "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "C64": 8}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


@dataclass(frozen=True)
class TensorSlot:
    """One tensor of one file: its dtype (safetensors spelling), shape and absolute byte range in the file."""

    path: Path
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


def read_header(path: Path) -> dict[str, TensorSlot]:
    """The tensors of a safetensors file by name, in file order; ``ExportFailed`` for a file that is not one."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(HEADER_LENGTH_BYTES)
        if len(prefix) < HEADER_LENGTH_BYTES:
            raise ExportFailed(f"{path.name} is not a safetensors file (shorter than its header length)")
        (header_bytes,) = struct.unpack("<Q", prefix)
        if header_bytes > MAX_HEADER_BYTES or HEADER_LENGTH_BYTES + header_bytes > size:
            raise ExportFailed(f"{path.name} is not a safetensors file (header length {header_bytes})")
        try:
            header = json.loads(handle.read(header_bytes))
        except ValueError:
            raise ExportFailed(f"{path.name} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ExportFailed(f"{path.name} is not a safetensors file (its header is not a JSON object)")
    data_start = HEADER_LENGTH_BYTES + header_bytes
    slots: list[TensorSlot] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = str(entry["dtype"]), tuple(int(dim) for dim in entry["shape"])
            begin, end = (int(offset) for offset in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ExportFailed(f"{path.name}: tensor {name!r} has a malformed header entry") from None
        numel = 1
        for dim in shape:
            numel *= dim
        if not 0 <= begin <= end or data_start + end > size or (
                dtype in ITEM_BYTES and end - begin != numel * ITEM_BYTES[dtype]):
            raise ExportFailed(f"{path.name}: tensor {name!r} has a byte range that does not fit its shape or the "
                               "file (a truncated or corrupt checkpoint)")
        slots.append(TensorSlot(path, name, dtype, shape, data_start + begin, data_start + end))
    slots.sort(key=lambda slot: slot.begin)
    return {slot.name: slot for slot in slots}


def torch_dtype(dtype: str) -> torch.dtype:
    import torch

    return {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[dtype]


def safetensors_dtype(dtype: torch.dtype) -> str:
    import torch

    return {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}[dtype]


def read_tensor(slot: TensorSlot) -> torch.Tensor:
    """A float tensor read into its own (allocator-aligned) memory; nothing of the file stays mapped."""
    import torch

    tensor = torch.empty(slot.shape, dtype=torch_dtype(slot.dtype))
    view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
    with open(slot.path, "rb", buffering=0) as handle:
        handle.seek(slot.begin)
        filled = 0
        while filled < slot.nbytes:
            count = handle.readinto(view[filled:])
            if not count:
                raise ExportFailed(f"{slot.path.name} ended inside tensor {slot.name!r}")
            filled += count
    return tensor


@dataclass(frozen=True)
class OutputTensor:
    """A tensor of an output shard as its header lists it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


class ShardWriter:
    """Writes one safetensors file whose tensors are known up front: the header first, then each tensor's bytes
    in the listed order, so no tensor has to wait in memory for the others."""

    def __init__(self, path: Path, tensors: list[OutputTensor]) -> None:
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for tensor in tensors:
            header[tensor.name] = {"dtype": tensor.dtype, "shape": list(tensor.shape),
                                   "data_offsets": [offset, offset + tensor.nbytes]}
            offset += tensor.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % HEADER_ALIGNMENT)
        self.path = path
        self._pending = list(tensors)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._write_all(struct.pack("<Q", len(encoded)) + encoded)

    def copy_from(self, slot: TensorSlot) -> None:
        """Append ``slot``'s bytes as they are in its file, copied by the kernel."""
        self._expect(slot.nbytes)
        with open(slot.path, "rb", buffering=0) as source:
            offset, left = slot.begin, slot.nbytes
            while left:
                try:
                    copied = os.copy_file_range(source.fileno(), self._fd, min(left, COPY_CHUNK_BYTES), offset)
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    copied = self._copy_through_buffer(source.fileno(), offset, min(left, COPY_CHUNK_BYTES))
                if copied == 0:
                    raise ExportFailed(f"{slot.path.name} ended inside tensor {slot.name!r}")
                offset += copied
                left -= copied

    def write_tensor(self, tensor: torch.Tensor) -> None:
        """Append a computed tensor's bytes (little-endian, row-major)."""
        import torch

        contiguous = tensor.contiguous()
        nbytes = contiguous.numel() * contiguous.element_size()
        self._expect(nbytes)
        if nbytes:
            self._write_all(memoryview(contiguous.reshape(-1).view(torch.uint8).numpy()))

    def close(self) -> None:
        if self._pending:
            os.close(self._fd)
            raise ExportFailed(f"{self.path.name}: {len(self._pending)} tensors planned but never written")
        # no fsync: the merged folder is a work file the next step reads at once, and a crash redoes the export
        os.close(self._fd)

    def _expect(self, nbytes: int) -> None:
        if not self._pending or self._pending[0].nbytes != nbytes:
            expected = self._pending[0].name if self._pending else "nothing"
            raise ExportFailed(f"{self.path.name}: wrote {nbytes} bytes where {expected} was planned")
        self._pending.pop(0)

    def _write_all(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def _copy_through_buffer(self, source_fd: int, offset: int, count: int) -> int:
        data = os.pread(source_fd, count, offset)
        self._write_all(data)
        return len(data)
