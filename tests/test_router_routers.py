"""The routers beyond Arrow (SpectR, Arrow top-n, uniform), per-sequence and pinned routing, and the
exported mixture, each against an independent dense reference: ΔW formed and decomposed with
``torch.linalg.svd`` in float64, and plain per-token loops."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import pytest
import torch
from torch import Tensor, nn

from libstore.errors import RouterError
from libstore.router.build import ExpertTensors, build_router, peft_prototype_fn
from libstore.router.export import mixture_factors
from libstore.router.layer import RoutedLinear, dense_reference
from libstore.router.model import RoutedModel
from libstore.router.routers import Arrow, SpectR, make_router
from tests.router_support import (  # noqa: F401 - one_torch_thread is an autouse fixture
    one_torch_thread,
    random_experts,
    recording_shapes,
    tiny_llama,
)


def ids_for(seed: int = 0, shape: tuple[int, int] = (2, 9)) -> Tensor:
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))


def local_experts(layer: RoutedLinear, experts: Sequence[ExpertTensors]) -> list[ExpertTensors]:
    return [experts[int(i)] for i in layer.expert_ids]


def dense_delta(e: ExpertTensors, module: str) -> Tensor:
    A, B = e.modules[module]
    return e.scale * (B.double() @ A.double())


def layer_inputs(routed: RoutedModel, ids: Tensor) -> dict[str, Tensor]:
    """Each routed layer's input (tokens, in) in one forward."""
    seen: dict[str, Tensor] = {}
    hooks = [
        layer.register_forward_pre_hook(
            lambda _m, args, n=name: seen.__setitem__(n, args[0].reshape(-1, args[0].shape[-1]))
        )
        for name, layer in routed.layers.items()
    ]
    with torch.no_grad():
        routed(ids)
    for h in hooks:
        h.remove()
    return seen


def delta(layer: RoutedLinear, x: Tensor) -> Tensor:
    with torch.no_grad():
        return (layer(x) - layer.base_layer(x)).double()


# -- SpectR -------------------------------------------------------------------------------------


def spectr_reference(h: Tensor, deltas: Sequence[Tensor]) -> Tensor:
    """SpectR's score from the dense ΔW: ||Σ Vᵀ h|| with U, Σ, Vᵀ = svd(ΔW), in float64."""
    cols = []
    for dw in deltas:
        _, S, Vh = torch.linalg.svd(dw, full_matrices=False)
        cols.append(torch.linalg.vector_norm((S[:, None] * Vh) @ h.double().T, dim=0))
    return torch.stack(cols, dim=1)


def test_spectr_score_equals_dense_svd_and_is_built_without_forming_delta_w() -> None:
    model = tiny_llama()
    experts = random_experts(model, 6, ranks=(2, 4, 8), subsets=True, seed=21)
    with recording_shapes() as rec:
        routed = build_router(model, experts, router="spectr", top_k=2)
    shapes = {(layer.out_features, layer.in_features) for layer in routed.layers.values()}
    assert not [s for s in rec.shapes if len(s) >= 2 and tuple(s[-2:]) in shapes]  # no ΔW, ever
    h = torch.randn(7, 64, generator=torch.Generator().manual_seed(0))
    for name, layer in routed.layers.items():
        mine = local_experts(layer, experts)
        assert layer.key_rows == tuple(e.modules[name][0].shape[0] for e in mine)  # the whole spectrum
        x = torch.randn(7, layer.in_features, generator=torch.Generator().manual_seed(1))
        deltas = [dense_delta(e, name) for e in mine]
        ref = spectr_reference(x, deltas)
        torch.testing.assert_close(layer.scores(x).double(), ref, rtol=1e-4, atol=2e-5)
        # the same number as the adapter's activation norm ||ΔW h||
        act = torch.stack([torch.linalg.vector_norm(x.double() @ dw.T, dim=1) for dw in deltas], 1)
        torch.testing.assert_close(ref, act, rtol=1e-9, atol=1e-9)
    assert h.shape == (7, 64)


