"""What turns token bytes into the text a client sees: stop strings held back across tokens,
UTF-8 assembled whole, and the speed figure counted over decoding only."""
from __future__ import annotations

import pytest

from app.services.core.text_stream import StopMatcher, StreamAssembler
from app.services.core.types import Timings


def feed_all(matcher: StopMatcher, pieces):
    sent, hit = [], False
    for piece in pieces:
        text, hit = matcher.feed(piece)
        sent.append(text)
        if hit:
            break
    if not hit:
        sent.append(matcher.flush())
    return "".join(sent), hit


@pytest.mark.parametrize(
    "pieces, stops, expected, hit",
    [
        (["Hello", " wor", "ld"], ["world"], "Hello ", True),
        (["ab", "c<", "|e", "nd|>", "tail"], ["<|end|>"], "abc", True),
        (["a<", "|x"], ["<|end|>"], "a<|x", False),  # a held-back prefix that never completes is released
        (["1, 2, 3", ", 4"], ["4", "3"], "1, 2, ", True),  # the earliest stop wins
        (["no stops here"], [], "no stops here", False),
    ],
)
def test_stop_matcher(pieces, stops, expected, hit):
    assert feed_all(StopMatcher(stops), pieces) == (expected, hit)


def test_stop_matcher_holds_back_only_a_possible_prefix():
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("abcST") == ("abc", False)
    assert matcher.feed("x") == ("STx", False)


def test_assembler_joins_split_utf8_and_drops_a_cut_character():
    text = "北京"
    data = text.encode("utf-8")
    assembler = StreamAssembler(prompt_tokens=3, stops=())
    pieces = [data[0:1], data[1:4], data[4:5]]  # 北 split 1+2, 京 begun but cut off
    chunks = [assembler.add(i, p) for i, p in enumerate(pieces)]
    assert [c.text for c in chunks] == ["", "北", ""]
    last = assembler.finish("length")
    assert last.text == ""
    assert "\ufffd" not in "".join(c.text for c in chunks) + last.text
    assert last.usage.model_dump() == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}


def test_assembler_stop_string_across_tokens():
    assembler = StreamAssembler(prompt_tokens=1, stops=["</s>"])
    texts = [assembler.add(i, p.encode()).text for i, p in enumerate(["ok", "</", "s>"])]
    assert texts == ["ok", "", ""]
    assert assembler.stopped_by_string
    assert assembler.finish("stop").text == ""


def test_tokens_per_second_counts_decode_only():
    assert Timings.measured(ttft_ms=500, prompt_ms=500, decode_ms=1000, completion_tokens=11).tokens_per_second == 10.0
    assert Timings.measured(ttft_ms=5, prompt_ms=5, decode_ms=0, completion_tokens=1).tokens_per_second == 0.0
