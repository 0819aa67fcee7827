"""A fast OpenAI-compatible chat server for loopback benchmarks.

It stands in for a GPU inference server: every call waits a configurable
time to first token, then "generates" ``--completion-tokens`` tokens at
``--tokens-per-s`` per stream (0 = instantly), streamed as server-sent
events (``n`` > 1 included, choices interleaved by ``index`` as vLLM does)
or not, with ``n`` samples per call supported, ignored or refused, and
``stream`` honoured, ignored or refused (``--stream-support``). ``--concurrency`` caps the
samples an endpoint works on at once (later ones queue, first come first
served), which models an endpoint that is the bottleneck; ``--endpoints N``
listens on N ports in one process, each with its own cap.

The HTTP/1.1 keep-alive server is written on ``asyncio.Protocol`` directly
and answers an undelayed, unstreamed call without creating a task, so that
the client under test, not this server, is what a benchmark measures.

Routes: ``POST /v1/chat/completions``, ``GET /v1/models`` and ``GET /stats``
(calls and samples served, peak samples in progress, faults injected).

``--faults SPEC --fault-seed N`` makes a share of the chat calls fail the ways
real servers do under load (5xx, 429 with ``Retry-After``, hangs, resets,
malformed or truncated answers, an endpoint that is down), deterministically
by seed; ``bench/faults.py`` lists the kinds. ``--api-key KEY`` makes the
endpoints require that bearer key (a wrong one gets a 401 quoting it, as some
hosted APIs do).

Usage::

    python bench/fastbackend.py --ttft-ms 50 --tokens-per-s 200 --endpoints 2

prints one ``http://127.0.0.1:PORT/v1`` line per endpoint, then ``ready``.

Model simulation (``--simulate``): a SIMULATION of a reasoning model, for
benchmarks of policies that depend on what a model answers (``bench/adaptive.py``).
Nothing is learned or computed about the question; every figure measured on it
is the simulation's. Off, the server behaves exactly as above. On:

- The problem is the last user message's stripped text, hashed; in a
  synthesis prompt (recognised by the ``Original Problem:`` and ``Reference
  Responses:`` lines of pacore's templates) it is the original problem, so
  every round of a request sees the same problem.
- Difficulty d is uniform in [0, 1] per problem; a fresh sample is right with
  p(d) = 1 / (1 + exp(steepness * (d - midpoint))) (defaults 8 and 0.6: a
  bimodal mix of easy and hard problems, mean p about 0.6), else it gives one of
  ``wrong_answers`` wrong answers with weights 1, 1/2, 1/3 (the first a common
  trap, which can outvote the right answer on hard problems). Answers are
  integers below 1000, the right one ``Simulation.problem(text).answer``.
- A synthesis prompt answers with the majority of its references' ``\\boxed{}``
  answers with probability ``follow_majority`` (0.9; ties drawn), else samples
  afresh as above.
- Lengths are log-normal: median ``median_tokens * (1 + hard_length * d)``
  (600, 1.0), log standard deviation ``length_sigma`` (0.6: within a problem
  the 90th percentile is 2.2x the median, the 99th 4.0x), times
  ``wrong_length`` (1.4) for a wrong trajectory and ``synthesis_length`` (0.5)
  for a synthesis call. ``max_tokens`` cuts them (``finish_reason: length``).
  The text is ``<think>`` filler words, then ``</think>`` and
  ``The answer is $\\boxed{N}$.``
  Sources: Hassid et al. 2025 ("Don't Overthink it", arXiv 2505.17813; 20
  samples a question from three R1-style models on AIME 2024/25 and HMMT 2025)
  find the chains of one question spread widely, wrong ones longer (the
  shortest chain up to 34.5 points more accurate than the longest), and the
  hardest third of questions using up to 2.9x the tokens of the easiest (here
  about 2x, with the wrong-length factor); RL-rollout papers (Hu et al. 2025,
  TLT, arXiv 2511.16665; DARTS, arXiv 2605.30859) report a long right tail
  of R1-style response lengths, within one prompt's group too; Jiao et al.
  (EMNLP 2025) fit GPT-4o response lengths (checked on Qwen and DeepSeek)
  with a Weibull-type, bounded-tail extreme-value law, heavier at higher
  temperature: no support for a power-law (Pareto) tail. None of these gives a within-question
  dispersion to fit, so ``length_sigma`` is a stated assumption, not a
  measurement: 0.6 gives a right skew of the reported kind (over a whole
  batch, difficulty and wrong answers included, p99 is 4.9x the median); 1.0
  gives the ~10x an RL-systems tutorial quotes for training rollouts, where
  unconverged policies and runaway repetition lengthen the tail.
- Runaways: a sample, round-1 trajectory or synthesis call alike, runs away
  with probability ``runaway * 2 * d`` (``runaway`` 0.03 on average over
  problems, 0.06 on the hardest): it loops, one short filler sentence
  repeated after ``<think>``, with no ``</think>`` and no answer, until the
  request's ``max_tokens`` cuts it (``finish_reason: length``; without
  ``max_tokens``, a 32768-token context). It counts as wrong, and its
  confidence stays high (a loop is low-entropy: no downward drift, and its
  sharpness level is raised by 1), so an early stop does not single it out.
  Its draw has a random stream of its own, so with ``runaway`` 0 every sample
  is exactly what it was before runaways existed, and with it the others are
  unchanged. Source: Pipis, Garg, Kontonis, Shrivastava, Krishnamurthy,
  Papailiopoulos, "Wait, Wait, Wait... Why Do Reasoning Models Loop?" (arXiv
  2512.12895, Dec 2025): open reasoning models (R1-distilled Qwen and Llama,
  OpenThinker3, Phi-4 reasoning) loop on AIME; looping is common at low
  temperature (OpenThinker3-1.5B loops in 30% of greedy responses), smaller
  and distilled models loop more, harder problems elicit more of it, and a
  higher temperature loops less but still generates far longer than needed.
  PaCoRe samples at temperature 1.0, where loops are far rarer than greedy
  decoding's 30% for a small distilled model: 3% on average and 6% on the
  hardest problems is a stated assumption, not a measurement. A runaway's
  length is the cap, so the cap matters: ``bench/adaptive.py``'s max_tokens
  of 2048 is about 12x its median trajectory (171 tokens), as DeepConf's
  64k-130k caps are for its ~10-20k-token traces.
- Wall time: ``--ttft-ms``, then each sample's tokens at ``--tokens-per-s``
  (chunks of ``--chunk-tokens`` sent when their last token is due), so wall
  time scales with length; ``n`` > 1 streams each choice at its own pace.
- Logprobs (``logprobs: true``, ``top_logprobs`` 0-20, more is a 400) come in
  OpenAI's format, ``choices[].logprobs.content[]`` with ``token``,
  ``logprob``, ``bytes: null`` and ``top_logprobs[]``, streamed with each
  chunk's tokens. Token t has a sharpness g_t: alternative j (0 = the chosen
  token) has log-probability ``log(1 - e^-g) - g j``, so DeepConf's token
  confidence is ``g (k-1)/2 - log(1 - e^-g)`` (about 2g for k = 5). g_t is
  a trajectory level (``sharpness`` 6 + N(0, ``problem_spread`` 0.5) per problem
  + N(0, ``sharpness_spread`` 0.6) per trajectory) plus a slow AR(1) wander
  (``wander`` 0.8, ~50-token correlation) plus token noise (``token_noise``
  1.5), floored at 0.3. A wrong trajectory, except a ``confident_wrong``
  share (0.2), starts drifting down at a uniform 10-60% of its length and
  reaches ``wrong_sharpness`` (4) over 10% of its length, so an early stop can
  catch it. With these defaults the lowest 128-token group confidence tells a
  right trajectory from a wrong one with an AUROC of about 0.88 (DeepConf
  reports strong but imperfect separation).
- Deterministic per (``--sim-seed``, problem, sample): the sample number is
  the request's ``seed`` plus the choice index (pacore sends a distinct seed per
  call when ``GenerationParams.seed`` is set), else a per-prompt call counter.

Every parameter is a ``--sim-*`` option (``--help``), a field of :class:`Simulation`.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hashlib
import itertools
import json
import math
import random
import re
import signal
import time
from collections import Counter, deque
from dataclasses import dataclass, fields
from typing import Literal

from faults import KINDS, FaultPlan, FaultSpecError, inject, parse_spec

NSupport = Literal["on", "ignore", "reject"]
StreamSupport = Literal["on", "ignore", "reject"]

# Short common words: a completion of N tokens is N of these, space separated.
_VOCABULARY = ("the", "answer", "is", "so", "we", "check", "each", "case", "and", "get")
_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed"}
_MAX_HEADER_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Behaviour:
    """How an endpoint behaves; the same for every call."""

    ttft_s: float = 0.0
    #: Tokens per second of each stream; 0 means the whole completion at once.
    tokens_per_s: float = 0.0
    completion_tokens: int = 32
    n_support: NSupport = "on"
    #: Whether ``stream: true`` is honoured, ignored (a plain JSON answer) or refused (HTTP 400).
    stream_support: StreamSupport = "on"
    #: Most samples in progress at once; 0 means unlimited.
    concurrency: int = 0
    #: Tokens per streamed chunk (real servers send one).
    chunk_tokens: int = 1
    model: str = "fast"

    def generation_s(self, tokens: int) -> float:
        return tokens / self.tokens_per_s if self.tokens_per_s > 0 else 0.0


@dataclass(slots=True)
class ChatRequest:
    model: str
    n: int
    stream: bool
    include_usage: bool
    max_tokens: int | None
    prompt_tokens: int
    #: Simulation only: the last user message's text, the request's ``seed``, and the
    #: alternatives per token of the logprobs asked for (``None``: no logprobs).
    prompt: str = ""
    seed: int | None = None
    top_logprobs: int | None = None


@dataclass(slots=True)
class Reply:
    status: int
    body: bytes


def _completion_text(tokens: int) -> str:
    return " ".join(_VOCABULARY[i % len(_VOCABULARY)] for i in range(tokens))


# --- model simulation (--simulate) ---------------------------------------------

#: The lines of pacore's synthesis templates (``pacore`` and ``generic``) that frame the
#: original problem and the references: what makes a prompt a synthesis prompt.
_PROBLEM_MARK = "Original Problem:\n"
_REFERENCES_MARK = "\nReference Responses:\n"
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
#: Slowly wandering confidence: the AR(1) coefficient per token (a correlation length of ~50 tokens).
_WANDER_CORRELATION = 0.98
#: A wrong trajectory starts drifting at a uniform fraction of its length in this range,
#: and reaches its lower level over this share of its length.
_DRIFT_START = (0.1, 0.6)
_DRIFT_SPAN = 0.1
_MIN_SHARPNESS = 0.3
_MIN_SIM_TOKENS = 24
#: A runaway trajectory loops on this sentence until it is cut (the looping Pipis et al. 2025 describe).
_LOOP = (" Wait", ",", " let", " me", " check", " that", " again", ".")
#: A loop repeats itself, so its tokens are this much sharper than its trajectory's level (low entropy).
_LOOP_SHARPENING = 1.0
#: Where a runaway asked without ``max_tokens`` stops: a context window commonly served for small
#: open reasoning models (their own windows reach 128k tokens).
_CONTEXT_TOKENS = 32768
#: Largest ``top_logprobs`` OpenAI's API accepts.
MAX_TOP_LOGPROBS = 20


def _rng(*key: object) -> random.Random:
    """A generator seeded by ``key`` alone (the same in every process; ``hash()`` of a str is not)."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "big"))


