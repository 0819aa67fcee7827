"""The ``pacore`` command: ``ask``, its errors, its progress display.

Most tests run the installed entry point as a subprocess, exactly as a user
would; the usage errors of ``ask`` and ``run`` run the same command line
in-process, as what they check is what the command says. Backend failures
come from a small fault-injection HTTP server on loopback; answers come from
the real embedded model (``model``) and from llama-cpp-python's real
OpenAI-compatible server (``http``).
"""

from __future__ import annotations

import base64
import io
import json
import shlex
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from cli_harness import assert_one_line_error, closed_port_url, environment, pacore, pacore_in_process
from fakes import ScriptedBackend
from pacore import __version__, asolve
from pacore.cli.ask import image_part
from pacore.cli.progress import LineProgress, LiveProgress, ProgressState, round_line, summary_line
from pacore.errors import InputError
from pacore.trace import Round

# A 1x1 transparent PNG.
PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII=")


def stderr_lines(process: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in process.stderr.splitlines() if line.strip()]


# --- a fault-injection OpenAI-compatible server ------------------------------


class FaultServer(ThreadingHTTPServer):
    """Answers by the first path segment, the scenario: ``/<scenario>/v1/...``.

    - ``auth``: every request gets HTTP 401;
    - ``unknown-model``: lists ``real-model``; chat with any other model gets 404;
    - ``ok``: every chat call succeeds;
    - ``fail-synthesis``: first-round calls succeed, synthesis calls get HTTP 503.
    """

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), FaultHandler)
        self.requests: list[tuple[str, str, Any]] = []

    def url(self, scenario: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{scenario}/v1"


class FaultHandler(BaseHTTPRequestHandler):
    server: FaultServer

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        return None

    def do_GET(self) -> None:
        self._answer(None)

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        self._answer(json.loads(self.rfile.read(length) or b"null"))

    def _answer(self, body: Any) -> None:
        scenario, _, endpoint = self.path.strip("/").partition("/")
        self.server.requests.append((scenario, endpoint, body))
        if scenario == "auth":
            return self._error(401, "Incorrect API key provided.", "invalid_api_key")
        if endpoint == "v1/models":
            return self._send(200, {"object": "list", "data": [{"id": "real-model", "object": "model"}]})
        if scenario == "unknown-model" and body["model"] != "real-model":
            return self._error(404, f"The model `{body['model']}` does not exist.", "model_not_found")
        prompt = json.dumps(body["messages"])
        if scenario == "fail-synthesis" and "Reference Responses" in prompt:
            return self._error(503, "Server overloaded.", "overloaded")
        n = body.get("n", 1)
        choices = [
            {"index": i, "message": {"role": "assistant", "content": f"Five. ({i})"}, "finish_reason": "stop"}
            for i in range(n)
        ]
        usage = {"prompt_tokens": 20, "completion_tokens": 3 * n, "total_tokens": 20 + 3 * n}
        self._send(200, {"id": "chatcmpl-1", "object": "chat.completion", "created": 0,
                         "model": body["model"], "choices": choices, "usage": usage})  # fmt: skip

    def _error(self, status: int, message: str, code: str) -> None:
        self._send(status, {"error": {"message": message, "type": "invalid_request_error", "code": code}})

    def _send(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def fault_server() -> Iterator[FaultServer]:
    server = FaultServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


# --- the command line itself ---------------------------------------------------


def test_version() -> None:
    process = pacore("--version")
    assert process.returncode == 0
    assert process.stdout.strip() == f"pacore {__version__}"


def test_ask_help_lists_every_flag_and_examples() -> None:
    process = pacore("ask", "--help")
    assert process.returncode == 0, process.stderr
    for flag in ("--schedule", "--json", "--quiet", "--image", "--system", "--backend", "--model",
                 "--api-key", "--max-tokens", "--temperature", "--top-p", "--seed", "--template", "--reference-order",
                 "--timeout", "--retries", "Examples", "Exit codes"):  # fmt: skip
        assert flag in process.stdout, flag


@pytest.mark.parametrize("command", ["report", "export-train", "serve"])
def test_help_prints_each_paragraph_of_a_command_as_one_flowing_text(command: str) -> None:
    """A docstring's line breaks are not kept: on a wide terminal each paragraph is one line."""
    from pacore.cli import report, serve
    from pacore.cli.main import unwrapped

    callback = {"report": report.report_command, "export-train": report.export_train_command, "serve": serve.serve}
    wide = pacore(*command.split(), "--help", env=environment(COLUMNS="1000"))
    lines = [line.strip() for line in wide.stdout.splitlines()]
    paragraphs = unwrapped(callback[command].__doc__).split("\n\n")
    assert len(paragraphs) >= 2
    for paragraph in paragraphs:
        assert paragraph in lines, paragraph


def test_help_paragraphs_keep_list_items_and_examples_on_their_lines() -> None:
    from pacore.cli.main import unwrapped

    doc = "Title.\n\n    A sentence\n    --with a flag.\n\n    Steps:\n    - one\n    - two\n\n      pacore ask x\n      pacore ask y\n"
    assert (
        unwrapped(doc)
        == "Title.\n\nA sentence --with a flag.\n\nSteps:\n- one\n- two\n\n  pacore ask x\n  pacore ask y"
    )


def test_top_level_help_lists_ask() -> None:
    process = pacore("--help")
    assert process.returncode == 0
    assert "ask" in process.stdout


def test_ask_starts_without_the_evaluation_code() -> None:
    # Only the named command's module is imported: run and report's evaluation code costs every
    # `pacore ask` a tenth of a second.
    code = (
        "import sys\nfrom pacore.cli.main import main\ntry:\n    main(['ask', '--help'])\nfinally:\n"
        "    print(sorted(m for m in sys.modules if m.startswith(('pacore.eval', 'pacore.cli.'))), file=sys.stderr)"
    )
    process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment())
    assert process.returncode == 0, process.stderr
    assert "Usage: pacore ask" in process.stdout
    loaded = process.stderr.strip()
    assert "pacore.cli.ask" in loaded and "pacore.eval" not in loaded and "pacore.cli.run" not in loaded, loaded


# --- usage errors: exit 2, one line, before any model is loaded -----------------


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "notes.png").write_text("this is text, not an image")
    (tmp_path / "broken.j2").write_text("{% for reference in references %}{{ reference }}")
    (tmp_path / "typo.j2").write_text("{{ problm }}\n{% for r in references %}{{ r }}{% endfor %}")
    (tmp_path / "include.j2").write_text('{{ problem }}\n{% include "/etc/passwd" %}')
    (tmp_path / "range.j2").write_text("{% for i in range(10**9) %}{{ problem }}{% endfor %}")
    return tmp_path


