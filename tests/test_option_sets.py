"""Each operation's options are defined once: a frozen dataclass in the ops module that owns the
operation. The CLI command, the ``Library`` method and the dataclass must list the same options with
the same defaults, and the operation takes the dataclass instead of re-listing them, so the three
cannot drift apart (as ``allow_nonfinite`` once did: in ops.import_dir, not in Library or the CLI)."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import click
import pytest

from libstore import Library
from libstore.cli.clusters import cluster
from libstore.cli.eval import eval_
from libstore.cli.hub import pull, push, status_cmd
from libstore.cli.lowrank import gks, merge, prototypes_compute, prototypes_show, similarity
from libstore.cli.route import export_routed
from libstore.ops import clusters, derive, evaluate, prototypes, sync
from libstore.ops import export_routed as export_ops
from libstore.ops import pull as pull_ops
from libstore.ops import push as push_ops
from libstore.ops import similarity as sim

#: command, Library method, options class, operation, the Library's non-option parameters (what the
#: operation works on), the command's non-option parameters (arguments, output flags).
CASES: list[tuple[click.Command, Callable[..., Any], type[Any], Callable[..., Any], set[str], set[str]]] = [
    (gks, Library.subtract_general, derive.GksOptions, derive.subtract_general,
     {"general", "experts"}, {"general", "experts", "as_json"}),
    (merge, Library.merge, derive.MergeOptions, derive.merge,
     {"names", "name"}, {"names", "name", "as_json"}),
    (prototypes_compute, Library.compute_prototypes, prototypes.PrototypeOptions, prototypes.compute,
     {"query"}, {"query", "as_json"}),
    (prototypes_show, Library.prototypes, prototypes.PrototypeOptions, prototypes.load,
     {"expert_or_query", "modules"}, {"name", "modules", "as_json"}),
    (similarity, Library.similarity, sim.SimilarityOptions, sim.similarity,
     {"query"}, {"query", "plot_path", "as_json"}),
    (cluster, Library.cluster, clusters.ClusterOptions, clusters.cluster,
     {"experts"}, {"experts", "as_json"}),
    (eval_, Library.evaluate, evaluate.EvalOptions, evaluate.evaluate,
     {"data", "base", "tokenizer"}, {"data", "base", "plot_png", "metric", "as_json"}),
    (export_routed, Library.export_routed, export_ops.ExportRoutedOptions, export_ops.export_routed,
     {"dest", "prompt", "base", "tokenizer"}, {"dest", "prompt", "base", "as_json"}),
    (push, Library.push, push_ops.PushOptions, push_ops.push, {"remote"}, {"remote_name", "as_json"}),
    (pull, Library.pull, pull_ops.PullOptions, pull_ops.pull, {"remote"}, {"remote_name", "as_json"}),
    (status_cmd, Library.status, sync.StatusOptions, sync.status, {"remote"},
     {"remote_name", "show_all", "as_json"}),
]  # fmt: skip


def _same(value: Any) -> Any:
    """Defaults compared as values: a list or tuple default is the same default."""
    return tuple(value) if isinstance(value, list | tuple) else value


def _fields(cls: type[Any]) -> dict[str, Any]:
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen  # type: ignore[attr-defined]  # set by @dataclass
    return {f.name: _same(f.default) for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("case", CASES, ids=[c[0].name or "" for c in CASES])
def test_cli_library_and_dataclass_list_the_same_options(case: tuple[Any, ...]) -> None:
    command, method, options, _op, lib_inputs, cli_inputs = case
    want = _fields(options)
    lib = {
        n: _same(p.default)
        for n, p in inspect.signature(method).parameters.items()
        if n != "self" and n not in lib_inputs
    }
    parsed = command.make_context(command.name, [], resilient_parsing=True).params  # defaults as run
    cli = {n: _same(v) for n, v in parsed.items() if n not in cli_inputs}
    assert lib == want, f"Library.{method.__name__} vs {options.__name__}"
    assert cli == want, f"libstore {command.name} vs {options.__name__}"


@pytest.mark.parametrize("case", CASES, ids=[c[0].name or "" for c in CASES])
def test_operation_takes_the_dataclass_not_the_options(case: tuple[Any, ...]) -> None:
    _command, _method, options, op, _lib_inputs, _cli_inputs = case
    params = inspect.signature(op).parameters
    assert params["options"].annotation in (options.__name__, f"{options.__name__} | None")
    assert not set(params) & set(_fields(options)), f"{op.__name__} re-lists options of {options.__name__}"


def test_tokens_are_not_shown_in_option_reprs() -> None:
    for options in (push_ops.PushOptions, pull_ops.PullOptions, sync.StatusOptions):
        assert "hf_secret" not in repr(options(token="hf_secret"))