@dataclass(frozen=True, slots=True)
class SimulatedProblem:
    key: str
    #: 0 (easy) to 1 (hard), uniform over problems.
    difficulty: float
    #: Probability that one fresh sample answers correctly.
    p_correct: float
    answer: str
    wrong_answers: tuple[str, ...]
    #: Median length of a correct round-1 trajectory, in tokens.
    median_tokens: float


@dataclass(frozen=True, slots=True)
class SimulatedSample:
    #: ``None``: a runaway, which never answers.
    answer: str | None
    correct: bool
    #: The generated tokens, whose concatenation is the text.
    tokens: list[str]
    #: Per token, the gap ``g`` between the log-probabilities of successive alternatives.
    sharpness: list[float]
    #: Where a wrong trajectory's confidence starts to drift down (``None``: it does not).
    drift_at: int | None
    #: A loop that runs until ``max_tokens`` (or the context) cuts it: no ``</think>``, no answer.
    runaway: bool = False

    @property
    def text(self) -> str:
        return "".join(self.tokens)


@dataclass(frozen=True, slots=True)
class Simulation:
    """A SIMULATED reasoning model: answers, lengths and logprobs drawn from stated distributions.

    Nothing here is a model; the figures a benchmark measures on it are the
    simulation's, chosen to be plausible (see the module docstring).
    """

    seed: int = 0
    #: Per-sample accuracy p(d) = 1 / (1 + exp(steepness * (d - midpoint))), d uniform in [0, 1].
    midpoint: float = 0.6
    steepness: float = 8.0
    #: Distinct wrong answers per problem, drawn with weights 1, 1/2, 1/3, ...
    wrong_answers: int = 3
    #: A synthesis prompt answers with its references' majority with this probability, else afresh.
    follow_majority: float = 0.9
    #: Lengths: log-normal, median ``median_tokens * (1 + hard_length * d)``, times ``wrong_length``
    #: for a wrong trajectory and ``synthesis_length`` for a synthesis call; ``length_sigma`` is the
    #: standard deviation of the log length.
    median_tokens: float = 600.0
    length_sigma: float = 0.6
    hard_length: float = 1.0
    wrong_length: float = 1.4
    synthesis_length: float = 0.5
    #: Token sharpness g (see the module docstring): a trajectory's level is
    #: ``sharpness`` + N(0, problem_spread) per problem + N(0, sharpness_spread) per trajectory.
    sharpness: float = 6.0
    problem_spread: float = 0.5
    sharpness_spread: float = 0.6
    #: A wrong trajectory's level drifts down by ``sharpness - wrong_sharpness`` partway,
    #: unless it is one of the ``confident_wrong`` share that stays confident.
    wrong_sharpness: float = 4.0
    confident_wrong: float = 0.2
    #: Slow (AR(1), ~50-token correlation) and per-token Gaussian noise on g.
    wander: float = 0.8
    token_noise: float = 1.5
    #: A sample (round 1 or synthesis) runs away, looping until it is cut, with probability
    #: ``runaway * 2 * d``: ``runaway`` on average over problems, more on hard ones.
    runaway: float = 0.03

    def problem(self, text: str) -> SimulatedProblem:
        """The simulated problem behind a question's text (its stripped text, hashed)."""
        key = hashlib.blake2b(text.strip().encode(), digest_size=8).hexdigest()
        rng = _rng(self.seed, key, "problem")
        difficulty = rng.random()
        p_correct = 1 / (1 + math.exp(self.steepness * (difficulty - self.midpoint)))
        answers = rng.sample(range(1000), 1 + self.wrong_answers)
        return SimulatedProblem(
            key=key,
            difficulty=difficulty,
            p_correct=p_correct,
            answer=str(answers[0]),
            wrong_answers=tuple(map(str, answers[1:])),
            median_tokens=self.median_tokens * (1 + self.hard_length * difficulty),
        )

    def sample(self, prompt: str, sample: int, max_tokens: int | None = None) -> SimulatedSample:
        """Sample number ``sample`` for the prompt: a question, or a synthesis prompt over references.

        ``max_tokens`` (the request's) is where a runaway sample stops; other samples ignore it
        (the server cuts them).
        """
        question, references = parse_synthesis(prompt)
        problem = self.problem(question)
        synthesis = references is not None
        kind = "synthesis" if synthesis else "sample"
        # Its own stream, so that every other sample is exactly what it is without runaways.
        looping = _rng(self.seed, problem.key, "runaway", kind, sample)
        if looping.random() < self.runaway * 2 * problem.difficulty:
            return self._runaway(problem, looping, max_tokens or _CONTEXT_TOKENS)
        rng = _rng(self.seed, problem.key, kind, sample)
        if references and rng.random() < self.follow_majority:
            counts = Counter(references)
            top = max(counts.values())
            answer = rng.choice(sorted(a for a, c in counts.items() if c == top))
        elif rng.random() < problem.p_correct:
            answer = problem.answer
        else:
            weights = [1 / (j + 1) for j in range(len(problem.wrong_answers))]
            answer = rng.choices(problem.wrong_answers, weights)[0]
        correct = answer == problem.answer
        median = problem.median_tokens * (self.synthesis_length if synthesis else 1.0)
        median *= 1.0 if correct else self.wrong_length
        length = max(_MIN_SIM_TOKENS, round(median * math.exp(self.length_sigma * rng.gauss(0, 1))))
        tokens = _sample_tokens(length, answer)
        level = self._level(problem, rng)
        drift_at = None
        if not correct and rng.random() >= self.confident_wrong:
            drift_at = round(length * rng.uniform(*_DRIFT_START))
        return SimulatedSample(answer, correct, tokens, self._sharpness(rng, level, length, drift_at), drift_at)

    def _runaway(self, problem: SimulatedProblem, rng: random.Random, length: int) -> SimulatedSample:
        """A trajectory that loops until it is cut at ``length``: confident throughout, so no early stop sees it."""
        tokens = ["<think>\n", *(_LOOP[i % len(_LOOP)] for i in range(length - 1))]
        level = self._level(problem, rng) + _LOOP_SHARPENING
        return SimulatedSample(None, False, tokens, self._sharpness(rng, level, length, None), None, runaway=True)

    def _level(self, problem: SimulatedProblem, rng: random.Random) -> float:
        """A trajectory's sharpness level: the problem's, plus this trajectory's own spread."""
        level = self.sharpness + _rng(self.seed, problem.key, "level").gauss(0, self.problem_spread)
        return level + rng.gauss(0, self.sharpness_spread)

    def _sharpness(self, rng: random.Random, level: float, length: int, drift_at: int | None) -> list[float]:
        """Per token g: ``level``, drifting down after ``drift_at``, plus a slow wander and token noise."""
        drop = self.sharpness - self.wrong_sharpness
        span = max(1.0, length * _DRIFT_SPAN)
        sharpness = []
        wander = rng.gauss(0, 1)
        innovation = math.sqrt(1 - _WANDER_CORRELATION**2)
        for position in range(length):
            wander = _WANDER_CORRELATION * wander + innovation * rng.gauss(0, 1)
            mean = level
            if drift_at is not None and position > drift_at:
                mean -= drop * min(1.0, (position - drift_at) / span)
            g = mean + self.wander * wander + self.token_noise * rng.gauss(0, 1)
            sharpness.append(max(_MIN_SHARPNESS, g))
        return sharpness

    def args(self) -> list[str]:
        """The command-line options that give this simulation (with ``--simulate``)."""
        return [
            part for f in fields(self) for part in (f"--sim-{f.name.replace('_', '-')}", str(getattr(self, f.name)))
        ]


