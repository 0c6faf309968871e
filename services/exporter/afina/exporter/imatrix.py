"""An importance matrix from the job's own training texts, for the low-bit GGUF variants.

llama.cpp's quantizer can weight each weight column's rounding error by how large that column's inputs
are in practice (the mean of the squared activations entering the matrix multiplication): columns that
carry large activations on the user's data are kept more exactly. llama.cpp computes this with its
``llama-imatrix`` tool, which is not in ``llama-cpp-python``; the same statistic is gathered here in
process with the pieces the library does expose:

- ``llama_context_params.cb_eval``, the scheduler's evaluation callback: asked about every graph node,
  it is handed each matrix multiplication whose weight is a layer tensor (``blk.*``) after it ran, and
  reads the input activations (``src[1]``) to add up their squares per column;
- ``llama_model_quantize_params.imatrix``, a C array of ``{name, data, size}`` entries (ended by a null
  name) that the quantizer matches to tensors by name; ``data`` holds the per-column means.

The text is cut into chunks of ``chunk_tokens`` (each starting with BOS where the model wants one, the
memory cleared between chunks), as ``llama-imatrix`` does. The output tensor is left out and mixture-of-
experts multiplications (``MUL_MAT_ID``) are not collected: their tensors are quantized without an
importance matrix, as llama.cpp allows for these variants. ``save``/``load`` use llama.cpp's GGUF imatrix
layout (``<tensor>.in_sum2`` and ``<tensor>.counts``), so the file also works with ``llama-quantize``.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from afina.core.errors import ExportFailed

CHUNK_TOKENS = 512
MAX_CHUNKS = 32
MIN_CHUNK_TOKENS = 16  # a shorter tail is not worth a decode (llama-imatrix ignores batches under 16 tokens)
GGML_MAX_DIMS = 4
GGML_MAX_SRC = 10
GGML_MAX_OP_PARAMS = 64
GGML_MAX_NAME = 64
GGML_TYPE_F32 = 0
COLLECTED_OPS = (b"MUL_MAT",)
LAYER_PREFIX = "blk."


class _GgmlTensor(ctypes.Structure):
    """``struct ggml_tensor`` as ``ggml.h`` declares it (checked against ``ggml_get_name`` before use)."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


