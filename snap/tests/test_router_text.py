"""Incremental detokenization (UTF-8 hold-back, special tokens) and stop sequences."""

from __future__ import annotations

import pytest

from shardline.router.detokenizer import IncrementalDetokenizer
from shardline.router.stop_sequences import StopSequenceMatcher
from tests.test_router_fakes import byte_ids, tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("router-tokenizer"))


def _stream(detokenizer: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detokenizer.add(token_id) for token_id in ids]


def test_split_characters_are_held_back_until_complete(tokenizer):
    text = "café 東京 🙂!"
    pieces = _stream(IncrementalDetokenizer(tokenizer), byte_ids(tokenizer, text))
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)
    # the four bytes of 🙂 give three empty steps, then the whole character
    emoji_start = len(byte_ids(tokenizer, "café 東京 "))
    assert pieces[emoji_start : emoji_start + 4] == ["", "", "", "🙂"]


def test_matches_full_decode_after_a_prompt(tokenizer):
    prompt = tokenizer.encode("the model server", add_special_tokens=False)
    generated = tokenizer.encode(" naïve über 東京 cache ☃", add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, prompt)
    streamed = "".join(_stream(detokenizer, generated)) + detokenizer.flush()
    assert streamed == tokenizer.decode(generated)


def test_skip_special_tokens(tokenizer):
    ids = tokenizer.encode("the city", add_special_tokens=False) + [tokenizer.eos_token_id]
    skipped = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
    kept = IncrementalDetokenizer(tokenizer, skip_special_tokens=False)
    assert "".join(_stream(skipped, ids)) == "the city"
    assert "".join(_stream(kept, ids)) == "the city<|im_end|>"


def test_flush_reveals_an_unfinished_character(tokenizer):
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert _stream(detokenizer, byte_ids(tokenizer, "🙂")[:2]) == ["", ""]
    assert detokenizer.flush() == "\ufffd"


def _feed_all(matcher: StopSequenceMatcher, pieces: list[str]) -> tuple[str, bool]:
    emitted = []
    for piece in pieces:
        check = matcher.feed(piece)
        emitted.append(check.text)
        if check.stopped:
            return "".join(emitted), True
    return "".join(emitted) + matcher.flush(), False


@pytest.mark.parametrize(
    ("pieces", "stops", "expected"),
    [
        (["Hello", " wor", "ld", "!"], ["world"], ("Hello ", True)),
        (["a", "b", "c"], ["bc", "abx"], ("a", True)),
        (["ab", "x"], ["bc", "abx"], ("", True)),
        (["The end", "ing"], ["end."], ("The ending", False)),
        (["no stop here"], [], ("no stop here", False)),
        (["x", "\n\n", "y"], ["\n\n"], ("x", True)),
    ],
)
def test_stop_sequences_across_pieces(pieces, stops, expected):
    assert _feed_all(StopSequenceMatcher(stops), pieces) == expected


def test_text_that_may_start_a_stop_is_held_back():
    matcher = StopSequenceMatcher(["STOP"])
    assert matcher.feed("go ST").text == "go "
    assert matcher.feed("x").text == "STx"
