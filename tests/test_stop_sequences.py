"""The stop-sequence rule shared by every route and the offline API: where the text ends with
vLLM's `include_stop_str_in_output` (`keep_stop`) and which stop matched (`stop_reason`)."""

from __future__ import annotations

import pytest

from shardline.router.stop_sequences import StopSequenceMatcher


def feed_all(matcher: StopSequenceMatcher, pieces: list[str]) -> str:
    emitted = []
    for piece in pieces:
        check = matcher.feed(piece)
        emitted.append(check.text)
        if check.stopped:
            return "".join(emitted)
    return "".join(emitted) + matcher.flush()


@pytest.mark.parametrize(
    ("pieces", "stops", "cut", "kept", "matched"),
    [
        (["Hello", " wor", "ld", "! more"], ["world"], "Hello ", "Hello world", "world"),
        (["a", "b", "cd"], ["bc", "abx"], "a", "abc", "bc"),
        (["the end.", " next"], ["end", "end."], "the ", "the end.", "end."),
        (["x\n", "\ny"], ["\n\n"], "x", "x\n\n", "\n\n"),
        (["no stop"], ["zz"], "no stop", "no stop", None),
    ],
)
def test_the_text_ends_before_or_after_the_first_match(pieces, stops, cut, kept, matched):
    cutting, keeping = StopSequenceMatcher(stops), StopSequenceMatcher(stops, keep_stop=True)
    assert feed_all(cutting, pieces) == cut and cutting.matched == matched
    assert feed_all(keeping, pieces) == kept and keeping.matched == matched
