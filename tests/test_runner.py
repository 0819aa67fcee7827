"""The batch runner on a scripted backend: methods, resume, refusals, trajectory pools."""

from __future__ import annotations

import asyncio
import random
import threading
from pathlib import Path

import pytest

from fakes import Call, ScriptedBackend, fail
from pacore.backends.base import GenerationParams
from pacore.errors import RunConflictError, UsageError
from pacore.eval.datasets import Problem
from pacore.eval.runner import Arm, BatchRun, run_dataset
from pacore.prompts import SynthesisTemplate
from pacore.store import RunStore

SYNTHESIS_MARK = "Reference Responses"


def make_problems(count: int = 3) -> list[Problem]:
    return [
        Problem(
            id=f"q{i}",
            messages=[{"role": "user", "content": f"What is {i} plus one?"}],
            answer=str(i + 1),
            kind="gsm8k",
            line=i + 1,
        )
        for i in range(count)
    ]


def problem_number(call: Call) -> int:
    """Which problem a call is about (synthesis prompts quote the problem too)."""
    text = call.last_user_text
    return int(text.split("What is ")[1].split(" ")[0])


def is_synthesis(call: Call) -> bool:
    return SYNTHESIS_MARK in call.last_user_text


def right_after_synthesis(call: Call, i: int) -> str:
    """First-round samples are wrong; the synthesis is right."""
    n = problem_number(call)
    return f"The answer is {n + 1}" if is_synthesis(call) else f"The answer is {n + 7}"


async def run(tmp_path: Path, backend: ScriptedBackend, arm: Arm, problems: list[Problem] | None = None, **options):
    return await run_dataset(
        tmp_path / "run", problems or make_problems(), dataset_path="data.jsonl", arm=arm,
        backend=backend, **options,
    )  # fmt: skip


def results(tmp_path: Path, arm: str):
    with RunStore.open(tmp_path / "run") as store:
        return {r.problem_id: r for r in store.results(arm)}


# --- methods ----------------------------------------------------------------


async def test_pacore_arm_goes_through_the_engine_and_stores_whole_traces(tmp_path: Path) -> None:
    backend = ScriptedBackend(respond=right_after_synthesis)
    summary = await run(tmp_path, backend, Arm.build("pacore", schedule="2"))
    assert (summary.arm, summary.answered, summary.failed, summary.correct, summary.graded) == ("pacore-2", 3, 0, 3, 3)
    assert len(backend.calls) == 3 * 3  # 2 trajectories + 1 synthesis per problem
    stored = results(tmp_path, "pacore-2")
    q1 = stored["q1"]
    assert (q1.status, q1.answer, q1.extracted, q1.correct, q1.calls) == ("done", "The answer is 2", "2", True, 3)
    assert [len(r.trajectories) for r in q1.trace.rounds] == [2, 1]
    assert q1.completion_tokens == q1.trace.usage.completion_tokens == 3 * 4
    assert q1.prompt_tokens == q1.trace.usage.prompt_tokens > 0


async def test_single_is_one_plain_call(tmp_path: Path) -> None:
    backend = ScriptedBackend(respond=lambda call, i: f"It is {problem_number(call) + 1}.")
    summary = await run(tmp_path, backend, Arm.build("single"))
    assert (summary.answered, summary.correct) == (3, 3)
    assert len(backend.calls) == 3 and not any(is_synthesis(c) for c in backend.calls)


async def test_majority_votes_over_k_samples_and_keeps_them_all(tmp_path: Path) -> None:
    calls_per_problem: dict[int, int] = {}

    def reply(call: Call, i: int) -> str:
        # Samples 0 and 2 of each problem agree on the right answer, sample 1 is wrong.
        n = problem_number(call)
        calls_per_problem[n] = calls_per_problem.get(n, 0) + 1
        return f"so {n + 1 + (calls_per_problem[n] == 2)}"

    backend = ScriptedBackend(respond=reply, max_n=1)
    summary = await run(tmp_path, backend, Arm.build("majority", samples=3))
    assert (summary.arm, summary.answered, summary.correct) == ("majority-3", 3, 3)
    assert len(backend.calls) == 9 and not any(is_synthesis(c) for c in backend.calls)
    q0 = results(tmp_path, "majority-3")["q0"]
    assert q0.answer == "1"  # the voted answer
    assert [t.text for t in q0.trace.rounds[0].trajectories] == ["so 1", "so 2", "so 1"]
    assert q0.trace.usage.calls == 3


