"""What a synthesis call sends, byte for byte (PACORE_METHOD.md, "Serialization P(x, M)").

Golden renderings through the engine (scripted backend) and through a real
HTTP server on loopback; the reference release's order reimplemented here,
independently of pacore, from its published procedure; the bypass of an
empty message set.
"""

from __future__ import annotations

import asyncio
import copy
import json
import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jinja2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pacore
from fakes import ScriptedBackend
from pacore.backends import open_backend
from pacore.backends.base import Completion
from pacore.errors import RoundFailedError
from pacore.prompts import SynthesisTemplate
from pacore.synthesis import SynthesisInput, build_synthesis_input
from pacore.trace import Result, Trajectory
from test_templates import TABLE_6, WORKED_EXAMPLE_JSON

GOLDEN = json.loads(WORKED_EXAMPLE_JSON)
PROBLEM = "What is 2+3?"
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
# Round-1 replies whose compacted messages are the worked example's M. Under the
# release order with seed 42 they come out as M = [A, B]: sorted by raw length
# (B is shorter), then Random(42) swaps the two.
REPLY_B = "It is **5**.\n"
REPLY_A = "<think>2 + 3 = 5, surely.</think>\n\nThe answer is 5."


def is_synthesis(messages) -> bool:
    return "Reference Responses" in json.dumps(messages)


def worked_example_backend() -> ScriptedBackend:
    return ScriptedBackend(
        respond=lambda call, i: "final" if is_synthesis(call.messages) else [REPLY_B, REPLY_A][call.number]
    )


async def synthesis_messages(conversation) -> tuple[list, Result]:
    backend = worked_example_backend()
    result = await pacore.asolve(conversation, schedule=[2], backend=backend, reference_order="release", seed=42)
    assert len(backend.calls) == 3
    return backend.calls[-1].messages, result


# --- golden renderings through the engine ---------------------------------------


async def test_the_worked_example_is_sent_byte_for_byte():
    messages, result = await synthesis_messages(PROBLEM)
    assert messages == [{"role": "user", "content": GOLDEN}]
    assert result.rounds[1].references == [(0, 1), (0, 0)]
    assert [t.message for t in result.rounds[0].trajectories] == [REPLY_B, "\n\nThe answer is 5."]


async def test_images_stay_in_the_synthesis_conversation():
    conversation = [{"role": "user", "content": [{"type": "text", "text": PROBLEM}, IMAGE]}]
    messages, _ = await synthesis_messages(conversation)
    assert messages == [{"role": "user", "content": [{"type": "text", "text": GOLDEN}, IMAGE]}]


async def test_multi_turn_keeps_system_and_history_and_replaces_only_the_last_user_message():
    conversation = [
        {"role": "system", "content": "Be brief.\n"},
        {"role": "user", "content": "What is 1+1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "name": "bob", "content": PROBLEM},
        {"role": "assistant", "content": "Answer: "},  # a prefill after the last user turn stays too
    ]
    before = copy.deepcopy(conversation)
    messages, _ = await synthesis_messages(conversation)
    expected = copy.deepcopy(before)
    expected[3]["content"] = GOLDEN
    assert messages == expected
    assert conversation == before


@pytest.mark.parametrize("newline", ["\n", "\n\n", " \n"])
async def test_trailing_newlines_of_the_problem_are_sent(newline):
    messages, _ = await synthesis_messages(PROBLEM + newline)
    assert messages[-1]["content"] == GOLDEN.replace(PROBLEM, PROBLEM + newline)


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        ("<think>r</think>\n\nAnswer: 7\n", "\n\nAnswer: 7\n"),
        ("<think>a</think>draft</think>\nAnswer: 7", "\nAnswer: 7"),  # after the LAST </think>
        ("no tag at all\n", "no tag at all\n"),
        ("lost opening tag</think>  Answer: 7", "  Answer: 7"),
    ],
)
async def test_think_variants_reach_the_prompt_exactly(reply, message):
    backend = ScriptedBackend(
        respond=lambda call, i: (
            "final" if is_synthesis(call.messages) else Completion(text=reply, reasoning="SECRET reasoning_content")
        )
    )
    await pacore.asolve("Q", schedule=[1], backend=backend)
    sent = backend.calls[-1].messages[-1]["content"]
    assert sent == jinja2.Template(TABLE_6).render(original_prompt="Q", ref_responses=[message])
    assert "SECRET" not in sent


async def test_the_answer_is_stripped_for_display_and_the_trace_keeps_the_bytes():
    backend = ScriptedBackend(respond=lambda call, i: "<think>x</think>\n\nThe answer is 5.\n")
    result = await pacore.asolve("Q", schedule=[1], backend=backend)
    assert result.answer == "The answer is 5."
    assert result.final is not None and result.final.message == "\n\nThe answer is 5.\n"


# --- the reference release's order, reimplemented from its published procedure ------


