"""The benchmarks' fast backend speaks the OpenAI protocol (so ``bench/`` does not rot).

It runs as its own process, exactly as the benchmarks start it, and is
checked with the real ``openai`` SDK and with pacore's own HTTP backend.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import openai
import pytest

from harness import FastBackend, fast_backend
from pacore import GenerationParams, asolve
from pacore.backends.openai_http import OpenAIBackend

pytestmark = pytest.mark.http
MESSAGES = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def server() -> Iterator[FastBackend]:
    with fast_backend("--completion-tokens", 12, "--model", "fast-model") as running:
        yield running


def test_lists_its_model(server: FastBackend) -> None:
    client = openai.OpenAI(base_url=server.url, api_key="unused")
    assert [model.id for model in client.models.list()] == ["fast-model"]


def test_returns_n_choices_with_usage(server: FastBackend) -> None:
    client = openai.OpenAI(base_url=server.url, api_key="unused")
    reply = client.chat.completions.create(model="fast-model", messages=MESSAGES, n=3)
    assert [choice.index for choice in reply.choices] == [0, 1, 2]
    assert all(len(choice.message.content.split()) == 12 for choice in reply.choices)
    assert {choice.finish_reason for choice in reply.choices} == {"stop"}
    assert reply.usage.completion_tokens == 36
    assert reply.usage.prompt_tokens > 0


def test_max_tokens_cuts_the_completion(server: FastBackend) -> None:
    client = openai.OpenAI(base_url=server.url, api_key="unused")
    reply = client.chat.completions.create(model="fast-model", messages=MESSAGES, max_tokens=5)
    assert len(reply.choices[0].message.content.split()) == 5
    assert reply.choices[0].finish_reason == "length"


def test_streams_the_same_text_with_usage(server: FastBackend) -> None:
    client = openai.OpenAI(base_url=server.url, api_key="unused")
    whole = client.chat.completions.create(model="fast-model", messages=MESSAGES)
    chunks = list(
        client.chat.completions.create(
            model="fast-model", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    )
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == whole.choices[0].message.content
    assert len([p for p in pieces if p]) == 12  # one token per chunk
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12


def test_streams_n_choices(server: FastBackend) -> None:
    client = openai.OpenAI(base_url=server.url, api_key="unused")
    texts: dict[int, str] = {}
    for chunk in client.chat.completions.create(model="fast-model", messages=MESSAGES, n=2, stream=True):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    assert sorted(texts) == [0, 1]
    assert all(len(text.split()) == 12 for text in texts.values())


def test_keep_alive_and_errors_in_openai_shape(server: FastBackend) -> None:
    with httpx.Client(base_url=server.url, limits=httpx.Limits(max_connections=1)) as client:
        for _ in range(3):  # one connection serves them all
            assert client.post("/chat/completions", json={"messages": MESSAGES}).status_code == 200
        bad = client.post("/chat/completions", content=b"{not json")
        assert bad.status_code == 400
        assert "not valid JSON" in bad.json()["error"]["message"]
        assert client.get("/nowhere").status_code == 404
        closing = client.post("/chat/completions", json={"messages": MESSAGES}, headers={"Connection": "close"})
        assert closing.headers.get("connection") == "close"
        assert client.post("/chat/completions", json={"messages": MESSAGES}).status_code == 200


def test_n_support_can_be_ignored_or_refused() -> None:
    with fast_backend("--n-support", "ignore") as ignoring, fast_backend("--n-support", "reject") as refusing:
        client = openai.OpenAI(base_url=ignoring.url, api_key="unused")
        assert len(client.chat.completions.create(model="fast", messages=MESSAGES, n=4).choices) == 1
        client = openai.OpenAI(base_url=refusing.url, api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="only n=1"):
            client.chat.completions.create(model="fast", messages=MESSAGES, n=4)
        assert len(client.chat.completions.create(model="fast", messages=MESSAGES).choices) == 1


async def test_concurrency_cap_queues_samples_and_endpoints_are_separate() -> None:
    with fast_backend("--concurrency", 2, "--ttft-ms", 50, "--endpoints", 2) as server:
        async with httpx.AsyncClient() as client:

            async def call(url: str, n: int) -> int:
                body = {"messages": MESSAGES, "n": n}
                response = await client.post(url + "/chat/completions", json=body)
                return len(response.json()["choices"])

            counts = await asyncio.gather(*(call(server.urls[0], 1) for _ in range(5)), call(server.urls[1], 3))
        assert counts == [1, 1, 1, 1, 1, 3]
        first, second = server.stats()
        assert (first["calls"], first["samples"], first["peak_active"]) == (5, 5, 2)
        # A call of n=3 above the cap of 2 takes the whole endpoint rather than waiting forever.
        assert (second["calls"], second["samples"], second["peak_active"]) == (1, 3, 3)


async def test_pacore_runs_against_it_batched_and_streamed(server: FastBackend) -> None:
    async with OpenAIBackend(server.url) as backend:
        result = await asolve("q", schedule=[6], backend=backend, params=GenerationParams(max_tokens=8))
        deltas: list[str] = []
        streamed = await backend.stream(MESSAGES, GenerationParams(), lambda content, _: deltas.append(content))
    assert backend.model == "fast-model"
    assert result.usage.calls == 7 and result.usage.failed_calls == 0
    assert result.usage.completion_tokens == 7 * 8
    assert len(result.answer.split()) == 8
    assert "".join(deltas) == streamed.text and len(deltas) == 12


@pytest.mark.parametrize("support", ["ignore", "reject"])
async def test_pacore_reads_servers_that_do_not_stream(support: str) -> None:
    # ``ignore``: plain JSON although a stream was asked; ``reject``: HTTP 400 to ``stream``.
    with fast_backend("--completion-tokens", 12, "--stream-support", support) as plain:
        async with OpenAIBackend(plain.url, model="fast") as backend:
            first = await backend.generate(MESSAGES, 3, GenerationParams())
            deltas: list[str] = []
            answer = await backend.stream(MESSAGES, GenerationParams(), lambda c, r: deltas.append(c))
        (stats,) = plain.stats()
    assert [len(c.text.split()) for c in first] == [12, 12, 12] and all(c.ok for c in first)
    assert answer.ok and deltas == [answer.text]  # one delta: the whole answer
    # Refused once, then remembered: every later call goes without streaming.
    assert stats["calls"] == 2


# --- the model simulation (--simulate) ------------------------------------------

from fastbackend import Simulation, parse_synthesis, token_confidence  # noqa: E402
from pacore import SynthesisTemplate  # noqa: E402
from pacore.eval.grading import extract_answer  # noqa: E402

QUESTION = "Problem 7. How many primes are below 100?"


def lowest_group(confidences: list[float], window: int) -> float:
    """The lowest mean over any ``window`` consecutive tokens (computed independently of pacore)."""
    window = min(window, len(confidences))
    return min(sum(confidences[i : i + window]) / window for i in range(0, len(confidences) - window + 1, 8))


def test_simulation_is_deterministic_per_seed_problem_and_sample() -> None:
    sim = Simulation(seed=3)
    problem = sim.problem(QUESTION)
    assert sim.problem("  " + QUESTION + "\n") == problem  # the stripped question is the problem
    first = sim.sample(QUESTION, 0)
    assert sim.sample(QUESTION, 0) == first
    assert Simulation(seed=3).sample(QUESTION, 0) == first  # nothing depends on the process
    samples = [sim.sample(QUESTION, i) for i in range(30)]
    assert len({len(s.tokens) for s in samples}) > 20
    assert {s.answer for s in samples} <= {problem.answer, *problem.wrong_answers}
    assert all(s.correct == (s.answer == problem.answer) for s in samples)
    assert all(s.text.startswith("<think>\n") and s.text.endswith(f"\\boxed{{{s.answer}}}$.") for s in samples)
    assert all(len(s.sharpness) == len(s.tokens) for s in samples)
    assert Simulation(seed=4).sample(QUESTION, 0) != first


#: Samples 0-3 of the hardest and the easiest of "Problem 0." ... "Problem 39." under
#: ``Simulation(seed=3, median_tokens=60)`` as the simulation drew them before runaways existed:
#: (answer, tokens, drift_at, sum of the sharpness rounded to 6 places).
BEFORE_RUNAWAYS = {
    "Problem 38.": [
        ("636", 91, 34, 558.543981), ("190", 241, 42, 1248.923067),
        ("190", 268, 62, 1299.967082), ("190", 755, 426, 3084.038015),
    ],
    "Problem 10.": [
        ("964", 83, None, 711.879034), ("964", 52, None, 312.949171),
        ("964", 136, None, 774.953248), ("964", 36, None, 218.686267),
    ],
}  # fmt: skip


def test_runaway_samples_loop_to_max_tokens_and_leave_the_others_as_they_were() -> None:
    sim = Simulation(seed=3, median_tokens=60)
    problems = {text: sim.problem(text) for text in (f"Problem {i}." for i in range(40))}
    hard, easy = BEFORE_RUNAWAYS
    assert max(problems, key=lambda text: problems[text].difficulty) == hard and problems[hard].difficulty > 0.9
    assert min(problems, key=lambda text: problems[text].difficulty) == easy
    # The runaway draw has a stream of its own: at runaway 0 every sample is what it was before,
    # and at the default the samples that do not run away are unchanged too.
    never = replace(sim, runaway=0.0)
    for text, before in BEFORE_RUNAWAYS.items():
        for i, expected in enumerate(before):
            sample = never.sample(text, i, 2048)
            assert (sample.answer, len(sample.tokens), sample.drift_at, round(sum(sample.sharpness), 6)) == expected
            assert not sample.runaway and sample.text.endswith(f"\\boxed{{{sample.answer}}}$.")
        for i in range(40):
            looped = sim.sample(text, i, 2048)
            assert looped.runaway or looped == never.sample(text, i, 2048)
    # At runaway 1, every sample of a problem harder than 0.5 loops until max_tokens.
    always = replace(sim, runaway=1.0)
    runaway = always.sample(hard, 0, 500)
    assert runaway.runaway and len(runaway.tokens) == len(runaway.sharpness) == 500
    assert runaway.answer is None and not runaway.correct and runaway.drift_at is None
    assert runaway.text.startswith("<think>\n") and "</think>" not in runaway.text
    assert extract_answer(runaway.text) is None
    assert runaway.text.count(" Wait, let me check that again.") == 499 // 8  # one sentence, repeated
    assert sum(runaway.sharpness) / 500 > sim.sharpness - 1  # confident throughout: no drift down
    assert len(always.sample(hard, 1).tokens) == 32768  # no max_tokens: the context window cuts it
    synthesis = SynthesisTemplate.load("pacore").render(hard, ["$\\boxed{3}$"], round=2, total_rounds=2)
    assert always.sample(synthesis, 0, 40).runaway  # synthesis calls loop too
    # Over many problems the share is about ``runaway``, mostly on the hard ones.
    draws = [(p.difficulty, sim.sample(text, i, 30).runaway) for text, p in problems.items() for i in range(100)]
    assert 0.02 < sum(r for _, r in draws) / len(draws) < 0.045
    assert sum(r for d, r in draws if d > 0.5) > 3 * sum(r for d, r in draws if d < 0.5)


async def test_a_runaway_is_served_to_max_tokens_with_finish_reason_length() -> None:
    hard = "Problem 38."  # difficulty 0.96 under seed 3 (above)
    args = ("--simulate", "--sim-seed", 3, "--sim-median-tokens", 60, "--sim-runaway", 1.0)
    with fast_backend(*args, "--tokens-per-s", 0) as server:
        client = openai.AsyncOpenAI(base_url=server.url, api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": hard}]
        plain = await client.chat.completions.create(model="sim", messages=messages, seed=1, max_tokens=300)
        streamed = [
            chunk
            async for chunk in await client.chat.completions.create(
                model="sim", messages=messages, seed=1, max_tokens=300, stream=True,
                stream_options={"include_usage": True},
            )
        ]  # fmt: skip
        await client.close()
    expected = Simulation(seed=3, median_tokens=60, runaway=1.0).sample(hard, 1, 300)
    assert plain.choices[0].finish_reason == "length" and plain.usage.completion_tokens == 300
    assert plain.choices[0].message.content == expected.text and "</think>" not in expected.text
    assert [c.choices[0].finish_reason for c in streamed if c.choices][-1] == "length"
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected.text
    assert streamed[-1].usage.completion_tokens == 300


def test_simulated_accuracy_follows_difficulty() -> None:
    sim = Simulation(median_tokens=20)  # short samples: only their answers matter here
    problems = [sim.problem(f"Problem {i}.") for i in range(200)]
    easy = [p for p in problems if p.difficulty < 0.3]
    hard = [p for p in problems if p.difficulty > 0.8]
    assert easy and hard and min(p.p_correct for p in easy) > 0.9 and max(p.p_correct for p in hard) < 0.2
    for problem_text in ("Problem 1.", "Problem 2.", "Problem 3."):
        p = sim.problem(problem_text)
        right = sum(sim.sample(problem_text, i).correct for i in range(400)) / 400
        assert abs(right - p.p_correct) < 0.08


def test_simulated_lengths_are_heavy_tailed_and_confidence_marks_wrong_trajectories() -> None:
    sim = Simulation(median_tokens=300, runaway=0.0)  # the log-normal lengths alone
    samples = [sim.sample(f"Problem {p}.", i) for p in range(30) for i in range(16)]
    lengths = sorted(len(s.tokens) for s in samples)
    median = lengths[len(lengths) // 2]
    assert lengths[-1] > 4 * median and lengths[len(lengths) * 9 // 10] > 1.8 * median  # a long right tail
    right = [s for s in samples if s.correct]
    wrong = [s for s in samples if not s.correct]
    assert sorted(len(s.tokens) for s in wrong)[len(wrong) // 2] > sorted(len(s.tokens) for s in right)[len(right) // 2]
    assert all(s.drift_at is None for s in right)
    assert 0.6 < sum(s.drift_at is not None for s in wrong) / len(wrong) < 0.95  # most wrong ones drift

    def lowest(s: object) -> float:
        return lowest_group([token_confidence(g, 5) for g in s.sharpness], 64)  # type: ignore[attr-defined]

    right_lowest = [lowest(s) for s in right]
    wrong_lowest = [lowest(s) for s in wrong]
    auroc = sum(r > w for r in right_lowest for w in wrong_lowest) / (len(right) * len(wrong))
    assert 0.7 < auroc < 0.98  # informative, not a perfect oracle


@pytest.mark.parametrize("template", ["pacore", "generic"])
def test_synthesis_prompts_are_recognised_and_follow_the_majority(template: str) -> None:
    references = [f"Reasoning.\n\nThe answer is $\\boxed{{{a}}}$." for a in ("12", "7", "12", "5")]
    references.append("no answer: cut short")
    prompt = SynthesisTemplate.load(template).render(QUESTION, references, round=2, total_rounds=2)
    question, answers = parse_synthesis(prompt)
    assert question.strip() == QUESTION and answers == ["12", "7", "12", "5"]
    assert parse_synthesis(QUESTION) == (QUESTION, None)
    # No runaways here: a synthesis call that loops answers nothing (see the runaway tests).
    following = Simulation(follow_majority=1.0, median_tokens=40, runaway=0.0)
    assert {following.sample(prompt, i).answer for i in range(20)} == {"12"}
    # Not following the references: a fresh sample of the same problem, right with its p(d).
    fresh = Simulation(follow_majority=0.0, median_tokens=20, runaway=0.0)
    problem = fresh.problem(QUESTION)
    fresh_answers = [fresh.sample(prompt, i).answer for i in range(300)]
    assert abs(fresh_answers.count(problem.answer) / 300 - problem.p_correct) < 0.1
    # Synthesis calls are shorter (synthesis_length), and seeded apart from round-1 samples.
    synthesis_lengths = sorted(len(following.sample(prompt, i).tokens) for i in range(101))
    sample_lengths = sorted(len(following.sample(QUESTION, i).tokens) for i in range(101))
    assert synthesis_lengths[50] < sample_lengths[50]


@pytest.fixture(scope="module")
def simulator() -> Iterator[FastBackend]:
    # No runaways: sample 5 of QUESTION would loop to the context window (see the runaway tests).
    with fast_backend("--simulate", "--sim-median-tokens", 60, "--sim-runaway", 0, "--model", "sim") as running:
        yield running


def test_simulated_server_is_deterministic_per_seed(simulator: FastBackend) -> None:
    client = openai.OpenAI(base_url=simulator.url, api_key="unused")
    messages = [{"role": "user", "content": QUESTION}]
    sim = Simulation(median_tokens=60, runaway=0.0)
    one = client.chat.completions.create(model="sim", messages=messages, seed=5)
    again = client.chat.completions.create(model="sim", messages=messages, seed=5)
    assert one.choices[0].message.content == again.choices[0].message.content == sim.sample(QUESTION, 5).text
    batch = client.chat.completions.create(model="sim", messages=messages, seed=5, n=3)
    assert [c.message.content for c in batch.choices] == [sim.sample(QUESTION, 5 + i).text for i in range(3)]
    assert batch.usage.completion_tokens == sum(len(sim.sample(QUESTION, 5 + i).tokens) for i in range(3))
    assert one.choices[0].logprobs is None  # not asked for
    cut = client.chat.completions.create(model="sim", messages=messages, seed=5, max_tokens=10)
    assert cut.choices[0].finish_reason == "length"
    assert cut.choices[0].message.content == "".join(sim.sample(QUESTION, 5).tokens[:10])


def test_simulated_logprobs_in_openai_format_streamed_and_not(simulator: FastBackend) -> None:
    client = openai.OpenAI(base_url=simulator.url, api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": QUESTION}]
    expected = Simulation(median_tokens=60, runaway=0.0).sample(QUESTION, 9)
    plain = client.chat.completions.create(model="sim", messages=messages, seed=9, logprobs=True, top_logprobs=3)
    content = plain.choices[0].logprobs.content
    assert [entry.token for entry in content] == expected.tokens
    assert all(len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token for entry in content)
    assert all(a.logprob > b.logprob for e in content for a, b in zip(e.top_logprobs, e.top_logprobs[1:], strict=False))
    for entry, g in zip(content, expected.sharpness, strict=True):
        confidence = -sum(alt.logprob for alt in entry.top_logprobs) / 3
        assert confidence == pytest.approx(token_confidence(g, 3), abs=1e-3)
    streamed = list(
        client.chat.completions.create(
            model="sim", messages=messages, seed=9, logprobs=True, top_logprobs=3, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    entries = [e for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in entries] == [(e.token, e.logprob) for e in content]
    assert streamed[-1].usage.completion_tokens == len(expected.tokens)
    no_alternatives = client.chat.completions.create(model="sim", messages=messages, seed=9, logprobs=True)
    assert all(e.top_logprobs == [] for e in no_alternatives.choices[0].logprobs.content)
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model="sim", messages=messages, logprobs=True, top_logprobs=21)


def test_simulated_wall_time_follows_length() -> None:
    with fast_backend(
        "--simulate", "--sim-median-tokens", 60, "--sim-runaway", 0, "--tokens-per-s", 1000, "--chunk-tokens", 4
    ) as server:
        client = openai.OpenAI(base_url=server.url, api_key="unused")
        messages = [{"role": "user", "content": QUESTION}]
        sim = Simulation(median_tokens=60, runaway=0.0)
        lengths = {seed: len(sim.sample(QUESTION, seed).tokens) for seed in range(12)}
        short, long = min(lengths, key=lengths.get), max(lengths, key=lengths.get)  # type: ignore[arg-type]
        for seed in (short, long):
            started = time.perf_counter()
            chunks = list(client.chat.completions.create(model="sim", messages=messages, seed=seed, stream=True))
            elapsed = time.perf_counter() - started
            assert elapsed >= lengths[seed] / 1000
            assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) == -(-lengths[seed] // 4)
        assert server.stats()[0]["tokens_sent"] == lengths[short] + lengths[long]


def test_a_simulated_stream_closed_part_way_stops_generating() -> None:
    # 50 tokens a second: half the longest sample takes seconds, so the close (after the first
    # content event) reaches the server long before, however loaded the machine.
    with fast_backend(
        "--simulate", "--sim-median-tokens", 60, "--sim-runaway", 0, "--tokens-per-s", 50, "--chunk-tokens", 4
    ) as server:
        sim = Simulation(median_tokens=60, runaway=0.0)
        lengths = {seed: len(sim.sample(QUESTION, seed).tokens) for seed in range(12)}
        long = max(lengths, key=lengths.get)  # type: ignore[arg-type]
        body = {"messages": [{"role": "user", "content": QUESTION}], "seed": long, "stream": True}
        with httpx.stream("POST", server.url + "/chat/completions", json=body) as response:
            for _ in zip(range(3), response.iter_lines(), strict=False):
                pass
        deadline = time.monotonic() + 60
        while server.stats()[0]["active"]:  # until the generation has stopped
            assert time.monotonic() < deadline, "the closed stream's generation did not stop in 60 s"
            time.sleep(0.02)
        cut = server.stats()[0]["tokens_sent"]
    assert 0 < cut < lengths[long] / 2


async def test_pacore_solves_against_the_simulator() -> None:
    with fast_backend("--simulate", "--sim-median-tokens", 60, "--sim-follow-majority", 1.0) as server:
        async with OpenAIBackend(server.url) as backend:
            result = await asolve(QUESTION, schedule=[8], backend=backend, params=GenerationParams(seed=1))
    problem = Simulation().problem(QUESTION)
    first = [extract_answer(t.text) for t in result.rounds[0].trajectories]
    assert len(set(t.text for t in result.rounds[0].trajectories)) > 1  # distinct samples
    assert set(first) <= {problem.answer, *problem.wrong_answers}
    counts = Counter(first)
    # The final call got a synthesis prompt and answered with its references' majority.
    assert counts[extract_answer(result.answer)] == max(counts.values())
    assert result.usage.completion_tokens == sum(t.completion_tokens for r in result.rounds for t in r.trajectories)


@pytest.mark.slow
def test_adaptive_benchmark_runs_against_the_simulator() -> None:
    """A smoke run of bench/adaptive.py (2 problems, 3 arms, other spread and runaways) so the benchmark does not rot."""
    bench = Path(__file__).resolve().parents[1] / "bench" / "adaptive.py"
    arms = "fixed,early_stop_p90,quorum_0.9"
    done = subprocess.run(
        [sys.executable, str(bench), "--json", "--problems", "2", "--arms", arms, "--no-replay", "--length-sigma", "0.9",
         "--runaway", "0.2"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    live = figures["live"]
    assert list(live) == arms.split(",")
    assert live["fixed"]["tokens_ratio"] == 1.0 and live["fixed"]["stopped_per_problem"] == 0
    # Early stop cut trajectories mid-stream, and their tokens were counted, not dropped.
    assert live["early_stop_p90"]["stopped_per_problem"] > 0
    assert 0 < live["early_stop_p90"]["tokens_ratio"] < 1
    # Quorum 0.9 of 16 cancels at most the last trajectory of round 1: none when the last ones finish
    # together, as runaways running to max_tokens side by side do (tests/test_adaptive_engine.py checks
    # the cancelling itself, without a clock).
    assert 0 <= live["quorum_0.9"]["stopped_per_problem"] <= 1
    assert live["quorum_0.9"]["tokens_ratio"] <= 1
    assert all(0 <= arm["accuracy"] <= 1 for arm in live.values())
    assert set(figures["targets"]) == {"token_saving_within_1pt", "quorum_p50_wall_saving"}
    # The simulator ran with the spread and runaway share asked for, and the figures say so.
    assert figures["simulation"]["length_sigma"] == 0.9 and figures["simulation"]["runaway"] == 0.2
    # At 0.2, both problems (difficulty 0.54 and 0.36) draw runaways in round 1: their trajectories
    # run to max_tokens, counted once, and the fixed schedule's tokens include them.
    assert live["fixed"]["problems_with_runaway"] == 2
    assert live["fixed"]["tokens_per_problem"] > figures["workload"]["max_tokens"]


@pytest.mark.parametrize(
    ("option", "error"),
    [
        (["--length-sigma", "-1"], "--length-sigma must be >= 0, got -1"),
        (["--runaway", "0.6"], "--runaway must be from 0 to 0.5 (a sample runs away with probability 2 R d), got 0.6"),
        (["--runaway", "nan"], "--runaway must be from 0 to 0.5 (a sample runs away with probability 2 R d), got nan"),
    ],
)
def test_adaptive_benchmark_refuses_a_bad_simulation_option(option: list[str], error: str) -> None:
    bench = Path(__file__).resolve().parents[1] / "bench" / "adaptive.py"
    done = subprocess.run([sys.executable, str(bench), *option], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].endswith(error)
