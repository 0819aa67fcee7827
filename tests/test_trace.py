"""The trace records: a backend's Completion and the Trajectory it becomes share one set of fields."""

from __future__ import annotations

import json

from pacore.backends.base import Completion
from pacore.trace import CallOutcome, Trajectory

FAILED = Completion(
    text="partial",
    reasoning="thinking",
    finish_reason="length",
    prompt_tokens=7,
    completion_tokens=11,
    latency_s=1.5,
    error="timeout after 3 streamed chunks",
    error_kind="timeout",
    failed_attempts=("status 503",),
    token_confidences=[2.0, 4.0],
)


def test_a_trajectory_records_every_field_of_its_completion_but_the_token_confidences() -> None:
    trajectory = Trajectory.from_completion(1, 3, FAILED)
    assert {name: getattr(trajectory, name) for name in CallOutcome.model_fields} == {
        name: getattr(FAILED, name) for name in CallOutcome.model_fields
    }
    assert (trajectory.round, trajectory.index, trajectory.message) == (1, 3, None)  # failed: no message
    assert trajectory.confidence is not None and trajectory.confidence.mean == 3.0
    assert "token_confidences" not in trajectory.model_dump()
    assert not trajectory.ok and Completion(text="4").ok


def test_a_trajectory_stored_with_the_earlier_key_order_loads_the_same() -> None:
    # How runs stored before the shared fields wrote a trajectory: round and index first.
    stored = (
        '{"round": 0, "index": 2, "text": "so 4", "reasoning": null, "message": "so 4", "finish_reason": "stop",'
        ' "prompt_tokens": 5, "completion_tokens": 9, "latency_s": 0.5, "error": null, "error_kind": null,'
        ' "failed_attempts": ["timeout"], "finish_order": 1, "confidence": null, "stopped": null}'
    )
    loaded = Trajectory.model_validate_json(stored)
    assert loaded.model_dump() == json.loads(stored) | {"failed_attempts": ("timeout",)}
    assert Trajectory.model_validate_json(loaded.model_dump_json()) == loaded


def test_a_lone_surrogate_becomes_a_replacement_character_in_both_records() -> None:
    completion = Completion(text="half \ud800 pair", reasoning="\udfff")
    assert (completion.text, completion.reasoning) == ("half \ufffd pair", "\ufffd")
    trajectory = Trajectory(round=0, index=0, text="x\udc80")
    assert trajectory.text == "x\ufffd"
    assert trajectory.model_dump_json()  # storable: no surrogate left to fail UTF-8