def release_prompt(problem: str, contents_in_completion_order: list[str], seed: int = 42) -> str:
    """stepfun-ai/PaCoRe's ``Exp._run_parallel_calls`` + ``process_single`` for one round.

    Responses are collected as they complete (a failed call is ``content=""``),
    sorted by ``len(content)``, shuffled with a fresh ``random.Random(seed)``; the
    next round keeps ``parse_answer(content)`` of those with content, in that order.
    """
    responses = [{"content": content} for content in contents_in_completion_order]
    responses.sort(key=lambda x: len(x["content"]))
    random.Random(seed).shuffle(responses)
    answers = [r["content"].split("</think>")[-1] for r in responses if r.get("content")]
    return jinja2.Template(TABLE_6).render(original_prompt=problem, ref_responses=answers)


# Replies by index. Equal raw lengths (0 and 2) test that the sort is stable in
# completion order; 5's raw length differs from its compacted one.
RELEASE_REPLIES: list[str | Completion] = [
    "same-length-A",
    "<think>long reasoning that makes this one the longest raw text</think>\n\nshort",
    "same-length-B",
    Completion(text="PARTIAL", error="stream broke", error_kind="protocol"),  # failed: counts as ""
    "",
    "mid <think>x</think> conclusion\n",
]
RELEASE_COMPLETION_ORDER = [4, 2, 5, 0, 3, 1]


@dataclass
class InOrderBackend(ScriptedBackend):
    """A scripted backend whose round-1 calls (one per trajectory) finish in ``completion_order``."""

    completion_order: list[int] = field(default_factory=list)
    finished: int = 0

    async def generate(self, messages, n, params):
        index = len(self.calls)
        completions = await super().generate(messages, n, params)
        if not is_synthesis(messages):
            while self.completion_order[self.finished] != index:
                await asyncio.sleep(0)
            self.finished += 1
        return completions


def content_of(reply: str | Completion) -> str:
    return reply if isinstance(reply, str) else (reply.text if reply.ok else "")


async def test_release_order_sends_what_the_release_sends():
    backend = InOrderBackend(
        respond=lambda call, i: "final" if is_synthesis(call.messages) else RELEASE_REPLIES[call.number],
        completion_order=RELEASE_COMPLETION_ORDER,
    )
    result = await pacore.asolve("Q\n", schedule=[6], backend=backend, reference_order="release", seed=42)
    first = result.rounds[0].trajectories
    completion_order = sorted(range(6), key=lambda i: first[i].finish_order)
    assert completion_order == RELEASE_COMPLETION_ORDER
    expected = release_prompt("Q\n", [content_of(RELEASE_REPLIES[i]) for i in completion_order])
    assert backend.calls[-1].messages[-1]["content"] == expected
    # And it is not simply the index order or today's shuffle.
    shuffled = await pacore.asolve("Q\n", schedule=[6], backend=ScriptedBackend(
        respond=lambda call, i: "final" if is_synthesis(call.messages) else RELEASE_REPLIES[call.number]
    ), seed=42)  # fmt: skip
    assert shuffled.rounds[1].references != result.rounds[1].references


def trajectories(contents: list[str], finish: list[int]) -> list[Trajectory]:
    return [
        Trajectory(round=0, index=i, text=text, message=pacore.compact(text), finish_order=finish[i])
        for i, text in enumerate(contents)
    ]


# Contents the release and the method agree on: empty, or not blank after compaction.
release_content = st.sampled_from(["", "a", "bb", "cc", "x</think>yy", "<think>t</think>\n\nz\n", "zz\n"]) | st.text(
    alphabet="ab <>/\n", max_size=8
).filter(lambda t: t == "" or bool(t.split("</think>")[-1].strip()))


@settings(max_examples=200)
@given(st.lists(release_content, min_size=1, max_size=8), st.randoms(use_true_random=False), st.integers(0, 100))
def test_release_order_matches_the_release_for_any_round(contents, rng, seed):
    finish = list(range(len(contents)))
    rng.shuffle(finish)
    built = build_synthesis_input(
        [{"role": "user", "content": "P"}], trajectories(contents, finish),
        template=SynthesisTemplate.default(), order="release", seed=seed,
    )  # fmt: skip
    in_completion_order = [contents[i] for i in sorted(range(len(contents)), key=lambda i: finish[i])]
    if not any(in_completion_order):
        assert built.bypassed
        return
    assert built.conversation[-1]["content"] == release_prompt("P", in_completion_order, seed)


def test_without_a_recorded_completion_order_index_order_is_used():
    contents = ["ccc", "a", "bb"]
    pooled = [t.model_copy(update={"finish_order": None}) for t in trajectories(contents, [2, 0, 1])]
    built = build_synthesis_input(
        [{"role": "user", "content": "P"}], pooled, template=SynthesisTemplate.default(), order="release", seed=42
    )
    assert built.conversation[-1]["content"] == release_prompt("P", contents)


