"""The one expert resolver: every operation that takes "some experts" names them the same way and
fails the same way (NotFoundError with ``what`` and ``name``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from libstore import Library
from libstore.errors import InvalidNameError, NotFoundError
from libstore.ops.select import resolve_experts
from libstore.types import ExpertQuery
from tests.factories import make_adapter

sqlite_only = pytest.mark.parametrize("db_url", [None], ids=["sqlite"])


@pytest.fixture
def abc(library: Library, base_dir: Path, tmp_path: Path) -> Library:
    for i, n in enumerate(("c", "a", "b")):
        library.add(
            make_adapter(base_dir, tmp_path / n, seed=i), name=n, kind="general" if n == "c" else "task"
        )
    return library


def test_queries_lists_and_experts(abc: Library) -> None:
    ctx = abc.context
    assert [e.name for e in resolve_experts(ctx, None)] == ["a", "b", "c"]  # catalog name order
    assert [e.name for e in resolve_experts(ctx, "kind=task")] == ["a", "b"]
    assert [e.name for e in resolve_experts(ctx, ExpertQuery(kinds=("general",)))] == ["c"]
    assert [e.name for e in resolve_experts(ctx, ["c", "a"])] == ["c", "a"]  # a list keeps its order
    b = abc.get("b")
    assert resolve_experts(ctx, b) == [b]
    got = resolve_experts(ctx, [b, "a"])
    assert got[0] is b and got[1].name == "a" and got[1].lineage is None
    assert resolve_experts(ctx, ["a"])[0].sha256 == abc.get("a").sha256


def test_one_error_for_every_operation(abc: Library) -> None:
    ctx = abc.context
    for target, name in (("kind=merged", "kind=merged"), ("a nope", "nope"), (["a", "nope"], "nope")):
        with pytest.raises(NotFoundError) as err:
            resolve_experts(ctx, target)
        assert (err.value.what, err.value.name) == ("expert", name)
    with pytest.raises(InvalidNameError):
        resolve_experts(ctx, ["a/../b"])
    # the operations resolve through it: the same error and fields everywhere
    calls = [
        lambda: abc.compute_prototypes(["a", "nope"]),
        lambda: abc.similarity(["a", "nope"]),
        lambda: abc.merge(["a", "nope"], name="m"),
        lambda: abc.cluster(["a", "nope"], k=1),
        lambda: abc.subtract_general(general=["c"], experts=["a", "nope"]),
        lambda: abc.routed_model(experts=["a", "nope"]),
    ]
    for call in calls:
        with pytest.raises(NotFoundError) as err:
            call()
        assert (err.value.what, err.value.name) == ("expert", "nope")
    with pytest.raises(NotFoundError, match="no general expert matches") as err:
        abc.subtract_general(general="kind=merged", experts="kind=task")
    assert err.value.name == "kind=merged"
