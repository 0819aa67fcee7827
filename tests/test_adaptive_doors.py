"""The adaptive-compute policies through every front door: SolveOptions, the CLI
flags of ``pacore ask`` and ``pacore run``, the server's ``pacore.compute`` object,
its response summary and the trace viewer's data.

Validation runs against the real entry point and a real loopback server (the
openai SDK as client). The end-to-end tests run the engine's policies against
bench/fastbackend.py's simulated model, which returns OpenAI-format logprobs.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from cli_harness import pacore_in_process
from fakes import StreamingScriptedBackend
from harness import fast_backend  # noqa: E402
from pacore import ComputePolicy, engine
from pacore.backends import open_backend
from pacore.backends.base import GenerationParams
from pacore.cli.options import compute_policy
from pacore.errors import UsageError
from pacore.eval.datasets import Problem
from pacore.eval.report import collect, plot_points
from pacore.eval.runner import Arm, run_dataset
from pacore.options import SolveOptions
from pacore.progress import round_details, trajectory_line
from pacore.schedule import Schedule
from pacore.server import ServerConfig
from pacore.store import RunStore
from pacore.trace import Confidence, Round, Trajectory
from server_harness import RunningServer, running_app, running_cli

PACORE = shutil.which("pacore", path=str(Path(sys.executable).parent)) or shutil.which("pacore")


def pacore(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    assert PACORE, "the pacore entry point is not installed next to this Python"
    env = {k: v for k, v in os.environ.items() if k not in ("PACORE_API_KEY", "OPENAI_API_KEY", "PACORE_DEBUG")}
    return subprocess.run([PACORE, *args], capture_output=True, text=True, timeout=timeout, env=env)


# --- SolveOptions ------------------------------------------------------------------


def test_solve_options_are_asolve_keywords_and_leave_compute_out_when_off():
    accepted = set(inspect.signature(engine.asolve).parameters)
    plain = SolveOptions(schedule=Schedule.parse("4"), seed=3, deadline=9.0).as_kwargs()
    assert set(plain) <= accepted
    assert "compute" not in plain  # the paper's method: the engine is called exactly as before
    assert "compute" not in SolveOptions(compute=ComputePolicy()).as_kwargs()
    policy = ComputePolicy(keep_top=0.5)
    assert SolveOptions(compute=policy).as_kwargs()["compute"] == policy


def test_solve_options_replace_keeps_the_rest():
    base = SolveOptions(schedule=Schedule.parse("4"), min_success=0.5, reference_order="release")
    changed = base.replace(seed=7)
    assert (changed.seed, changed.min_success, changed.reference_order) == (7, 0.5, "release")
    assert base.seed is None


# --- the CLI -------------------------------------------------------------------------


def test_compute_policy_from_flags():
    assert compute_policy(confidence=False, keep_top=None) is None
    policy = compute_policy(keep_top=0.5, early_stop=True, warmup=2, window=64, confidence=False)
    assert policy == ComputePolicy(keep_top=0.5, early_stop=True, warmup=2, window=64)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"keep_top": 1.5}, "--keep-top: input should be less than or equal to 1, got 1.5"),
        ({"top_logprobs": 21}, "--top-logprobs: input should be less than or equal to 20, got 21"),
        ({"window": 0}, "--confidence-window: input should be greater than or equal to 1, got 0"),
        ({"straggler_timeout": 2.0}, "--straggler-timeout needs --quorum"),
        ({"settle_threshold": 0.3}, "--settle-threshold: input should be greater than 0.5, got 0.3"),
    ],
)
def test_bad_policy_flags_name_the_flag(flags, message):
    with pytest.raises(UsageError) as caught:
        compute_policy(**flags)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["ask", "--quorum", "0", "hi"], "--quorum: input should be greater than 0, got 0.0"),
        (["ask", "--straggler-timeout", "1", "hi"], "--straggler-timeout needs --quorum"),
        (["ask", "--budget-tokens", "0", "hi"], "--budget-tokens: input should be greater than or equal to 1"),
        (["ask", "--warmup", "0", "--early-stop", "hi"], "--warmup: input should be greater than or equal to 1"),
    ],
)
def test_cli_refuses_bad_policy_values_with_exit_2(args, fragment):
    process = pacore_in_process(*args, "--backend", "http://127.0.0.1:9/v1")
    lines = [line for line in process.stderr.splitlines() if line.strip()]
    assert process.returncode == 2, process.stderr
    assert lines == [f"pacore: error: {lines[0].removeprefix('pacore: error: ')}"] and fragment in lines[0]
    assert "Traceback" not in process.stderr


def test_ask_help_lists_every_policy_flag():
    process = pacore("ask", "--help")
    assert process.returncode == 0
    for flag in (
        "--confidence", "--top-logprobs", "--confidence-window", "--keep-top", "--early-stop", "--warmup",
        "--early-stop-percentile", "--warmup-first", "--adaptive-k", "--wave", "--settle-threshold", "--quorum",
        "--straggler-timeout", "--budget-tokens",
    ):  # fmt: skip
        assert flag in process.stdout, flag


# --- batch-run arms ------------------------------------------------------------------


def test_an_arm_is_a_schedule_and_a_policy():
    plain = Arm.build("pacore", schedule="4")
    assert plain.name == "pacore-4" and plain.compute is None
    assert Arm.build("pacore", schedule="4", compute=ComputePolicy()).name == "pacore-4"
    arm = Arm.build("pacore", schedule="8", compute=ComputePolicy(keep_top=0.5, early_stop=True, warmup=2))
    assert arm.name == "pacore-8+keep-top=0.5+early-stop+warmup=2"
    with pytest.raises(UsageError, match="for --method pacore, not majority"):
        Arm.build("majority", samples=4, compute=ComputePolicy(quorum=0.5))


# --- the server ----------------------------------------------------------------------


@pytest.fixture
def fake() -> StreamingScriptedBackend:
    return StreamingScriptedBackend(respond=lambda call, i: "The answer is 42.")


@pytest.fixture
def server(fake) -> Iterator[RunningServer]:
    with running_app(fake, ServerConfig(schedule=Schedule.parse([2]))) as running:
        yield running


def ask(running: RunningServer, **options):
    client = openai.OpenAI(base_url=running.api_url, api_key="unused", max_retries=0)
    return client.chat.completions.create(
        model="scripted", messages=[{"role": "user", "content": "What is six times seven?"}], **options
    )


@pytest.mark.parametrize(
    ("compute", "param", "words"),
    [
        ({"keep_top": 1.5}, "pacore.compute.keep_top", "less than or equal to 1"),
        ({"keep_top": "0.5"}, "pacore.compute.keep_top", "valid number"),
        ({"early_stop": 1}, "pacore.compute.early_stop", "valid boolean"),
        ({"warmup": 2.5}, "pacore.compute.warmup", "valid integer"),
        ({"top_logprobs": 40}, "pacore.compute.top_logprobs", "less than or equal to 20"),
        ({"keep_topp": 0.5}, "pacore.compute.keep_topp", "Extra inputs are not permitted"),
        ({"straggler_timeout": 1.0}, "pacore.compute", "straggler_timeout needs quorum"),
        ("fast", "pacore.compute", "valid dictionary"),
    ],
)
def test_bad_compute_objects_get_400_naming_the_field(server, fake, compute, param, words):
    with pytest.raises(openai.BadRequestError) as caught:
        ask(server, extra_body={"pacore": {"compute": compute}})
    assert caught.value.status_code == 400
    assert caught.value.body["param"] == param
    assert words in caught.value.body["message"]
    assert fake.calls == []


def test_a_request_without_policy_has_no_compute_summary(server, fake):
    completion = ask(server)
    assert "compute" not in completion.model_extra["pacore"]
    assert [call.params.top_logprobs for call in fake.calls] == [None] * 3


# --- end to end on the simulated model (bench/fastbackend.py --simulate: logprobs) ---------


@pytest.fixture(scope="module")
def simulated_url() -> Iterator[str]:
    with fast_backend("--simulate", "--sim-median-tokens", 60) as backend:
        yield backend.url


@pytest.fixture
def policy_server(simulated_url) -> Iterator[RunningServer]:
    with running_app(open_backend(simulated_url), ServerConfig(schedule=Schedule.parse([8]))) as running:
        yield running


def test_keep_top_through_the_server_drops_the_least_confident_and_the_viewer_shows_it(policy_server):
    compute = {"keep_top": 0.5, "window": 16, "keep_token_confidences": True}
    completion = ask(policy_server, seed=1, extra_body={"pacore": {"compute": compute}})
    summary = completion.model_extra["pacore"]["compute"]
    assert summary["policy"] == compute
    assert summary["dropped"] == 4
    assert summary["with_confidence"] >= 8 and summary["mean_confidence"] > 0
    assert summary["notes"] == ["round 2: keep-top: 4 of 8 messages kept"]
    detail = httpx.get(f"{policy_server.base_url}/ui/api/requests/{completion.id}").json()
    first, synthesis = detail["rounds"]
    confidences = {t["index"]: t["confidence"]["lowest_group"] for t in first["trajectories"]}
    # The viewer keeps figures, never per-token values, even when the request kept them.
    assert len(confidences) == 8 and all(t["confidence"]["tokens"] is None for t in first["trajectories"])
    stored = policy_server.app.state.pacore.history.get(completion.id).rounds[0].trace.trajectories
    assert all(t.confidence.tokens is None for t in stored)
    dropped = {index for _round, index in synthesis["dropped"]}
    kept = set(confidences) - dropped
    assert len(dropped) == 4 and synthesis["policy_note"] == "keep-top: 4 of 8 messages kept"
    # The dropped messages are the least confident ones.
    assert max(confidences[i] for i in dropped) <= min(confidences[i] for i in kept)


def test_early_stop_through_a_streamed_request_reports_stopped_trajectories(policy_server):
    client = openai.OpenAI(base_url=policy_server.api_url, api_key="unused", max_retries=0)
    # The warm-up first (DeepConf's online algorithm): every later trajectory is judged, however fast it runs.
    compute = {"early_stop": True, "warmup": 2, "warmup_first": True, "window": 16, "early_stop_percentile": 90}
    stream = client.chat.completions.create(
        model="scripted", messages=[{"role": "user", "content": "Problem 7"}], seed=1, stream=True,
        extra_body={"pacore": {"compute": compute}},
    )  # fmt: skip
    chunks = list(stream)
    summary = chunks[-1].model_extra["pacore"]["compute"]
    progress = "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks if c.choices)
    assert "round 1/2: " in progress and "trajectories" in progress and "(early stop: threshold " in progress
    assert summary["stopped"]["early_stop"] >= 1
    assert summary["stopped_tokens"] > 0
    assert summary["notes"][0].startswith("round 1: early stop: threshold ")
    detail = httpx.get(f"{policy_server.base_url}/ui/api/requests/{chunks[0].id}").json()
    stopped = [t for t in detail["rounds"][0]["trajectories"] if t["stopped"] == "early_stop"]
    assert len(stopped) == summary["stopped"]["early_stop"]


#: DeepConf's online algorithm in full: early stop, the warm-up first, and adaptive width (its adaptive
#: sampling); a warm-up and waves of 4, the defaults.
DEEPCONF_ONLINE = {
    "early_stop": True,
    "warmup_first": True,
    "early_stop_percentile": 90,
    "window": 16,
    "adaptive_k": True,
}


def test_deepconf_online_through_the_server_reports_both_parts(policy_server):
    completion = ask(policy_server, seed=1, extra_body={"pacore": {"compute": DEEPCONF_ONLINE}})
    summary = completion.model_extra["pacore"]["compute"]
    assert summary["policy"] == DEEPCONF_ONLINE
    (note,) = summary["notes"]
    assert note.startswith("round 1: adaptive width: ") and "; early stop: threshold " in note
    detail = httpx.get(f"{policy_server.base_url}/ui/api/requests/{completion.id}").json()
    first = detail["rounds"][0]["trajectories"]
    stopped = [t["index"] for t in first if t["stopped"] == "early_stop"]
    assert len(stopped) == summary["stopped"].get("early_stop", 0)
    assert stopped and min(stopped) >= 4  # the warm-up is never stopped


def test_serve_flags_set_the_default_policy_a_request_may_replace(simulated_url):
    with running_cli("--backend", simulated_url, "--schedule", "4", "--keep-top", "0.5",
                     "--confidence-window", "16") as (running, _process):  # fmt: skip
        default = ask(running, seed=1).model_extra["pacore"]["compute"]
        own = ask(running, seed=1, extra_body={"pacore": {"compute": {"quorum": 1.0}}}).model_extra["pacore"]
    assert default["policy"] == {"keep_top": 0.5, "window": 16} and default["dropped"] == 2
    assert own["compute"]["policy"] == {"quorum": 1.0} and own["compute"]["dropped"] == 0


def test_ask_flags_reach_the_engine(simulated_url):
    process = pacore(
        "ask", "Problem 7", "--json", "--schedule", "8", "--seed", "1", "--backend", simulated_url,
        "--keep-top", "0.25", "--confidence-window", "16", "--adaptive-k", "--wave", "4",
    )  # fmt: skip
    assert process.returncode == 0, process.stderr
    trace = json.loads(process.stdout)
    first, synthesis = trace["rounds"]
    sampled = len(first["trajectories"])
    assert sampled in (4, 8) and first["policy_note"].startswith("adaptive width: ")
    assert all(t["confidence"]["window"] <= 16 for t in first["trajectories"])
    assert len(synthesis["references"]) == max(1, sampled // 4)
    assert len(synthesis["dropped"]) == sampled - len(synthesis["references"])


def test_deepconf_online_flags_together_reach_the_engine(simulated_url):
    process = pacore(
        "ask", "Problem 7", "--json", "--schedule", "16", "--seed", "1", "--backend", simulated_url,
        "--early-stop", "--warmup", "4", "--warmup-first", "--early-stop-percentile", "90",
        "--confidence-window", "16", "--adaptive-k", "--wave", "4",
    )  # fmt: skip
    assert process.returncode == 0, process.stderr
    first, synthesis = json.loads(process.stdout)["rounds"]
    # On this simulated problem early stop cuts most trajectories after the warm-up, so the
    # answers never settle: adaptive width samples all 16, and the note says both.
    assert first["policy_note"].startswith("adaptive width: not settled, sampled 16 of 16; early stop: threshold ")
    stopped = {t["index"] for t in first["trajectories"] if t["stopped"] == "early_stop"}
    assert stopped and min(stopped) >= 4
    assert {index for _round, index in synthesis["references"]} == set(range(16)) - stopped


# --- batch runs: policy arms and offline replay on a pool ------------------------------


def simulated_problems(count: int = 3) -> list[Problem]:
    return [
        Problem(id=f"p{i}", messages=[{"role": "user", "content": f"Problem {i}"}], answer="0", kind="math", line=i + 1)
        for i in range(count)
    ]


async def test_policy_arms_replay_on_a_pool_without_sampling_again(simulated_url, tmp_path):
    run_dir = tmp_path / "run"
    problems = simulated_problems()
    backend = open_backend(simulated_url, model="fast")
    params = GenerationParams(seed=1)
    try:
        early = Arm.build("pacore", schedule="8", compute=ComputePolicy(
            early_stop=True, warmup=2, window=16, early_stop_percentile=90,
        ))  # fmt: skip
        await run_dataset(run_dir, problems, dataset_path="d.jsonl", arm=early, backend=backend, params=params,
                          pool_size=8)  # fmt: skip
        with RunStore.open(run_dir) as store:
            pool = store.pool("p0")
        # Sampled for replay: every pooled trajectory keeps its per-token confidences.
        assert len(pool) == 8 and all(t.confidence and t.confidence.tokens for t in pool)
        calls_before = backend_calls(simulated_url)
        keep = Arm.build("pacore", schedule="8", compute=ComputePolicy(keep_top=0.5, window=16))
        await run_dataset(run_dir, problems, dataset_path="d.jsonl", arm=keep, backend=backend, params=params)
        # Round 1 came from the pool: one synthesis call per problem, nothing else.
        assert backend_calls(simulated_url) - calls_before == len(problems)
    finally:
        await backend.aclose()
    with RunStore.open(run_dir) as store:
        assert {a.name for a in store.arms()} == {early.name, keep.name}
        replayed = [r.trace for r in store.results(early.name)]
        kept = [r.trace for r in store.results(keep.name)]
    assert all(t.rounds[0].policy_note.endswith("(replayed)") for t in replayed)
    assert any(t.stopped == "early_stop" for trace in replayed for t in trace.rounds[0].trajectories)
    assert all(len(trace.rounds[1].dropped) == 4 for trace in kept)


def backend_calls(url: str) -> int:
    return httpx.get(url.removesuffix("/v1") + "/stats").json()["calls"]


@pytest.mark.slow
def test_run_and_report_place_policy_arms_next_to_the_fixed_schedule(simulated_url, tmp_path):
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "question": f"Problem {i}", "answer": "0"}) + "\n"
                            for i in range(3)))  # fmt: skip
    run_dir = tmp_path / "run"
    common = ["--out", str(run_dir), "--backend", simulated_url, "--model", "fast", "--seed", "1", "-q"]
    pooled = pacore("run", str(data), *common, "--pool-size", "8", "--schedule", "8", "--confidence",
                    "--confidence-window", "16")  # fmt: skip
    assert pooled.returncode == 0, pooled.stderr
    kept = pacore("run", str(data), *common, "--schedule", "8", "--keep-top", "0.5", "--confidence-window", "16")
    assert kept.returncode == 0, kept.stderr
    assert "pacore-8+window=16+keep-top=0.5: 3/3 answered" in kept.stdout
    fixed = pacore("run", str(data), *common, "--schedule", "4")
    assert fixed.returncode == 0, fixed.stderr
    refused = pacore("run", str(data), *common, "--method", "majority", "--samples", "4", "--quorum", "0.5")
    assert refused.returncode == 2 and "the adaptive-compute options are for --method pacore" in refused.stderr

    report = pacore("report", str(run_dir), "--json")
    assert report.returncode == 0, report.stderr
    methods = {m["arm"]: m for m in json.loads(report.stdout)["methods"]}
    assert set(methods) == {"pacore-8+confidence+window=16", "pacore-8+window=16+keep-top=0.5", "pacore-4"}
    policy_arm = methods["pacore-8+window=16+keep-top=0.5"]
    assert policy_arm["compute"] == {"window": 16, "keep_top": 0.5}
    assert policy_arm["dropped_messages"] == 3 * 4
    assert methods["pacore-4"]["compute"] is None and methods["pacore-4"]["dropped_messages"] == 0
    markdown = (run_dir / "report.md").read_text()
    assert "| 8 +window=16+keep-top=0.5 |" in markdown
    assert "## Adaptive compute" in markdown
    assert "| pacore-8+window=16+keep-top=0.5 | window=16+keep-top=0.5 | " in markdown
    assert "| pacore-4 | " not in markdown.split("## Adaptive compute")[1].split("##")[0]

    with RunStore.open(run_dir) as store:
        arms = {arm.name: arm for arm in store.arms()}
    series = plot_points(collect([run_dir]), with_run=False)
    assert set(series) == {"pacore", "pacore +confidence+window=16", "pacore +window=16+keep-top=0.5"}
    assert arms["pacore-4"].compute is None


# --- the progress display (pacore ask --show-rounds) ------------------------------------


def test_show_rounds_lines_say_what_the_policies_did():
    confidence = Confidence(mean=11.5, lowest_group=9.25, tail=10.0, window=16, token_count=80)
    answer = Trajectory(
        round=1, index=0, text="The answer is 4.", message="The answer is 4.", completion_tokens=5,
        confidence=confidence,
    )  # fmt: skip
    rnd = Round(
        index=1, k=1, final=True, references=[(0, 0)], dropped=[(0, 2), (0, 1)],
        policy_note="keep-top: 1 of 3 messages kept", trajectories=[answer],
    )  # fmt: skip
    assert round_details(rnd) == [
        "  the synthesis call read the answer of round 1",
        "  keep-top left out the least confident of round 1: #3, #2",
        "  policy: keep-top: 1 of 3 messages kept",
        '  #1 · 5 tokens · confidence 11.50 (lowest group 9.25) · answer: 4 · "The answer is 4."',
    ]
    stopped = Trajectory(round=0, index=3, text="Let me", completion_tokens=40, stopped="early_stop")
    assert trajectory_line(stopped) == "#4 · 40 tokens · stopped by early stop: contributes no message"


def test_ask_show_rounds_on_the_simulated_model(simulated_url):
    process = pacore(
        "ask", "Problem 7", "--schedule", "8", "--seed", "1", "--backend", simulated_url, "--show-rounds",
        "--keep-top", "0.5", "--early-stop", "--warmup", "2", "--warmup-first", "--confidence-window", "16",
        "--early-stop-percentile", "90",
    )  # fmt: skip
    assert process.returncode == 0, process.stderr
    lines = process.stderr.splitlines()
    assert any(line.startswith("  policy: early stop: threshold ") for line in lines)
    assert any(line.startswith("  keep-top left out the least confident of round 1: #") for line in lines)
    assert any("stopped by early stop: contributes no message" in line for line in lines)
    assert sum(" · confidence " in line for line in lines) == 9  # 8 trajectories and the synthesis
    assert "stopped early by a policy, " in lines[-1]  # the summary line


def test_a_streamed_final_round_counts_the_references_keep_top_kept(policy_server):
    client = openai.OpenAI(base_url=policy_server.api_url, api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model="scripted", messages=[{"role": "user", "content": "Problem 7"}], seed=1, stream=True,
        extra_body={"pacore": {"compute": {"keep_top": 0.5, "window": 16}}},
    )  # fmt: skip
    chunks = list(stream)
    progress = "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks if c.choices)
    assert chunks[-1].model_extra["pacore"]["compute"]["notes"] == ["round 2: keep-top: 4 of 8 messages kept"]
    assert "round 2/2 (final): synthesizing the final answer from 4 references" in progress