def parse_synthesis(prompt: str) -> tuple[str, list[str] | None]:
    """``(question, answers of the references)`` of a synthesis prompt; ``(prompt, None)`` otherwise.

    A reference without a ``\\boxed{}`` answer (cut short) contributes none.
    """
    start = prompt.find(_PROBLEM_MARK)
    end = prompt.find(_REFERENCES_MARK, start + 1)
    if start < 0 or end < 0:
        return prompt, None
    return prompt[start + len(_PROBLEM_MARK) : end], _BOXED.findall(prompt, end)


def _sample_tokens(length: int, answer: str) -> list[str]:
    """Inline reasoning, then a short conclusion with the boxed answer (``length`` tokens in all)."""
    conclusion = ["\n</think>\n\n", "The", " answer", " is", " $\\boxed{", answer, "}$", "."]
    reasoning = length - 1 - len(conclusion)
    return ["<think>\n", *(" " + _VOCABULARY[i % len(_VOCABULARY)] for i in range(reasoning)), *conclusion]


def token_confidence(sharpness: float, top: int) -> float:
    """DeepConf's token confidence of a simulated token: -(1/k) * sum of the top-k log-probabilities.

    Alternative j (0 = the chosen token) has log-probability ``log(1 - e^-g) - g * j``
    (a geometric distribution over the vocabulary), so C = g (k - 1) / 2 - log(1 - e^-g).
    """
    return sharpness * (top - 1) / 2 - math.log1p(-math.exp(-sharpness))


