"""The importance matrix as the quantizer receives it (a C array ended by a null name) and as a file in
llama.cpp's GGUF imatrix layout; collecting it from a model is in tests/integration/exporter/test_imatrix.py."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest

from afina.core.errors import ExportFailed
from afina.exporter.imatrix import ImportanceMatrix, _weight_name


def matrix() -> ImportanceMatrix:
    return ImportanceMatrix(
        sums={"blk.0.attn_q.weight": np.array([[4.0, 8.0, 12.0]]),
              "blk.0.ffn_down.weight": np.array([[1.0, 2.0], [3.0, 5.0]]),  # two experts' matrices
              "blk.1.attn_k.weight": np.array([[0.0, 0.0, 0.0]])},
        counts={"blk.0.attn_q.weight": np.array([4.0]), "blk.0.ffn_down.weight": np.array([1.0, 2.0]),
                "blk.1.attn_k.weight": np.array([0.0])},
        chunks=3, chunk_tokens=256, tokens=700, datasets=["job training split"])


def test_means_are_sums_over_counts_flattened_per_matrix() -> None:
    imatrix = matrix()
    np.testing.assert_array_equal(imatrix.means("blk.0.attn_q.weight"), np.array([1.0, 2.0, 3.0], np.float32))
    np.testing.assert_array_equal(imatrix.means("blk.0.ffn_down.weight"), np.array([1.0, 2.0, 1.5, 2.5], np.float32))


def test_the_c_array_lists_every_observed_tensor_and_ends_with_a_null_name() -> None:
    import llama_cpp

    c_matrix = matrix().to_c()
    entries = ctypes.cast(c_matrix.pointer, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    # blk.1.attn_k was never seen (count 0): left out, so the quantizer treats it as having no matrix
    assert [entries[0].name, entries[1].name, entries[2].name] == [b"blk.0.attn_q.weight", b"blk.0.ffn_down.weight",
                                                                  None]
    assert [entries[0].size, entries[1].size] == [3, 4]
    assert [entries[1].data[index] for index in range(4)] == [1.0, 2.0, 1.5, 2.5]


def test_non_finite_values_are_refused_before_the_quantizer_sees_them() -> None:
    imatrix = matrix()
    imatrix.sums["blk.0.attn_q.weight"][0, 1] = np.inf
    with pytest.raises(ExportFailed, match="blk.0.attn_q.weight holds non-finite values"):
        imatrix.to_c()


def test_the_file_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "imatrix.gguf"
    matrix().save(path)
    loaded = ImportanceMatrix.load(path)
    assert (loaded.chunks, loaded.chunk_tokens, loaded.datasets) == (3, 256, ["job training split"])
    assert loaded.sums.keys() == matrix().sums.keys()
    for name, sums in matrix().sums.items():
        np.testing.assert_array_equal(loaded.sums[name], sums.astype(np.float32))
        np.testing.assert_array_equal(loaded.counts[name], matrix().counts[name].astype(np.float32))


def test_a_file_that_is_not_an_imatrix_is_refused(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_tensor("token_embd.weight", np.zeros((2, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ExportFailed, match="is not a GGUF importance matrix"):
        ImportanceMatrix.load(path)


def test_backend_copies_of_a_weight_are_named_as_the_weight() -> None:
    assert _weight_name("CUDA0#blk.0.attn_k.weight#0") == "blk.0.attn_k.weight"
    assert _weight_name("blk.0.attn_k.weight") == "blk.0.attn_k.weight"