USAGE_ERRORS = [
    (["ask", ""], "", "question is empty"),
    (["ask", "   "], "", "question is empty"),
    (["ask", "-"], "", "stdin is empty"),
    (["ask", "-"], "  \n\n", "stdin is empty"),
    (["ask"], "", "Missing argument"),
    (["ask", "q", "--schedule", "0"], "", "at least 1"),
    (["ask", "q", "--schedule", "-1"], "", "at least 1"),
    (["ask", "q", "--schedule", "a"], "", "invalid schedule 'a'"),
    (["ask", "q", "--schedule", "4,,2"], "", "empty entry"),
    (["ask", "q", "--image", "{tmp}/missing.png"], "", "image not found"),
    (["ask", "q", "--image", "{tmp}/notes.png"], "", "not a PNG, JPEG"),
    (["ask", "q", "--template", "{tmp}/missing.j2"], "", "cannot read template"),
    (["ask", "q", "--template", "{tmp}/broken.j2"], "", "broken.j2: line"),
    (["ask", "q", "--template", "{tmp}/typo.j2"], "", "'problm' is undefined"),
    (["ask", "q", "--template", "{tmp}/include.j2"], "", "'{% include %}' is not allowed"),
    (["ask", "q", "--template", "{tmp}/range.j2"], "", "limit of 100000"),
    (["ask", "q", "--template", "{tmp}"], "", "not a regular file"),
    (["ask", "q", "--template", "pacore-v2"], "", "cannot read template pacore-v2"),
    (["ask", "q", "--reference-order", "sorted"], "", "--reference-order must be one of shuffle, release"),
    (["run", "{tmp}/data.jsonl", "--out", "{tmp}/run", "--template", "{tmp}/include.j2"], "", "is not allowed"),
    (["run", "{tmp}/data.jsonl", "--out", "{tmp}/run", "--reference-order", "x"], "", "--reference-order"),
    (["serve", "--port", "0", "--template", "{tmp}/include.j2"], "", "'{% include %}' is not allowed"),
    (["serve", "--port", "0", "--template", "{tmp}/range.j2"], "", "limit of 100000"),
    (["serve", "--port", "0", "--reference-order", "x"], "", "--reference-order"),
    (["ask", "q", "--temperature", "-1"], "", "--temperature must be 0 or more"),
    (["ask", "q", "--temperature", "hot"], "", "--temperature"),
    (["ask", "q", "--max-tokens", "0"], "", "--max-tokens must be at least 1"),
    (["ask", "q", "--top-p", "1.5"], "", "--top-p"),
    (["ask", "q", "--timeout", "0"], "", "--timeout must be positive"),
    (["ask", "q", "--timeout", "nan"], "", "--timeout must be positive"),
    (["ask", "q", "--temperature", "nan"], "", "--temperature must be 0 or more and finite"),
    (["ask", "q", "--retries", "-1"], "", "--retries must be 0 or more"),
    (["ask", "q", "--backend", "ftp://example"], "", "unknown backend"),
    (["ask", "q", "--backend", "http://"], "", "invalid backend URL"),
    (["ask", "q", "--no-such-flag"], "", "No such option"),
]


