"""Issue 13 tried as a new user would: settings of a policy that is off are refused
(rather than silently ignored) at every front door, with a one-line message; runs, servers
and keep-top refuse or fix what a new user tripped over."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from cli_harness import assert_one_line_error, closed_port_url, pacore, pacore_in_process
from fakes import StreamingScriptedBackend
from pacore import ComputePolicy, engine
from pacore.cli.options import compute_policy
from pacore.errors import UsageError
from pacore.schedule import Schedule
from pacore.server import ServerConfig
from pacore.synthesis import keep_most_confident
from pacore.trace import Confidence, Trajectory
from server_harness import RunningServer, running_app

#: Each setting given without its policy, the CLI's message, and the same setting with its policy.
ORPHANS = [
    ({"warmup": 2}, "--warmup needs --early-stop", {"early_stop": True}),
    ({"early_stop_percentile": 90.0}, "--early-stop-percentile needs --early-stop", {"early_stop": True}),
    ({"warmup_first": True}, "--warmup-first needs --early-stop", {"early_stop": True}),
    ({"wave": 3}, "--wave needs --adaptive-k", {"adaptive_k": True}),
    ({"settle_threshold": 0.9}, "--settle-threshold needs --adaptive-k", {"adaptive_k": True}),
    ({"straggler_timeout": 1.0}, "--straggler-timeout needs --quorum", {"quorum": 0.5}),
]


@pytest.mark.parametrize(("setting", "message", "policy"), ORPHANS)
def test_a_setting_without_its_policy_is_refused_naming_both_flags(setting, message, policy):
    with pytest.raises(UsageError) as caught:
        compute_policy(**setting)
    assert str(caught.value) == message
    assert compute_policy(**setting, **policy) == ComputePolicy(**setting, **policy)


def test_a_dumped_policy_validates_again():
    # Stored runs and traces keep every field of their policy, defaults included.
    for policy in (ComputePolicy(), ComputePolicy(keep_top=0.5), ComputePolicy(early_stop=True, warmup=2)):
        assert ComputePolicy.model_validate(policy.model_dump()) == policy


def test_the_python_api_says_which_policy_a_setting_needs():
    with pytest.raises(UsageError, match=r"^compute policy: wave needs adaptive_k$"):
        engine.compute_policy({"wave": 3})


def test_pacore_ask_refuses_a_setting_without_its_policy_with_exit_2():
    process = pacore_in_process("ask", "--wave", "3", "--backend", closed_port_url(), "hi")
    assert_one_line_error(process, 2, "pacore: error: --wave needs --adaptive-k")


@pytest.fixture
def fake() -> StreamingScriptedBackend:
    return StreamingScriptedBackend(respond=lambda call, i: "The answer is 42.")


@pytest.fixture
def server(fake) -> Iterator[RunningServer]:
    with running_app(fake, ServerConfig(schedule=Schedule.parse([2]))) as running:
        yield running


@pytest.mark.http
@pytest.mark.parametrize("stream", [False, True])
def test_the_server_answers_400_for_a_setting_without_its_policy(server, fake, stream):
    client = openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="scripted", messages=[{"role": "user", "content": "hi"}], stream=stream,
            extra_body={"pacore": {"compute": {"early_stop_percentile": 90}}},
        )  # fmt: skip
    assert caught.value.body["param"] == "pacore.compute"
    assert caught.value.body["message"] == "pacore.compute: early_stop_percentile needs early_stop"
    assert fake.calls == []


TOO_SMALL = "pacore: error: budget_tokens=10 cannot run one trajectory of each of the 2 rounds at max_tokens=100"


def test_pacore_run_refuses_a_budget_below_one_call_per_round_before_writing_anything(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"id": "a", "question": "What is 1 plus 1?", "answer": "2"}\n')
    out = tmp_path / "run"
    process = pacore_in_process("run", str(data), "--out", str(out), "--schedule", "4", "--budget-tokens", "10",
                     "--max-tokens", "100", "--backend", closed_port_url())  # fmt: skip
    assert_one_line_error(process, 2, TOO_SMALL)
    assert not out.exists()


def test_pacore_serve_refuses_a_default_policy_no_request_could_run():
    # A subprocess, with a timeout: accepted by mistake, serve would listen for ever in this process.
    process = pacore("serve", "--port", "0", "--schedule", "4", "--budget-tokens", "10", "--max-tokens", "100",
                     "--backend", closed_port_url())  # fmt: skip
    assert_one_line_error(process, 2, TOO_SMALL)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"quorum": 0.5, "straggler_timeout": float("inf")}, "--straggler-timeout: input should be a finite number"),
        ({"keep_top": float("nan")}, "--keep-top: input should be a finite number, got nan"),
    ],
)
def test_non_finite_policy_values_are_refused(flags, message):
    with pytest.raises(UsageError) as caught:
        compute_policy(**flags)
    assert str(caught.value).startswith(message)


@pytest.mark.parametrize(("flag", "value"), [("--quorum", "0.5"), ("--budget-tokens", "9000")])
def test_pacore_run_refuses_quorum_and_budget_arms_on_a_pool(tmp_path, flag, value):
    # On a pool round 1 is finished trajectories: nothing to cut, so the arm would measure the fixed schedule.
    data = tmp_path / "d.jsonl"
    data.write_text('{"id": "a", "question": "What is 1 plus 1?", "answer": "2"}\n')
    out = tmp_path / "run"
    process = pacore_in_process("run", str(data), "--out", str(out), "--pool-size", "4", "--schedule", "4", flag, value,
                     "--backend", closed_port_url())  # fmt: skip
    assert_one_line_error(process, 2, f"pacore: error: {flag} cannot be replayed on the trajectory pool of {out}: "
                                      "run such an arm in a run directory without --pool-size")  # fmt: skip


@pytest.mark.parametrize(("fraction", "count", "kept"), [(0.28, 25, 7), (0.56, 50, 28), (0.7, 10, 7), (0.67, 3, 3)])
def test_keep_top_keeps_the_fraction_rounded_up_without_float_noise(fraction, count, kept):
    def trajectory(index: int) -> Trajectory:
        confidence = Confidence(mean=float(index), lowest_group=float(index), tail=float(index), window=4,
                                token_count=4)  # fmt: skip
        return Trajectory(round=0, index=index, text="m", message="m", confidence=confidence)

    chosen, dropped = keep_most_confident([trajectory(i) for i in range(count)], fraction)
    assert (len(chosen), len(dropped)) == (kept, count - kept)
    assert [t.index for t in chosen] == list(range(count - kept, count))  # the most confident


@pytest.mark.http
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("pacore", "max_tokens", "message"),
    [
        ({"compute": {"budget_tokens": 60}}, 50, "budget_tokens=60 cannot run one trajectory of each of the 2 rounds"),
        ({"compute": {"keep_top": 0.5}, "schedule": []}, None, "need a schedule with at least one coordinated round"),
    ],
)
def test_a_policy_the_request_cannot_run_is_a_400_streamed_or_not(server, fake, stream, pacore, max_tokens, message):
    client = openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="scripted", messages=[{"role": "user", "content": "hi"}], stream=stream,
            max_tokens=max_tokens or openai.NOT_GIVEN, extra_body={"pacore": pacore},
        )  # fmt: skip
    assert caught.value.status_code == 400 and message in caught.value.body["message"]
    assert fake.calls == []