def _logprob_entries(sample: SimulatedSample, count: int, top: int) -> list[bytes]:
    """The OpenAI ``logprobs.content`` entry of each of the first ``count`` tokens."""
    entries = []
    for index in range(count):
        token = sample.tokens[index]
        g = sample.sharpness[index]
        first = math.log1p(-math.exp(-g))
        listed = ",".join(
            [f'{prefix}{first - g * j:.4f},"bytes":null}}' for j, prefix in enumerate(_prefixes(token, top))]
        )
        entries.append(f'{_prefixes(token, 1)[0]}{first:.4f},"bytes":null,"top_logprobs":[{listed}]}}'.encode())
    return entries


@functools.lru_cache(maxsize=1024)
def _prefixes(token: str, top: int) -> tuple[str, ...]:
    """``{"token":...,"logprob":`` of the chosen token and its ``top - 1`` alternatives."""
    words = [" " + word for word in _VOCABULARY if " " + word != token]
    alternatives = [words[j % len(words)] + ("" if j < len(words) else str(j)) for j in range(top - 1)]
    return tuple(f'{{"token":{json.dumps(t)},"logprob":' for t in [token, *alternatives][:top])


class _Slots:
    """A first-come-first-served counting semaphore taken ``n`` slots at a time."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.free = size
        self.waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def acquire(self, count: int) -> None:
        if not self.waiters and self.free >= count:
            self.free -= count
            return
        future = asyncio.get_running_loop().create_future()
        entry = (count, future)
        self.waiters.append(entry)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(count)  # granted just as the caller went away
            else:
                self.waiters.remove(entry)
            raise

    def release(self, count: int) -> None:
        self.free += count
        while self.waiters and self.waiters[0][0] <= self.free:
            granted, future = self.waiters.popleft()
            self.free -= granted
            future.set_result(None)


class Endpoint:
    """One listening port: its behaviour, its capacity and its counters."""

    def __init__(
        self,
        behaviour: Behaviour,
        faults: FaultPlan | None = None,
        api_key: str | None = None,
        simulation: Simulation | None = None,
    ) -> None:
        self.behaviour = behaviour
        self.faults = faults
        self.api_key = api_key
        self.simulation = simulation
        #: Simulation: the next sample number of each prompt asked without a ``seed``.
        self._unseeded: dict[str, itertools.count[int]] = {}
        self.slots = _Slots(behaviour.concurrency) if behaviour.concurrency > 0 else None
        self.calls = 0
        self.samples = 0
        self.active = 0
        self.peak_active = 0
        #: Simulation: tokens sent (a cancelled stream counts what went out before it was closed).
        self.tokens_sent = 0
        self._ids = itertools.count(1)
        self._choices: dict[tuple[int, int, str], bytes] = {}
        self._deltas: dict[tuple[int, int], tuple[str, ...]] = {}
        self.model_list = json.dumps(
            {"object": "list", "data": [{"id": behaviour.model, "object": "model", "owned_by": "fastbackend"}]}
        ).encode()

    # --- parsing ------------------------------------------------------------

    def parse(self, body: bytes) -> ChatRequest | Reply:
        try:
            data = json.loads(body)
        except ValueError:
            return _error(400, "the request body is not valid JSON")
        if not isinstance(data, dict) or not isinstance(data.get("messages"), list) or not data["messages"]:
            return _error(400, "'messages' must be a non-empty list")
        n = data.get("n") or 1
        if not isinstance(n, int) or n < 1:
            return _error(400, "'n' must be a positive integer")
        if n > 1 and self.behaviour.n_support == "reject":
            return _error(400, "this server supports only n=1")
        if self.behaviour.n_support == "ignore":
            n = 1
        stream = bool(data.get("stream"))
        if stream and self.behaviour.stream_support == "reject":
            return _error(400, "streaming is not supported")
        max_tokens = data.get("max_completion_tokens") or data.get("max_tokens")
        options = data.get("stream_options") or {}
        request = ChatRequest(
            model=str(data.get("model") or self.behaviour.model),
            n=n,
            stream=stream and self.behaviour.stream_support == "on",
            include_usage=bool(options.get("include_usage")),
            max_tokens=max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else None,
            prompt_tokens=max(1, len(body) // 4),
        )
        return request if self.simulation is None else _simulated_request(request, data)

    def length(self, request: ChatRequest) -> tuple[int, str]:
        tokens = self.behaviour.completion_tokens
        if request.max_tokens is not None and request.max_tokens < tokens:
            return request.max_tokens, "length"
        return tokens, "stop"

    def is_instant(self, request: ChatRequest) -> bool:
        b = self.behaviour
        return not request.stream and self.slots is None and b.ttft_s <= 0 and b.tokens_per_s <= 0

    # --- replies ------------------------------------------------------------

    async def respond(self, request: ChatRequest, transport: asyncio.Transport, keep_alive: bool) -> None:
        """Serve one chat call, waiting as the behaviour says (the fault-injection point)."""
        tokens, _ = self.length(request)
        if self.slots is not None:
            await self.slots.acquire(min(request.n, self.slots.size))
        self._start(request)
        try:
            if self.simulation is not None:
                await self._simulate(request, transport, keep_alive)
            elif request.stream:
                await self._stream(request, transport, keep_alive)
            else:
                await asyncio.sleep(self.behaviour.ttft_s + self.behaviour.generation_s(tokens))
                transport.write(_http(200, self.completion(request), keep_alive))
        finally:
            self.active -= request.n
            if self.slots is not None:
                self.slots.release(min(request.n, self.slots.size))

    def _start(self, request: ChatRequest) -> None:
        self.calls += 1
        self.samples += request.n
        self.active += request.n
        self.peak_active = max(self.peak_active, self.active)

    def serve_instantly(self, request: ChatRequest) -> bytes:
        self._start(request)
        self.active -= request.n
        return self.completion(request)

    def completion(self, request: ChatRequest) -> bytes:
        if self.simulation is not None:
            return self._simulated_completion(request, self.samples_for(request))
        tokens, finish = self.length(request)
        key = (request.n, tokens, finish)
        choices = self._choices.get(key)
        if choices is None:
            text = _completion_text(tokens)
            choices = self._choices[key] = json.dumps(
                [
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": finish,
                        "logprobs": None,
                    }
                    for i in range(request.n)
                ]
            ).encode()
        usage = _usage(request.prompt_tokens, tokens * request.n)
        return b"".join(
            (
                b'{"id":"chatcmpl-%d","object":"chat.completion","created":%d,"model":'
                % (next(self._ids), int(time.time())),
                json.dumps(request.model).encode(),
                b',"choices":',
                choices,
                b',"usage":',
                usage,
                b"}",
            )
        )

    async def _stream(self, request: ChatRequest, transport: asyncio.Transport, keep_alive: bool) -> None:
        b = self.behaviour
        tokens, finish = self.length(request)
        head = b'{"id":"chatcmpl-%d","object":"chat.completion.chunk","created":%d,"model":%s,"choices":[' % (
            next(self._ids),
            int(time.time()),
            json.dumps(request.model).encode(),
        )
        transport.write(_STREAM_HEADERS_KEEP if keep_alive else _STREAM_HEADERS_CLOSE)
        await asyncio.sleep(b.ttft_s)
        first = b"".join(
            _event(head + b'{"index":%d,"delta":{"role":"assistant","content":""},"finish_reason":null}]}' % i)
            for i in range(request.n)
        )
        transport.write(first)
        step = max(1, b.chunk_tokens)
        pause = b.generation_s(step)
        for piece in self._delta_pieces(tokens, step):
            if pause:
                await asyncio.sleep(pause)
            content = json.dumps(piece).encode()
            transport.write(
                b"".join(
                    _event(head + b'{"index":%d,"delta":{"content":%s},"finish_reason":null}]}' % (i, content))
                    for i in range(request.n)
                )
            )
        tail = [
            _event(head + b'{"index":%d,"delta":{},"finish_reason":"%s"}]}' % (i, finish.encode()))
            for i in range(request.n)
        ]
        if request.include_usage:
            usage = _usage(request.prompt_tokens, tokens * request.n)
            tail.append(_event(head[: head.rindex(b'"choices":[')] + b'"choices":[],"usage":' + usage + b"}"))
        tail.append(_event(b"[DONE]"))
        tail.append(b"0\r\n\r\n")
        transport.write(b"".join(tail))

    def _delta_pieces(self, tokens: int, step: int) -> tuple[str, ...]:
        key = (tokens, step)
        pieces = self._deltas.get(key)
        if pieces is None:
            words = _completion_text(tokens).split(" ") if tokens else []
            pieces = self._deltas[key] = tuple(
                (" " if start else "") + " ".join(words[start : start + step]) for start in range(0, len(words), step)
            )
        return pieces

    # --- simulation -----------------------------------------------------------

    def samples_for(self, request: ChatRequest) -> list[SimulatedSample]:
        """The call's samples: numbered from its ``seed`` (+ choice index), else counted per prompt."""
        assert self.simulation is not None
        if request.seed is not None:
            first = request.seed
        else:
            counter = self._unseeded.setdefault(request.prompt, itertools.count())
            first = next(counter)
            for _ in range(request.n - 1):
                next(counter)
        return [self.simulation.sample(request.prompt, first + i, request.max_tokens) for i in range(request.n)]

    def _cut(self, request: ChatRequest, sample: SimulatedSample) -> tuple[int, str]:
        length = len(sample.tokens)
        if request.max_tokens is not None and request.max_tokens < length:
            return request.max_tokens, "length"
        return length, "length" if sample.runaway else "stop"

    def _simulated_completion(self, request: ChatRequest, samples: list[SimulatedSample]) -> bytes:
        choices, total = [], 0
        for i, sample in enumerate(samples):
            count, finish = self._cut(request, sample)
            total += count
            logprobs = None
            if request.top_logprobs is not None:
                entries = b",".join(_logprob_entries(sample, count, request.top_logprobs))
                logprobs = b'{"content":[%s]}' % entries
            choices.append(
                b'{"index":%d,"message":{"role":"assistant","content":%s},"finish_reason":"%s","logprobs":%s}'
                % (i, json.dumps("".join(sample.tokens[:count])).encode(), finish.encode(), logprobs or b"null")
            )
        self.tokens_sent += total
        return b'{"id":"chatcmpl-%d","object":"chat.completion","created":%d,"model":%s,"choices":[%s],"usage":%s}' % (
            next(self._ids),
            int(time.time()),
            json.dumps(request.model).encode(),
            b",".join(choices),
            _usage(request.prompt_tokens, total),
        )

    async def _simulate(self, request: ChatRequest, transport: asyncio.Transport, keep_alive: bool) -> None:
        """A simulated call: every sample at ``tokens_per_s`` for its own length."""
        b = self.behaviour
        samples = self.samples_for(request)
        if not request.stream:
            longest = max(self._cut(request, sample)[0] for sample in samples)
            await asyncio.sleep(b.ttft_s + b.generation_s(longest))
            transport.write(_http(200, self._simulated_completion(request, samples), keep_alive))
            return
        head = b'{"id":"chatcmpl-%d","object":"chat.completion.chunk","created":%d,"model":%s,"choices":[' % (
            next(self._ids),
            int(time.time()),
            json.dumps(request.model).encode(),
        )
        transport.write(_STREAM_HEADERS_KEEP if keep_alive else _STREAM_HEADERS_CLOSE)
        await asyncio.sleep(b.ttft_s)
        transport.write(
            b"".join(
                _event(head + b'{"index":%d,"delta":{"role":"assistant","content":""},"finish_reason":null}]}' % i)
                for i in range(request.n)
            )
        )
        counts = [self._cut(request, sample) for sample in samples]
        await asyncio.gather(
            *(
                self._stream_sample(request, transport, head, i, sample, *cut)
                for i, (sample, cut) in enumerate(zip(samples, counts, strict=True))
            )
        )
        tail = []
        if request.include_usage:
            usage = _usage(request.prompt_tokens, sum(count for count, _ in counts))
            tail.append(_event(head[: head.rindex(b'"choices":[')] + b'"choices":[],"usage":' + usage + b"}"))
        tail.append(_event(b"[DONE]"))
        tail.append(b"0\r\n\r\n")
        transport.write(b"".join(tail))

    async def _stream_sample(
        self,
        request: ChatRequest,
        transport: asyncio.Transport,
        head: bytes,
        index: int,
        sample: SimulatedSample,
        count: int,
        finish: str,
    ) -> None:
        """One choice's chunks, each sent when its last token is due (so wall time follows length)."""
        loop = asyncio.get_running_loop()
        step = max(1, self.behaviour.chunk_tokens)
        entries = _logprob_entries(sample, count, request.top_logprobs) if request.top_logprobs is not None else None
        started = loop.time()
        for start in range(0, count, step):
            end = min(count, start + step)
            delay = started + self.behaviour.generation_s(end) - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if transport.is_closing():
                return  # the client went away (a cancelled trajectory): generation stops
            content = json.dumps("".join(sample.tokens[start:end])).encode()
            logprobs = b"" if entries is None else b',"logprobs":{"content":[%s]}' % b",".join(entries[start:end])
            delta = b'{"index":%d,"delta":{"content":%s}%s,"finish_reason":null}]}' % (index, content, logprobs)
            transport.write(_event(head + delta))
            self.tokens_sent += end - start
        transport.write(_event(head + b'{"index":%d,"delta":{},"finish_reason":"%s"}]}' % (index, finish.encode())))

    def stats(self) -> bytes:
        counters = {
            "calls": self.calls, "samples": self.samples, "active": self.active, "peak_active": self.peak_active,
            "faults": dict(self.faults.injected) if self.faults else {},
        }  # fmt: skip
        if self.simulation is not None:
            counters["tokens_sent"] = self.tokens_sent
        return json.dumps(counters).encode()


