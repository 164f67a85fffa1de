"""The manifest format (strict reader, deterministic writer) and the pure sync planner. No server."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json

import pytest

from libstore.hub.manifest import FORMAT, Manifest, ManifestError, PrototypeEntry, record_digest
from libstore.hub.manifest_reader import parse_manifest
from libstore.hub.modelcard import render
from libstore.hub.plan import classify, matches, plan
from libstore.ops.query import parse_query
from libstore.types import (
    BaseModel,
    ClusteringInput,
    ClusteringRecord,
    ClusterRecord,
    Derivation,
    DerivationParent,
    Expert,
    LinearShape,
    ModuleShape,
    PrototypeSet,
    StoredFile,
)

H = [f"{i:x}" * 64 for i in range(10)]


def _expert(
    name: str,
    *,
    sha: str = H[1],
    tags: tuple[str, ...] = ("v1",),
    cluster: str | None = None,
    kind: str = "task",
) -> Expert:
    return Expert(
        name=name,
        kind=kind,
        base_model="tiny",
        rank=4,
        alpha=8.0,
        use_rslora=False,
        target_modules=("q_proj",),
        modules={"model.layers.0.self_attn.q_proj": ModuleShape(32, 32, 4)},
        dtype="float32",
        sha256=sha,
        bytes=5500,
        files=(
            StoredFile("adapter_config.json", H[0], 500),
            StoredFile("adapter_model.safetensors", sha, 5000),
        ),
        tasks=(name,),
        tags=tags,
        metadata={"note": "x"},
        cluster=cluster,
    )


def _manifest() -> Manifest:
    base = BaseModel(
        "tiny",
        "org/tiny-llama",
        None,
        "LlamaForCausalLM",
        "llama",
        H[9],
        {"model.layers.0.self_attn.q_proj": LinearShape(32, 32)},
    )
    res = dataclasses.replace(
        _expert("arc_res", sha=H[3], kind="residual"),
        lineage=Derivation(
            "gks",
            1,
            {"mode": "param"},
            H[4],
            (DerivationParent("expert", "arc", H[1]), DerivationParent("general", "wiki", H[2])),
        ),
    )
    clustering = ClusteringRecord(
        name="mbc",
        base_model="tiny",
        method="mbc",
        metric="cosine",
        k=2,
        seed=0,
        query="kind=task",
        params={},
        criterion={},
        inputs=(ClusteringInput("arc", H[1]),),
        clusters=(ClusterRecord(0, ("arc",), ("arc",), "c0", {}),),
    )
    return Manifest(
        base_models={"tiny": base},
        experts={
            "arc": _expert("arc"),
            "wiki": _expert("wiki", sha=H[2], kind="general"),
            "arc_res": res,
            "c0": _expert("c0", sha=H[5], kind="cluster", cluster="mbc:0"),
        },
        clusterings={"mbc": clustering},
        prototypes=(PrototypeEntry("arc", PrototypeSet(H[1], "exact", 1, {"top_n": 1}, H[6], H[7], 700)),),
        generator="libstore test",
    )


def test_round_trip_is_exact_and_deterministic() -> None:
    m = _manifest()
    data = m.to_bytes()
    again = parse_manifest(data)
    assert again == m and again.to_bytes() == data
    assert json.loads(data)["format"] == FORMAT
    assert set(m.files()) == {
        *(
            f"experts/{n}/{f}"
            for n in m.experts
            for f in ("adapter_config.json", "adapter_model.safetensors")
        ),
        f"prototypes/arc/exact-v1-{H[6][:16]}.safetensors",
    }
    assert (
        record_digest(_expert("a"))
        == record_digest(_expert("a"))
        != record_digest(_expert("a", tags=("v2",)))
    )
    # what the catalog adds to a record (where it came from, when) is not part of the digest
    assert record_digest(
        dataclasses.replace(_expert("a"), source="/x", created_at=dt.datetime.now(dt.UTC))
    ) == (record_digest(_expert("a")))
    card = render(m, "org/lib")
    assert "subfolder='experts/arc'" in card and 'base_model:\n- "org/tiny-llama"' in card


def _tampered(edit) -> bytes:
    raw = json.loads(_manifest().to_bytes())
    edit(raw)
    return json.dumps(raw).encode()


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m["experts"].__setitem__("..", m["experts"]["arc"]), "invalid name"),
        (lambda m: m["experts"].__setitem__("/abs", m["experts"]["arc"]), "path separator"),
        (lambda m: m["experts"]["arc"]["files"].pop("adapter_config.json"), "missing"),
        (
            lambda m: m["experts"]["arc"]["files"].__setitem__("run.sh", {"sha256": H[0], "size": 1}),
            "unknown file",
        ),
        (lambda m: m["experts"]["arc"]["files"]["adapter_config.json"].__setitem__("path", "../x"), "is not"),
        (lambda m: m["experts"]["arc"]["files"]["adapter_config.json"].__setitem__("size", -1), "integer"),
        (lambda m: m["experts"]["arc"]["files"]["adapter_config.json"].__setitem__("size", True), "integer"),
        (lambda m: m["experts"]["arc"].__setitem__("base_model", "other"), "not defined"),
        (lambda m: m["experts"]["arc"].__setitem__("alpha", "8"), "finite number"),
        (lambda m: m["experts"]["arc"].__setitem__("tags", ["ok", "no way"]), "invalid name"),
        (lambda m: m["experts"]["arc"]["modules"].__setitem__("a..b", [1, 1, 4]), "module name"),
        (lambda m: m["experts"]["c0"].__setitem__("cluster", "mbc:7"), "no cluster 7"),
        (
            lambda m: m["experts"]["arc_res"]["derivation"]["parents"][0].__setitem__("name", "../up"),
            "invalid name",
        ),
        (lambda m: m["prototypes"][0].__setitem__("path", "prototypes/../../evil.safetensors"), "is not"),
        (lambda m: m["prototypes"][0].__setitem__("expert_sha256", H[8]), "does not match"),
        (lambda m: m["prototypes"][0].__setitem__("method", "../x"), "lowercase"),
        (lambda m: m.__setitem__("format", "something-else"), "expected"),
        (lambda m: m.__setitem__("format_version", 2), "upgrade libstore"),
        (lambda m: m.pop("experts"), "missing key"),
    ],
)
def test_hostile_or_broken_manifests_are_refused(edit, match) -> None:
    with pytest.raises(ManifestError, match=match):
        parse_manifest(_tampered(edit))


def test_json_level_tricks_are_refused() -> None:
    data = _manifest().to_bytes().decode()
    with pytest.raises(ManifestError, match="duplicate key"):
        parse_manifest(data.replace('"experts": {', '"experts": {}, "experts": {', 1).encode())
    with pytest.raises(ManifestError, match="not valid JSON"):
        parse_manifest(data.replace('"alpha": 8.0', '"alpha": NaN', 1).encode())
    with pytest.raises(ManifestError, match="UTF-8"):
        parse_manifest(b"\xff\xfe" + data.encode())
    with pytest.raises(ManifestError, match="limit"):
        parse_manifest(b" " * (64 << 20 | 1))
    with pytest.raises(ManifestError, match="object"):
        parse_manifest(b"[]")


@pytest.mark.parametrize(
    "where",
    ["metadata key", "cluster label", "generator", "derivation params"],
)
def test_manifest_reader_refuses_lone_surrogates_everywhere(where: str) -> None:
    raw = json.loads(_manifest().to_bytes())
    if where == "metadata key":
        raw["experts"]["arc"]["metadata"] = {"\udfff": 1}
    elif where == "cluster label":
        raw["clusterings"]["mbc"]["clusters"][0]["label"] = "c\ud83d"
    elif where == "generator":
        raw["generator"] = "\ud800"
    else:
        raw["experts"]["arc_res"]["derivation"]["params"]["mode"] = "\udc80"
    with pytest.raises(ManifestError, match="surrogate"):
        parse_manifest(json.dumps(raw).encode())


@pytest.mark.parametrize(
    "local, remote, synced, state",
    [
        ("a", "a", None, "in_sync"),
        ("a", None, None, "local_only"),
        (None, "a", None, "remote_only"),
        ("b", "a", "a", "local_changed"),
        ("a", "b", "a", "remote_changed"),
        ("b", "c", "a", "conflict"),
        ("b", "c", None, "conflict"),
        (None, "a", "a", "deleted_local"),
        ("a", None, "a", "deleted_remote"),
        (None, "b", "a", "conflict"),
        ("b", None, "a", "conflict"),
        (None, None, "a", None),
    ],
)
def test_three_way_states(local, remote, synced, state) -> None:
    assert classify(local, remote, synced) == state


def test_actions_force_prune_and_selection() -> None:
    local = {"new": "1", "chg": "2", "same": "3", "conf": "4", "gone_r": "5"}
    remote = {"chg": "0", "same": "3", "conf": "6", "theirs": "7", "gone_l": "8", "rchg": "9"}
    synced = {"chg": "0", "conf": "x", "gone_r": "5", "gone_l": "8", "rchg": "y"}
    local["rchg"] = "y"
    p = {e.name: (e.state, e.push, e.pull) for e in plan(local, remote, synced)}
    assert p == {
        "new": ("local_only", "upload", "none"),
        "chg": ("local_changed", "upload", "none"),
        "same": ("in_sync", "none", "none"),
        "conf": ("conflict", "conflict", "conflict"),
        "gone_r": ("deleted_remote", "none", "none"),
        "theirs": ("remote_only", "none", "download"),
        "gone_l": ("deleted_local", "none", "none"),
        "rchg": ("remote_changed", "none", "download"),
    }
    forced = {e.name: (e.push, e.pull) for e in plan(local, remote, synced, force=True, prune=True)}
    assert forced["conf"] == ("upload", "download") and forced["gone_l"] == ("delete", "download")
    assert forced["gone_r"] == ("upload", "remove")
    only = {e.name: e.push for e in plan(local, remote, synced, selected={"new"})}
    assert only["new"] == "upload" and only["chg"] == "none"


def test_query_matching_on_manifest_entries() -> None:
    m = _manifest()

    def names(q: str) -> list[str]:
        return sorted(n for n, e in m.experts.items() if matches(e, parse_query(q)))

    assert names("arc*") == ["arc", "arc_res"]
    assert names("kind=general") == ["wiki"]
    assert names("tag=v1 kind=task") == ["arc"]
    assert names("task=wiki,c0") == ["c0", "wiki"]
    assert names("cluster=mbc") == ["c0"] and names("cluster=mbc:0") == ["c0"] and names("cluster=x") == []
    assert names("base=tiny") == sorted(m.experts)