@dataclass
class ImportanceMatrix:
    """Per weight tensor (GGUF name): the sums of squared inputs per column, and how many rows were summed.

    ``sums[name]`` has shape ``(n_mat, n_columns)`` (``n_mat`` is 1 for a plain 2-D weight), ``counts[name]``
    shape ``(n_mat,)``. The quantizer is given ``sums / counts``, the mean squared activation.
    """

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    chunks: int = 0
    chunk_tokens: int = CHUNK_TOKENS
    tokens: int = 0
    datasets: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def means(self, name: str) -> np.ndarray:
        """The mean squared input of each column of ``name``, flattened as llama.cpp reads it."""
        counts = np.maximum(self.counts[name], 1.0)[:, None]
        return np.ascontiguousarray((self.sums[name] / counts).reshape(-1), dtype=np.float32)

    def to_c(self) -> CImportanceMatrix:
        """The C array ``llama_model_quantize_params.imatrix`` points at (keep the result alive while quantizing)."""
        import llama_cpp

        names = sorted(name for name in self.sums if self.counts[name].max() > 0)
        buffers = [self.means(name) for name in names]
        for name, values in zip(names, buffers, strict=True):
            if not np.isfinite(values).all():
                raise ExportFailed(f"the importance matrix of {name} holds non-finite values; export without imatrix")
        entries = (llama_cpp.llama_model_imatrix_data * (len(names) + 1))()
        encoded = [name.encode() for name in names]
        for index, (raw_name, values) in enumerate(zip(encoded, buffers, strict=True)):
            entries[index].name = raw_name
            entries[index].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[index].size = values.size
        entries[len(names)].name = None  # the end of the list
        return CImportanceMatrix(array=entries, buffers=buffers, names=encoded)

    def save(self, path: Path) -> None:
        """Write llama.cpp's GGUF imatrix file (usable with ``llama-quantize --imatrix``)."""
        import gguf

        writer = gguf.GGUFWriter(str(path), arch="")
        writer.add_string("general.type", "imatrix")
        writer.add_array("imatrix.datasets", self.datasets or ["afina training data"])
        writer.add_uint32("imatrix.chunk_count", self.chunks)
        writer.add_uint32("imatrix.chunk_size", self.chunk_tokens)
        for name in sorted(self.sums):
            writer.add_tensor(f"{name}.in_sum2", np.ascontiguousarray(self.sums[name], dtype=np.float32))
            writer.add_tensor(f"{name}.counts", np.ascontiguousarray(self.counts[name][:, None], dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    @classmethod
    def load(cls, path: Path) -> ImportanceMatrix:
        """Read a GGUF imatrix file (this module's or ``llama-imatrix``'s)."""
        import gguf

        reader = gguf.GGUFReader(str(path))
        kind = reader.get_field("general.type")
        if kind is None or kind.contents() != "imatrix":
            raise ExportFailed(f"{path.name} is not a GGUF importance matrix (general.type is not 'imatrix')")
        tensors = {tensor.name: np.array(tensor.data, dtype=np.float32) for tensor in reader.tensors}
        matrix = cls()
        for tensor_name, data in tensors.items():
            if not tensor_name.endswith(".in_sum2"):
                continue
            name = tensor_name.removesuffix(".in_sum2")
            counts = tensors.get(f"{name}.counts")
            if counts is None:
                raise ExportFailed(f"{path.name} has {tensor_name} without {name}.counts")
            matrix.counts[name] = counts.reshape(-1)
            matrix.sums[name] = data.reshape(len(matrix.counts[name]), -1)
        for key, attribute in (("imatrix.chunk_count", "chunks"), ("imatrix.chunk_size", "chunk_tokens")):
            found = reader.get_field(key)
            if found is not None:
                setattr(matrix, attribute, int(found.contents()))
        datasets = reader.get_field("imatrix.datasets")
        matrix.datasets = list(datasets.contents()) if datasets is not None else []
        return matrix


@dataclass(frozen=True)
class CImportanceMatrix:
    """The C entries and the buffers they point into (the quantizer copies them before it returns)."""

    array: Any
    buffers: list[np.ndarray]
    names: list[bytes]

    @property
    def pointer(self) -> Any:
        import llama_cpp

        return ctypes.cast(self.array, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))


def compute_imatrix(gguf_path: Path, texts: Sequence[str], *, chunk_tokens: int = CHUNK_TOKENS,
                    max_chunks: int = MAX_CHUNKS, threads: int | None = None, dataset: str = "training data",
                    check_continue: Callable[[], None] | None = None) -> ImportanceMatrix:
    """Run the 16-bit GGUF over ``texts`` (the job's rendered training conversations) and collect the matrix.

    At most ``max_chunks`` chunks of ``chunk_tokens`` tokens are evaluated (the texts are joined first).
    ``ExportFailed`` when the texts give no chunk or nothing could be collected.
    """
    import llama_cpp

    started = time.monotonic()
    library = _ggml_library()
    model = _load_model(gguf_path)
    context = batch = None
    collector = _Collector(library)
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        chunks = _chunks(vocab, texts, chunk_tokens=chunk_tokens, max_chunks=max_chunks)
        if not chunks:
            raise ExportFailed(f"the training texts hold fewer than {MIN_CHUNK_TOKENS} tokens: too little to compute "
                               "an importance matrix; export without imatrix")
        longest = max(len(chunk) for chunk in chunks)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = longest
        params.n_batch = longest
        params.n_ubatch = longest  # one chunk is one micro-batch: every multiplication sees the whole chunk
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = threads or max(1, _cpu_count() // 2)
        params.cb_eval = collector.callback
        params.cb_eval_user_data = None
        context = llama_cpp.llama_init_from_model(model, params)
        if context is None:
            raise ExportFailed(f"llama.cpp could not make a context for {gguf_path.name} to compute the imatrix")
        batch = llama_cpp.llama_batch_init(longest, 0, 1)
        for chunk in chunks:
            if check_continue is not None:
                check_continue()
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(context), True)
            _fill_batch(batch, chunk)
            status = llama_cpp.llama_decode(context, batch)
            if status != 0:
                raise ExportFailed(f"llama.cpp failed to evaluate a chunk for the imatrix (status {status})")
            collector.raise_if_failed()
    finally:
        if batch is not None:
            llama_cpp.llama_batch_free(batch)
        if context is not None:
            llama_cpp.llama_free(context)
        llama_cpp.llama_model_free(model)
    if not collector.sums:
        raise ExportFailed(f"no layer multiplication was seen while evaluating {gguf_path.name}: no imatrix")
    return ImportanceMatrix(sums=collector.sums, counts=collector.counts, chunks=len(chunks),
                            chunk_tokens=chunk_tokens, tokens=sum(len(chunk) for chunk in chunks), datasets=[dataset],
                            seconds=round(time.monotonic() - started, 2))


class _Collector:
    """The evaluation callback: squares of the inputs of every layer multiplication, summed per column."""

    def __init__(self, library: ctypes.CDLL) -> None:
        import llama_cpp

        self._library = library
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, np.ndarray] = {}
        self._layout_checked = False
        self._error: BaseException | None = None
        # a bound method wrapped once; the context keeps only the raw pointer, so this object must outlive it
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._on_node)

    def raise_if_failed(self) -> None:
        if self._error is not None:
            raise ExportFailed(f"collecting the importance matrix failed: {self._error}") from self._error

    def _on_node(self, tensor_pointer: int | None, ask: bool, user_data: int | None) -> bool:
        try:
            return self._handle(tensor_pointer, ask)
        except Exception as exc:  # an exception cannot cross into C: keep it and stop the graph
            self._error = exc
            return False

    def _handle(self, tensor_pointer: int | None, ask: bool) -> bool:
        if not tensor_pointer:
            return False
        node = _GgmlTensor.from_address(tensor_pointer)
        if not self._layout_checked:
            self._check_layout(tensor_pointer, node)
        if self._library.ggml_op_name(node.op) not in COLLECTED_OPS or not node.src[0] or not node.src[1]:
            return False
        weight = _GgmlTensor.from_address(node.src[0])
        name = _weight_name(weight.name.decode("utf-8", errors="replace"))
        if not name.startswith(LAYER_PREFIX):
            return False
        inputs = _GgmlTensor.from_address(node.src[1])
        if inputs.type != GGML_TYPE_F32:
            return False
        if ask:
            return True
        self._accumulate(name, weight, node.src[1], inputs)
        return True

    def _check_layout(self, tensor_pointer: int, node: _GgmlTensor) -> None:
        expected = self._library.ggml_get_name(ctypes.c_void_p(tensor_pointer))
        if expected != node.name:
            raise RuntimeError("this llama.cpp's struct ggml_tensor differs from ggml.h as afina reads it")
        self._layout_checked = True

    def _accumulate(self, name: str, weight: _GgmlTensor, inputs_pointer: int, inputs: _GgmlTensor) -> None:
        size = int(self._library.ggml_nbytes(ctypes.c_void_p(inputs_pointer)))
        raw = ctypes.create_string_buffer(size)
        self._library.ggml_backend_tensor_get(ctypes.c_void_p(inputs_pointer), raw, ctypes.c_size_t(0),
                                              ctypes.c_size_t(size))
        shape = tuple(int(inputs.ne[axis]) for axis in reversed(range(GGML_MAX_DIMS)))  # (ne3, ne2, ne1, ne0)
        strides = tuple(int(inputs.nb[axis]) for axis in reversed(range(GGML_MAX_DIMS)))
        values = np.lib.stride_tricks.as_strided(np.frombuffer(raw, dtype=np.float32), shape=shape, strides=strides)
        squares = np.square(values, dtype=np.float64).sum(axis=2)  # (ne3, ne2, ne0): summed over rows
        weight_mats = (int(weight.ne[3]), int(weight.ne[2]))
        columns = int(inputs.ne[0])
        total = self.sums.get(name)
        if total is None:
            total = self.sums[name] = np.zeros((weight_mats[0] * weight_mats[1], columns), dtype=np.float64)
            self.counts[name] = np.zeros(weight_mats[0] * weight_mats[1], dtype=np.float64)
        # inputs broadcast over the weight's matrices (its dims 2 and 3), as ggml_mul_mat does
        for i3 in range(shape[0]):
            for i2 in range(shape[1]):
                matrix = (i3 % weight_mats[0]) * weight_mats[1] + (i2 % weight_mats[1])
                total[matrix] += squares[i3, i2]
                self.counts[name][matrix] += shape[2]


