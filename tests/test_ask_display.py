"""What ``pacore ask`` shows while it works: the round ETA, the streamed answer, ``--show-rounds``.

Answers come from ``bench/fastbackend.py`` (a real OpenAI-compatible server on
loopback that streams at a set rate) and from the scripted backend; terminal
behaviour is checked on real pseudo-terminals.
"""

from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import sys
import time

import pytest

from fakes import ScriptedBackend
from harness import fast_backend
from pacore import asolve
from pacore.cli.answer_stream import AnswerStream
from pacore.cli.progress import LineProgress, ProgressState
from pacore.trace import AnswerDelta, RoundStarted, Trajectory, TrajectoryFinished, TrajectoryProgress

ENV = {k: v for k, v in os.environ.items() if k not in ("PACORE_API_KEY", "OPENAI_API_KEY", "PACORE_DEBUG")}


def run_pacore(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "pacore", *args], capture_output=True, timeout=120, env=ENV, stdin=subprocess.DEVNULL
    )


# --- ETA ---------------------------------------------------------------------------


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """A stopped ``perf_counter`` that the test moves by hand (``clock[0] += 10``).

    The ETA divides by the time gone by: on the real clock, a loaded machine's 15 ms between
    setting the round's start and reading the ETA changed "13.5s" into "13.6s".
    """
    now = [1000.0]
    monkeypatch.setattr("pacore.progress.time.perf_counter", lambda: now[0])
    return now


def test_eta_uses_the_finished_trajectories_length_and_the_round_rate(clock: list[float]) -> None:
    state = ProgressState(max_tokens=500)
    state.apply(RoundStarted(round=0, k=4, final=False, total_rounds=2))
    assert state.eta_s() is None  # no rate yet
    state.apply(TrajectoryFinished(round=0, trajectory=Trajectory(round=0, index=0, text="x", completion_tokens=100),
                                   done=1, k=4))  # fmt: skip
    state.apply(TrajectoryProgress(round=0, tokens={1: 50, 2: 20}))
    clock[0] += 10  # 170 tokens in 10 s
    # Expected 100 tokens each: 50 + 80 still to come from the streaming two, 100 from the one not started.
    assert state.eta_s() == pytest.approx(230 / 17)
    assert state.streaming_label().endswith("· ETA ~13.5s")


def test_eta_of_a_new_round_uses_the_earlier_rounds_then_max_tokens(clock: list[float]) -> None:
    state = ProgressState(max_tokens=64)
    state.apply(RoundStarted(round=0, k=1, final=False, total_rounds=2))
    state.apply(TrajectoryProgress(round=0, tokens={0: 16}))
    clock[0] += 1
    assert state.eta_s() == pytest.approx(48 / 16)  # nothing finished: max_tokens
    state.apply(TrajectoryFinished(round=0, trajectory=Trajectory(round=0, index=0, text="x", completion_tokens=40),
                                   done=1, k=1))  # fmt: skip
    state.apply(RoundStarted(round=1, k=1, final=True, total_rounds=2))
    state.apply(AnswerDelta(content="a"))
    state.apply(AnswerDelta(content="b"))
    clock[0] += 1
    assert state.eta_s() == pytest.approx(38 / 2)  # the request's mean so far: 40 tokens
    assert ProgressState().eta_label() == ""  # nothing known: no ETA shown


# --- the streamed answer -------------------------------------------------------------


def stream_text(pieces: list[str], message: str | None) -> AnswerStream:
    out = io.StringIO()
    stream = AnswerStream(out, None)
    stream.handle(RoundStarted(round=0, k=1, final=True, total_rounds=1))
    for piece in pieces:
        stream.handle(AnswerDelta(content=piece))
    trajectory = Trajectory(round=0, index=0, text="".join(pieces), message=message, completion_tokens=len(pieces))
    stream.handle(TrajectoryFinished(round=0, trajectory=trajectory, done=1, k=1))
    return stream


@pytest.mark.parametrize(
    "pieces",
    [
        ["\n\n", "  Paris", " is", " the", " capital", ".", "\n", "\n"],
        ["The answer", "  \n", "is 5", "  "],
        ["<thi", "nk>\nlet me", " see</th", "ink>\n\n", "Paris", "."],
        ["x </th", "inking> y"],  # looks like the tag's start, is not
    ],
)
def test_the_streamed_answer_writes_exactly_the_answer_and_a_newline(pieces: list[str]) -> None:
    from pacore.messages import compact

    text = "".join(pieces)
    stream = stream_text(pieces, compact(text))
    answer = (compact(text) or "").strip()
    assert stream.out.getvalue() == answer + "\n"  # type: ignore[attr-defined]
    assert not stream.diverged


def test_reasoning_without_an_opening_tag_is_printed_again_as_the_answer() -> None:
    pieces = ["I think", " it is", " Paris", "</think>", " Paris."]
    stream = stream_text(pieces, " Paris.")
    assert stream.diverged
    assert stream.out.getvalue() == "I think it is Paris\nParis.\n"  # type: ignore[attr-defined]


def test_the_answer_is_written_as_it_arrives() -> None:
    out = io.StringIO()
    stream = AnswerStream(out, None)
    stream.handle(RoundStarted(round=0, k=1, final=True, total_rounds=1))
    stream.handle(AnswerDelta(content="Paris "))
    assert out.getvalue() == "Paris"  # the space waits: it may end the answer
    stream.handle(AnswerDelta(content="is"))
    assert out.getvalue() == "Paris is"


