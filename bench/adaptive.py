"""Adaptive compute: tokens, wall time and accuracy of each policy against the fixed schedule, on a SIMULATED model.

The model is ``bench/fastbackend.py --simulate`` (its own process): per-problem
difficulty, answer distributions, a synthesis that follows its references'
majority, log-normal (heavy-tailed) lengths with wrong trajectories longer,
runaway samples that loop until max_tokens with no answer (3% on average, more
on hard problems), a per-token delay, and logprobs whose confidence drifts down
on most wrong trajectories. Its parameters are printed with the figures and
documented in fastbackend.py; they were chosen to be plausible, not to meet the
targets, and every figure here is the simulation's, not a real model's.

P problems are each solved with the fixed schedule and with each policy,
through ``pacore.asolve`` over ``OpenAIBackend``, side by side in one run: the
arms of a problem run close together, with the same seeds, so they draw the same
round-1 samples (a policy only changes which of them are drawn, cut or used).
The simulator knows each problem's answer, so every final answer is graded.
Per arm: accuracy, tokens per problem (counted by the simulator, which
serves each arm on its own endpoint: what a server would really generate,
cancelled streams included up to their cut), p50/p90 wall time per problem,
and ratios against the fixed schedule.

Offline replay: round 1 of each problem is sampled once into a pool (with
per-token confidences), then the fixed schedule and keep-top, early stop and
adaptive width are replayed on it with ``first_round``; only the final
synthesis calls the model (so its wall times are the final call's alone).

    python bench/adaptive.py [--quick] [--json] [--problems P] [--arms fixed,quorum] [--schedule 32,4]
                             [--length-sigma S] [--runaway R]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from fastbackend import Simulation
from harness import Clock, check_targets, emit, fast_backend, machine, percentile, target_lines
from pacore import ComputePolicy, GenerationParams, Result, asample, asolve
from pacore.backends.openai_http import OpenAIBackend
from pacore.eval.grading import grade
from pacore.trace import Event, RoundStarted, TrajectoryFinished

#: The simulated model (fastbackend's defaults, lengths scaled down so a run fits on a shared 2-core machine:
#: the policies act on ratios of lengths and windows, which the scaling keeps).
SIMULATION = Simulation(seed=13, median_tokens=100)
TOKENS_PER_S = 200.0
TTFT_MS = 20.0
CHUNK_TOKENS = 4
#: max_tokens: far above the simulated lengths (a cap only the longest tail reaches), about 12x a median
#: trajectory as DeepConf's 64k-130k caps are for its ~10-20k-token traces; a runaway (a loop) runs to it.
MAX_TOKENS = 2048
#: The "medium" preset; ``--schedule`` runs another.
SCHEDULE = (16,)
#: Confidence window: a tenth to a fifth of a median trajectory, as DeepConf's 2048 of ~10-20k-token traces.
WINDOW = 16
TOP_LOGPROBS = 5
#: About a third of a median trajectory's time.
STRAGGLER_TIMEOUT_S = 0.25

#: The arms: the fixed schedule (paper's method) and one policy each.
ARMS: dict[str, ComputePolicy | None] = {
    "fixed": None,
    "early_stop": ComputePolicy(early_stop=True, window=WINDOW, top_logprobs=TOP_LOGPROBS),
    "early_stop_p90": ComputePolicy(
        early_stop=True, early_stop_percentile=90, window=WINDOW, top_logprobs=TOP_LOGPROBS
    ),
    "early_stop_p90_first": ComputePolicy(
        early_stop=True, early_stop_percentile=90, warmup_first=True, window=WINDOW, top_logprobs=TOP_LOGPROBS
    ),
    "adaptive_k": ComputePolicy(adaptive_k=True),
    # DeepConf's online algorithm in full: the warm-up first, early stop at its percentile, and
    # sampling stopped once the answers agree (adaptive width's test in place of its vote share).
    "deepconf_online_low": ComputePolicy(
        early_stop=True,
        early_stop_percentile=90,
        warmup_first=True,
        adaptive_k=True,
        window=WINDOW,
        top_logprobs=TOP_LOGPROBS,
    ),
    "deepconf_online_high": ComputePolicy(
        early_stop=True,
        early_stop_percentile=10,
        warmup_first=True,
        adaptive_k=True,
        window=WINDOW,
        top_logprobs=TOP_LOGPROBS,
    ),
    # Adaptive-Consistency's own procedure: one sample at a time, the Beta test after each.
    "adaptive_k_1": ComputePolicy(adaptive_k=True, wave=1),
    "keep_top_0.5": ComputePolicy(keep_top=0.5, window=WINDOW, top_logprobs=TOP_LOGPROBS),
    "quorum_0.9": ComputePolicy(quorum=0.9),
    "quorum_0.9_straggler": ComputePolicy(quorum=0.9, straggler_timeout=STRAGGLER_TIMEOUT_S),
    "budget": None,  # set per schedule: see arm_policy
}
ARM_NOTES = {
    "fixed": "the fixed schedule, every policy off (the paper's method)",
    "early_stop": f"online early stop, warm-up 4 (DeepConf's 16 of 512 cannot fit K=16), percentile 10 "
    f"(DeepConf-high), window {WINDOW}",
    "early_stop_p90": f"online early stop, warm-up 4, percentile 90 (DeepConf-low), window {WINDOW}",
    "early_stop_p90_first": "as early_stop_p90, the warm-up run first (warmup_first: DeepConf's online algorithm)",
    "adaptive_k": "adaptive width, waves of 4 (the engine's default), Beta test at 0.95 (Adaptive-Consistency's)",
    "deepconf_online_low": "DeepConf's online algorithm (Fu et al. 2025): warm-up of 4 first, early stop at "
    "percentile 90 (DeepConf-low), and adaptive sampling: waves of 4 until the answer is settled (Beta test at 0.95)",
    "deepconf_online_high": "as deepconf_online_low at percentile 10 (DeepConf-high)",
    "adaptive_k_1": "adaptive width, one trajectory at a time (Adaptive-Consistency's own), Beta test at 0.95",
    "keep_top_0.5": "the most confident half of round 1's messages synthesized",
    "quorum_0.9": "a round ends when 90% of its trajectories have finished",
    "quorum_0.9_straggler": f"quorum 0.9, then up to {STRAGGLER_TIMEOUT_S} s more for stragglers",
    "budget": "generated tokens per problem capped at half the fixed schedule's worst case (all at max_tokens)",
}
#: Arms replayed offline on a stored round-1 pool (the policies that act on round 1's samples).
REPLAY_ARMS = (
    "fixed",
    "early_stop",
    "early_stop_p90",
    "adaptive_k",
    "adaptive_k_1",
    "deepconf_online_low",
    "deepconf_online_high",
    "keep_top_0.5",
)

#: Arms whose rounds each last as long as their slowest kept trajectory, so that the simulated lengths
#: alone give their wall time with no overhead (see ``no_overhead_s``).
NO_OVERHEAD_ARMS = ("fixed", "quorum_0.9")

#: The arms the token-saving target is about.
EARLY_STOP_AND_WIDTH = (
    "early_stop",
    "early_stop_p90",
    "early_stop_p90_first",
    "adaptive_k",
    "adaptive_k_1",
    "deepconf_online_low",
    "deepconf_online_high",
)

TARGETS = {
    # The larger token saving of early stop and adaptive width among those losing at most 1 point.
    "token_saving_within_1pt": (0.40, True),
    "quorum_p50_wall_saving": (0.30, True),
}


def arm_policy(arm: str, schedule: Sequence[int]) -> ComputePolicy | None:
    if arm == "budget":
        return ComputePolicy(budget_tokens=(sum(schedule) + 1) * MAX_TOKENS // 2)
    return ARMS[arm]


@dataclass(frozen=True)
class Workload:
    problems: int
    #: Requests (each one arm of one problem) at once, for round 1 of 16: ``in_flight_for`` scales it.
    in_flight: int
    schedule: tuple[int, ...] = SCHEDULE
    #: The simulated model (``--length-sigma`` changes its length spread, ``--runaway`` its runaway share).
    simulation: Simulation = SIMULATION

    @property
    def in_flight_for(self) -> int:
        """``in_flight`` scaled to the schedule's first round, so the streams at once stay about the same."""
        return max(1, self.in_flight * 16 // self.schedule[0])


#: ``in_flight`` keeps the two processes well under the machine's cores (about 16 streams of
#: ``TOKENS_PER_S`` each per request), so wall times are the simulated model's, not CPU queues.
FULL = Workload(problems=60, in_flight=6)
QUICK = Workload(problems=12, in_flight=6)

QUESTION = "Problem {i}. Find the number of ordered pairs of integers satisfying the stated conditions."


def question(i: int) -> str:
    return QUESTION.format(i=i)


def params(i: int) -> GenerationParams:
    """The same seed for every arm of problem ``i``, so they draw the same samples."""
    return GenerationParams(max_tokens=MAX_TOKENS, seed=1000 * (i + 1))


@dataclass
class Outcome:
    correct: bool
    tokens: int
    wall_s: float
    stopped: int
    trajectories: int
    #: Round 1's last finisher kept (not stopped) to the start of round 2's call.
    round_gap_s: float
    #: The wall time the simulated lengths alone give (arms in NO_OVERHEAD_ARMS).
    no_overhead_s: float
    #: Trajectories that ran to max_tokens (``finish_reason: length``): the simulation's runaways.
    cut_at_max_tokens: int


class RoundGap:
    """An ``on_event`` timing round 1's last kept finisher to the start of round 2."""

    def __init__(self) -> None:
        self.last_finished = self.next_started = 0.0

    def __call__(self, event: Event) -> None:
        if isinstance(event, TrajectoryFinished) and event.round == 0 and event.trajectory.stopped is None:
            self.last_finished = time.perf_counter()
        elif isinstance(event, RoundStarted) and event.round == 1:
            self.next_started = time.perf_counter()

    @property
    def seconds(self) -> float:
        return self.next_started - self.last_finished


def no_overhead_s(result: Result) -> float:
    """Each round as long as the simulator makes its slowest kept trajectory: time to first token, then its
    tokens at the simulated rate (no client, server or scheduling overhead)."""
    kept = [[t.completion_tokens for t in r.trajectories if t.ok and t.stopped is None] for r in result.rounds]
    return sum(TTFT_MS / 1000 + max(tokens, default=0) / TOKENS_PER_S for tokens in kept)


def outcome(i: int, result: Result, wall_s: float, simulation: Simulation, gap: RoundGap) -> Outcome:
    trajectories = [t for r in result.rounds for t in r.trajectories]
    return Outcome(
        correct=grade(result.answer, simulation.problem(question(i)).answer),
        tokens=result.usage.completion_tokens,
        wall_s=wall_s,
        stopped=sum(t.stopped is not None for t in trajectories),
        trajectories=len(trajectories),
        round_gap_s=gap.seconds,
        no_overhead_s=no_overhead_s(result),
        cut_at_max_tokens=sum(t.finish_reason == "length" for t in trajectories),
    )


async def solve(backend: OpenAIBackend, i: int, workload: Workload, arm: str, **extra: Any) -> Outcome:
    started = time.perf_counter()
    schedule = list(workload.schedule)
    compute = arm_policy(arm, schedule)
    gap = RoundGap()
    result = await asolve(
        question(i), schedule=schedule, backend=backend, params=params(i), compute=compute, on_event=gap, **extra
    )
    return outcome(i, result, time.perf_counter() - started, workload.simulation, gap)


async def run_arms(backends: dict[str, OpenAIBackend], workload: Workload) -> dict[str, list[Outcome]]:
    """Every (problem, arm), ``in_flight`` at a time in problem order, so the arms of a problem run close together."""
    gate = asyncio.Semaphore(workload.in_flight_for)
    arms = list(backends)

    async def job(i: int, arm: str) -> Outcome:
        async with gate:
            return await solve(backends[arm], i, workload, arm)

    done = await asyncio.gather(*(job(i, arm) for i in range(workload.problems) for arm in arms))
    return {arm: list(done[j :: len(arms)]) for j, arm in enumerate(arms)}


async def run_replay(backend: OpenAIBackend, workload: Workload, arms: Sequence[str]) -> dict[str, list[Outcome]]:
    """Round 1 sampled once per problem (a pool), then each arm replayed on it: only the final call is live."""
    pool_policy = ComputePolicy(confidence=True, keep_token_confidences=True, window=WINDOW, top_logprobs=TOP_LOGPROBS)
    gate = asyncio.Semaphore(workload.in_flight_for)
    k = workload.schedule[0]

    async def problem(i: int) -> list[Outcome]:
        async with gate:
            pool = await asample(question(i), k, backend=backend, params=params(i), compute=pool_policy)
        return [await solve(backend, i, workload, arm, first_round=pool) for arm in arms]

    rows = await asyncio.gather(*(problem(i) for i in range(workload.problems)))
    return {arm: [row[j] for row in rows] for j, arm in enumerate(arms)}


def summarize(outcomes: dict[str, list[Outcome]], sent: dict[str, int] | None = None) -> dict[str, Any]:
    """Per arm figures; tokens are those the simulator sent (``sent``, per arm) when given, else the engine's count."""

    def tokens_of(arm: str) -> float:
        rows = outcomes[arm]
        return sent[arm] / len(rows) if sent is not None else statistics.mean(o.tokens for o in rows)

    fixed = outcomes["fixed"]
    base_tokens = tokens_of("fixed")
    base_p50 = percentile([o.wall_s for o in fixed], 50)
    base_accuracy = statistics.mean(o.correct for o in fixed)
    figures: dict[str, Any] = {}
    for arm, rows in outcomes.items():
        tokens = tokens_of(arm)
        walls = [o.wall_s for o in rows]
        accuracy = statistics.mean(o.correct for o in rows)
        figures[arm] = {
            "accuracy": round(accuracy, 4),
            "accuracy_change_points": round(100 * (accuracy - base_accuracy), 1),
            "tokens_per_problem": round(tokens),
            # What the engine counted (usage.completion_tokens): a stopped trajectory without logprobs
            # (quorum, budget) counts its streamed chunks, exact only with one token per chunk.
            "engine_tokens_per_problem": round(statistics.mean(o.tokens for o in rows)),
            "tokens_ratio": round(tokens / base_tokens, 3),
            "wall_p50_s": round(percentile(walls, 50), 3),
            "wall_p90_s": round(percentile(walls, 90), 3),
            "wall_p50_ratio": round(percentile(walls, 50) / base_p50, 3),
            "stopped_per_problem": round(statistics.mean(o.stopped for o in rows), 2),
            "round_gap_p50_ms": round(1000 * percentile([o.round_gap_s for o in rows], 50), 2),
            "round_gap_p90_ms": round(1000 * percentile([o.round_gap_s for o in rows], 90), 2),
            "trajectories_per_problem": round(statistics.mean(o.trajectories for o in rows), 2),
            # Problems with a trajectory that ran to max_tokens (a runaway, unless it was cut first).
            "problems_with_runaway": sum(o.cut_at_max_tokens > 0 for o in rows),
            # Problems where this arm and the fixed schedule disagree on correctness (paired).
            "gained": sum(o.correct and not f.correct for o, f in zip(rows, fixed, strict=True)),
            "lost": sum(f.correct and not o.correct for o, f in zip(rows, fixed, strict=True)),
        }
    return figures


def best_saving(arms: dict[str, Any]) -> float:
    """The larger token saving of early stop / adaptive width among arms losing at most 1 point (0 if none)."""
    savings = [
        1 - arms[arm]["tokens_ratio"]
        for arm in EARLY_STOP_AND_WIDTH
        if arm in arms and arms[arm]["accuracy_change_points"] >= -1.0
    ]
    return round(max(savings, default=0.0), 3)


async def measure(workload: Workload, arms: Sequence[str], replay: bool) -> dict[str, Any]:
    figures: dict[str, Any] = {
        "machine": machine(),
        "workload": {
            "problems": workload.problems,
            "requests_in_flight": workload.in_flight_for,
            "schedule": list(workload.schedule),
            "max_tokens": MAX_TOKENS,
            "tokens_per_s_per_stream": TOKENS_PER_S,
            "ttft_ms": TTFT_MS,
            "chunk_tokens": CHUNK_TOKENS,
            "window": WINDOW,
            "top_logprobs": TOP_LOGPROBS,
        },
        "simulation": asdict(workload.simulation),
        "arms": {arm: ARM_NOTES[arm] for arm in arms},
    }
    problems = [workload.simulation.problem(question(i)) for i in range(workload.problems)]
    figures["simulated_mean_p_correct"] = round(statistics.mean(p.p_correct for p in problems), 3)
    runaway = workload.simulation.runaway
    figures["simulated_runaway_share"] = round(
        statistics.mean(min(1.0, runaway * 2 * p.difficulty) for p in problems), 4
    )
    # One endpoint per arm, so the simulator counts the tokens each arm really made it generate.
    with fast_backend(
        "--simulate", *workload.simulation.args(), "--tokens-per-s", TOKENS_PER_S, "--ttft-ms", TTFT_MS,
        "--chunk-tokens", CHUNK_TOKENS, "--endpoints", len(arms),
    ) as server:  # fmt: skip
        backends = {arm: OpenAIBackend(url, n_mode="off") for arm, url in zip(arms, server.urls, strict=True)}
        try:
            with Clock() as clock:
                live = await run_arms(backends, workload)
            figures["live_seconds"] = round(clock.wall, 1)
            figures["client_cpu_share"] = round(clock.cpu / clock.wall, 2)
            sent = {arm: stats["tokens_sent"] for arm, stats in zip(arms, server.stats(), strict=True)}
            figures["live"] = summarize(live, sent)
            if replay:
                replay_arms = [arm for arm in REPLAY_ARMS if arm in arms]
                figures["replay"] = summarize(await run_replay(backends["fixed"], workload, replay_arms))
        finally:
            await asyncio.gather(*(backend.aclose() for backend in backends.values()))
    live_arms = figures["live"]
    figures["token_saving_within_1pt"] = best_saving(live_arms)
    if "quorum_0.9" in live_arms:
        figures["quorum_p50_wall_saving"] = round(1 - live_arms["quorum_0.9"]["wall_p50_ratio"], 3)
        # The same saving if every round lasted exactly what the simulated lengths say: what any
        # client could measure on this simulation, so how far the measured one is from its bound.
        p50 = {arm: percentile([o.no_overhead_s for o in live[arm]], 50) for arm in NO_OVERHEAD_ARMS}
        figures["no_overhead_p50_s"] = {arm: round(value, 3) for arm, value in p50.items()}
        figures["quorum_p50_wall_saving_no_overhead"] = round(1 - p50["quorum_0.9"] / p50["fixed"], 3)
    figures["targets"] = check_targets(figures, {k: v for k, v in TARGETS.items() if k in figures})
    return figures


def arm_table(arms: dict[str, Any]) -> list[str]:
    lines = [
        f"  {'arm':22} {'accuracy':>8} {'vs fixed':>8} {'+/-':>5} {'tokens':>7} {'ratio':>6} {'engine':>7} "
        f"{'p50 s':>6} {'p90 s':>6} {'p50 ratio':>9} {'stopped':>7} {'gap ms':>6}"
    ]
    for arm, f in arms.items():
        lines.append(
            f"  {arm:22} {f['accuracy']:8.1%} {f['accuracy_change_points']:+7.1f}p {f['gained']:>2}/{f['lost']:<2} "
            f"{f['tokens_per_problem']:7d} {f['tokens_ratio']:6.2f} {f['engine_tokens_per_problem']:7d} {f['wall_p50_s']:6.2f} {f['wall_p90_s']:6.2f} "
            f"{f['wall_p50_ratio']:9.2f} {f['stopped_per_problem']:7.1f} {f['round_gap_p50_ms']:6.1f}"
        )
    return lines


def report(figures: dict[str, Any]) -> list[str]:
    w = figures["workload"]
    sim = figures["simulation"]
    lines = [
        f"Adaptive compute on a SIMULATED model (bench/fastbackend.py --simulate): {w['problems']} problems, "
        f"schedule {w['schedule']}, {w['requests_in_flight']} requests in flight (arms of a problem close together, "
        f"same seeds), {w['tokens_per_s_per_stream']:g} tokens/s per stream, {w['ttft_ms']:g} ms to first token, "
        f"max_tokens {w['max_tokens']}, confidence window {w['window']}, top_logprobs {w['top_logprobs']}.",
        f"Simulation: per-sample accuracy 1/(1+exp({sim['steepness']:g}*(d-{sim['midpoint']:g}))) over uniform "
        f"difficulty d (mean {figures['simulated_mean_p_correct']:.2f} on these problems), {sim['wrong_answers']} "
        f"wrong answers, synthesis follows the majority with p {sim['follow_majority']:g}; log-normal lengths, "
        f"median {sim['median_tokens']:g} x (1 + {sim['hard_length']:g} d), sigma {sim['length_sigma']:g}, "
        f"wrong x{sim['wrong_length']:g}, synthesis x{sim['synthesis_length']:g}; runaways (loops to max_tokens, no "
        f"answer) at rate {sim['runaway']:g} x 2d ({figures['simulated_runaway_share']:.1%} of samples on these "
        f"problems); confidence drifts down on {1 - sim['confident_wrong']:.0%} of wrong trajectories. Figures are "
        "the simulation's, not a real model's.",
        "",
    ]
    lines += [f"  {arm:22} = {note}" for arm, note in figures["arms"].items()]
    lines += [
        "",
        f"live ({figures['live_seconds']} s, client CPU {figures['client_cpu_share']:.0%} of a core); '+/-': problems "
        "the arm gets right that fixed does not / the reverse; tokens per problem as the simulator counted them "
        "('engine': as usage counted them); ratios against fixed; 'gap ms': p50 from round 1's last kept "
        "finisher to round 2's call:",
        *arm_table(figures["live"]),
    ]
    fixed = figures["live"]["fixed"]
    lines.append(
        f"  runaways: {fixed['problems_with_runaway']} of {w['problems']} problems had a trajectory run to max_tokens "
        "in the fixed schedule (round 1 or synthesis: a runaway, or rarely a length drawn above the cap)"
    )
    if "no_overhead_p50_s" in figures:
        bound = figures["no_overhead_p50_s"]
        lines.append(
            f"  with no overhead (each round {w['ttft_ms']:g} ms + its slowest kept trajectory's simulated tokens at "
            f"{w['tokens_per_s_per_stream']:g}/s): p50 fixed {bound['fixed']:.2f} s, quorum_0.9 "
            f"{bound['quorum_0.9']:.2f} s, saving {figures['quorum_p50_wall_saving_no_overhead']:.3f} "
            f"(measured {figures['quorum_p50_wall_saving']:.3f})"
        )
    if "replay" in figures:
        lines += ["", "offline replay on a stored round-1 pool (first_round; only the final call is live):"]
        lines += arm_table(figures["replay"])
    lines.append(
        f"\none problem is {100 / w['problems']:.1f} accuracy points: accuracy changes are paired (same samples), "
        "so '+/-' counts the problems that moved."
    )
    return [*lines, "\ntargets:", *target_lines(figures["targets"])]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller workload (about a minute)")
    parser.add_argument("--json", action="store_true", help="print one JSON object of the figures")
    parser.add_argument("--problems", type=int, help="problems (default: 60, --quick 12)")
    parser.add_argument("--arms", help=f"comma-separated arms to run (default all: {','.join(ARMS)}; fixed always)")
    parser.add_argument("--no-replay", action="store_true", help="skip the offline replay")
    parser.add_argument("--schedule", help="trajectories per coordinated round, e.g. 32,4 (default 16)")
    parser.add_argument(
        "--length-sigma", type=float,
        help=f"the simulated lengths' log standard deviation (default {SIMULATION.length_sigma:g}), for a sensitivity run",
    )  # fmt: skip
    parser.add_argument(
        "--runaway", type=float, metavar="R",
        help=f"the simulated runaway share: a sample loops to max_tokens with probability 2 R d (default "
        f"{SIMULATION.runaway:g}, at most 0.5), for a sensitivity run",
    )  # fmt: skip
    args = parser.parse_args(argv)
    workload = QUICK if args.quick else FULL
    if args.problems:
        workload = replace(workload, problems=args.problems)
    if args.schedule:
        try:
            workload = replace(workload, schedule=tuple(int(k) for k in args.schedule.split(",")))
        except ValueError:
            parser.error(f"--schedule takes comma-separated counts, got {args.schedule!r}")
    if args.length_sigma is not None:
        if args.length_sigma < 0:
            parser.error(f"--length-sigma must be >= 0, got {args.length_sigma:g}")
        workload = replace(workload, simulation=replace(workload.simulation, length_sigma=args.length_sigma))
    if args.runaway is not None:
        if not 0 <= args.runaway <= 0.5:
            parser.error(
                f"--runaway must be from 0 to 0.5 (a sample runs away with probability 2 R d), got {args.runaway:g}"
            )
        workload = replace(workload, simulation=replace(workload.simulation, runaway=args.runaway))
    arms = ["fixed", *(a for a in (args.arms.split(",") if args.arms else ARMS) if a != "fixed")]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    figures = asyncio.run(measure(workload, arms, not args.no_replay))
    emit(figures, args.json, report(figures))


if __name__ == "__main__":
    main()
