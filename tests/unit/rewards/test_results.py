"""The result channel parsed on the scorer's side: only tagged JSON data, whatever the bytes."""

from __future__ import annotations

import json

import pytest

from rewards.results import ListValue, Opaque, TreeValue, decode, parse_channel


def test_decode_tags_to_plain_python():
    assert decode([1, 2.5, "a", None, True]) == [1, 2.5, "a", None, True]
    assert decode({"t": [1, {"t": []}]}) == (1, ())
    assert decode({"d": [[1, "x"], [{"t": [1, 2]}, [3]]]}) == {1: "x", (1, 2): [3]}
    assert decode({"s": [3, 1]}) == {1, 3}
    assert decode({"b": "\u00ff"}) == b"\xff"
    assert decode({"c": [1, -2]}) == 1 - 2j
    assert decode({"L": [1, 2]}) == ListValue((1, 2))
    assert decode({"T": [1, None, 2]}) == TreeValue((1, None, 2))


@pytest.mark.parametrize("bad", [
    {"x": [1]},  # unknown tag
    {"t": [1], "d": []},  # two keys
    {"t": 5},  # tag without a list
    {"d": [[1, 2, 3]]},  # not a pair
    {"s": [[1]]},  # unhashable element
    {"d": [[[1], 2]]},  # unhashable key
    {"c": ["a", 1]},
])
def test_decode_rejects(bad):
    with pytest.raises(ValueError):
        decode(bad)


def test_decode_caps_nesting():
    deep: object = 1
    for _ in range(500):
        deep = [deep]
    with pytest.raises(ValueError, match="nested"):
        decode(deep)


def test_parse_channel_values_errors_and_done():
    lines = [{"i": 0, "v": 3}, {"i": 1, "u": "Gen", "t": True}, {"i": 2, "e": "timeout"},
             {"done": False, "e": "timeout"}]
    rep = parse_channel(b"".join(json.dumps(x).encode() + b"\n" for x in lines))
    assert rep.values == {0: 3, 1: Opaque("Gen", True)} and rep.errors == {2: "timeout"}
    assert not rep.done and rep.error == "timeout" and not rep.malformed
    assert parse_channel(b'{"done": true}\n').done


def test_parse_channel_skips_garbage_and_flags_duplicates():
    data = b'garbage\n{"i": -1, "v": 1}\n{"i": true, "v": 1}\n{"i": 0, "v": {"pickle": "x"}}\n[1]\n\xff\xfe\n'
    rep = parse_channel(data)
    assert rep.values == {} and rep.skipped == 6 and not rep.done
    rep = parse_channel(b'{"i": 0, "v": 1}\n{"i": 0, "v": 2}\n{"done": true}\n')
    assert rep.malformed == "case 0 reported twice"
    assert parse_channel(b'{"done": "yes"}\n').done is False  # only a literal true counts