@pytest.mark.parametrize(
    ("kind", "stated", "truth"),
    [("math", r"\frac{1}{2}", r"\frac{1}{2}"), ("auto", r"\sqrt{2}", r"\sqrt{2}"), ("math", "(1, 2)", "(1,2)"),
     ("choice", "C", "C"), ("exact", "Paris", "paris")],
)  # fmt: skip
async def test_a_majority_vote_is_graded_as_the_answer_it_is(
    tmp_path: Path, kind: str, stated: str, truth: str
) -> None:
    """The voted answer is extracted already: searched again, ``\\frac{1}{2}`` would give its last number, 2."""
    problem = Problem(id="q", messages=[{"role": "user", "content": "Which?"}], answer=truth, kind=kind, line=1)
    backend = ScriptedBackend(respond=lambda call, i: f"So the answer is \\boxed{{{stated}}}.", max_n=1)
    await run(tmp_path, backend, Arm.build("single"), [problem])
    summary = await run(tmp_path, backend, Arm.build("majority", samples=3), [problem], add_arm=True)
    assert (summary.answered, summary.graded, summary.correct) == (1, 1, 1)
    voted = results(tmp_path, "majority-3")["q"]
    assert (voted.answer, voted.extracted, voted.correct) == (stated, stated, True)
    assert results(tmp_path, "single")["q"].correct  # the same samples, graded as whole responses


def test_arm_options_are_validated() -> None:
    with pytest.raises(UsageError, match="--samples is for --method majority"):
        Arm.build("pacore", samples=4)
    with pytest.raises(UsageError, match="--schedule is for --method pacore"):
        Arm.build("majority", schedule="4")
    with pytest.raises(UsageError, match="use --method single"):
        Arm.build("pacore", schedule="off")
    with pytest.raises(UsageError, match="unknown method"):
        Arm.build("vote")
    assert Arm.build("pacore").name == "pacore-4"
    assert Arm.build("pacore", schedule="high").name == "pacore-32,4"


# --- failures and resume ----------------------------------------------------


async def test_a_failing_problem_is_recorded_with_its_partial_trace_and_retried_on_resume(tmp_path: Path) -> None:
    def flaky(call: Call, i: int):
        if problem_number(call) == 1 and is_synthesis(call):
            return fail("status", "HTTP 503 from backend")
        return right_after_synthesis(call, i)

    arm = Arm.build("pacore", schedule="2")
    first = ScriptedBackend(respond=flaky)
    summary = await run(tmp_path, first, arm)
    assert (summary.answered, summary.failed) == (2, 1)
    assert "503" in summary.failure_reasons[0][0]
    q1 = results(tmp_path, "pacore-2")["q1"]
    assert q1.status == "failed" and "final round" in q1.error
    assert len(q1.trace.rounds[0].trajectories) == 2  # the first round is kept
    assert q1.completion_tokens == 2 * 4

    # Not retried when asked not to: no call at all.
    idle = ScriptedBackend(respond=right_after_synthesis)
    summary = await run(tmp_path, idle, arm, retry_failed=False)
    assert (summary.answered, summary.failed, len(idle.calls)) == (2, 1, 0)

    # Retried by default; only the failed problem is worked on.
    second = ScriptedBackend(respond=right_after_synthesis)
    with BatchRun.open(tmp_path / "run", make_problems(), dataset_path="data.jsonl", arm=arm, backend=second) as batch:
        assert (batch.progress.done, batch.progress.failed, batch.progress.todo) == (2, 0, 1)
        summary = await batch.execute()
        assert (batch.progress.done, batch.progress.failed) == (3, 0)
    assert (summary.answered, summary.failed) == (3, 0)
    assert {problem_number(c) for c in second.calls} == {1} and len(second.calls) == 3
    stored = results(tmp_path, "pacore-2")
    assert stored["q1"].attempts == 2 and stored["q0"].attempts == 1


