"""The upload-time check that decides whether a file is JSON Lines at all."""

from __future__ import annotations

import pytest

from afina.core.datasets.jsonl import JsonlSniffer
from afina.core.errors import InvalidRequest


def sniff(data: bytes, chunk: int = 7) -> JsonlSniffer:
    sniffer = JsonlSniffer("upload.jsonl")
    for i in range(0, len(data), chunk):
        sniffer.feed(data[i:i + chunk])
    sniffer.finish()
    return sniffer


def test_jsonl_split_across_chunks_is_accepted() -> None:
    sniffer = sniff(b'{"a": 1}\r\n\n{"b": "\xc3\xa9"}\n{"c": 3}')
    assert sniffer.objects == 3


def test_bom_is_tolerated() -> None:
    assert sniff(b'\xef\xbb\xbf{"a": 1}\n').objects == 1


@pytest.mark.parametrize("data", [b"", b"\n\n", b"hello world\n", b"[1,2,3]\n", b"\x89PNG\r\n\x1a\n\x00\x00",
                                  b"a,b,c\n1,2,3\n", b'"just a string"\n'])
def test_non_jsonl_is_rejected_with_the_reason(data: bytes) -> None:
    with pytest.raises(InvalidRequest) as caught:
        sniff(data)
    assert "not a JSONL file" in caught.value.message


def test_a_later_broken_line_is_left_to_row_validation() -> None:
    sniffer = sniff(b'{"a": 1}\n{"b": \n{"c": 3}\n')
    assert sniffer.objects == 2 and sniffer.first_error[0] == 2