@pytest.mark.parametrize("top_k,temperature", [(1, 1.0), (2, 0.5), (4, 2.0)])
def test_spectr_routed_delta_matches_dense_loop(top_k: int, temperature: float) -> None:
    model = tiny_llama()
    experts = random_experts(model, 5, ranks=(4,), seed=22)
    routed = build_router(model, experts, router="spectr", top_k=top_k, temperature=temperature)
    inputs = layer_inputs(routed, ids_for(1))
    for name, layer in routed.layers.items():
        x = inputs[name]
        mine = local_experts(layer, experts)
        scores = spectr_reference(x, [dense_delta(e, name) for e in mine]).float()
        ref = dense_reference(
            x,
            layer.prototypes,
            [e.modules[name][0] for e in mine],
            [e.modules[name][1] for e in mine],
            [e.scale for e in mine],
            top_k=top_k,
            temperature=temperature,
            scores=scores,
        )
        for strategy in ("dense", "gather", "grouped"):  # fp32 scores vs float64 ones: softmax noise
            layer.strategy = strategy
            torch.testing.assert_close(delta(layer, x), ref, atol=1e-4, rtol=1e-4)


def test_spectr_with_genknowsub_scores_the_residuals() -> None:
    model = tiny_llama()
    experts = random_experts(model, 3, ranks=(4,), seed=23)
    general = random_experts(model, 2, ranks=(4,), seed=24)
    routed = build_router(model, experts, general=general, router="spectr")
    name = "model.layers.1.mlp.down_proj"
    layer = routed.layers[name]
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(2))
    mean_A = sum(g.modules[name][0] for g in general) / 2
    mean_B = sum(g.modules[name][1] for g in general) / 2
    residuals = [
        e.scale * ((e.modules[name][1] - mean_B).double() @ (e.modules[name][0] - mean_A).double())
        for e in experts
    ]
    torch.testing.assert_close(layer.scores(x).double(), spectr_reference(x, residuals), rtol=1e-4, atol=2e-5)


# -- Arrow top-n and uniform --------------------------------------------------------------------


def test_arrow_top_n_scores_the_projection_onto_the_top_singular_subspace() -> None:
    model = tiny_llama()
    experts = random_experts(model, 4, ranks=(4, 8), seed=25)
    one = build_router(copy.deepcopy(model), experts, top_k=2)
    two = build_router(copy.deepcopy(model), experts, router=Arrow(top_n=2), top_k=2)
    for name, layer in two.layers.items():
        x = torch.randn(6, layer.in_features, generator=torch.Generator().manual_seed(3))
        deltas = [dense_delta(e, name) for e in local_experts(layer, experts)]
        ref2, ref1 = [], []
        for dw in deltas:
            Vh = torch.linalg.svd(dw, full_matrices=False)[2]
            ref2.append(torch.linalg.vector_norm(Vh[:2] @ x.double().T, dim=0))
            ref1.append((Vh[0] @ x.double().T).abs())
        torch.testing.assert_close(layer.scores(x).double(), torch.stack(ref2, 1), rtol=1e-4, atol=2e-5)
        torch.testing.assert_close(
            one.layers[name].scores(x).double(), torch.stack(ref1, 1), rtol=1e-4, atol=2e-5
        )
    with pytest.raises(RouterError, match="at most"):
        build_router(tiny_llama(), random_experts(tiny_llama(), 2, ranks=(2,)), router=Arrow(top_n=3))


def test_uniform_is_the_plain_average_of_the_experts() -> None:
    model = tiny_llama()
    experts = random_experts(model, 4, ranks=(2, 4), subsets=True, seed=26)
    routed = build_router(model, experts, router="uniform", top_k=1)  # top_k does not apply
    inputs = layer_inputs(routed, ids_for(2))
    for name, layer in routed.layers.items():
        x = inputs[name]
        mine = local_experts(layer, experts)
        ref = sum(x.double() @ dense_delta(e, name).T for e in mine) / len(mine)
        assert isinstance(ref, Tensor)
        for strategy in ("dense", "grouped"):
            layer.strategy = strategy
            torch.testing.assert_close(delta(layer, x), ref, atol=2e-5, rtol=1e-4)