@pytest.mark.http
def test_a_piped_streamed_answer_is_byte_identical_to_the_plain_one() -> None:
    with fast_backend("--tokens-per-s", 200, "--completion-tokens", 12) as backend:
        streamed = run_pacore("ask", "-b", backend.url, "--schedule", "2", "hi")
        plain = run_pacore("ask", "-b", backend.url, "--schedule", "2", "--no-stream", "hi")
        as_json = run_pacore("ask", "-b", backend.url, "--schedule", "2", "--json", "--show-rounds", "hi")
    assert streamed.returncode == plain.returncode == as_json.returncode == 0, streamed.stderr
    assert streamed.stdout == plain.stdout
    assert streamed.stdout == b"the answer is so we check each case and get the answer\n"
    assert as_json.stdout.startswith(b"{")  # --json never streams: one JSON document
    import json

    assert json.loads(as_json.stdout)["answer"] + "\n" == streamed.stdout.decode()
    # --show-rounds writes on stderr only: stdout stays the one JSON document.
    assert b"  #2 \xc2\xb7 12 tokens" in as_json.stderr and b"#2" not in as_json.stdout


def read_until_exit(
    process: subprocess.Popen[bytes], fds: list[int], timeout: float
) -> dict[int, list[tuple[float, bytes]]]:
    """Everything written to the pseudo-terminals ``fds``, with the time each piece arrived."""
    received: dict[int, list[tuple[float, bytes]]] = {fd: [] for fd in fds}
    deadline = time.monotonic() + timeout
    open_fds = list(fds)
    while open_fds and time.monotonic() < deadline:
        ready, _, _ = select.select(open_fds, [], [], 0.2)
        for fd in ready:
            try:
                data = os.read(fd, 4096)
            except OSError:  # the slave side closed
                data = b""
            if data:
                received[fd].append((time.monotonic(), data))
            else:
                open_fds.remove(fd)
        if not ready and process.poll() is not None:
            break
    return received


@pytest.mark.http
def test_on_a_terminal_the_answer_streams_while_it_is_generated() -> None:
    # 40 final tokens at 20 tokens/s: two seconds of streaming.
    with fast_backend("--tokens-per-s", 20, "--completion-tokens", 40) as backend:
        out_master, out_slave = pty.openpty()
        err_master, err_slave = pty.openpty()
        process = subprocess.Popen(
            [sys.executable, "-m", "pacore", "ask", "-b", backend.url, "--schedule", "1", "--show-rounds", "hi"],
            stdin=subprocess.DEVNULL, stdout=out_slave, stderr=err_slave, env={**ENV, "COLUMNS": "200"},
        )  # fmt: skip
        os.close(out_slave)
        os.close(err_slave)
        try:
            received = read_until_exit(process, [out_master, err_master], timeout=120)
            assert process.wait(timeout=30) == 0
        finally:
            process.kill()
            os.close(out_master)
            os.close(err_master)
    answer_pieces = received[out_master]
    answer = b"".join(data for _, data in answer_pieces).replace(b"\r\n", b"\n")
    assert answer.startswith(b"the answer is so we check") and answer.endswith(b"\n")
    assert len(answer.split()) == 40 and answer.count(b"\n") == 1
    # Streamed: the first words came well before the last ones.
    assert len(answer_pieces) > 3 and answer_pieces[-1][0] - answer_pieces[0][0] > 1.0
    status = b"".join(data for _, data in received[err_master]).decode()
    assert "round 1/2: 1/1 trajectories" in status and "#1 · 40 tokens" in status
    assert "ETA ~" in status  # the live line estimated the round's end
    assert "2 rounds, 2 calls" in status


# --- --show-rounds ------------------------------------------------------------------


async def test_show_rounds_prints_each_trajectory_and_the_synthesis() -> None:
    answers = {0: "We add: 2 + 3 = 5. The answer is 5.", 1: "It is 6", 2: "", 3: "5"}
    backend = ScriptedBackend(
        respond=lambda call, i: answers[call.number] if call.number < 4 else "Both say 5, so \\boxed{5}"
    )
    out = io.StringIO()
    progress = LineProgress(out, show_rounds=True)
    await asolve("What is 2 + 3?", schedule=[4], backend=backend, on_event=progress.handle, seed=1)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("round 1/2: 4/4 trajectories, ")
    first = lines[1:5]
    assert first[0].startswith("  #1 · ") and 'answer: 5 · "We add: 2 + 3 = 5. The answer is 5."' in first[0]
    assert "answer: 6" in first[1] and "no message" in first[2] and "answer: 5" in first[3]
    assert lines[5].startswith("round 2/2 (final): 1/1 trajectories, ")
    assert lines[6] == "  the synthesis call read the 3 answers of round 1"
    assert lines[7].startswith("  #1 · ") and 'answer: 5 · "Both say 5, so \\boxed{5}"' in lines[7]


def test_opening_cuts_long_texts_on_one_line() -> None:
    from pacore.cli.progress import opening

    assert opening("a\n\nb   c") == "a b c"
    cut = opening("word " * 40, chars=20)
    assert len(cut) == 20 and cut.endswith("…")


def test_show_rounds_and_quiet_are_refused_together() -> None:
    process = run_pacore("ask", "--show-rounds", "--quiet", "hi")
    assert process.returncode == 2
    assert process.stderr.decode().strip().startswith("pacore: error: --show-rounds")
