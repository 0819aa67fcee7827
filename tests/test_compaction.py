"""The compaction C: only a trajectory's final conclusion reaches the next round, byte for byte."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pacore.engine import THINK_END, compact


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("The answer is 4.", "The answer is 4."),
        ("  padded \n", "  padded \n"),  # kept as is: the release passes it on unstripped
        ("<think>2+2... 4</think>The answer is 4.", "The answer is 4."),
        ("<think>2+2... 4</think>\n\nThe answer is 4.\n", "\n\nThe answer is 4.\n"),  # blank lines kept
        ("<think>a</think>draft</think>\n final", "\n final"),  # only after the LAST </think>
        ("reasoning without an opening tag</think>conclusion", "conclusion"),
        ("<think>unfinished reasoning", "<think>unfinished reasoning"),  # no </think>: kept whole
        ("a </THINK> b", "a </THINK> b"),  # the tag is matched exactly
    ],
)
def test_keeps_the_conclusion_exactly(text, message):
    assert compact(text) == message


@pytest.mark.parametrize(
    "text", [None, "", "   ", "\n\t", "<think>all reasoning</think>", "x</think>  \n", "a</think>\n\n"]
)
def test_empty_or_blank_conclusions_contribute_no_message(text):
    assert compact(text) is None


# Text built from fragments that are likely to form or nearly form the tag.
think_heavy_text = st.lists(
    st.sampled_from(["</think>", "<think>", "</", "think>", "</think", " ", "\n", "a", "b"]) | st.text(),
    max_size=12,
).map("".join)


@given(st.text() | think_heavy_text)
def test_is_the_text_after_the_last_tag_or_none(text):
    message = compact(text)
    after = text.rsplit(THINK_END, 1)[-1]
    if after.strip():
        assert message == after  # unstripped, byte for byte
    else:
        assert message is None
    assert message is None or THINK_END not in message


@given(st.text() | think_heavy_text)
def test_is_idempotent_on_its_own_output(text):
    message = compact(text)
    if message is not None:
        assert compact(message) == message


@given(st.text(), st.text() | think_heavy_text)
def test_whatever_precedes_the_last_tag_is_dropped(reasoning, conclusion):
    expected = compact(conclusion.rsplit(THINK_END, 1)[-1])
    assert compact(reasoning + THINK_END + conclusion) == expected
