"""The start-up summary: each phase's share of the time to the first optimizer step."""

from __future__ import annotations

from afina.trainer.phases import PhaseClock


def test_the_summary_names_each_phase_with_its_own_duration() -> None:
    clock = PhaseClock(started=100.0)
    clock.marks = [("backend import", 101.5), ("model load", 107.0), ("first step", 110.25)]
    assert clock.durations() == [("backend import", 1.5), ("model load", 5.5), ("first step", 3.25)]
    assert clock.total() == 10.25
    assert clock.summary() == ("First optimizer step 10.2 s after the stage started (backend import 1.5 s, "
                               "model load 5.5 s, first step 3.2 s)")
    clock.queued_for = 2.0
    assert clock.summary().endswith("; 2.0 s queued before that")


def test_marks_are_taken_from_the_monotonic_clock() -> None:
    clock = PhaseClock()
    clock.mark("dataset")
    assert clock.durations()[0][0] == "dataset" and clock.durations()[0][1] >= 0.0