async def test_a_fatal_backend_error_fails_only_its_problem(tmp_path: Path) -> None:
    def reply(call: Call, i: int):
        if problem_number(call) == 0:
            return fail("bad_request", "HTTP 400: prompt too long")
        return right_after_synthesis(call, i)

    summary = await run(tmp_path, ScriptedBackend(respond=reply), Arm.build("pacore", schedule="2"))
    assert (summary.answered, summary.failed) == (2, 1)
    assert "prompt too long" in results(tmp_path, "pacore-2")["q0"].error


async def test_concurrency_bounds_the_problems_in_progress(tmp_path: Path) -> None:
    active = peak = 0

    class Counting(ScriptedBackend):
        async def generate(self, messages, n, params):
            nonlocal active, peak
            active += 1
            peak = max(peak, active)
            if active == 3:
                self.gate.set()  # three problems at once: from here on calls go through
            try:
                return await super().generate(messages, n, params)
            finally:
                active -= 1

    # The first calls wait until three are in flight, however far apart a loaded machine starts them.
    backend = Counting(respond=lambda call, i: "The answer is 1", delay=0.02, gate=threading.Event())
    await run(tmp_path, backend, Arm.build("pacore", schedule="1"), make_problems(8), concurrency=3)
    assert peak == 3  # one call in flight per problem, three problems at once


# --- refusals -----------------------------------------------------------------


async def test_another_data_set_or_setting_is_refused_unless_forced(tmp_path: Path) -> None:
    arm = Arm.build("pacore", schedule="2")
    await run(tmp_path, ScriptedBackend(respond=right_after_synthesis), arm)

    other_data = make_problems(4)
    with pytest.raises(RunConflictError, match="another data set"):
        await run(tmp_path, ScriptedBackend(), arm, other_data)
    with pytest.raises(RunConflictError, match="max-tokens None -> 64"):
        await run(tmp_path, ScriptedBackend(), arm, params=GenerationParams(max_tokens=64))
    with pytest.raises(RunConflictError, match="reference-order shuffle -> release"):
        await run(tmp_path, ScriptedBackend(), arm, reference_order="release")
    with pytest.raises(RunConflictError, match="template pacore -> generic"):
        await run(tmp_path, ScriptedBackend(), arm, template=SynthesisTemplate.load("generic"))
    with pytest.raises(RunConflictError, match="--add-arm"):
        await run(tmp_path, ScriptedBackend(), Arm.build("majority", samples=2))
    assert set(results(tmp_path, "pacore-2")) == {"q0", "q1", "q2"}  # untouched

    backend = ScriptedBackend(respond=right_after_synthesis)
    summary = await run(tmp_path, backend, arm, other_data, force=True)
    assert (summary.problems, summary.answered) == (4, 4)
    assert len(list((tmp_path / "run").glob("run.replaced-*.sqlite"))) == 1


async def test_add_arm_evaluates_another_method_in_the_same_run(tmp_path: Path) -> None:
    await run(tmp_path, ScriptedBackend(respond=right_after_synthesis), Arm.build("pacore", schedule="2"))
    backend = ScriptedBackend(respond=lambda call, i: "The answer is 3")
    summary = await run(tmp_path, backend, Arm.build("majority", samples=2), add_arm=True)
    assert (summary.arm, summary.answered, summary.correct) == ("majority-2", 3, 1)
    with RunStore.open(tmp_path / "run") as store:
        assert [a.name for a in store.arms()] == ["pacore-2", "majority-2"]


# --- trajectory pools -----------------------------------------------------------