# -- per-sequence and pinned routing ------------------------------------------------------------


def test_sequence_routing_decides_once_from_the_prompt_tokens() -> None:
    model = tiny_llama()
    experts = random_experts(model, 5, ranks=(4,), seed=27)
    routed = build_router(model, experts, router="spectr", top_k=2, temperature=0.7)
    prompt = ids_for(3, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0  # the second prompt is 4 tokens, right-padded
    name = "model.layers.1.self_attn.v_proj"
    layer = routed.layers[name]
    seen: list[Tensor] = []
    hook = layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad(), routed.sequence_routing(mask) as routes:
        routed.model(input_ids=prompt, attention_mask=mask)
        cont = torch.cat([prompt, ids_for(4, (2, 3))], dim=1)
        routed.model(input_ids=cont)  # a later call inside the block reuses the decision
    hook.remove()
    x = seen[0]  # (2, 6, in): what the module saw when it decided
    ids, weights = routes.routes[name]
    for b, n in ((0, 6), (1, 4)):
        s = spectr_reference(x[b, :n], [dense_delta(e, name) for e in local_experts(layer, experts)])
        top, idx = torch.topk(s.mean(0), 2)
        assert ids[b].tolist() == layer.expert_ids[idx].tolist()
        torch.testing.assert_close(weights[b].double(), torch.softmax(top / 0.7, 0), rtol=1e-4, atol=2e-5)
        # every token of the continuation used those experts with those weights
        xc = seen[1][b]
        ref = sum(
            w * (xc.double() @ dense_delta(experts[int(e)], name).T)
            for e, w in zip(ids[b].tolist(), weights[b].tolist(), strict=True)
        )
        assert isinstance(ref, Tensor)
        with torch.no_grad():
            got = layer(xc.unsqueeze(0)) - layer.base_layer(xc.unsqueeze(0))
        # outside the block the layer routes per token again: compare with the pinned replay instead
        with routed.pinned(routes), torch.no_grad():
            pinned = layer(seen[1]) - layer.base_layer(seen[1])
        torch.testing.assert_close(pinned[b].double(), ref, atol=2e-5, rtol=1e-4)
        assert not torch.allclose(got[0].double(), ref, atol=1e-4)  # per-token routing differs here


def test_granularity_sequence_generates_with_the_prompts_experts() -> None:
    model = tiny_llama()
    experts = random_experts(model, 6, ranks=(4,), seed=28, scale=0.3)
    routed = build_router(model, experts, router="arrow", top_k=2, granularity="sequence")
    prompt = ids_for(5, (1, 7))
    with torch.no_grad():
        out = routed.generate(input_ids=prompt, max_new_tokens=5, do_sample=False)
        with routed.sequence_routing() as routes:
            routed.model(input_ids=prompt)
        seq = prompt
        with routed.pinned(routes):  # the same experts, no KV cache: token by token
            for _ in range(5):
                nxt = routed.model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
                seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)
    routed.configure(granularity="token")  # back to per-token routing: as a router built that way
    per_token = build_router(tiny_llama(), experts, router="arrow", top_k=2)
    with torch.no_grad():
        a = routed.generate(input_ids=prompt, max_new_tokens=5, do_sample=False)
        b = per_token.generate(input_ids=prompt, max_new_tokens=5, do_sample=False)
    assert torch.equal(a, b)


