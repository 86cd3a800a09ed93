"""benchmarks/occupancy.py's arithmetic and drawing, from a few logged calls."""

import xml.dom.minidom

import pytest

from benchmarks.occupancy import call_columns, starts, summary, svg
from benchmarks.offline_floor import Call

CALLS = [
    Call("prefill", 0, 300, 0, 0, seconds=0.2),
    Call("decode", 3, 0, 300, 0, seconds=0.1, gap_before_s=0.05),
    Call("mixed", 3, 100, 303, 0, seconds=0.3, gap_before_s=0.0),
    Call("decode", 200, 0, 900, 0, seconds=0.4, gap_before_s=0.1),
]


def test_calls_start_after_the_previous_call_and_its_gap():
    columns = call_columns(CALLS)
    assert columns["decode_rows"] == [0, 3, 3, 200]
    assert starts(columns) == pytest.approx([0.0, 0.25, 0.35, 0.75])


def test_summary_weighs_calls_by_time_or_count():
    columns = call_columns(CALLS)
    timed = summary(columns, timed=True)
    assert timed["mean_decode_rows"] == round((0.3 + 0.9 + 80) / 1.0, 1)
    assert timed["share_under_32_rows"] == 0.6  # 0.2 + 0.1 + 0.3 of 1.0 s
    counted = summary(columns, timed=False)
    assert counted["mean_decode_rows"] == 51.5 and counted["share_under_32_rows"] == 0.75
    assert counted["prompt_calls"] == 2 and counted["prompt_tokens"] == 400


def test_svg_draws_both_panels():
    columns = call_columns(CALLS)
    drawing = xml.dom.minidom.parseString(svg(columns, starts(columns), "wall seconds", "t"))
    lines = drawing.getElementsByTagName("polyline")
    assert len(lines) == 2
    assert all(len(line.getAttribute("points").split()) == len(CALLS) for line in lines)