async def test_pool_is_generated_once_and_shared_by_every_arm(tmp_path: Path) -> None:
    backend = ScriptedBackend(respond=right_after_synthesis, max_n=4)
    pool = {"pool_size": 8}

    await run(tmp_path, backend, Arm.build("pacore", schedule="4"), **pool)
    pool_calls = [c for c in backend.calls if not is_synthesis(c)]
    assert [c.n for c in pool_calls] == [4, 4] * 3  # P=8 in chunks of max_n per problem
    assert sum(1 for c in backend.calls if is_synthesis(c)) == 3
    assert len(backend.calls) == 6 + 3

    # Later arms: one synthesis call per problem, or nothing at all.
    await run(tmp_path, backend, Arm.build("pacore", schedule="8"))
    assert len(backend.calls) == 9 + 3
    await run(tmp_path, backend, Arm.build("majority", samples=8))
    await run(tmp_path, backend, Arm.build("single"))
    assert len(backend.calls) == 12
    assert backend.trajectories_requested == 3 * 8 + 2 * 3

    with RunStore.open(tmp_path / "run") as store:
        assert store.pool_counts() == {"q0": 8, "q1": 8, "q2": 8}
        pooled = {t.text for t in store.pool("q2")}
        pacore8 = {r.problem_id: r for r in store.results("pacore-8")}
        majority8 = {r.problem_id: r for r in store.results("majority-8")}
        single = list(store.results("single"))
    # K1 = k draws the very same trajectories, so PaCoRe and voting are compared on equal terms.
    for problem_id, result in pacore8.items():
        assert [t.text for t in result.trace.rounds[0].trajectories] == [
            t.text for t in majority8[problem_id].trace.rounds[0].trajectories
        ]
    assert {t.text for t in pacore8["q2"].trace.rounds[0].trajectories} <= pooled
    assert all(r.status == "done" and r.trace.usage.calls == 1 for r in single)


async def test_pool_draws_are_seeded(tmp_path: Path) -> None:
    async def drawn(run_dir: str, seed: int | None) -> tuple[list[str], list[str]]:
        backend = ScriptedBackend(respond=lambda call, i: f"sample {call.number}.{i}", max_n=8)
        await run(tmp_path / run_dir, backend, Arm.build("majority", samples=3), make_problems(1),
                  pool_size=8, params=GenerationParams(seed=seed))  # fmt: skip
        with RunStore.open(tmp_path / run_dir / "run") as store:
            texts = [t.text for t in next(store.results("majority-3")).trace.rounds[0].trajectories]
            return texts, [t.text for t in store.pool("q0")]

    first, pool = await drawn("a", None)
    again, same_pool = await drawn("b", None)
    other, _ = await drawn("c", 5)
    assert same_pool == pool and again == first  # same seed, same pool: same draw
    assert len(set(first)) == 3 and set(first) <= set(pool)
    assert other != first  # another seed draws other trajectories


async def test_pool_refuses_draws_larger_than_the_pool_and_other_pool_sizes(tmp_path: Path) -> None:
    await run(
        tmp_path,
        ScriptedBackend(respond=right_after_synthesis, max_n=4),
        Arm.build("pacore", schedule="4"),
        pool_size=4,
    )
    with pytest.raises(UsageError, match="draws 8 first-round trajectories .* holds 4"):
        await run(tmp_path, ScriptedBackend(), Arm.build("pacore", schedule="8"))
    with pytest.raises(RunConflictError, match="pool of 4, not 8"):
        await run(tmp_path, ScriptedBackend(), Arm.build("pacore", schedule="4"), pool_size=8)


