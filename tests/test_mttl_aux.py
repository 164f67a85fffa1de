"""mttl's auxiliary data (``<expert>.<data_type>.bin``) imported as data attached to the expert:
read pickle-free (numpy arrays included), stored as safetensors + JSON expert files, read back
bit-equal, carried by push/pull, export, gc and verify."""

from __future__ import annotations

import builtins
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from libstore import Library
from libstore.errors import NotFoundError, UnsafeFileError, ValidationError
from libstore.types import ADAPTER_WEIGHTS
from tests import hub_support as support
from tests.hub_support import REPO, snapshot
from tests.hubserver import HubServer
from tests.test_hub_import import ARROW_CONFIG, ARROW_SAVE, MODULES, _write_arrow_protos, _write_mttl_library

hub = support.hub  # fixtures
other = support.other

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.parametrize("db_url", [None], ids=["sqlite"]),
]

SVD_SAVE = "svdembeddingtransformconfig-1a2b3c"  # SVDEmbeddingTransformConfig().save_name
HIDDEN_SAVE = "hiddenstatecomputerconfig-4d5e6f"


def _write_aux(folder: Path, name: str, weights: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Every kind of auxiliary data mttl 1.0.2 writes for an expert, as it writes it
    (ExpertLibrary.add_auxiliary_data: torch.save of {"data", "config"}); returns the payloads."""
    _write_arrow_protos(folder, name, weights, tied=False)
    gen = np.random.default_rng(0)
    payloads = {
        "embeddings": {  # add_embeddings(expert_name, embedding_config, expert_embedding: np.ndarray)
            "data": gen.standard_normal((3, 8)),
            "config": {"model": "all-MiniLM", "pool": "mean"},
        },
        SVD_SAVE: {  # SVDEmbeddingTransform: one row of the normalised float32 embeddings
            "data": gen.standard_normal(16).astype(np.float32),
            "config": {"name": None, "n_components": 16, "sparsity_threshold": 0.8},
        },
        HIDDEN_SAVE: {  # HiddenStateComputer: layer -> normalised centroid tensor
            "data": {m: torch.nn.functional.normalize(torch.randn(32), dim=0) for m in MODULES},
            "config": {"name": None, "use_base_model_only": False, "model": None, "track": "each_layer"},
        },
    }
    for data_type, payload in payloads.items():
        torch.save(payload, folder / f"{name}.{data_type}.bin")
    for kind in ("vectors", "eigvals", "protos"):
        payloads[f"{ARROW_SAVE}_{kind}"] = torch.load(
            folder / f"{name}.{ARROW_SAVE}_{kind}.bin", weights_only=False
        )
    return payloads


def _as_tensor(v: object) -> torch.Tensor:
    return torch.from_numpy(v) if isinstance(v, np.ndarray) else v  # type: ignore[return-value]  # test data: arrays or tensors


def test_every_aux_data_type_is_attached_and_reads_back_bit_equal(library: Library, tmp_path: Path) -> None:
    folder = tmp_path / "mttl"
    src = _write_mttl_library(folder, {"plain": "t1"})
    payloads = _write_aux(folder, "plain", src["plain"])
    e = library.import_mttl(folder, allow_base_mismatch=True).added[0]
    types = tuple(sorted(["arrow", *payloads]))
    assert e.data_types == types and e.metadata["mttl"]["aux_data"] == list(types)
    assert "aux_data_not_imported" not in e.metadata["mttl"]
    assert e.sha256 == e.file(ADAPTER_WEIGHTS).sha256  # the identity is the weights, data aside
    assert {f.path for f in e.files} >= {"mttl/embeddings.json", "mttl/embeddings.safetensors"}
    assert "mttl/" + ARROW_SAVE + "_eigvals.safetensors" not in {f.path for f in e.files}  # floats only
    for data_type, payload in payloads.items():
        d = library.expert_data("plain", data_type)
        assert d.data_type == data_type and d.source == "mttl" and d.config == payload["config"]
        data = payload["data"]
        want = data if isinstance(data, dict) else {"data": data}
        if data_type.endswith("_eigvals"):
            assert d.values == want and d.tensors == {}  # Python floats, exactly
            continue
        assert set(d.tensors) == set(want) and d.values == {}
        for key, v in want.items():
            t = _as_tensor(v)
            assert d.tensors[key].dtype == t.dtype and torch.equal(d.tensors[key], t)  # bit-equal
        assert set(d.arrays) == {k for k, v in want.items() if isinstance(v, np.ndarray)}
    assert library.expert_data("plain", "arrow").tensors["x"].equal(torch.ones(2))
    arrow = e.metadata["mttl"]["arrow_prototypes"]
    assert set(arrow) == {f"{ARROW_SAVE}_{k}" for k in ("protos", "vectors", "eigvals")}
    assert arrow[f"{ARROW_SAVE}_eigvals"]["config"] == ARROW_CONFIG
    with pytest.raises(NotFoundError, match="has no attached data of type 'scores'.*embeddings") as err:
        library.expert_data("plain", "scores")
    assert err.value.what == "expert data" and err.value.name == "plain:scores"
    # the same expert imported without its data has the same identity
    lib2 = Library.init(tmp_path / "lib2")
    lib2.add_base("tiny", library.base("tiny").source)
    for f in folder.glob("plain.*.bin"):
        f.unlink()
    bare = lib2.import_mttl(folder, allow_base_mismatch=True).added[0]
    assert bare.sha256 == e.sha256 and bare.data_types == () and "aux_data" not in bare.metadata["mttl"]
    lib2.close()


def test_arrays_pickled_by_numpy_1_load_too(library: Library, tmp_path: Path) -> None:
    """mttl 1.0.2 ran on numpy 1, whose pickles name numpy.core.multiarray._reconstruct."""
    folder = tmp_path / "mttl"
    _write_mttl_library(folder, {"old": "t"})
    reconstruct = np.zeros(0).__reduce__()[0]
    module = reconstruct.__module__
    reconstruct.__module__ = "numpy.core.multiarray"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.save({"data": np.arange(6, dtype=np.int64), "config": {}}, folder / "old.embeddings.bin")
    finally:
        reconstruct.__module__ = module
    assert "numpy.core.multiarray._reconstruct" in torch.serialization.get_unsafe_globals_in_checkpoint(
        folder / "old.embeddings.bin"
    )
    library.import_mttl(folder, allow_base_mismatch=True)
    assert torch.equal(library.expert_data("old", "embeddings").tensors["data"], torch.arange(6))


def test_aux_data_needing_other_classes_is_refused_unrun_and_nothing_imported(
    library: Library, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # what a hostile file does: call something on load
            return (builtins.exec, (f"open({str(marker)!r}, 'w').write('x')",))

    folder = tmp_path / "mttl"
    _write_mttl_library(folder, {"good": "good", "evil": "evil"})
    before = snapshot(library)
    hostile = [
        {"data": Evil(), "config": {}},
        {"data": np.array([Evil()], dtype=object), "config": {}},  # an object array pickles its items
        {"data": {"x": np.ones(2)}, "config": {"hook": Evil()}},
    ]
    for payload in hostile:
        torch.save(payload, folder / "evil.embeddings.bin")
        with pytest.raises(UnsafeFileError, match="weights_only"):
            library.import_mttl(folder, allow_base_mismatch=True)
        assert not marker.exists() and snapshot(library) == before  # all or nothing: 'good' neither
    torch.save({"data": np.ones(2, dtype=np.complex64), "config": {}}, folder / "evil.embeddings.bin")
    with pytest.raises(UnsafeFileError):  # a dtype safetensors cannot hold: its class is not allowed
        library.import_mttl(folder, allow_base_mismatch=True)
    torch.save({"data": {1: torch.ones(2)}, "config": {}}, folder / "evil.embeddings.bin")
    with pytest.raises(ValidationError, match="only non-empty string keys"):
        library.import_mttl(folder, allow_base_mismatch=True)
    assert snapshot(library) == before and not list((library.path / ".tmp").glob("*"))


def test_export_keeps_the_data_gc_keeps_it_verify_checks_it(library: Library, tmp_path: Path) -> None:
    folder = tmp_path / "mttl"
    src = _write_mttl_library(folder, {"plain": "t1"})
    _write_aux(folder, "plain", src["plain"])
    e = library.import_mttl(folder, allow_base_mismatch=True).added[0]
    out = library.export("plain", tmp_path / "out")
    for f in e.files:
        assert (out / f.path).read_bytes() == library.context.blobs.read_bytes(f.sha256)
    doc = json.loads((out / "mttl" / "embeddings.json").read_text())
    assert doc["format"] == "libstore-expert-data" and doc["arrays"] == ["data"]
    library.gc(grace_s=0)
    assert library.verify().ok
    assert torch.equal(
        library.expert_data("plain", "embeddings").tensors["data"],
        torch.from_numpy(torch.load(folder / "plain.embeddings.bin", weights_only=False)["data"]),
    )
    # a data file that hashes right but is not what libstore writes is an error of verify
    from sqlalchemy import update

    from libstore.catalog.models import BlobRow, ExpertFileRow

    bogus = library.context.blobs.put_bytes(b'{"format": "something else"}\n')
    with library.context.catalog.write() as s:
        s.add(BlobRow(sha256=bogus.sha256, size=bogus.size))
        s.flush()
        arrow = ExpertFileRow.path == "mttl/arrow.json"
        s.execute(update(ExpertFileRow).where(arrow).values(blob_sha256=bogus.sha256, size=bogus.size))
    found = [p for p in library.verify().errors if getattr(p, "what", None) == "attached data"]
    assert len(found) == 1 and "not a libstore expert-data file" in found[0].message


def test_attached_data_travels_through_push_and_pull(
    library: Library, other: Library, hub: HubServer, tmp_path: Path
) -> None:
    folder = tmp_path / "mttl"
    src = _write_mttl_library(folder, {"plain": "t1"})
    _write_aux(folder, "plain", src["plain"])
    e = library.import_mttl(folder, allow_base_mismatch=True).added[0]
    library.add_remote("origin", REPO)
    library.push()
    other.add_remote("origin", REPO)
    other.pull()
    got = other.get("plain")
    assert got.sha256 == e.sha256 and got.data_types == e.data_types and got.files == e.files
    for data_type in e.data_types:
        mine, theirs = library.expert_data("plain", data_type), other.expert_data("plain", data_type)
        assert mine.values == theirs.values and mine.config == theirs.config
        assert mine.tensors.keys() == theirs.tensors.keys()
        assert all(torch.equal(t, theirs.tensors[k]) for k, t in mine.tensors.items())


def test_cli_show_lists_the_data_and_data_reads_one(library: Library, tmp_path: Path) -> None:
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from libstore.cli.app import cli

    folder = tmp_path / "mttl"
    src = _write_mttl_library(folder, {"plain": "t1"})
    payloads = _write_aux(folder, "plain", src["plain"])
    library.import_mttl(folder, allow_base_mismatch=True)
    runner = CliRunner()

    def run(*args: str, code: int = 0) -> str:
        result = runner.invoke(cli, ["-L", str(library.path), *args], catch_exceptions=False)
        assert result.exit_code == code, (args, result.output)
        return result.output

    assert f"attached data   arrow, {ARROW_SAVE}_eigvals" in run("show", "plain")
    out = tmp_path / "e.safetensors"
    shown = json.loads(run("data", "plain", "embeddings", "--out", str(out), "--json"))
    assert shown["tensors"] == {"data": {"dtype": "float64", "shape": [3, 8], "numpy": True}}
    assert torch.equal(load_file(out)["data"], torch.from_numpy(payloads["embeddings"]["data"]))
    eig = json.loads(run("data", "plain", f"{ARROW_SAVE}_eigvals", "--json"))
    assert eig["values"] == payloads[f"{ARROW_SAVE}_eigvals"]["data"] and eig["tensors"] == {}
    assert "has no attached data of type 'nope'" in run("data", "plain", "nope", code=4)


def test_the_allow_list_is_numpy_array_reconstruction_only_and_for_aux_data_only(
    library: Library, tmp_path: Path
) -> None:
    from libstore.hub.mttl import numpy_globals

    names = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in numpy_globals()}
    assert all(n.startswith("numpy.") for n in names) and "numpy.dtypes.ObjectDType" not in names
    folder = tmp_path / "mttl"
    _write_mttl_library(folder, {"e": "t"})
    eig = {m: np.float32(1.5) for m in MODULES}  # numpy scalars (not .item()) load as well
    torch.save({"data": eig, "config": {}}, folder / f"e.{ARROW_SAVE}_eigvals.bin")
    library.import_mttl(folder, allow_base_mismatch=True)
    assert library.expert_data("e", f"{ARROW_SAVE}_eigvals").values == dict.fromkeys(MODULES, 1.5)
    meta = torch.load(folder / "e.meta", weights_only=True)
    meta["expert_config"]["lora_alpha"] = np.float64(16.0)  # weights and metadata stay plain
    torch.save(meta, folder / "e.meta")
    with pytest.raises(UnsafeFileError):
        library.import_mttl(folder, allow_base_mismatch=True)