def _fill_batch(batch: Any, chunk: list[int]) -> None:
    """One sequence from position 0 with an output at every token: llama.cpp then runs the last layer on every
    row (asked for the final token only, it drops the other rows before the last layer's feed-forward)."""
    batch.n_tokens = len(chunk)
    for index, token in enumerate(chunk):
        batch.token[index] = token
        batch.pos[index] = index
        batch.n_seq_id[index] = 1
        batch.seq_id[index][0] = 0
        batch.logits[index] = 1


def _weight_name(name: str) -> str:
    """A weight's GGUF name without a backend copy's decoration (``CUDA0#blk.0.attn_k.weight#0``)."""
    if "#" in name:
        return name.split("#")[1]
    return name


def _chunks(vocab: Any, texts: Sequence[str], *, chunk_tokens: int, max_chunks: int) -> list[list[int]]:
    """The texts' tokens, joined and cut into chunks, each led by BOS where the vocabulary adds one."""
    import llama_cpp

    add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
    bos = int(llama_cpp.llama_vocab_bos(vocab))
    stream: list[int] = []
    budget = max_chunks * chunk_tokens
    for text in texts:
        stream.extend(_tokenize(vocab, text))
        if len(stream) >= budget:
            break
    body = chunk_tokens - 1 if add_bos else chunk_tokens
    chunks = []
    for start in range(0, len(stream), body):
        piece = stream[start:start + body]
        if len(piece) < MIN_CHUNK_TOKENS or len(chunks) == max_chunks:
            break
        chunks.append([bos, *piece] if add_bos else piece)
    return chunks


