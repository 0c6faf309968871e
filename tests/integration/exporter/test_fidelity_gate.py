"""The fidelity gate on real SmolLM2 GGUFs: the job's own exports pass with every figure reported; a GGUF of
another fine-tune, or a damaged quantized variant, fails naming the variant, the figure and the limit."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from afina.core.catalog import CHATML
from afina.exporter.fidelity import FidelityFailed, check_fidelity
from tests.integration.exporter import gguf_fixtures
from tests.integration.exporter.gguf_fixtures import HELD_OUT_PROMPTS, VALIDATION_CHATS, rendered_texts

pytestmark = pytest.mark.slow

strong_adapter_dir = gguf_fixtures.strong_adapter_dir
strong_merged_dir = gguf_fixtures.strong_merged_dir
other_model_f16_gguf = gguf_fixtures.other_model_f16_gguf
quantized_gguf = gguf_fixtures.quantized_gguf

# the settings' defaults (afina.core.settings: fidelity_*), and a near tie of at most 0.01 logits
LIMITS = {"min_agreement": 0.95, "min_variant_agreement": 0.0, "max_perplexity_ratio": 1.5}
NEAR_TIE = 0.01


@pytest.fixture(scope="module")
def texts(merged_dir: Path) -> list[str]:
    return rendered_texts(VALIDATION_CHATS, merged_dir)


def test_the_exported_ggufs_answer_like_the_trained_model(merged_dir: Path, merged_f16_gguf: Path, quantized_gguf,  # noqa: ANN001
                                                          texts: list[str]) -> None:
    ggufs = {"f16": merged_f16_gguf, **{variant: quantized_gguf(variant) for variant in ("bf16", "q8_0", "q4_k_m")}}
    report = check_fidelity(merged_dir=merged_dir, ggufs=ggufs, family=CHATML, prompts=HELD_OUT_PROMPTS, texts=texts,
                            near_tie_margin=NEAR_TIE, **LIMITS)
    assert report.passed and report.failures == []
    assert list(report.variants) == ["f16", "bf16", "q8_0", "q4_k_m"]
    assert report.prompts == 6 and report.texts == 3 and report.perplexity_tokens > 100
    assert report.reference.dtype == "float32"
    f16 = report.variants["f16"]
    assert f16.compared_with == "reference" and f16.prompts_compared == 6
    # the f16 copy may break a tie of the float32 model differently, and only that
    assert all(mismatch.near_tie and mismatch.expected_margin <= NEAR_TIE for mismatch in f16.mismatches)
    assert f16.agreement + f16.near_ties / 6 >= 0.95
    # llama.cpp reads the rendered prompts into the same ids as the trained tokenizer
    assert f16.tokenization_matches == 6 and f16.tokenization_mismatches == []
    # the f16 GGUF predicts the validation texts like the float32 model (within 1%)
    assert f16.perplexity == pytest.approx(report.reference.perplexity, rel=0.01)
    for variant in ("bf16", "q8_0", "q4_k_m"):
        figures = report.variants[variant]
        assert figures.compared_with == "f16" and figures.perplexity is not None
        assert figures.perplexity_ratio == pytest.approx(figures.perplexity / f16.perplexity)
        assert figures.perplexity_ratio < LIMITS["max_perplexity_ratio"]
    assert report.variants["bf16"].perplexity_ratio == pytest.approx(1.0, abs=0.01)


def test_a_gguf_of_another_fine_tune_fails_the_gate(merged_dir: Path, other_model_f16_gguf: Path,
                                                    texts: list[str]) -> None:
    with pytest.raises(FidelityFailed) as caught:
        check_fidelity(merged_dir=merged_dir, ggufs={"f16": other_model_f16_gguf}, family=CHATML,
                       prompts=HELD_OUT_PROMPTS, texts=texts, near_tie_margin=NEAR_TIE, **LIMITS)
    figures = caught.value.report.variants["f16"]
    assert figures.agreement <= 1 / 6 and figures.near_ties == 0
    assert f"the f16 GGUF gives the trained model's first 32 greedy tokens on {round(figures.agreement * 6)}/6 " \
           f"held-out prompts (agreement {figures.agreement:.4g}); the limit is min_agreement 0.95" \
           in caught.value.message
    assert caught.value.report.passed is False and figures.problems
    assert figures.tokenization_matches == 6  # same tokenizer: it is the weights that differ


def damaged_copy(source: Path, target: Path, *, layers: range, seed: int = 0) -> Path:
    """A copy of an f16 GGUF whose ffn_down weights in ``layers`` were replaced by noise of three times their
    spread: what a broken quantization leaves behind."""
    import gguf

    shutil.copyfile(source, target)
    reader = gguf.GGUFReader(str(target), "r+")
    generator = np.random.default_rng(seed)
    damaged = 0
    for tensor in reader.tensors:
        if tensor.name.endswith("ffn_down.weight") and int(tensor.name.split(".")[1]) in layers:
            spread = float(np.asarray(tensor.data, dtype=np.float32).std())
            tensor.data[...] = generator.normal(0.0, 3 * spread, size=tensor.data.shape).astype(np.float16)
            damaged += 1
    assert damaged == len(layers)
    del reader  # flushes the memory map
    return target


def test_a_damaged_quantized_variant_fails_on_agreement_and_perplexity(merged_dir: Path, merged_f16_gguf: Path,
                                                                       texts: list[str], tmp_path: Path) -> None:
    broken = damaged_copy(merged_f16_gguf, tmp_path / "model-q4_0.gguf", layers=range(0, 10))
    with pytest.raises(FidelityFailed) as caught:
        check_fidelity(merged_dir=merged_dir, ggufs={"f16": merged_f16_gguf, "q4_0": broken}, family=CHATML,
                       prompts=HELD_OUT_PROMPTS, texts=texts, near_tie_margin=NEAR_TIE, min_agreement=0.95,
                       min_variant_agreement=0.5, max_perplexity_ratio=1.5)
    report = caught.value.report
    assert report.variants["f16"].passed
    q4 = report.variants["q4_0"]
    assert q4.perplexity_ratio is not None and q4.perplexity_ratio > 1.5 and q4.agreement < 0.5
    assert q4.problems == [
        f"the q4_0 GGUF gives the f16 GGUF's first 32 greedy tokens on {round(q4.agreement * 6)}/6 held-out prompts "
        f"(agreement {q4.agreement:.4g}); the limit is min_variant_agreement 0.5",
        f"the q4_0 GGUF's perplexity on the validation texts is {q4.perplexity_ratio:.4f}x the f16 GGUF's "
        f"({q4.perplexity:.4f} vs {report.variants['f16'].perplexity:.4f}); the limit is max_perplexity_ratio 1.5",
    ]
    assert report.failures == q4.problems
