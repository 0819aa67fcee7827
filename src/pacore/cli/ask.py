"""``pacore ask``: answer one question with parallel coordinated reasoning."""

from __future__ import annotations

import base64
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from pacore.adaptive import ComputePolicy
from pacore.cli.app import app
from pacore.cli.options import (
    ScheduleOption,
    SolveFlags,
    solve_setup,
    with_solve_options,
)
from pacore.errors import InputError, PacoreError
from pacore.files import MIB, read_input, read_stream

if TYPE_CHECKING:
    from pacore.backends import Message
    from pacore.engine import EventCallback
    from pacore.trace import Event, Result

EXAMPLES = """\
[bold]Examples[/bold]

  pacore ask "How many primes are below 100?"
  pacore ask --schedule high --backend http://127.0.0.1:8000/v1 --model qwen3-8b "Prove that ..."
  echo "What is 2+3?" | pacore ask - --json > trace.json
  pacore ask --show-rounds --schedule 4 --max-tokens 96 "What is the capital of France?"
  pacore ask --image chart.png "What does this chart show?" -b http://127.0.0.1:8000/v1

[bold]Exit codes[/bold]: 0 answered; 1 runtime failure (backend unreachable, all trajectories failed...);
2 bad usage (empty question, bad schedule, unreadable file...); 130 interrupted (Ctrl-C: the
finished rounds are kept, printed as a partial trace with --json).
"""

MAX_IMAGE_BYTES = 20 * MIB
MAX_QUESTION_BYTES = 8 * MIB

# Formats a vision model is likely to accept, recognised by their first bytes.
_IMAGE_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
)


def image_mime_type(data: bytes, path: Path) -> str:
    """The image's MIME type from its content; a file name can lie."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    for signature, mime in _IMAGE_SIGNATURES:
        if data.startswith(signature):
            return mime
    raise InputError(f"cannot use image {path}: not a PNG, JPEG, GIF, WebP or BMP file")


def image_part(path: Path) -> dict[str, object]:
    """An OpenAI ``image_url`` content part holding the file as a base64 data URL."""
    data = read_input(path, limit=MAX_IMAGE_BYTES, what="image")
    if not data:
        raise InputError(f"cannot use image {path}: the file is empty")
    encoded = base64.b64encode(data).decode("ascii")
    return {"type": "image_url", "image_url": {"url": f"data:{image_mime_type(data, path)};base64,{encoded}"}}


def read_question(question: str) -> str:
    """The question argument, or stdin's text when it is ``-``."""
    if question == "-":
        data = read_stream(getattr(sys.stdin, "buffer", None), limit=MAX_QUESTION_BYTES, what="stdin")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"the question read from stdin is not valid UTF-8 (byte {exc.start})") from None
        if not text.strip():
            raise InputError("the question read from stdin is empty")
        return text.strip()
    if not question.strip():
        raise InputError("the question is empty")
    return question


def build_messages(question: str, images: list[Path], system: str | None) -> list[Message]:
    content: str | list[dict[str, object]] = question
    if images:
        content = [{"type": "text", "text": question}, *(image_part(path) for path in images)]
    messages: list[Message] = [{"role": "user", "content": content}]
    if system and system.strip():
        messages.insert(0, {"role": "system", "content": system})
    return messages


def print_json(result: Result) -> None:
    sys.stdout.write(result.model_dump_json(indent=2) + "\n")
    sys.stdout.flush()


def combine(*handlers: EventCallback | None) -> EventCallback | None:
    """One ``on_event`` calling each handler in turn."""
    present = [handler for handler in handlers if handler is not None]
    if not present:
        return None

    def on_event(event: Event) -> None:
        for handler in present:
            handler(event)

    return on_event


@app.command("ask", epilog=EXAMPLES)
@with_solve_options
def ask(
    question: Annotated[
        str, typer.Argument(metavar="QUESTION", help="The question to answer, or - to read it from stdin.")
    ],
    image: Annotated[
        list[Path] | None,
        typer.Option(
            "--image",
            "-i",
            metavar="FILE",
            help="Attach an image (repeatable); sent as a data URL to vision models.",
            show_default=False,
        ),
    ] = None,
    system: Annotated[str | None, typer.Option("--system", help="A system prompt.")] = None,
    json_output: Annotated[
        bool,
        typer.Option("--json", help="Print the whole trace as JSON on stdout instead of the answer."),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display and no summary on stderr.")] = False,
    show_rounds: Annotated[
        bool,
        typer.Option(
            "--show-rounds",
            help="After each round, print on stderr what each trajectory did: tokens, stated answer, first words.",
        ),
    ] = False,
    stream: Annotated[
        bool,
        typer.Option(
            "--stream/--no-stream",
            help="Print the final answer as it is generated (the same bytes in the end); never with --json.",
        ),
    ] = True,
    schedule: ScheduleOption = "low",
    *,
    flags: SolveFlags,
    compute: ComputePolicy | None = None,
) -> None:
    """Answer a question with parallel coordinated reasoning.

    The answer goes to stdout; progress and a one-line summary go to stderr.
    """
    # Imported here, not at the top: `pacore --help` and every other command need none of them.
    import asyncio

    from pacore.cli.answer_stream import AnswerStream
    from pacore.cli.progress import open_progress, summary_line
    from pacore.engine import asolve

    if sys.stdout is None:  # started with stdout closed (`>&-`): refused before any work
        raise InputError("stdout is closed: there is nowhere to print the answer")
    messages = build_messages(read_question(question), image or [], system)
    if quiet and show_rounds:
        raise InputError("--show-rounds prints on stderr, which --quiet keeps silent: use one of them")
    streamed = stream and not json_output
    setup = solve_setup(flags, schedule=schedule, compute=compute, stream_answer=streamed)

    interrupted: list[Result] = []
    answer_stream: AnswerStream | None = None

    async def run(on_event: EventCallback | None) -> Result:
        try:
            return await asolve(messages, backend=setup.backend, on_event=on_event, **setup.options.as_kwargs())
        except asyncio.CancelledError as exc:  # Ctrl-C: asyncio.run cancels us, then raises KeyboardInterrupt
            partial = getattr(exc, "result", None)
            if partial is not None:
                interrupted.append(partial)
            raise
        finally:
            await setup.backend.aclose()

    try:
        with open_progress(quiet, max_tokens=setup.options.params.max_tokens, show_rounds=show_rounds) as progress:
            if streamed:
                # The status line is paused only when the answer is written to the same screen.
                answer_stream = AnswerStream(sys.stdout, progress if sys.stdout.isatty() else None)
            result = asyncio.run(
                run(combine(progress.handle if progress else None, answer_stream.handle if answer_stream else None))
            )
    except PacoreError as exc:
        if answer_stream is not None:
            answer_stream.end_line()
        # Keep whatever was computed before the failure; main prints the error.
        if json_output and exc.result is not None and exc.result.usage.calls:
            print_json(exc.result)
        raise
    except KeyboardInterrupt:
        if answer_stream is not None:
            answer_stream.end_line()
        # As for a failure: the partial trace (--json) or what the finished rounds cost; main says "interrupted".
        partial = interrupted[0] if interrupted else None
        if partial is not None and partial.usage.calls:
            if json_output:
                print_json(partial)
            if not quiet:
                typer.echo(summary_line(partial), err=True)
        raise
    if json_output:
        print_json(result)
    elif answer_stream is None or not answer_stream.finished:
        typer.echo(result.answer)
    elif answer_stream.diverged and not quiet:
        typer.echo("pacore: note: the streamed text included reasoning; the answer was printed again", err=True)
    if not quiet:
        typer.echo(summary_line(result), err=True)
