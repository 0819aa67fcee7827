"""A scripted OpenAI-compatible judge on loopback, for tests of the process verifier.

It answers every chat completion with ``judge(prompt)`` (the text of the last
user message) and records the prompts it was sent, so a test can count the
calls that reached it over real HTTP.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI, Request

from server_harness import serving

Judge = Callable[[str], str]


def verdict_by_keyword(prompt: str) -> str:
    """INVALID for a solution that guesses, no verdict for a garbled one, else VALID."""
    solution = prompt.split("Solution to check:", 1)[-1].split("Is the derivation valid?", 1)[0]
    if "garble" in solution:
        return "I cannot tell."
    if "guess" in solution:
        return "The solution guesses without deriving anything.\nVERDICT: INVALID"
    return "Each step follows from the previous one.\n**VERDICT: VALID**"


@dataclass
class JudgeServer:
    url: str  # http://127.0.0.1:PORT/v1
    prompts: list[str] = field(default_factory=list)


@contextlib.contextmanager
def judge_server(judge: Judge = verdict_by_keyword) -> Iterator[JudgeServer]:
    app = FastAPI()
    running = JudgeServer(url="")

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "judge", "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict:
        body = await request.json()
        prompt = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
        running.prompts.append(prompt)
        text = judge(prompt)
        return {
            "id": f"judge-{len(running.prompts)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or "judge",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": len(text.split()), "total_tokens": 0},
        }

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    with serving(server) as base_url:
        running.url = f"{base_url}/v1"
        yield running