def _tokenize(vocab: Any, text: str) -> list[int]:
    import llama_cpp

    raw = text.encode("utf-8")
    capacity = len(raw) + 16
    while True:
        buffer = (llama_cpp.llama_token * capacity)()
        count = llama_cpp.llama_tokenize(vocab, raw, len(raw), buffer, capacity, False, True)
        if count >= 0:
            return list(buffer[:count])
        capacity = -count


def _load_model(gguf_path: Path) -> Any:
    import llama_cpp

    from afina.exporter.gguf import _quiet_llama_logs

    _quiet_llama_logs()
    params = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(str(gguf_path).encode(), params)
    if model is None:
        raise ExportFailed(f"llama.cpp cannot load {gguf_path.name} to compute the imatrix")
    return model


def _ggml_library() -> ctypes.CDLL:
    """ggml's base library as llama-cpp-python loaded it, with the signatures the collector calls."""
    import llama_cpp

    directory = Path(llama_cpp.__file__).resolve().parent / "lib"
    candidates = sorted(directory.glob("libggml-base.*")) or sorted(directory.glob("ggml-base.*"))
    if not candidates:
        raise ExportFailed(f"ggml's base library is not in {directory}: cannot compute an imatrix")
    library = ctypes.CDLL(str(candidates[0]))
    library.ggml_op_name.restype = ctypes.c_char_p
    library.ggml_op_name.argtypes = [ctypes.c_int]
    library.ggml_get_name.restype = ctypes.c_char_p
    library.ggml_get_name.argtypes = [ctypes.c_void_p]
    library.ggml_nbytes.restype = ctypes.c_size_t
    library.ggml_nbytes.argtypes = [ctypes.c_void_p]
    library.ggml_backend_tensor_get.restype = None
    library.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    return library


def _cpu_count() -> int:
    import os

    return os.cpu_count() or 2
