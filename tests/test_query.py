"""The query language: parsing, canonical form, errors."""

from __future__ import annotations

import pytest

from libstore.errors import QueryError
from libstore.ops.query import format_query, parse_query
from libstore.types import ExpertQuery


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ExpertQuery()),
        ("all", ExpertQuery()),
        ("kind=task tag=v1", ExpertQuery(kinds=("task",), tags=("v1",))),
        ("kind=task,cluster kind=general", ExpertQuery(kinds=("task", "cluster", "general"))),
        ("arc_* base=phi3", ExpertQuery(names=("arc_*",), bases=("phi3",))),
        ("name=a task=t1 cluster=mbc:3", ExpertQuery(names=("a",), tasks=("t1",), clusters=("mbc:3",))),
        ("tag=v1 tag=v1", ExpertQuery(tags=("v1",))),
    ],
)
def test_parse(text: str, expected: ExpertQuery) -> None:
    assert parse_query(text) == expected


def test_round_trip() -> None:
    q = parse_query("kind=task,general tag=v1 arc_*")
    assert parse_query(format_query(q)) == q
    assert format_query(ExpertQuery()) == "all"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("colour=red", "unknown query field 'colour'"),
        ("kind=", "empty value"),
        ("kind=lora", "unknown kind 'lora'"),
    ],
)
def test_errors(text: str, message: str) -> None:
    with pytest.raises(QueryError, match=message):
        parse_query(text)