def _simulated_request(request: ChatRequest, data: dict[str, object]) -> ChatRequest | Reply:
    """``request`` with what the simulation reads: the prompt, the seed, the logprobs asked for."""
    user = [m for m in data["messages"] if isinstance(m, dict) and m.get("role") == "user"]  # type: ignore[union-attr]
    content = user[-1].get("content") if user else ""
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    request.prompt = content if isinstance(content, str) else ""
    seed = data.get("seed")
    request.seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else None
    if data.get("logprobs") is True:
        top = data.get("top_logprobs") or 0
        if not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS:
            return _error(400, f"'top_logprobs' must be an integer from 0 to {MAX_TOP_LOGPROBS}")
        request.top_logprobs = top
    return request


def _usage(prompt_tokens: int, completion_tokens: int) -> bytes:
    return b'{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}' % (
        prompt_tokens,
        completion_tokens,
        prompt_tokens + completion_tokens,
    )


def _event(data: bytes) -> bytes:
    """One server-sent event framed as one HTTP chunk."""
    payload = b"data: " + data + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(payload), payload)


_STREAM_HEADERS_KEEP = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
_STREAM_HEADERS_CLOSE = _STREAM_HEADERS_KEEP[:-2] + b"connection: close\r\n\r\n"


def _http(status: int, body: bytes, keep_alive: bool) -> bytes:
    return b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s" % (
        status,
        _REASONS.get(status, b"Error"),
        len(body),
        b"" if keep_alive else b"connection: close\r\n",
        body,
    )