def _case_id(args: list[str], stdin: str) -> str:
    return (shlex.join(args[1:]) or "(no question)") + (f" <<< {stdin!r}" if args[-1] == "-" else "")


@pytest.mark.parametrize(
    ("args", "stdin", "fragment"), USAGE_ERRORS, ids=[_case_id(args, stdin) for args, stdin, _ in USAGE_ERRORS]
)
def test_usage_errors_exit_2_with_one_line(files: Path, args: list[str], stdin: str, fragment: str) -> None:
    command = [arg.format(tmp=files) for arg in args]
    # serve in a subprocess, with a timeout: accepted by mistake, it would listen for ever in this process.
    if args[0] == "serve":
        process = pacore(*command, stdin=stdin, timeout=60)
    else:
        process = pacore_in_process(*command, stdin=stdin)
    assert_one_line_error(process, 2, fragment)
    assert process.stdout == ""


# --- runtime errors: exit 1, one line ------------------------------------------


def test_unreachable_backend_exits_1() -> None:
    url = closed_port_url()
    process = pacore("ask", "q", "--backend", url, "--retries", "0", timeout=60)
    assert_one_line_error(process, 1, "unreachable")
    assert url in process.stderr


def test_rejected_api_key_exits_1(fault_server: FaultServer) -> None:
    process = pacore("ask", "q", "--backend", fault_server.url("auth"), "--api-key", "wrong", timeout=60)
    assert_one_line_error(process, 1, "HTTP 401")
    assert "API key" in process.stderr
    assert "wrong" not in process.stderr  # the key itself is never echoed


def test_unknown_model_exits_1(fault_server: FaultServer) -> None:
    url = fault_server.url("unknown-model")
    process = pacore("ask", "q", "--backend", url, "--model", "no-such-model", timeout=60)
    assert_one_line_error(process, 1, "no-such-model")
    assert "404" in process.stderr
    # A fatal error stops the request at once: one chat call, not one per trajectory and retry.
    chats = [r for r in fault_server.requests if r[0] == "unknown-model" and r[1] == "v1/chat/completions"]
    assert len(chats) == 1


def test_failure_after_a_round_keeps_the_partial_trace(fault_server: FaultServer) -> None:
    url = fault_server.url("fail-synthesis")
    process = pacore("ask", "q", "--backend", url, "--schedule", "3", "--retries", "0", "--json", timeout=60)
    assert process.returncode == 1
    assert "Traceback" not in process.stderr
    lines = stderr_lines(process)
    assert lines[0].startswith("round 1/2: 3/3 trajectories")  # plain progress: stderr is a pipe
    assert lines[-1].startswith("pacore: error: final round: the call failed")
    assert "503" in lines[-1]
    trace = json.loads(process.stdout)
    assert trace["error"] == lines[-1].removeprefix("pacore: error: ")
    assert [len(r["trajectories"]) for r in trace["rounds"]] == [3, 1]
    assert all(t["message"].startswith("Five.") for t in trace["rounds"][0]["trajectories"])
    assert trace["rounds"][1]["trajectories"][0]["error_kind"] == "status"
    assert trace["usage"]["completion_tokens"] == 9


# --- requests as the backend receives them -------------------------------------


def test_images_and_system_prompt_reach_the_backend(fault_server: FaultServer, tmp_path: Path) -> None:
    image = tmp_path / "photo.dat"  # the MIME type comes from the bytes, not the name
    image.write_bytes(PNG)
    before = len(fault_server.requests)
    process = pacore(
        "ask", "What is in the picture?", "--backend", fault_server.url("ok"), "--schedule", "1",
        "--image", str(image), "--system", "Be brief.", "--quiet", timeout=60,
    )  # fmt: skip
    assert process.returncode == 0, process.stderr
    assert process.stdout.strip() == "Five. (0)"
    assert process.stderr == ""  # --quiet: no progress, no summary
    chats = [body for _, endpoint, body in fault_server.requests[before:] if endpoint == "v1/chat/completions"]
    assert len(chats) == 2  # one trajectory, then the final synthesis
    expected_url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    for body in chats:
        system, user = body["messages"]
        assert system == {"role": "system", "content": "Be brief."}
        text, picture = user["content"]
        assert picture == {"type": "image_url", "image_url": {"url": expected_url}}
        assert body["temperature"] == 1.0 and body["top_p"] == 1.0 and "max_tokens" not in body
    assert chats[0]["messages"][1]["content"][0]["text"] == "What is in the picture?"
    assert "Reference Responses" in chats[1]["messages"][1]["content"][0]["text"]


