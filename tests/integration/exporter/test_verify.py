"""Verification passes a faithful GGUF and catches one whose chat template was changed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from afina.core.catalog import CHATML
from afina.exporter.verify import VerificationFailed, load_hf_tokenizer, verify_all, verify_gguf

pytestmark = pytest.mark.slow

# the edit users make by hand: a different default system prompt renders different prompts than training
EDITED_TEMPLATE = CHATML.stock_template.replace("You are a helpful AI assistant named SmolLM", "You are a pirate")


@pytest.fixture(scope="module")
def hf_tokenizer(lora_adapter_dir: Path):  # noqa: ANN201
    return load_hf_tokenizer(lora_adapter_dir, CHATML.stock_template)


@pytest.fixture(scope="module")
def edited_template_gguf(tmp_path_factory: pytest.TempPathFactory, merged_f16_gguf: Path) -> Path:
    """A copy of the merged GGUF whose chat template was changed with gguf's own metadata tool."""
    assert EDITED_TEMPLATE != CHATML.stock_template
    out = tmp_path_factory.mktemp("edited") / "model-f16.gguf"
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(merged_f16_gguf), str(out),
                    "--chat-template", EDITED_TEMPLATE, "--force"], check=True, capture_output=True)
    return out


def test_faithful_gguf_passes_every_check(merged_f16_gguf: Path, hf_tokenizer) -> None:  # noqa: ANN001
    check = verify_gguf(merged_f16_gguf, "f16", family=CHATML, hf_tokenizer=hf_tokenizer)
    assert check.problems == []
    assert check.chat_template_matches and check.eos_matches and check.eos_token == "<|im_end|>"
    assert check.prompt_tokens_match and check.prompt_tokens > 20
    assert check.completion.strip() and check.finish_reason == "stop"
    assert "<|im_start|>" not in check.completion


def test_edited_template_fails_with_a_clear_error(edited_template_gguf: Path, hf_tokenizer) -> None:  # noqa: ANN001
    check = verify_gguf(edited_template_gguf, "f16", family=CHATML, hf_tokenizer=hf_tokenizer)
    assert not check.passed and not check.chat_template_matches and not check.prompt_tokens_match
    assert any("tokenizer.chat_template differs from the stock chatml template" in p for p in check.problems)
    assert any("prompt tokens of probe chat 1 differ" in p for p in check.problems)
    with pytest.raises(VerificationFailed) as caught:
        verify_all({"f16": edited_template_gguf}, family=CHATML, hf_tokenizer=hf_tokenizer)
    assert "GGUF verification failed: model-f16.gguf: the GGUF's tokenizer.chat_template differs" \
        in caught.value.message
    assert caught.value.report["passed"] is False
    assert caught.value.report["checks"]["f16"]["chat_template_matches"] is False
