"""Quantization names: case-insensitive, ordered, deduplicated; unknown names refused before any work."""

from __future__ import annotations

import pytest

from afina.core.errors import ExportFailed
from afina.exporter.gguf import allowed_quantizations, resolve_quantizations


def test_names_are_case_insensitive_ordered_and_deduplicated() -> None:
    assert resolve_quantizations(["Q4_K_M", "q8_0", "q4_k_m", " Q8_0 "]) == ["q4_k_m", "q8_0"]


def test_f16_is_always_made_by_conversion_and_never_quantized() -> None:
    assert resolve_quantizations(["F16", "Q8_0"]) == ["q8_0"]


def test_allowed_names_come_from_llama_cpp() -> None:
    allowed = allowed_quantizations()
    assert {"Q4_K_M", "Q8_0", "Q5_K_M", "Q6_K"} <= set(allowed)
    assert "F16" not in allowed


def test_unknown_name_fails_naming_the_allowed_ones() -> None:
    with pytest.raises(ExportFailed) as caught:
        resolve_quantizations(["Q4_K_M", "Q3_XL"])
    message = caught.value.message
    assert "unknown quantization 'Q3_XL'" in message
    assert "AFINA_EXPORT_QUANTIZATIONS" in message
    assert "allowed: " in message and "Q4_K_M" in message and "Q8_0" in message
    assert caught.value.param == "export_quantizations"