def test_generation_flags_reach_the_backend(fault_server: FaultServer) -> None:
    before = len(fault_server.requests)
    process = pacore(
        "ask", "q", "-b", fault_server.url("ok"), "-s", "off", "--max-tokens", "7",
        "--temperature", "0.3", "--top-p", "0.9", "--seed", "5", "-q", "--model", "m1", timeout=60,
    )  # fmt: skip
    assert process.returncode == 0, process.stderr
    (body,) = [b for _, endpoint, b in fault_server.requests[before:] if endpoint == "v1/chat/completions"]
    assert (body["model"], body["max_tokens"], body["temperature"], body["top_p"]) == ("m1", 7, 0.3, 0.9)
    assert isinstance(body["seed"], int)


def test_image_part_detects_the_mime_type(tmp_path: Path) -> None:
    jpeg = tmp_path / "x.png"  # misleading name: the content wins
    jpeg.write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 16)
    assert image_part(jpeg)["image_url"]["url"].startswith("data:image/jpeg;base64,/9j/")  # type: ignore[index]
    webp = tmp_path / "y"
    webp.write_bytes(b"RIFF\0\0\0\0WEBPVP8 " + b"\0" * 8)
    assert image_part(webp)["image_url"]["url"].startswith("data:image/webp;base64,")  # type: ignore[index]
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        image_part(empty)


# --- progress -------------------------------------------------------------------


async def test_line_progress_prints_one_line_per_round_and_counts_match() -> None:
    out = io.StringIO()
    progress = LineProgress(out)
    result = await asolve("q", schedule=[3, 2], backend=ScriptedBackend(), on_event=progress.handle)
    lines = out.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines] == ["round 1/3", "round 2/3", "round 3/3 (final)"]
    assert lines[0].startswith("round 1/3: 3/3 trajectories, ")
    state = progress.state
    assert state.usage.calls == result.usage.calls == 6
    assert state.usage.completion_tokens == result.usage.completion_tokens > 0
    assert state.usage.prompt_tokens == result.usage.prompt_tokens
    tokens = result.usage.completion_tokens
    assert summary_line(result).startswith(f"3 rounds, 6 calls, {tokens} effective TTC tokens, ")


async def test_progress_counts_failed_trajectories() -> None:
    from fakes import fail

    backend = ScriptedBackend(respond=lambda call, i: fail() if call.number == 1 else "fine")
    state = ProgressState()
    result = await asolve("q", schedule=[3], backend=backend, on_event=state.apply)
    assert (state.usage.calls, state.usage.failed_calls) == (4, 1)
    assert "4 calls (1 failed)" in summary_line(result)


async def test_summary_line_says_one_round_one_call_in_the_singular() -> None:
    result = await asolve("q", schedule="off", backend=ScriptedBackend())
    assert summary_line(result).startswith("1 round, 1 call, ")


def test_live_progress_renders_the_current_round() -> None:
    from pacore.trace import RoundStarted, Trajectory, TrajectoryFinished

    console = Console(file=io.StringIO(), force_terminal=True, width=120, color_system=None)
    progress = LiveProgress(console)
    progress.handle(RoundStarted(round=0, k=4, final=False, total_rounds=2))
    for i in range(2):
        trajectory = Trajectory(round=0, index=i, text="x", completion_tokens=250)
        progress.handle(TrajectoryFinished(round=0, trajectory=trajectory, done=i + 1, k=4))
    console.print(progress.render())
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "round 1/2" in text and "2/4 trajectories" in text and "500 tokens" in text


