"""The fidelity gate's arithmetic and limits, on hand-made model runs: where sequences differ, the perplexity sum,
and a failure message that names the variant, the figure and the limit."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from afina.core.artifacts.fidelity import FidelityReport, FidelityTolerances
from afina.core.catalog import CHATML
from afina.core.errors import ExportFailed
from afina.exporter.fidelity import (
    EncodedPrompt,
    FidelityFailed,
    Greedy,
    ModelRun,
    check_fidelity,
    compare_sequences,
    judge,
    negative_log_likelihood,
)

EOS = 2
TOLERANCES = FidelityTolerances(tokens=4, min_agreement=0.95, min_variant_agreement=0.5, max_perplexity_ratio=1.2)
PROMPTS = [EncodedPrompt(rendered=f"prompt {i}", ids=[1, 10 + i], full_ids=[1, 10 + i], truncated=False)
           for i in range(4)]
GGUFS = {name: Path(f"/exports/model-{name}.gguf") for name in ("f16", "q8_0", "q4_0")}
REFERENCE = [[5, 6, 7, 8], [5, EOS], [9, 9, 9, 9], [4, 3, EOS]]


def greedy(tokens: list[int], *, runner_up: int = 99, margin: float = 3.0) -> Greedy:
    """Greedy tokens with the same runner-up and lead at every step."""
    return Greedy(tokens=tokens, runner_ups=[runner_up] * len(tokens), margins=[margin] * len(tokens))


def run(sequences: list[list[int]], perplexity: float | None = 10.0, tokenization: list[int] | None = None,
        **step: float) -> ModelRun:
    steps = [greedy(tokens, **step) for tokens in sequences]  # type: ignore[arg-type]
    return ModelRun(greedy=steps, perplexity=perplexity, seconds=0.5,
                    tokenization_mismatches=tokenization or [], problems=[])


def test_mismatch_is_the_first_differing_position_with_both_tokens() -> None:
    mismatches = compare_sequences([greedy(tokens) for tokens in REFERENCE],
                                   [[5, 6, 0, 8], [5, EOS], [9, 9, 9, 9], [4, 3, EOS]])
    assert [(m.prompt, m.position, m.expected, m.actual, m.expected_margin, m.near_tie) for m in mismatches] == \
        [(0, 2, 7, 0, 3.0, False)]


def test_stopping_early_or_late_is_a_mismatch_where_one_side_ended() -> None:
    # the reference stopped (EOS) after 2 tokens; the variant went on without EOS
    mismatches = compare_sequences([greedy([5, EOS]), greedy([4, 3, EOS])], [[5, 6, 7, 8], [4, 3]])
    assert [(m.prompt, m.position, m.expected, m.actual) for m in mismatches] == [(0, 1, EOS, 6), (1, 2, EOS, None)]


def test_negative_log_likelihood_equals_a_direct_log_softmax() -> None:
    generator = np.random.default_rng(0)
    logits = generator.normal(size=(150, 40)).astype(np.float32) * 5  # more rows than one block
    targets = generator.integers(0, 40, size=150).tolist()
    expected = 0.0
    for row, target in zip(logits.astype(np.float64), targets, strict=True):
        expected -= row[target] - math.log(np.exp(row).sum())
    assert negative_log_likelihood(logits, targets) == pytest.approx(expected, rel=1e-12)


def test_faithful_runs_pass_with_every_figure() -> None:
    report = judge(tolerances=TOLERANCES, reference=run(REFERENCE, 9.9), reference_dtype="float32",
                   runs={"f16": run(REFERENCE, 10.0), "q8_0": run(REFERENCE, 10.1),
                         "q4_0": run([[5, 6, 7, 0], *REFERENCE[1:]], 11.0, tokenization=[3])},
                   ggufs=GGUFS, encoded=PROMPTS, text_ids=[[1, 2, 3], [4, 5]])
    assert report.passed and report.failures == []
    assert list(report.variants) == ["f16", "q8_0", "q4_0"]
    f16, q4 = report.variants["f16"], report.variants["q4_0"]
    assert (f16.compared_with, f16.agreement, f16.perplexity_ratio) == ("reference", 1.0, 1.0)
    assert (q4.compared_with, q4.agreement, q4.agreement_with_reference) == ("f16", 0.75, 0.75)
    assert q4.perplexity_ratio == pytest.approx(1.1)
    assert [(m.prompt, m.position) for m in q4.mismatches] == [(0, 3)]
    assert (q4.tokenization_matches, q4.tokenization_mismatches) == (3, [3])
    assert report.perplexity_tokens == 3 and report.texts == 2 and report.reference.perplexity == 9.9
    assert any("llama.cpp tokenizes 1/4 rendered prompts differently" in line for line in report.warnings)
    # the report is the contract the manifest and the model card read
    assert FidelityReport.model_validate_json(report.model_dump_json()) == report


def test_f16_below_the_agreement_limit_fails_naming_variant_figure_and_limit() -> None:
    other_model = [[1, 1, 1, 1], REFERENCE[1], [0, 0, 0, 0], [7, EOS]]
    with pytest.raises(FidelityFailed) as caught:
        judge(tolerances=TOLERANCES, reference=run(REFERENCE), reference_dtype="float32",
              runs={"f16": run(other_model), "q8_0": run(other_model)}, ggufs=GGUFS, encoded=PROMPTS, text_ids=[])
    message = caught.value.message
    assert "the f16 GGUF gives the trained model's first 4 greedy tokens on 1/4 held-out prompts " \
           "(agreement 0.25); the limit is min_agreement 0.95" in message
    assert caught.value.code == "export_fidelity_failed"
    report = caught.value.report
    assert not report.passed and report.variants["f16"].problems and report.variants["q8_0"].passed
    assert report.variants["q8_0"].agreement == 1.0 and report.variants["q8_0"].agreement_with_reference == 0.25


def test_a_quantized_variant_beyond_its_limits_fails_with_both_figures() -> None:
    drifted = [[0, 6, 7, 8], [0, EOS], [0, 9, 9, 9], [4, 3, EOS]]
    with pytest.raises(FidelityFailed) as caught:
        judge(tolerances=TOLERANCES, reference=run(REFERENCE), reference_dtype="bfloat16",
              runs={"f16": run(REFERENCE, 10.0), "q4_0": run(drifted, 12.5)}, ggufs=GGUFS, encoded=PROMPTS,
              text_ids=[[1, 2, 3]])
    assert caught.value.report.variants["q4_0"].problems == [
        "the q4_0 GGUF gives the f16 GGUF's first 4 greedy tokens on 1/4 held-out prompts (agreement 0.25); the "
        "limit is min_variant_agreement 0.5",
        "the q4_0 GGUF's perplexity on the validation texts is 1.2500x the f16 GGUF's (12.5000 vs 10.0000); the "
        "limit is max_perplexity_ratio 1.2",
    ]
    assert caught.value.report.variants["f16"].passed
    assert caught.value.message.startswith("fidelity gate failed: the q4_0 GGUF gives")


def test_agreement_limit_is_inclusive_and_perplexity_is_optional() -> None:
    half = [[0, 6, 7, 8], [0, EOS], *REFERENCE[2:]]
    report = judge(tolerances=TOLERANCES, reference=run(REFERENCE, None), reference_dtype="float32",
                   runs={"f16": run(REFERENCE, None), "q4_0": run(half, None)}, ggufs=GGUFS, encoded=PROMPTS,
                   text_ids=[])
    assert report.passed and report.variants["q4_0"].agreement == 0.5
    assert report.variants["q4_0"].perplexity is None and report.variants["q4_0"].perplexity_ratio is None


def test_a_near_tie_is_reported_and_counted_as_agreeing_only_within_the_margin() -> None:
    # the reference's winner led the token f16 took (its runner-up, 6) by 2e-5 logits: a coin toss for any copy
    reference = [greedy([5, 7, 8], runner_up=6, margin=2e-5), *[greedy(tokens) for tokens in REFERENCE[1:]]]
    f16 = [[5, 6, 1], *REFERENCE[1:]]
    strict, tolerant = (compare_sequences(reference, f16, near_tie_margin=margin) for margin in (0.0, 0.01))
    assert [(m.position, m.expected_margin, m.near_tie) for m in strict] == [(1, 2e-5, False)]
    assert [m.near_tie for m in tolerant] == [True]
    # a token other than the runner-up is no near tie, however small the lead
    assert compare_sequences(reference, [[5, 3, 1], *REFERENCE[1:]], near_tie_margin=0.01)[0].near_tie is False

    reference_run = ModelRun(greedy=reference, perplexity=None, seconds=1.0, tokenization_mismatches=[], problems=[])
    tolerances = TOLERANCES.model_copy(update={"near_tie_margin": 0.01})
    report = judge(tolerances=tolerances, reference=reference_run, reference_dtype="float32",
                   runs={"f16": run(f16, None)}, ggufs=GGUFS, encoded=PROMPTS, text_ids=[])
    assert report.passed and report.variants["f16"].agreement == 0.75 and report.variants["f16"].near_ties == 1
    with pytest.raises(FidelityFailed, match=r"on 3/4 held-out prompts \(agreement 0.75\); the limit is "
                                             r"min_agreement 0.95"):
        judge(tolerances=TOLERANCES.model_copy(update={"min_disagreements": 1}), reference=reference_run,
              reference_dtype="float32", runs={"f16": run(f16, None)}, ggufs=GGUFS, encoded=PROMPTS, text_ids=[])


# the gate on a tiny held-out set (a job with 2 test conversations): the rule of afina.core.settings' fidelity_*
TWO_PROMPTS = PROMPTS[:2]
SMALL_SET = FidelityTolerances(tokens=4, min_agreement=0.95, min_variant_agreement=0.0, max_perplexity_ratio=1.5,
                               near_tie_margin=0.05, min_disagreements=2)


def reference_with_a_flat_step(margin: float) -> ModelRun:
    """The merged model's greedy tokens on 2 prompts; on the first, at position 1, its top token (7) led the
    runner-up (6) by ``margin`` logits."""
    flat = Greedy(tokens=[5, 7, 8, 9], runner_ups=[99, 6, 99, 99], margins=[3.0, margin, 3.0, 3.0])
    return ModelRun(greedy=[flat, greedy([4, 3, EOS])], perplexity=None, seconds=1.0, tokenization_mismatches=[],
                    problems=[])


def test_a_small_set_whose_only_divergence_starts_at_a_near_tie_of_the_merged_model_passes() -> None:
    # f16 took the runner-up where the merged model's top two were 0.03 logits apart, and went its own way after
    f16 = run([[5, 6, 1, 1], [4, 3, EOS]], None)
    report = judge(tolerances=SMALL_SET, reference=reference_with_a_flat_step(0.03), reference_dtype="float32",
                   runs={"f16": f16}, ggufs=GGUFS, encoded=TWO_PROMPTS, text_ids=[])
    figures = report.variants["f16"]
    assert report.passed and report.warnings == []
    assert (figures.agreement, figures.near_ties) == (0.5, 1)  # the exact share is reported as measured
    [mismatch] = figures.mismatches
    assert (mismatch.prompt, mismatch.position, mismatch.expected, mismatch.actual, mismatch.near_tie) == \
        (0, 1, 7, 6, True)
    assert mismatch.expected_margin == 0.03


def test_a_real_divergence_on_a_small_set_fails() -> None:
    # every prompt leaves the merged model's path where it was sure of its token (a lead of 3 logits)
    other = run([[5, 0, 0, 0], [4, 0, EOS]], None)
    with pytest.raises(FidelityFailed) as caught:
        judge(tolerances=SMALL_SET, reference=reference_with_a_flat_step(0.03), reference_dtype="float32",
              runs={"f16": other}, ggufs=GGUFS, encoded=TWO_PROMPTS, text_ids=[])
    assert "the f16 GGUF gives the trained model's first 4 greedy tokens on 0/2 held-out prompts (agreement 0); " \
           "the limit is min_agreement 0.95" in caught.value.message
    assert caught.value.report.variants["f16"].near_ties == 0


def test_a_divergence_beyond_the_margin_is_real_and_one_alone_is_only_a_warning() -> None:
    # the same flat step, but 0.2 logits apart: beyond the 0.05 margin, so a real divergence on 1 of 2 prompts
    f16 = run([[5, 6, 1, 1], [4, 3, EOS]], None)
    reference = reference_with_a_flat_step(0.2)
    report = judge(tolerances=SMALL_SET, reference=reference, reference_dtype="float32", runs={"f16": f16},
                   ggufs=GGUFS, encoded=TWO_PROMPTS, text_ids=[])
    assert report.passed and report.variants["f16"].near_ties == 0
    assert report.warnings == [
        "the f16 GGUF gives the trained model's first 4 greedy tokens on 1/2 held-out prompts (agreement 0.5); the "
        "limit is min_agreement 0.95, tolerated: 1 disagreeing prompt(s), and the gate fails from 2 (too few "
        "held-out prompts to tell one stray divergence from a different model)"]
    # with min_disagreements 1 (the share alone decides) the same run fails
    with pytest.raises(FidelityFailed, match=r"on 1/2 held-out prompts \(agreement 0.5\)"):
        judge(tolerances=SMALL_SET.model_copy(update={"min_disagreements": 1}), reference=reference,
              reference_dtype="float32", runs={"f16": f16}, ggufs=GGUFS, encoded=TWO_PROMPTS, text_ids=[])


def test_the_gate_needs_the_f16_gguf_and_held_out_prompts(tmp_path: Path) -> None:
    limits = {"min_variant_agreement": 0.0, "max_perplexity_ratio": 1.5}
    with pytest.raises(ExportFailed, match=r"needs the f16 GGUF \(got \['q4_0'\]\)"):
        check_fidelity(merged_dir=tmp_path, ggufs={"q4_0": tmp_path / "q.gguf"}, family=CHATML,
                       prompts=[[{"role": "user", "content": "hi"}]], texts=[], **limits)
    with pytest.raises(ExportFailed, match="has no held-out prompts"):
        check_fidelity(merged_dir=tmp_path, ggufs={"f16": tmp_path / "f.gguf"}, family=CHATML, prompts=[], texts=[],
                       **limits)