def test_shuffle_order_is_the_seeded_shuffle_of_before():
    contents = [f"m{i}" for i in range(6)]
    usable = trajectories(contents, [5, 4, 3, 2, 1, 0])
    built = build_synthesis_input(
        [{"role": "user", "content": "P"}], usable, template=SynthesisTemplate.default(), seed=7, round_index=1
    )
    expected = list(range(6))
    random.Random("pacore:7:1").shuffle(expected)  # pacore's seeding since the first release
    assert built.references == [(0, i) for i in expected]


# --- an empty message set bypasses the template ----------------------------------


@pytest.mark.parametrize("order", ["shuffle", "release"])
async def test_an_empty_message_set_sends_the_original_conversation(order):
    conversation = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": [{"type": "text", "text": "Q"}, IMAGE]},
    ]
    replies = ["", "   \n", "<think>only thinking</think>\n"]
    backend = ScriptedBackend(respond=lambda call, i: replies[call.number] if call.number < 3 else "final")
    result = await pacore.asolve(conversation, schedule=[3], backend=backend, reference_order=order)
    assert backend.calls[-1].messages == conversation
    assert result.answer == "final" and result.error is None
    assert [r.bypassed for r in result.rounds] == [False, True]
    assert result.rounds[1].references == []
    assert json.loads(result.model_dump_json())["rounds"][1]["bypassed"] is True


async def test_every_call_failing_is_still_an_error():
    backend = ScriptedBackend(respond=lambda call, i: Completion(text="", error="boom", error_kind="status"))
    with pytest.raises(RoundFailedError, match="all 3 trajectories failed"):
        await pacore.asolve("Q", schedule=[3], backend=backend)


async def test_min_success_still_counts_calls_not_messages():
    # Two empty successes and one failure: min_success=0.5 is met, nothing to synthesize: bypass.
    replies = ["", Completion(text="", error="boom", error_kind="status"), " "]
    backend = ScriptedBackend(respond=lambda call, i: replies[call.number] if call.number < 3 else "final")
    result = await pacore.asolve("Q", schedule=[3], backend=backend, min_success=0.5)
    assert result.rounds[1].bypassed and backend.calls[-1].messages == [{"role": "user", "content": "Q"}]


def test_bypass_is_reported_by_build_synthesis_input():
    messages = [{"role": "user", "content": "P"}]
    built = build_synthesis_input(messages, trajectories(["", " "], [0, 1]), template=SynthesisTemplate.default())
    assert built == SynthesisInput(conversation=messages, references=[], bypassed=True)
    assert built.conversation is not messages


async def test_a_bad_reference_order_is_a_usage_error():
    with pytest.raises(pacore.UsageError, match="reference_order must be one of shuffle, release"):
        await pacore.asolve("Q", backend=ScriptedBackend(), reference_order="sorted")  # type: ignore[arg-type]


# --- the bytes a real HTTP server receives ------------------------------------------


class RecordingServer(ThreadingHTTPServer):
    """An OpenAI-compatible chat server on loopback that records every request body."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _RecordingHandler)
        self.bodies: list[bytes] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _RecordingHandler(BaseHTTPRequestHandler):
    server: RecordingServer

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.bodies.append(body)
        request = json.loads(body)
        replies = ["final"] if is_synthesis(request["messages"]) else [REPLY_B, REPLY_A]
        n = request.get("n", 1)
        # One call per sample, or one call for all: sample i of call j is reply j + i.
        first = sum(1 for b in self.server.bodies[:-1] if not is_synthesis(json.loads(b)["messages"]))
        choices = [
            {"index": i, "message": {"role": "assistant", "content": replies[min(first + i, len(replies) - 1)]},
             "finish_reason": "stop"}
            for i in range(n)
        ]  # fmt: skip
        reply = json.dumps({
            "id": "rec", "object": "chat.completion", "created": 0, "model": "recorder", "choices": choices,
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }).encode()  # fmt: skip
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def recording_server() -> Iterator[RecordingServer]:
    server = RecordingServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


async def test_the_http_backend_sends_the_golden_bytes():
    conversation = [{"role": "system", "content": "sys"}, {"role": "user", "content": PROBLEM}]
    with recording_server() as server:
        async with open_backend(server.url, model="recorder") as backend:
            result = await pacore.asolve(
                conversation, schedule=[2], backend=backend, reference_order="release", seed=42
            )
    assert result.answer == "final"
    synthesis = [body for body in server.bodies if b"Reference Responses" in body]
    assert len(synthesis) == 1
    encode = lambda value: json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()  # noqa: E731
    expected = b'{"messages":' + encode([{"role": "system", "content": "sys"}, {"role": "user", "content": GOLDEN}])
    assert synthesis[0].startswith(expected + b",")
    assert json.loads(synthesis[0])["messages"][-1]["content"] == GOLDEN