def _error(status: int, message: str) -> Reply:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}})
    return Reply(status, body.encode())


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; requests are answered in order."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.task is not None:
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.task is None:
            self._process()

    def _process(self) -> None:
        """Answer every complete request in the buffer, until one needs to wait."""
        while self.transport is not None and self.task is None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > _MAX_HEADER_BYTES:
                    self._finish(_error(400, "headers too large"), False)
                return
            head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
            method, _, rest = head[0].partition(" ")
            path, _, version = rest.partition(" ")
            length = 0
            keep_alive = version == "HTTP/1.1"
            authorization = ""
            for line in head[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value) if value.strip().isdigit() else -1
                elif name == "connection":
                    keep_alive = value.strip().lower() != "close"
                elif name == "authorization":
                    authorization = value.strip()
            if length < 0:
                self._finish(_error(400, "bad content-length"), False)
                return
            if len(self.buffer) < end + 4 + length:
                return
            body = bytes(self.buffer[end + 4 : end + 4 + length])
            del self.buffer[: end + 4 + length]
            self._dispatch(method, path, body, keep_alive, authorization)

    def _dispatch(self, method: str, path: str, body: bytes, keep_alive: bool, authorization: str = "") -> None:
        endpoint = self.endpoint
        path = path.partition("?")[0]
        if endpoint.api_key is not None and path != "/stats" and authorization != f"Bearer {endpoint.api_key}":
            presented = authorization.removeprefix("Bearer ") or "none"
            self._finish(_error(401, f"Incorrect API key provided: {presented}"), keep_alive)
        elif path in ("/v1/chat/completions", "/chat/completions"):
            if method != "POST":
                self._finish(_error(405, "use POST"), keep_alive)
                return
            request = endpoint.parse(body)
            if isinstance(request, Reply):
                self._finish(request, keep_alive)
            elif endpoint.faults is not None and (fault := endpoint.faults.draw()) is not None:
                self.task = asyncio.get_running_loop().create_task(self._fault(fault, request, keep_alive))
            elif endpoint.is_instant(request):
                self._finish(Reply(200, endpoint.serve_instantly(request)), keep_alive)
            else:
                self.task = asyncio.get_running_loop().create_task(self._respond(request, keep_alive))
        elif path in ("/v1/models", "/models") and method == "GET":
            self._finish(Reply(200, endpoint.model_list), keep_alive)
        elif path == "/stats" and method == "GET":
            self._finish(Reply(200, endpoint.stats()), keep_alive)
        else:
            self._finish(_error(404, f"no route {method} {path}"), keep_alive)

    async def _respond(self, request: ChatRequest, keep_alive: bool) -> None:
        assert self.transport is not None
        await self.endpoint.respond(request, self.transport, keep_alive)
        self.task = None
        self._after(keep_alive)

    async def _fault(self, kind: str, request: ChatRequest, keep_alive: bool) -> None:
        assert self.transport is not None and self.endpoint.faults is not None
        answer = self.endpoint.completion(request)
        in_order = await inject(kind, self.endpoint.faults, self.transport, answer, request.stream, keep_alive)
        self.task = None
        if in_order:
            self._after(keep_alive)
        else:
            self.transport = None  # the fault closed the connection

    def _finish(self, reply: Reply, keep_alive: bool) -> None:
        assert self.transport is not None
        self.transport.write(_http(reply.status, reply.body, keep_alive))
        self._after(keep_alive)

    def _after(self, keep_alive: bool) -> None:
        if self.transport is None:
            return
        if not keep_alive:
            self.transport.close()
            self.transport = None
        elif self.buffer:
            self._process()


