"""DeepConf confidence measures (pacore.confidence): hand-computed values and properties."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pacore.adaptive import ComputePolicy
from pacore.backends.base import Completion
from pacore.confidence import (
    WindowedConfidence,
    effective_window,
    lowest_group_at,
    summarize,
    token_confidence,
)
from pacore.trace import Trajectory


def test_token_confidence_is_negative_mean_logprob() -> None:
    assert token_confidence([-1.0, -2.0, -3.0]) == pytest.approx(2.0)
    assert token_confidence([-0.5]) == pytest.approx(0.5)
    # A sure token: its rivals are improbable, so the mean logprob is very negative.
    assert token_confidence([-0.001, -9.0, -11.0]) > token_confidence([-0.7, -0.8, -1.0])


def test_token_confidence_needs_an_alternative() -> None:
    with pytest.raises(ValueError, match="at least one"):
        token_confidence([])


def test_summarize_hand_computed() -> None:
    # Windows of 2 over [4, 2, 0, 6, 8]: means 3, 1, 3, 7 -> lowest 1; tail = (6 + 8) / 2.
    figures = summarize([4.0, 2.0, 0.0, 6.0, 8.0], window=2)
    assert figures.mean == pytest.approx(4.0)
    assert figures.lowest_group == pytest.approx(1.0)
    assert figures.tail == pytest.approx(7.0)
    assert figures.window == 2
    assert figures.token_count == 5
    assert figures.tokens is None


def test_summarize_scales_the_window_down_for_short_outputs() -> None:
    figures = summarize([1.0, 2.0, 6.0], window=2048)
    assert figures.window == 3
    assert figures.mean == figures.lowest_group == figures.tail == pytest.approx(3.0)


def test_summarize_keeps_tokens_only_when_asked() -> None:
    assert summarize([1.0, 2.0], window=4, keep_tokens=True).tokens == [1.0, 2.0]
    assert summarize([1.0, 2.0], window=4).tokens is None


def test_summarize_rejects_empty_output() -> None:
    with pytest.raises(ValueError, match="at least one token"):
        summarize([], window=4)


@pytest.mark.parametrize("window", [0, -3])
def test_window_must_be_positive(window: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        WindowedConfidence(window)
    with pytest.raises(ValueError, match="at least 1"):
        effective_window(window, 10)


def test_effective_window() -> None:
    assert effective_window(2048, 100) == 100
    assert effective_window(16, 100) == 16
    assert effective_window(16, 0) == 1


def test_monitor_streams_hand_computed_values() -> None:
    monitor = WindowedConfidence(3)
    assert monitor.current is None and monitor.lowest is None and monitor.mean is None
    assert not monitor.below(100.0)
    monitor.add([5.0, 1.0])
    # Fewer than a window: the figures are over every token so far, and early stop waits.
    assert monitor.current == pytest.approx(3.0)
    assert monitor.lowest == pytest.approx(3.0)
    assert not monitor.full and not monitor.below(100.0)
    monitor.add([0.0])  # window [5, 1, 0] -> 2
    assert monitor.full
    assert monitor.current == pytest.approx(2.0)
    assert monitor.below(2.5) and not monitor.below(2.0)
    monitor.add([9.0, 9.0])  # windows [1, 0, 9] -> 10/3, [0, 9, 9] -> 6
    assert monitor.current == pytest.approx(6.0)
    assert monitor.lowest == pytest.approx(2.0)
    assert monitor.mean == pytest.approx(24.0 / 5)
    assert monitor.count == 5


def test_lowest_group_at_hand_computed() -> None:
    values = [5.0, 1.0, 0.0, 9.0, 9.0]
    # Window 3: full-window means after tokens 2, 3, 4 are 2, 10/3, 6.
    assert lowest_group_at(values, 3, 2.5) == 2
    assert lowest_group_at(values, 3, 2.0) is None
    # Window 1: the first token under the threshold.
    assert lowest_group_at(values, 1, 0.5) == 2
    # Window 2: means 3, 0.5, 4.5, 9 after tokens 1..4; only full windows count.
    assert lowest_group_at(values, 2, 4.0) == 1
    # A window longer than the output never stops it.
    assert lowest_group_at(values, 6, 100.0) is None


# Token confidences are non-negative (logprobs are <= 0); bounded to keep sums exact enough.
confidences = st.lists(st.floats(min_value=0.0, max_value=30.0), min_size=1, max_size=60)
windows = st.integers(min_value=1, max_value=12)
# No per-example deadline: the test machine is shared and busy; the work per example is tiny.
unhurried = settings(deadline=None)


def _reference(values: list[float], window: int) -> tuple[float, float, float]:
    """Mean, lowest group and tail recomputed naively, window by window."""
    width = min(window, len(values))
    groups = [math.fsum(values[i : i + width]) / width for i in range(len(values) - width + 1)]
    return math.fsum(values) / len(values), min(groups), math.fsum(values[-width:]) / width


@unhurried
@given(confidences, windows)
def test_summarize_matches_a_naive_computation(values: list[float], window: int) -> None:
    mean, lowest, tail = _reference(values, window)
    figures = summarize(values, window)
    assert figures.mean == pytest.approx(mean, abs=1e-9)
    assert figures.lowest_group == pytest.approx(lowest, abs=1e-9)
    assert figures.tail == pytest.approx(tail, abs=1e-9)
    assert figures.window == min(window, len(values))
    assert figures.token_count == len(values)


@unhurried
@given(confidences, windows, st.lists(st.integers(min_value=1, max_value=7), min_size=1))
def test_monitor_fed_in_chunks_agrees_with_summarize(values: list[float], window: int, sizes: list[int]) -> None:
    """The engine feeds streamed chunks of any size; the figures must not depend on the chunking."""
    monitor = WindowedConfidence(window)
    start = 0
    for size in sizes * len(values):
        if start >= len(values):
            break
        monitor.add(values[start : start + size])
        start += size
    monitor.add(values[start:])
    figures = summarize(values, window)
    if len(values) >= window:
        assert monitor.lowest == pytest.approx(figures.lowest_group, abs=1e-9)
        assert monitor.current == pytest.approx(figures.tail, abs=1e-9)
    else:
        # Short output: the monitor's figures use every token, as the scaled window does.
        assert monitor.lowest == pytest.approx(figures.mean, abs=1e-9)
        assert monitor.current == pytest.approx(figures.tail, abs=1e-9)
    assert monitor.mean == pytest.approx(figures.mean, abs=1e-9)


@unhurried
@given(confidences, windows, st.floats(min_value=0.0, max_value=30.0))
def test_lowest_group_at_is_the_first_full_window_under_threshold(
    values: list[float], window: int, threshold: float
) -> None:
    cut = lowest_group_at(values, window, threshold)
    full_means = {i: math.fsum(values[i - window + 1 : i + 1]) / window for i in range(window - 1, len(values))}
    under = [i for i, mean in full_means.items() if mean < threshold - 1e-9]
    clearly_over = all(mean > threshold + 1e-9 for mean in full_means.values())
    if clearly_over:
        assert cut is None
    if under:
        assert cut is not None and cut <= under[0]
    if cut is not None:
        assert cut >= window - 1
        # The cut output's tail (its last full window) is under the threshold.
        assert summarize(values[: cut + 1], window).tail < threshold + 1e-9


def test_trajectory_from_completion_records_confidence_with_the_policy_window() -> None:
    completion = Completion(
        text="<think>x</think>The answer is 4.",
        finish_reason="stop",
        prompt_tokens=3,
        completion_tokens=4,
        token_confidences=[4.0, 2.0, 0.0, 6.0],
    )
    trajectory = Trajectory.from_completion(1, 2, completion, ComputePolicy(window=2, keep_token_confidences=True))
    assert (trajectory.round, trajectory.index) == (1, 2)
    assert trajectory.message == "The answer is 4."
    assert trajectory.completion_tokens == 4
    assert trajectory.confidence is not None
    assert trajectory.confidence.lowest_group == pytest.approx(1.0)
    assert trajectory.confidence.tail == pytest.approx(3.0)
    assert trajectory.confidence.tokens == [4.0, 2.0, 0.0, 6.0]
    # Without a policy: the default window (scaled to the 4 tokens), figures only.
    default = Trajectory.from_completion(0, 0, completion)
    assert default.confidence is not None
    assert default.confidence.window == 4 and default.confidence.tokens is None


def test_trajectory_from_completion_without_logprobs_has_no_confidence() -> None:
    for token_confidences in (None, list[float]()):
        completion = Completion(text="4", token_confidences=token_confidences)
        assert Trajectory.from_completion(0, 0, completion, ComputePolicy(confidence=True)).confidence is None
    failed = Trajectory.from_completion(0, 1, Completion(text="", error="boom", error_kind="status"))
    assert failed.message is None and failed.error == "boom" and failed.confidence is None
