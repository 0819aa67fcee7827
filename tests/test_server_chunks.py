"""The server's streamed chunks: the fast framing of answer deltas gives the bytes pydantic gives."""

from __future__ import annotations

import json

import pytest

from pacore.server.completions import ChunkWriter
from pacore.server.protocol import ChatCompletionChunk, DeltaMessage, StreamChoice
from pacore.trace import AnswerDelta

TEXTS = ["", "a", 'q"uo\\te', "\n\t\r\x00\x1f\x7f", "é漢字😀", "\u2028\u2029", "</script>", " 42 "]


def _pydantic_frame(writer: ChunkWriter, content: str, reasoning: str, created: int) -> str:
    choice = StreamChoice(delta=DeltaMessage(content=content or None, reasoning_content=reasoning or None))
    chunk = ChatCompletionChunk(id=writer.request_id, model=writer.model, created=created, choices=[choice])
    return f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"


@pytest.mark.parametrize("content", TEXTS)
@pytest.mark.parametrize("reasoning", ["", "think", '\x01é"\\'])
def test_answer_delta_chunk_is_the_pydantic_chunk(content: str, reasoning: str) -> None:
    writer = ChunkWriter(request_id='chatcmpl-"odd\\id', model="pacore-1/m\u00e9\x00", include_usage=False)
    (frame,) = writer.on_event(AnswerDelta(content=content, reasoning=reasoning))
    created = json.loads(frame.removeprefix("data: "))["created"]
    assert frame == _pydantic_frame(writer, content, reasoning, created)
