"""Schedules: presets, accepted spellings, clear errors, and properties."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pacore.errors import ScheduleError, UsageError
from pacore.schedule import MAX_TRAJECTORIES_PER_ROUND, PRESETS, Schedule


@pytest.mark.parametrize(
    ("preset", "rounds"),
    [("low", [4]), ("medium", [16]), ("high", [32, 4]), ("off", []), ("HIGH", [32, 4]), (" Low ", [4])],
)
def test_presets_match_the_report(preset, rounds):
    assert Schedule.parse(preset).as_list() == rounds


def test_default_schedule_is_low():
    assert Schedule.parse(None).as_list() == [4]


@pytest.mark.parametrize(
    ("value", "rounds"),
    [
        ("4", [4]),
        ("32,4", [32, 4]),
        ("[32, 4]", [32, 4]),
        (" 8 ", [8]),
        (" 16 , 2 ", [16, 2]),
        ("+3", [3]),
        ("[]", []),
        (7, [7]),
        ([32, 4], [32, 4]),
        ((2, 2, 2), [2, 2, 2]),
        (["8", " 2"], [8, 2]),
        ([], []),
        (iter([5, 1]), [5, 1]),
        (MAX_TRAJECTORIES_PER_ROUND, [MAX_TRAJECTORIES_PER_ROUND]),
    ],
)
def test_accepted_forms(value, rounds):
    assert Schedule.parse(value).as_list() == rounds


def test_a_schedule_passes_through_parse_unchanged():
    schedule = Schedule.parse("32,4")
    assert Schedule.parse(schedule) is schedule


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("0", "at least 1"),
        ("-1", "at least 1"),
        ("a", "'a' is not a count"),
        ("4,,2", "empty entry"),
        (",", "empty entry"),
        ("4,", "empty entry"),
        ("1.5", "'1.5' is not a count"),
        ("", "empty schedule"),
        ("   ", "empty schedule"),
        (True, "invalid schedule True"),
        ([0], "at least 1"),
        ([-3], "at least 1"),
        (["x"], "'x' is not a count"),
        ([True], "True is not a count"),
        ([1.5], "'1.5' is not a count"),
        (1.5, "invalid schedule 1.5"),
        (b"4", "invalid schedule b'4'"),
        ({"k": 4}, "invalid schedule"),
        ("4,low", "preset name cannot be mixed"),
        ("[[4]]", "'[4]' is not a count"),
        ("\u0663", "is not a count"),  # an Arabic-Indic digit: counts are ASCII
        (str(MAX_TRAJECTORIES_PER_ROUND + 1), "exceeds the limit"),
        (MAX_TRAJECTORIES_PER_ROUND + 1, "exceeds the limit"),
        ([10**12], "exceeds the limit"),
        ("9" * 5000, "5000-digit count exceeds the limit"),
    ],
)
def test_bad_forms_name_the_problem(value, problem):
    with pytest.raises(ScheduleError) as caught:
        Schedule.parse(value)
    message = str(caught.value)
    assert problem in message
    assert "\n" not in message and len(message) < 200


def test_schedule_errors_are_usage_errors():
    # The CLI maps UsageError to exit code 2 and the server to a 400.
    assert issubclass(ScheduleError, UsageError)


def test_direct_construction_is_validated_too():
    with pytest.raises(ScheduleError, match="at least 1"):
        Schedule((4, 0))
    with pytest.raises(ScheduleError, match="whole numbers"):
        Schedule((True,))  # type: ignore[arg-type]


def test_round_counts_and_names():
    high = Schedule.parse("high")
    assert high.ks == (32, 4, 1)
    assert high.total_calls == 37
    assert high.name() == "high"
    assert Schedule.parse("5,3").name() == "5,3"
    assert Schedule.parse("off").is_passthrough and Schedule.parse("off").ks == (1,)
    assert str(Schedule.parse([])) == "off"
    assert set(PRESETS) == {"low", "medium", "high", "off"}


@given(st.lists(st.integers(min_value=1, max_value=MAX_TRAJECTORIES_PER_ROUND), max_size=8))
def test_any_valid_schedule_round_trips_through_text(rounds):
    schedule = Schedule.parse(rounds)
    assert Schedule.parse(schedule.text()) == schedule
    assert Schedule.parse(str(schedule.as_list())) == schedule


@given(st.text())
def test_arbitrary_text_raises_only_schedule_errors(text):
    try:
        schedule = Schedule.parse(text)
    except ScheduleError as exc:
        assert str(exc)
    else:
        assert all(1 <= k <= MAX_TRAJECTORIES_PER_ROUND for k in schedule.rounds)


@given(st.lists(st.one_of(st.integers(), st.text(max_size=8), st.floats(), st.booleans(), st.none())))
def test_arbitrary_lists_raise_only_schedule_errors(items):
    try:
        schedule = Schedule.parse(items)
    except ScheduleError:
        return
    assert all(isinstance(k, int) and k >= 1 for k in schedule.rounds)
