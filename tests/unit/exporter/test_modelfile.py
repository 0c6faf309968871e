"""The Ollama Modelfile spells out the family's template and stop tokens (Ollama cannot guess them)."""

from __future__ import annotations

from afina.core.catalog import CHATML
from afina.exporter.modelfile import render_modelfile


def test_modelfile_names_the_gguf_template_stops_and_parameters() -> None:
    text = render_modelfile("model-q4_k_m.gguf", CHATML)
    assert text.startswith("FROM ./model-q4_k_m.gguf\n")
    assert f'TEMPLATE """{CHATML.ollama_template}"""' in text
    stops = [line for line in text.splitlines() if line.startswith("PARAMETER stop ")]
    assert stops == ['PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|im_start|>"']
    assert "PARAMETER temperature 0.7\n" in text
    assert text.endswith("PARAMETER num_ctx 2048\n")