async def serve(
    behaviour: Behaviour,
    endpoints: int = 1,
    host: str = "127.0.0.1",
    port: int = 0,
    faults: dict[str, float] | None = None,
    fault_seed: int = 0,
    retry_after_s: float = 1.0,
    api_key: str | None = None,
    simulation: Simulation | None = None,
) -> None:
    loop = asyncio.get_running_loop()
    servers = []
    for i in range(endpoints):
        plan = FaultPlan(faults, fault_seed, i, retry_after_s) if faults else None
        endpoint = Endpoint(behaviour, plan, api_key, simulation)
        server = await loop.create_server(
            lambda endpoint=endpoint: _Connection(endpoint),
            host,
            port + i if port else 0,
            backlog=4096,
            reuse_address=True,
        )
        servers.append(server)
        print(f"http://{host}:{server.sockets[0].getsockname()[1]}/v1", flush=True)
    print("ready", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


_SIMULATION_HELP = {
    "seed": "seed of every simulated draw",
    "midpoint": "difficulty d at which a sample is right half the time",
    "steepness": "how fast per-sample accuracy falls with difficulty: p(d) = 1/(1+exp(steepness*(d-midpoint)))",
    "wrong_answers": "distinct wrong answers per problem (weights 1, 1/2, 1/3, ...)",
    "follow_majority": "probability that a synthesis call answers with its references' majority (else afresh)",
    "median_tokens": "median length in tokens of a correct round-1 trajectory of the easiest problem",
    "length_sigma": "standard deviation of the log length (log-normal lengths)",
    "hard_length": "median length grows by this factor times the difficulty",
    "wrong_length": "length factor of a wrong trajectory",
    "synthesis_length": "length factor of a synthesis call",
    "sharpness": "mean token sharpness g of a confident trajectory (token confidence ~ 2g for top_logprobs 5)",
    "problem_spread": "standard deviation of g between problems",
    "sharpness_spread": "standard deviation of g between trajectories of a problem",
    "wrong_sharpness": "the g a drifting wrong trajectory falls to",
    "confident_wrong": "share of wrong trajectories that never drift",
    "wander": "amplitude of the slow (~50-token) wander of g",
    "token_noise": "standard deviation of g token to token",
    "runaway": "mean share of samples that loop until max_tokens (rate runaway * 2 * d: more on hard problems)",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="first port (default: any free port)")
    parser.add_argument("--endpoints", type=int, default=1, help="ports to listen on, each with its own cap")
    parser.add_argument("--ttft-ms", type=float, default=0.0, help="time to first token")
    parser.add_argument("--tokens-per-s", type=float, default=0.0, help="per stream; 0 = instant")
    parser.add_argument("--completion-tokens", type=int, default=32)
    parser.add_argument("--n-support", choices=("on", "ignore", "reject"), default="on")
    parser.add_argument("--stream-support", choices=("on", "ignore", "reject"), default="on")
    parser.add_argument("--concurrency", type=int, default=0, help="samples in progress per endpoint; 0 = no cap")
    parser.add_argument("--chunk-tokens", type=int, default=1, help="tokens per streamed chunk")
    parser.add_argument("--model", default="fast")
    parser.add_argument(
        "--faults", metavar="SPEC", default="",
        help=f"KIND:RATE,... or all:RATE; kinds: {', '.join(KINDS)} (see bench/faults.py)",
    )  # fmt: skip
    parser.add_argument("--fault-seed", type=int, default=0, help="seed of the fault draws")
    parser.add_argument("--fault-retry-after", type=float, default=1.0, help="Retry-After seconds of a 429 fault")
    parser.add_argument("--api-key", help="require this bearer key")
    simulated = parser.add_argument_group(
        "model simulation (SIMULATED answers, lengths and logprobs; see the module docstring)"
    )
    simulated.add_argument(
        "--simulate", action="store_true",
        help="answer as a simulated reasoning model instead of fixed filler text (--completion-tokens is then unused)",
    )  # fmt: skip
    for f in fields(Simulation):
        simulated.add_argument(
            f"--sim-{f.name.replace('_', '-')}", dest=f"sim_{f.name}", type=type(f.default), default=f.default,
            metavar=type(f.default).__name__.upper(), help=f"{_SIMULATION_HELP[f.name]} (default {f.default})",
        )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        faults = parse_spec(args.faults)
    except FaultSpecError as exc:
        parser.error(str(exc))
    behaviour = Behaviour(
        ttft_s=args.ttft_ms / 1000,
        tokens_per_s=args.tokens_per_s,
        completion_tokens=args.completion_tokens,
        n_support=args.n_support,
        stream_support=args.stream_support,
        concurrency=args.concurrency,
        chunk_tokens=args.chunk_tokens,
        model=args.model,
    )
    simulation = Simulation(**{f.name: getattr(args, f"sim_{f.name}") for f in fields(Simulation)})
    asyncio.run(
        serve(
            behaviour, args.endpoints, args.host, args.port, faults, args.fault_seed, args.fault_retry_after,
            args.api_key, simulation if args.simulate else None,
        )
    )  # fmt: skip


if __name__ == "__main__":
    main()
