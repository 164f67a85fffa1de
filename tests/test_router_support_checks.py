"""The router test helpers themselves: the PEFT folder loader and the shape recorder work."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.router_support import (  # noqa: F401 - one_torch_thread is an autouse fixture
    load_peft_folder,
    make_adapter,
    one_torch_thread,
    peft_arrow,
    recording_shapes,
    tiny_llama,
)


def test_load_peft_folder_matches_peft_weights(tmp_path: Path) -> None:
    base = tiny_llama()
    folder = make_adapter(
        base,
        tmp_path / "a",
        seed=3,
        target_modules=["q_proj", "down_proj"],
        r=4,
        alpha=8,
    )
    ex = load_peft_folder(folder)
    assert ex.scale == 2.0
    assert sorted(ex.modules) == sorted(
        f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "mlp.down_proj")
    )
    A, B = ex.modules["model.layers.0.mlp.down_proj"]
    assert A.shape == (4, 128) and B.shape == (64, 4)


def test_shape_recorder_sees_peft_materialise_tokens_x_experts_x_out(
    tmp_path: Path,
) -> None:
    """The detector works: PEFT's Arrow forward does build a (tokens x E x out) tensor."""
    base = tiny_llama()
    E = 6
    tasks = [make_adapter(base, tmp_path / f"t{i}", seed=i, target_modules=["q_proj"]) for i in range(E)]
    pm = peft_arrow(base, tasks, top_k=2)
    ids = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        pm(ids)  # prototypes built lazily on the first call
        with recording_shapes() as rec:
            pm(ids)
    assert (10, E, 64) in rec.shapes