async def test_failed_pool_samples_are_generated_again_on_resume(tmp_path: Path) -> None:
    def flaky(call: Call, i: int):
        from pacore.backends.base import Completion

        if not is_synthesis(call) and call.number == 0 and i == 1:
            return Completion(text="", error="HTTP 503", error_kind="status")
        return right_after_synthesis(call, i)

    backend = ScriptedBackend(respond=flaky, max_n=4)
    arm = Arm.build("pacore", schedule="4")
    summary = await run(tmp_path, backend, arm, make_problems(1), pool_size=4)
    assert summary.failed == 1 and "1 of 4 samples failed" in summary.failure_reasons[0][0]
    with RunStore.open(tmp_path / "run") as store:
        assert store.pool_counts() == {"q0": 3}
    summary = await run(tmp_path, backend, arm, make_problems(1))
    assert summary.answered == 1
    top_up = backend.calls[1]
    assert (top_up.n, is_synthesis(top_up)) == (1, False)  # only the missing sample
    with RunStore.open(tmp_path / "run") as store:
        assert sorted(t.index for t in store.pool("q0")) == [0, 2, 3, 4]


async def test_progress_counts_problems_tokens_and_flight(tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    # The first calls wait until both problems' first rounds are in flight (a loaded machine may start them apart).
    backend = ScriptedBackend(respond=right_after_synthesis, gate=threading.Event())
    with BatchRun.open(
        tmp_path / "run", make_problems(), dataset_path="data.jsonl", arm=Arm.build("pacore", schedule="2"),
        backend=backend, concurrency=2,
    ) as batch:  # fmt: skip

        async def watch() -> None:
            while True:
                seen.append((batch.progress.in_flight, batch.progress.done))
                if batch.progress.in_flight == 4:
                    backend.gate.set()
                await asyncio.sleep(0.002)

        watcher = asyncio.create_task(watch())
        await batch.execute()
        watcher.cancel()
        progress = batch.progress
    assert (progress.done, progress.failed, progress.correct, progress.graded) == (3, 0, 3, 3)
    assert progress.completion_tokens == 3 * 3 * 4 and progress.in_flight == 0
    assert max(flight for flight, _ in seen) == 4  # two problems, two first-round trajectories each
    assert progress.accuracy == 1.0 and progress.eta_s == 0


async def test_commits_and_grading_run_off_the_event_loop(tmp_path: Path, monkeypatch) -> None:
    # A commit waits for fsync and math-verify may take 100s of ms: on the loop they would stall every call.
    import pacore.eval.runner as runner_module

    used: dict[str, set[threading.Thread]] = {}

    def spy(name: str, function):
        def wrapper(*args, **kwargs):
            used.setdefault(name, set()).add(threading.current_thread())
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(runner_module, "grade_verdict", spy("grade", runner_module.grade_verdict))
    for method in ("record", "pool", "add_pool"):
        monkeypatch.setattr(RunStore, method, spy(method, getattr(RunStore, method)))
    backend = ScriptedBackend(respond=right_after_synthesis)
    summary = await run(tmp_path, backend, Arm.build("pacore", schedule="2"), pool_size=2)
    assert (summary.answered, summary.correct) == (3, 3)
    assert set(used) == {"grade", "record", "pool", "add_pool"}
    assert all(threading.current_thread() not in threads for threads in used.values())
    assert len(set().union(*used.values())) == 1  # one worker thread keeps the store's work in order


# --- repeats --------------------------------------------------------------------


def first_round_texts(result) -> list[str]:
    return [t.text for t in result.trace.rounds[0].trajectories]


async def test_repeats_draw_independent_subsets_from_one_pool(tmp_path: Path) -> None:
    backend = ScriptedBackend(respond=lambda call, i: f"sample {call.number}.{i}", max_n=8)
    summary = await run(tmp_path, backend, Arm.build("majority", samples=3), make_problems(2), pool_size=8, repeats=6)
    assert (summary.problems, summary.results, summary.repeats, summary.answered) == (2, 12, 6, 12)
    # The pool is filled once per problem although its repeats run concurrently.
    assert [c.n for c in backend.calls] == [8, 8]
    with RunStore.open(tmp_path / "run") as store:
        stored = list(store.results("majority-3"))
        pools = {p: {t.text for t in store.pool(p)} for p in ("q0", "q1")}
    assert [(r.problem_id, r.seed, r.repeat) for r in stored] == [(f"q{p}", 0, i) for p in range(2) for i in range(6)]
    for problem_id in ("q0", "q1"):
        draws = [first_round_texts(r) for r in stored if r.problem_id == problem_id]
        assert all(len(set(d)) == 3 and set(d) <= pools[problem_id] for d in draws)
        assert len({tuple(d) for d in draws}) > 1  # independent draws, not one draw six times

    # Repeat 0 is the draw a run without repeats makes, so older runs stay comparable.
    single_draw = ScriptedBackend(respond=lambda call, i: f"sample {call.number}.{i}", max_n=8)
    await run(tmp_path / "plain", single_draw, Arm.build("majority", samples=3), make_problems(2), pool_size=8)
    with RunStore.open(tmp_path / "plain" / "run") as store:
        plain = {r.problem_id: first_round_texts(r) for r in store.results("majority-3")}
    assert plain == {r.problem_id: first_round_texts(r) for r in stored if r.repeat == 0}


async def test_pacore_and_majority_repeats_see_the_same_draws(tmp_path: Path) -> None:
    backend = ScriptedBackend(respond=right_after_synthesis, max_n=8)
    await run(tmp_path, backend, Arm.build("pacore", schedule="3"), make_problems(2), pool_size=8, repeats=3)
    await run(tmp_path, backend, Arm.build("majority", samples=3), make_problems(2), repeats=3)
    with RunStore.open(tmp_path / "run") as store:
        pacore = {(r.problem_id, r.repeat): first_round_texts(r) for r in store.results("pacore-3")}
        majority = {(r.problem_id, r.repeat): first_round_texts(r) for r in store.results("majority-3")}
    assert len(pacore) == 6 and pacore == majority


async def test_repeats_without_a_pool_sample_afresh_each_with_its_own_seed(tmp_path: Path) -> None:
    backend = ScriptedBackend(respond=lambda call, i: f"It is {problem_number(call) + 1}.")
    summary = await run(tmp_path, backend, Arm.build("single"), make_problems(2), repeats=3,
                        params=GenerationParams(seed=5))  # fmt: skip
    assert (summary.results, summary.answered, summary.correct) == (6, 6, 6)
    seeds: dict[int, set[int | None]] = {}
    for call in backend.calls:
        seeds.setdefault(problem_number(call), set()).add(call.params.seed)
    assert all(len(s) == 3 for s in seeds.values())  # three calls per problem, three seeds
    # Repeat 0 samples as a run without repeats does.
    plain = ScriptedBackend(respond=lambda call, i: "It is 1.")
    await run(tmp_path / "plain", plain, Arm.build("single"), make_problems(1), params=GenerationParams(seed=5))
    assert plain.calls[0].params.seed in seeds[0]


async def test_another_seed_adds_draws_to_a_pooled_run_and_is_refused_without_a_pool(tmp_path: Path) -> None:
    backend = ScriptedBackend(respond=lambda call, i: f"sample {call.number}.{i}", max_n=8)
    arm = Arm.build("majority", samples=2)
    await run(tmp_path, backend, arm, make_problems(2), pool_size=8, repeats=2, params=GenerationParams(seed=1))
    pool_calls = len(backend.calls)
    summary = await run(tmp_path, backend, arm, make_problems(2), repeats=2, params=GenerationParams(seed=2))
    assert len(backend.calls) == pool_calls  # the pool is reused, not regenerated
    assert (summary.results, summary.repeats, summary.answered) == (8, 4, 8)
    with RunStore.open(tmp_path / "run") as store:
        keys = sorted((r.problem_id, r.seed, r.repeat) for r in store.results("majority-2"))
        by_seed = {}
        for r in store.results("majority-2"):
            by_seed.setdefault(r.seed, []).append(first_round_texts(r))
        assert store.run_info().config["params"]["seed"] == 1  # the run keeps its first settings
    assert keys == [(f"q{p}", s, i) for p in range(2) for s in (1, 2) for i in range(2)]
    assert by_seed[1] != by_seed[2]

    # The same seed again is a resume: nothing to do.
    again = await run(tmp_path, backend, arm, make_problems(2), repeats=2, params=GenerationParams(seed=2))
    assert again.results == 8 and len(backend.calls) == pool_calls

    await run(tmp_path / "nopool", ScriptedBackend(respond=right_after_synthesis), arm, params=GenerationParams(seed=1))
    with pytest.raises(RunConflictError, match="seed 1 -> 2"):
        await run(tmp_path / "nopool", ScriptedBackend(), arm, params=GenerationParams(seed=2))


async def test_resume_runs_only_the_missing_repeats(tmp_path: Path) -> None:
    syntheses = 0

    def flaky(call: Call, i: int):
        nonlocal syntheses
        if is_synthesis(call):
            syntheses += 1
            if syntheses == 3:  # one repeat's synthesis fails
                return fail("status", "HTTP 503 from backend")
        return right_after_synthesis(call, i)

    arm = Arm.build("pacore", schedule="2")
    first = ScriptedBackend(respond=flaky, max_n=4)
    summary = await run(tmp_path, first, arm, make_problems(2), pool_size=4, repeats=3, concurrency=1)
    assert (summary.results, summary.answered, summary.failed) == (6, 5, 1)
    with RunStore.open(tmp_path / "run") as store:
        before = {(r.problem_id, r.repeat): (r.status, r.attempts, r.answer) for r in store.results(arm.name)}
    (failed_key,) = [key for key, (status, _, _) in before.items() if status == "failed"]

    # Same command: only the failed repeat is redone (its draw reused, one synthesis call).
    second = ScriptedBackend(respond=right_after_synthesis, max_n=4)
    with BatchRun.open(tmp_path / "run", make_problems(2), dataset_path="data.jsonl", arm=arm, backend=second,
                       repeats=3) as batch:  # fmt: skip
        assert (batch.plan.done, batch.plan.failed, batch.progress.total, batch.progress.todo) == (5, 1, 6, 1)
        summary = await batch.execute()
    assert (summary.answered, summary.failed) == (6, 0)
    assert len(second.calls) == 1 and is_synthesis(second.calls[0])
    assert problem_number(second.calls[0]) == int(failed_key[0][1:])

    # More repeats: only the new ones run; nothing done is redone.
    third = ScriptedBackend(respond=right_after_synthesis, max_n=4)
    summary = await run(tmp_path, third, arm, make_problems(2), repeats=5)
    assert (summary.results, summary.answered, summary.repeats) == (10, 10, 5)
    assert len(third.calls) == 2 * 2 and all(is_synthesis(c) for c in third.calls)
    with RunStore.open(tmp_path / "run") as store:
        after = {(r.problem_id, r.repeat): (r.status, r.attempts, r.answer) for r in store.results(arm.name)}
    for key, row in before.items():
        if key != failed_key:
            assert after[key] == row
    assert after[failed_key][:2] == ("done", 2)
    assert all(attempts == 1 for key, (_, attempts, _) in after.items() if key != failed_key)


def test_repeats_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--repeats must be at least 1"):
        BatchRun.open(tmp_path / "run", make_problems(), dataset_path="d.jsonl", arm=Arm.build("single"),
                      backend=ScriptedBackend(), repeats=0)  # fmt: skip
    assert not (tmp_path / "run").exists()


async def test_the_reference_order_reaches_every_problem(tmp_path: Path) -> None:
    # Round-1 replies of distinct lengths: the release order is sorted by length, then Random(seed).
    def respond(call: Call, i: int) -> str:
        return "The answer is 1" if is_synthesis(call) else "x" * (call.number % 4 + 1)

    backend = ScriptedBackend(respond=respond)
    await run(tmp_path, backend, Arm.build("pacore", schedule="4"), make_problems(1),
              params=GenerationParams(seed=42), reference_order="release")  # fmt: skip
    expected = ["x" * n for n in range(1, 5)]
    random.Random(42).shuffle(expected)
    prompt = backend.calls[-1].last_user_text
    assert sorted((m for m in expected), key=lambda m: prompt.index(f"\n{m}\n")) == expected
