"""The importance matrix gathered through llama.cpp's evaluation callback is the mean squared input of each layer
multiplication (checked against transformers' own activations), survives its GGUF file, and steers the quantizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from afina.core.catalog import CHATML
from afina.exporter.fidelity import gguf_perplexity
from afina.exporter.gguf import quantize_gguf
from afina.exporter.imatrix import ImportanceMatrix, compute_imatrix
from tests.integration.exporter.gguf_fixtures import VALIDATION_CHATS, rendered_texts

pytestmark = pytest.mark.slow

TRAINING_CHATS = [
    [{"role": "user", "content": f"Question {number}: how do I keep {thing} fresh?"},
     {"role": "assistant", "content": f"Keep {thing} in a cool, dry place, away from sunlight, and use it within a few "
                                      "days. A sealed container helps, and so does buying only what you need."}]
    for number, thing in enumerate(["bread", "coffee", "herbs", "cheese", "apples", "rice", "spices", "tea"])
]
CHUNK = 128


@pytest.fixture(scope="module")
def training_texts(merged_dir: Path) -> list[str]:
    return rendered_texts(TRAINING_CHATS, merged_dir)


@pytest.fixture(scope="module")
def imatrix(merged_f16_gguf: Path, training_texts: list[str]) -> ImportanceMatrix:
    return compute_imatrix(merged_f16_gguf, training_texts, chunk_tokens=CHUNK, max_chunks=4, threads=2,
                           dataset="job training split")


def test_every_layer_multiplication_is_collected_over_every_token(imatrix: ImportanceMatrix) -> None:
    # 30 layers x (q, k, v, output, gate, up, down); the output layer is left out, as llama-imatrix does
    kinds = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    assert set(imatrix.sums) == {f"blk.{layer}.{kind}.weight" for layer in range(30) for kind in kinds}
    assert imatrix.chunks == 4 and imatrix.tokens == 4 * CHUNK
    for name, sums in imatrix.sums.items():
        columns = 1536 if "ffn_down" in name else 576
        assert sums.shape == (1, columns), name
        assert imatrix.counts[name].tolist() == [imatrix.tokens], name
        assert (imatrix.means(name) > 0).all(), name


def test_the_matrix_is_the_mean_squared_input_transformers_sees(imatrix: ImportanceMatrix, merged_dir: Path,
                                                                merged_f16_gguf: Path,
                                                                training_texts: list[str]) -> None:
    """The same chunks through the float32 merged model: the inputs of two layers' projections, squared and
    averaged, equal what the callback collected from the f16 GGUF (to f16 precision)."""
    import llama_cpp
    import torch
    from transformers import AutoModelForCausalLM

    from afina.exporter.imatrix import _chunks, _load_model

    model_handle = _load_model(merged_f16_gguf)
    try:
        chunks = _chunks(llama_cpp.llama_model_get_vocab(model_handle), training_texts, chunk_tokens=CHUNK,
                         max_chunks=4)
    finally:
        llama_cpp.llama_model_free(model_handle)
    model = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype="auto")
    captured: dict[str, list[np.ndarray]] = {"blk.0.attn_q.weight": [], "blk.17.ffn_down.weight": []}
    hooks = [model.model.layers[0].self_attn.q_proj.register_forward_hook(
                 lambda module, args, out: captured["blk.0.attn_q.weight"].append(args[0][0].numpy().copy())),
             model.model.layers[17].mlp.down_proj.register_forward_hook(
                 lambda module, args, out: captured["blk.17.ffn_down.weight"].append(args[0][0].numpy().copy()))]
    with torch.inference_mode():
        for chunk in chunks:
            model(input_ids=torch.tensor([chunk]))
    for hook in hooks:
        hook.remove()
    for name, inputs in captured.items():
        expected = np.square(np.concatenate(inputs).astype(np.float64)).mean(axis=0)
        np.testing.assert_allclose(imatrix.means(name), expected, rtol=0.02, atol=1e-6 * expected.max())


def test_the_file_round_trips_in_llama_cpp_s_layout(imatrix: ImportanceMatrix, tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "imatrix.gguf"
    imatrix.save(path)
    reader = gguf.GGUFReader(str(path))
    assert reader.get_field("general.type").contents() == "imatrix"
    assert reader.get_field("imatrix.chunk_count").contents() == 4
    assert reader.get_field("imatrix.chunk_size").contents() == CHUNK
    assert reader.get_field("imatrix.datasets").contents() == ["job training split"]
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    assert tensors["blk.3.ffn_down.weight.in_sum2"].shape.tolist() == [1536, 1]
    assert tensors["blk.3.ffn_down.weight.counts"].shape.tolist() == [1, 1]
    loaded = ImportanceMatrix.load(path)
    assert loaded.sums.keys() == imatrix.sums.keys() and loaded.chunks == 4
    for name in imatrix.sums:
        np.testing.assert_array_equal(loaded.means(name), imatrix.means(name))


def test_the_quantizer_takes_the_matrix(imatrix: ImportanceMatrix, merged_f16_gguf: Path, merged_dir: Path,
                                        tmp_path: Path) -> None:
    import gguf

    plain, weighted = tmp_path / "model-q4_0.gguf", tmp_path / "model-q4_0-imatrix.gguf"
    quantize_gguf(merged_f16_gguf, plain, "q4_0")
    quantize_gguf(merged_f16_gguf, weighted, "q4_0", imatrix=imatrix)
    types = [{tensor.name: tensor.tensor_type.name for tensor in gguf.GGUFReader(str(path)).tensors}
             for path in (plain, weighted)]
    # with a matrix, llama.cpp keeps the first eighth of the ffn_down layers at Q4_1 (its guard for Q4_0)
    assert [types[1][f"blk.{layer}.ffn_down.weight"] for layer in range(4)] == ["Q4_1", "Q4_1", "Q4_1", "Q4_0"]
    assert all(types[0][f"blk.{layer}.ffn_down.weight"] == "Q4_0" for layer in range(4))
    assert types[0]["blk.10.attn_q.weight"] == types[1]["blk.10.attn_q.weight"] == "Q4_0"
    reader_plain, reader_weighted = (gguf.GGUFReader(str(path)) for path in (plain, weighted))
    same_type = next(t for t in reader_plain.tensors if t.name == "blk.10.attn_q.weight")
    weighted_q = next(t for t in reader_weighted.tensors if t.name == "blk.10.attn_q.weight")
    assert bytes(same_type.data) != bytes(weighted_q.data)  # same type, rounded to the data's importance
    held_out = _ids(rendered_texts(VALIDATION_CHATS, merged_dir), merged_dir)
    for path in (plain, weighted):
        assert np.isfinite(gguf_perplexity(path, held_out, threads=2))


def _ids(texts: list[str], tokenizer_dir: Path) -> list[list[int]]:
    from afina.exporter.fidelity import encode_texts
    from afina.exporter.verify import load_hf_tokenizer

    return encode_texts(load_hf_tokenizer(tokenizer_dir, CHATML.stock_template), texts, 512)