def test_live_progress_shows_tokens_as_they_stream() -> None:
    from pacore.trace import RoundStarted, Trajectory, TrajectoryFinished, TrajectoryProgress

    console = Console(file=io.StringIO(), force_terminal=True, width=160, color_system=None)
    progress = LiveProgress(console)
    progress.handle(RoundStarted(round=0, k=4, final=False, total_rounds=2))
    progress.handle(TrajectoryProgress(round=0, tokens={0: 100, 1: 40}))
    progress.handle(TrajectoryProgress(round=0, tokens={0: 1200, 2: 7}))
    state = progress.state
    assert state.streaming == {0: 1200, 1: 40, 2: 7} and state.tokens == 1247
    trajectory = Trajectory(round=0, index=0, text="x", completion_tokens=1300)
    progress.handle(TrajectoryFinished(round=0, trajectory=trajectory, done=1, k=4))
    # The finished trajectory's final count replaces its live one.
    assert state.streaming == {1: 40, 2: 7} and state.tokens == 1347
    console.print(progress.render())
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "1/4 trajectories" in text and "1,347 tokens" in text
    assert "2 streaming (longest 40 tokens)" in text and "tok/s" in text
    # A progress event of another round (late, or from elsewhere) is ignored.
    progress.handle(TrajectoryProgress(round=1, tokens={3: 999}))
    assert state.tokens == 1347


async def test_line_progress_reports_long_streaming_rounds(monkeypatch) -> None:
    from pacore.cli import progress as progress_module
    from pacore.trace import RoundStarted, TrajectoryProgress

    monkeypatch.setattr(progress_module, "STREAMING_LINE_INTERVAL_S", 0.0)
    out = io.StringIO()
    progress = LineProgress(out)
    progress.handle(RoundStarted(round=0, k=2, final=False, total_rounds=2))
    progress.handle(TrajectoryProgress(round=0, tokens={0: 10, 1: 30}))
    (line,) = out.getvalue().splitlines()
    assert line.startswith("round 1/2: 0/2 trajectories, 2 streaming (longest 30 tokens) · ")


# --- the real embedded model ----------------------------------------------------


@pytest.mark.model
def test_ask_with_the_embedded_model_end_to_end() -> None:
    """The one whole PaCoRe request on the real embedded model (the other front doors share its
    engine and are tested on fast backends): the question from stdin, the trace as JSON on stdout,
    progress and the summary on stderr."""
    process = pacore(
        "ask", "-", "--schedule", "2", "--max-tokens", "32", "--seed", "3", "--json", stdin="What is 2+3?\n"
    )
    assert process.returncode == 0, process.stderr
    trace = json.loads(process.stdout)
    assert [len(r["trajectories"]) for r in trace["rounds"]] == [2, 1]
    assert trace["schedule"] == [2] and trace["model"] == "gemma-3-270m-q4_k_m"
    assert trace["rounds"][-1]["final"] is True
    assert trace["answer"] == trace["rounds"][-1]["trajectories"][0]["message"]
    # The synthesis prompt carries the round-1 answers: longer than the question alone.
    first, synthesis = trace["rounds"][0]["trajectories"][0], trace["rounds"][1]["trajectories"][0]
    assert synthesis["prompt_tokens"] > first["prompt_tokens"] > 0
    usage = trace["usage"]
    assert usage["completion_tokens"] == sum(t["completion_tokens"] for r in trace["rounds"] for t in r["trajectories"])
    assert 0 < usage["completion_tokens"] <= 3 * 32
    assert usage["prompt_tokens"] > 0
    assert trace["error"] is None
    # A round longer than 30 s (a busy machine) adds "still streaming" lines, tested on their own above.
    lines = [line for line in stderr_lines(process) if " streaming (longest " not in line]
    assert lines[0].startswith("round 1/2: 2/2 trajectories, ")
    assert lines[1].startswith("round 2/2 (final): 1/1 trajectories, ")
    assert lines[2].startswith("2 rounds, 3 calls, ")
    assert "effective TTC tokens" in lines[2] and "prompt tokens" in lines[2]


# --- a real OpenAI-compatible server ---------------------------------------------


@pytest.mark.http
def test_ask_over_http_with_llama_cpp_server(llama_server_url: str) -> None:
    process = pacore(
        "ask", "What is 2+3?", "--backend", llama_server_url, "--schedule", "2", "--max-tokens", "16", "--json"
    )
    assert process.returncode == 0, process.stderr
    trace = json.loads(process.stdout)
    assert [len(r["trajectories"]) for r in trace["rounds"]] == [2, 1]
    assert all(t["error"] is None for r in trace["rounds"] for t in r["trajectories"])
    assert trace["usage"]["completion_tokens"] > 0
    assert llama_server_url in trace["backend"]


def test_a_bypassed_round_says_so_in_its_progress_line() -> None:
    assert "no references" in round_line(Round(index=1, k=1, final=True, bypassed=True), 2)
    assert "no references" not in round_line(Round(index=1, k=1, final=True), 2)
