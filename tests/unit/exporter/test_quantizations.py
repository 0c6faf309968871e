"""Variant names: case-insensitive, ordered, deduplicated; unknown names refused before any work; each variant
has exactly one maker (conversion or llama.cpp's quantizer)."""

from __future__ import annotations

from pathlib import Path

import pytest

from afina.core.artifacts.export_options import LOW_BIT_VARIANTS, VARIANTS
from afina.core.errors import ExportFailed
from afina.exporter.gguf import (
    BASE_GGUF,
    CONVERTED_VARIANTS,
    FTYPE_PREFIX,
    QUANTIZED_FTYPES,
    allowed_quantizations,
    make_variant,
    quantize_gguf,
    resolve_quantizations,
)
from afina.exporter.imatrix import ImportanceMatrix


def test_names_are_case_insensitive_ordered_and_deduplicated() -> None:
    assert resolve_quantizations(["Q4_K_M", "q8_0", "q4_k_m", " Q8_0 ", "BF16"]) == ["q4_k_m", "q8_0", "bf16"]


def test_f16_is_always_made_by_conversion_and_never_listed() -> None:
    assert resolve_quantizations(["F16", "Q8_0"]) == ["q8_0"]


def test_allowed_names_are_the_variants_afina_makes() -> None:
    assert allowed_quantizations() == [name for name in VARIANTS if name != BASE_GGUF]
    assert "bf16" in allowed_quantizations() and "f16" not in allowed_quantizations()


def test_every_variant_has_exactly_one_maker_known_to_llama_cpp() -> None:
    import llama_cpp

    assert set(CONVERTED_VARIANTS) | set(QUANTIZED_FTYPES) == set(VARIANTS)
    assert not set(CONVERTED_VARIANTS) & set(QUANTIZED_FTYPES)
    for name in QUANTIZED_FTYPES.values():
        assert isinstance(getattr(llama_cpp, FTYPE_PREFIX + name), int), name
    assert LOW_BIT_VARIANTS <= set(QUANTIZED_FTYPES)  # an imatrix only ever goes to the quantizer


def test_unknown_name_fails_naming_the_allowed_ones() -> None:
    with pytest.raises(ExportFailed) as caught:
        resolve_quantizations(["Q4_K_M", "Q3_XL"])
    message = caught.value.message
    assert "unknown quantization 'Q3_XL'" in message
    assert "AFINA_EXPORT_QUANTIZATIONS" in message
    assert "allowed: BF16, Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0 (in any case; f16 is always made)" in message
    assert caught.value.param == "export_quantizations"


def test_a_llama_cpp_type_afina_does_not_make_is_refused() -> None:
    # llama.cpp knows Q3_K_M, but afina serves only the variants it verifies
    with pytest.raises(ExportFailed, match="unknown quantization 'q3_k_m'"):
        resolve_quantizations(["q3_k_m"])
    with pytest.raises(ExportFailed, match="the quantizer makes q8_0, q6_k, q5_k_m, q4_k_m, q4_0"):
        quantize_gguf(Path("/nonexistent/model-f16.gguf"), Path("/nonexistent/out.gguf"), "q3_k_m")


def test_bf16_needs_the_merged_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ExportFailed, match="converted from the merged checkpoint"):
        make_variant("bf16", merged_dir=None, f16_gguf=tmp_path / "model-f16.gguf", target=tmp_path / "x.gguf",
                     log_path=tmp_path / "log")


def test_an_importance_matrix_is_refused_for_a_converted_variant(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="an importance matrix does not apply"):
        make_variant("bf16", merged_dir=tmp_path, f16_gguf=tmp_path / "model-f16.gguf", target=tmp_path / "x.gguf",
                     log_path=tmp_path / "log", imatrix=ImportanceMatrix())
