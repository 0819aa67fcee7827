"""Chat-message helpers shared by the engine, the server and the training export.

Pure functions on OpenAI-style messages: the compaction C, finding the last
user turn (the "problem"), and replacing it with a synthesis prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pacore.backends.base import Message

THINK_END = "</think>"


def text_of(content: str | list[dict[str, Any]] | None) -> str:
    """The text of a message's content, whether a string or a list of parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text")


def compact(text: str | None) -> str | None:
    """The compaction C: keep only a trajectory's final conclusion.

    ``reasoning_content`` never reaches here (it is kept apart in the trace);
    inline reasoning is cut at the last ``</think>``. What follows is kept
    exactly as it is, leading blank lines included: the released model saw
    those bytes in training. A conclusion that is empty or only whitespace
    gives ``None``: that trajectory contributes no message. Display and
    answer extraction may strip; the message passed on must not be.
    """
    if not text:
        return None
    cut = text.rfind(THINK_END)
    if cut >= 0:
        text = text[cut + len(THINK_END) :]
    return text if text.strip() else None


def last_user_index(messages: Sequence[Message]) -> int | None:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "user":
            return i
    return None


def last_user_text(messages: Sequence[Message]) -> str:
    """The text of the last user message (the problem, unstripped); empty if there is none."""
    index = last_user_index(messages)
    return text_of(messages[index].get("content")) if index is not None else ""


def non_text_parts(content: Any) -> list[dict[str, Any]]:
    """The parts of a message's content that are not text (images)."""
    if not isinstance(content, list):
        return []
    return [part for part in content if not (isinstance(part, dict) and part.get("type") == "text")]


def synthesis_conversation(messages: Sequence[Message], prompt_text: str) -> list[Message]:
    """Copy of the conversation with only its last user message replaced.

    Non-text parts (images) of that message are kept after the new text, so a
    vision-language model still sees them while it synthesizes.
    """
    index = last_user_index(messages)
    if index is None:
        raise ValueError("the conversation has no user message to replace")
    original = messages[index]
    extra_parts = non_text_parts(original.get("content"))
    content: str | list[dict[str, Any]] = (
        [{"type": "text", "text": prompt_text}, *extra_parts] if extra_parts else prompt_text
    )
    conversation = list(messages)
    conversation[index] = {**original, "content": content}
    return conversation