def test_pinned_experts_per_sequence_in_every_module() -> None:
    model = tiny_llama()
    experts = random_experts(model, 4, ranks=(2, 4), subsets=True, seed=29)
    routed = build_router(model, experts, top_k=2)
    x_ids = ids_for(6, (2, 5))
    inputs: dict[str, Tensor] = {}
    hooks = [
        layer.register_forward_pre_hook(lambda _m, a, n=name: inputs.__setitem__(n, a[0]))
        for name, layer in routed.layers.items()
    ]
    with torch.no_grad(), routed.pinned([["expert1"], ["expert0", "expert3"]]) as routes:
        routed.model(input_ids=x_ids)
    for h in hooks:
        h.remove()
    for name, layer in routed.layers.items():
        x = inputs[name]
        with torch.no_grad(), routed.pinned(routes):
            got = (layer(x) - layer.base_layer(x)).double()
        for b, (chosen, w) in enumerate(((["expert1"], [1.0]), (["expert0", "expert3"], [0.5, 0.5]))):
            ref = torch.zeros(x.shape[1], layer.out_features, dtype=torch.float64)
            for n, wi in zip(chosen, w, strict=True):
                e = next(e for e in experts if e.name == n)
                if name in e.modules:  # an expert that lacks the module adds nothing there
                    ref += wi * (x[b].double() @ dense_delta(e, name).T)
            torch.testing.assert_close(got[b], ref, atol=2e-5, rtol=1e-4)


def test_mixture_factors_are_the_routed_delta_exactly() -> None:
    model = tiny_llama()
    for mixing in ("output", "parameter"):
        experts = random_experts(model, 5, ranks=(4,), seed=30)
        routed = build_router(copy.deepcopy(model), experts, top_k=3, mixing=mixing)  # type: ignore[arg-type]  # a literal
        with torch.no_grad(), routed.sequence_routing() as routes:
            routed.model(input_ids=ids_for(7, (1, 6)))
        factors = mixture_factors(routed, routes)
        ranks = {a.shape[0] for a, _ in factors.values()}
        assert ranks == ({12} if mixing == "output" else {4})
        for name, (A, B) in factors.items():
            chosen = routes.names(name)
            if mixing == "output":
                ref = sum(w * dense_delta(next(e for e in experts if e.name == n), name) for n, w in chosen)
            else:
                es = [(next(e for e in experts if e.name == n), w) for n, w in chosen]
                ref = sum(w * e.scale * e.modules[name][1].double() for e, w in es) @ sum(
                    w * e.modules[name][0].double() for e, w in es
                )
            assert isinstance(ref, Tensor)
            torch.testing.assert_close(B.double() @ A.double(), ref, atol=1e-6, rtol=1e-5)


# -- errors -------------------------------------------------------------------------------------


def test_router_errors() -> None:
    model = tiny_llama()
    experts = random_experts(model, 3, seed=31)
    with pytest.raises(RouterError, match="unknown router"):
        make_router("nope")
    with pytest.raises(RouterError, match="arrow router only"):
        build_router(copy.deepcopy(model), experts, router="spectr", prototype_fn=peft_prototype_fn())
    with pytest.raises(RouterError, match="top_n"):
        Arrow(top_n=2, method="peft")
    assert SpectR().params() == {} and Arrow(top_n=2).params() == {"top_n": 2, "method": "exact"}
    routed = build_router(copy.deepcopy(model), experts, router="spectr")
    nested = pytest.raises(RouterError, match="do not nest")
    with routed.sequence_routing(), nested, routed.pinned([["expert0"]]):
        pass
    with pytest.raises(RouterError, match="not routed"), routed.pinned([["expert9"]]):
        pass
    with torch.no_grad(), routed.sequence_routing():
        routed.model(input_ids=ids_for(8, (2, 4)))
        with pytest.raises(RouterError, match="sequences"):
            routed.model(input_ids=ids_for(8, (3, 4)))
    bad_mask = pytest.raises(RouterError, match="attention mask")
    with bad_mask, torch.no_grad(), routed.sequence_routing(torch.ones(2, 3)):
        routed.model(input_ids=ids_for(8, (2, 4)))
    assert isinstance(routed.model, nn.Module) and routed.router == "spectr"
