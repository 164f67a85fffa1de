"""The router's own features: mixed ranks and module subsets, parameter mixing, strategies and their
cost rule, generation with the KV cache, bf16, tracing and plots, memory bounds, unpatching, errors,
build cost, torch.compile.

References here are dense float64 loops (:func:`libstore.router.layer.dense_reference`) wherever PEFT
cannot serve as the oracle (it requires equal ranks and has no parameter mixing).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from libstore.errors import RouterError
from libstore.router.build import ExpertTensors, build_router, peft_prototype_fn
from libstore.router.layer import RoutedLinear, choose_strategy, dense_reference
from libstore.router.model import RoutedModel
from tests.router_support import (  # noqa: F401 - one_torch_thread is an autouse fixture
    one_torch_thread,
    random_experts,
    recording_shapes,
    tiny_llama,
    tiny_phi3,
)

STRATEGIES = ("dense", "gather", "grouped")


def ids_for(seed: int = 0, shape: tuple[int, int] = (2, 12)) -> Tensor:
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))


def check_layers_against_dense_loop(
    routed: RoutedModel, experts: Sequence[ExpertTensors], ids: Tensor
) -> None:
    """Every routed layer's delta equals the float64 per-token loop, for every strategy allowed."""
    inputs: dict[str, Tensor] = {}
    hooks = [
        layer.register_forward_pre_hook(lambda _m, args, name=name: inputs.__setitem__(name, args[0]))
        for name, layer in routed.layers.items()
    ]
    with torch.no_grad():
        routed(ids)
    for h in hooks:
        h.remove()
    for name, layer in routed.layers.items():
        x = inputs[name].reshape(-1, layer.in_features)
        mine = [e for e in experts if name in e.modules]
        ref = dense_reference(
            x,
            layer.prototypes,
            [e.modules[name][0] for e in mine],
            [e.modules[name][1] for e in mine],
            [e.scale for e in mine],
            top_k=layer.top_k,
            temperature=layer.temperature,
            mixing=layer.mixing,
        )
        for strategy in STRATEGIES:
            if strategy == "gather" and not layer.uniform_rank:
                continue
            layer.strategy = strategy
            with torch.no_grad():
                delta = layer(x) - layer.base_layer(x)
            torch.testing.assert_close(
                delta.double(),
                ref,
                atol=2e-5,
                rtol=1e-4,
                msg=lambda m, n=name, s=strategy: f"{n} {s}: {m}",
            )
        layer.strategy = "auto"


# -- semantics ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k,temperature", [(1, 1.0), (3, 0.5), (9, 2.0)])
def test_mixed_ranks_and_module_subsets_match_dense_loop(top_k: int, temperature: float) -> None:
    model = tiny_llama()
    experts = random_experts(model, 7, ranks=(2, 4, 8), subsets=True)
    routed = build_router(model, experts, top_k=top_k, temperature=temperature)
    q0 = routed.layers["model.layers.0.self_attn.q_proj"]
    assert len(set(q0.ranks)) > 1 and q0.num_experts < 7  # really mixed ranks, really a subset
    check_layers_against_dense_loop(routed, experts, ids_for(1))


@pytest.mark.parametrize("top_k", [1, 2, 5])
def test_parameter_mixing_matches_dense_loop(top_k: int) -> None:
    """mttl's mixing: per token (sum_e c_e s_e B_e)(sum_e c_e A_e) h, checked against a plain loop."""
    model = tiny_llama()
    experts = random_experts(model, 5, ranks=(4,), seed=3)
    routed = build_router(model, experts, top_k=top_k, mixing="parameter")
    check_layers_against_dense_loop(routed, experts, ids_for(2))
    if top_k > 1:  # and it is a different function from output mixing
        out_mix = build_router(tiny_llama(), experts, top_k=top_k)
        with torch.no_grad():
            assert not torch.allclose(routed(ids_for(2)).logits, out_mix(ids_for(2)).logits, atol=1e-4)


def test_parameter_mixing_refuses_mixed_ranks() -> None:
    model = tiny_llama()
    with pytest.raises(RouterError, match="equal ranks"):
        build_router(model, random_experts(model, 3, ranks=(2, 4)), mixing="parameter")
    assert not any(isinstance(m, RoutedLinear) for m in model.modules())


def test_top_k_above_module_expert_count_is_clamped() -> None:
    """PEFT raises at the first forward when top_k > E; libstore uses all E experts (= top_k=E)."""
    model = tiny_llama()
    experts = random_experts(model, 3)
    ids = ids_for(3)
    with torch.no_grad():
        big = build_router(copy.deepcopy(model), experts, top_k=10)(ids).logits
        exact = build_router(copy.deepcopy(model), experts, top_k=3)(ids).logits
    torch.testing.assert_close(big, exact, atol=0, rtol=0)


def test_strategies_agree_on_whole_model_with_grad() -> None:
    """All strategies give the same logits and the same gradients w.r.t. the inputs (autograd path)."""
    model = tiny_llama()
    routed = build_router(model, random_experts(model, 6, seed=5), top_k=2)
    emb = model.get_input_embeddings()(ids_for(4)).detach()
    results = []
    for strategy in STRATEGIES:
        routed.configure(strategy=strategy)
        x = emb.clone().requires_grad_(True)
        logits = routed(inputs_embeds=x).logits
        logits.square().mean().backward()
        results.append((logits.detach(), x.grad))
    for logits, grad in results[1:]:
        torch.testing.assert_close(logits, results[0][0], atol=1e-5, rtol=0)
        torch.testing.assert_close(grad, results[0][1], atol=1e-6, rtol=1e-4)


def test_cost_rule() -> None:
    common = {
        "top_k": 3,
        "max_rank": 8,
        "in_features": 512,
        "out_features": 512,
        "uniform_rank": True,
    }
    # few experts: dense rank space is cheapest at any length
    assert choose_strategy(tokens=1024, experts=4, total_rank=32, device_type="cpu", **common) == "dense"
    assert choose_strategy(tokens=1, experts=4, total_rank=32, device_type="cpu", **common) == "dense"
    # many experts, long input on CPU: one segment per expert
    assert (
        choose_strategy(tokens=1024, experts=256, total_rank=2048, device_type="cpu", **common) == "grouped"
    )
    # many experts, one decoding step: gather the chosen factors
    assert choose_strategy(tokens=2, experts=256, total_rank=2048, device_type="cpu", **common) == "gather"
    # never the data-dependent path under torch.compile
    assert (
        choose_strategy(
            tokens=1024,
            experts=256,
            total_rank=2048,
            device_type="cpu",
            compiling=True,
            **common,
        )
        != "grouped"
    )
    # mixed ranks cannot gather
    mixed = dict(common, uniform_rank=False)
    assert choose_strategy(tokens=2, experts=256, total_rank=2048, device_type="cpu", **mixed) != "gather"


# -- generation, dtypes, compile ----------------------------------------------------------------------


@pytest.mark.parametrize("make", [tiny_llama, tiny_phi3], ids=["llama", "phi3"])
def test_generate_with_kv_cache_equals_without(make: object) -> None:
    model = make()  # type: ignore[operator]
    routed = build_router(model, random_experts(model, 16, seed=6, scale=0.3), top_k=3)
    ids = ids_for(5, (2, 7))
    kw = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        cached = routed.generate(ids, use_cache=True, **kw)
        uncached = routed.generate(ids, use_cache=False, **kw)
        assert torch.equal(cached, uncached)
        # step by step with the cache: each step's logits equal the full forward's at that position
        full = routed(cached).logits
        out = routed(cached[:, :7], use_cache=True)
        past, steps = out.past_key_values, [out.logits[:, -1]]
        for i in range(7, cached.shape[1] - 1):
            out = routed(cached[:, i : i + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            steps.append(out.logits[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 6:-1], atol=1e-4, rtol=1e-4)
    # decoding steps (2 tokens) took a cheaper path than the prefill
    assert {layer._last_strategy for layer in routed.layers.values()} <= {
        "dense",
        "gather",
    }


def test_bf16_model_and_bf16_factors() -> None:
    """bf16 runs on every path; with top_k = E (no discontinuous top-k flips from rounding) it stays
    close to the fp32 result."""
    model32 = tiny_llama()
    experts = random_experts(model32, 6, seed=7, scale=0.1)
    ids = ids_for(6)
    with torch.no_grad():
        ref = build_router(copy.deepcopy(model32), experts, top_k=6)(ids).logits
        model16 = copy.deepcopy(model32).to(torch.bfloat16)
        routed = build_router(model16, experts, top_k=6)  # factors fp32 by default (PEFT's autocast)
        layer = next(iter(routed.layers.values()))
        assert layer.lora_A.dtype == torch.float32 and layer.prototypes.dtype == torch.float32
        out = routed(ids).logits
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.05)
        routed.configure(top_k=2)
        by_strategy = []
        for strategy in STRATEGIES:
            routed.configure(strategy=strategy)
            by_strategy.append(routed(ids).logits.float())
        for other in by_strategy[1:]:
            torch.testing.assert_close(other, by_strategy[0], atol=0.05, rtol=0.02)
        routed.unpatch()
        half = build_router(model16, experts, top_k=6, dtype=torch.bfloat16)
        assert next(iter(half.layers.values())).lora_A.dtype == torch.bfloat16
        torch.testing.assert_close(half(ids).logits.float(), ref, atol=0.1, rtol=0.05)
        assert half.generate(ids[:, :4], max_new_tokens=3, do_sample=False, pad_token_id=0).shape == (2, 7)


def test_compiles_without_graph_breaks() -> None:
    """torch.compile(fullgraph=True) traces the routed model (the auto rule avoids data-dependent code)."""
    model = tiny_llama()
    routed = build_router(model, random_experts(model, 6, seed=8), top_k=2)
    ids = ids_for(7)
    with torch.no_grad():
        eager = routed(ids).logits
        torch._dynamo.reset()
        compiled = torch.compile(routed.model, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(ids).logits, eager, atol=1e-5, rtol=0)
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiles_with_inductor() -> None:
    model = tiny_llama()
    routed = build_router(model, random_experts(model, 6, seed=8), top_k=2)
    ids = ids_for(7)
    with torch.no_grad():
        eager = routed(ids).logits
        torch._dynamo.reset()
        compiled = torch.compile(routed.model)
        torch.testing.assert_close(compiled(ids).logits, eager, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(compiled(ids).logits, eager, atol=1e-4, rtol=1e-4)
    torch._dynamo.reset()


# -- tracing -------------------------------------------------------------------------------------------


def test_trace_records_the_expected_experts(tmp_path: Path) -> None:
    """One-hot prototypes on a one-Linear model: each token's experts and weights are known."""
    model = nn.Sequential(nn.Linear(8, 8))
    experts = [ExpertTensors(f"e{i}", 1.0, {"0": (torch.randn(2, 8), torch.randn(8, 2))}) for i in range(4)]
    protos = {"0": torch.eye(8)[:4]}  # expert e scores |h_e|
    routed = build_router(model, experts, prototypes=protos, top_k=2, temperature=0.5)
    h = torch.zeros(3, 8)
    h[0, 0], h[0, 1] = 3.0, 2.0  # -> e0, e1
    h[1, 3], h[1, 2] = -4.0, 1.0  # -> e3, e2 (|.|)
    h[2, 1], h[2, 2], h[2, 5] = 1.0, 2.0, 9.0  # dim 5 has no expert -> e2, e1
    layer = routed.layers["0"]
    assert layer._trace is None
    with torch.no_grad(), routed.explain() as trace:
        routed(h.unsqueeze(0))
        routed(h[:1])
    assert layer._trace is None  # off again: zero cost outside explain()
    experts_seen, weights = trace.tokens("0")
    assert experts_seen.tolist() == [[0, 1], [3, 2], [2, 1], [0, 1]]
    expected_w0 = torch.softmax(torch.tensor([3.0, 2.0]) / 0.5, 0)
    torch.testing.assert_close(weights[0], expected_w0)
    torch.testing.assert_close(weights.sum(1), torch.ones(4))
    assert trace.counts("0").tolist() == [2, 3, 2, 1]
    assert [e for e, _ in trace.summary(top=2)["0"]] == [
        "e0",
        "e3",
    ]  # by total weight, not count
    assert "0" in trace.format()
    for by in ("module", "layer", "token"):
        path = trace.plot(tmp_path / f"{by}.png", by=by)  # type: ignore[arg-type]
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with (
        pytest.raises(RouterError, match="already active"),
        routed.explain(),
        routed.explain(),
    ):
        pass


def test_trace_on_a_transformer_counts_every_token() -> None:
    model = tiny_llama()
    experts = random_experts(model, 5, subsets=True, seed=9)
    routed = build_router(model, experts, top_k=2)
    ids = ids_for(8, (2, 6))
    with torch.no_grad(), routed.explain() as trace:
        routed.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    counts = trace.counts()
    assert isinstance(counts, dict) and set(counts) == set(routed.layers)
    # prefill 12 tokens + 2 decoding steps of 2 tokens, 2 experts each
    for name, c in counts.items():
        assert int(c.sum()) == (12 + 2 * 2) * 2, name
        never = set(range(5)) - set(routed.layers[name].expert_ids.tolist())
        assert all(int(c[e]) == 0 for e in never)  # experts without the module are never chosen
    rows, mat = trace.usage(by="layer")
    assert rows == ["layer 0", "layer 1"] and torch.allclose(mat.sum(1), torch.ones(2))


# -- memory, parameters, unpatch ---------------------------------------------------------------------


def test_never_materialises_tokens_x_experts_x_out() -> None:
    model = tiny_llama()
    E = 64
    routed = build_router(model, random_experts(model, E, seed=10), top_k=3)
    ids = ids_for(9, (2, 16))
    t, smallest_out = 32, 64
    forbidden = t * E * smallest_out
    for strategy in STRATEGIES:
        routed.configure(strategy=strategy)
        with torch.no_grad(), recording_shapes() as rec:
            routed(ids)
        # the largest new tensors are rank-space: t x E*r (dense), t x k*r x in (gather), t*k x in
        assert rec.largest < forbidden // 2, (strategy, rec.largest)


def test_base_parameters_untouched_and_unpatch_restores_the_model() -> None:
    model = tiny_llama()
    ids = ids_for(10)
    with torch.no_grad():
        before = model(ids).logits
    params = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    modules = dict(model.named_modules())
    routed = build_router(model, random_experts(model, 4, seed=11), top_k=2)
    assert isinstance(model.model.layers[0].self_attn.q_proj, RoutedLinear)
    assert model.model.layers[0].self_attn.q_proj.base_layer is modules["model.layers.0.self_attn.q_proj"]
    with torch.no_grad():
        routed_logits = routed(ids).logits
    assert not torch.allclose(routed_logits, before)
    assert "RoutedModel(LlamaForCausalLM, 4 experts, 14 routed modules" in repr(routed)
    assert routed.config is model.config  # attribute pass-through
    plain = routed.unpatch()
    assert plain is model
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(modules[n] is m for n, m in model.named_modules())
    for n, p in model.named_parameters():
        assert p.data_ptr() == params[n][0] and torch.equal(p, params[n][1]), n
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    with pytest.raises(RouterError, match="unpatched"):
        routed(ids)


# -- build: cost and errors -----------------------------------------------------------------------------


def test_build_walks_the_module_tree_once_and_is_fast(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = tiny_llama()
    experts = random_experts(model, 256, ranks=(4, 8), seed=12)
    walks = []
    original = type(model).named_modules

    def counting(self: nn.Module, *a: object, **kw: object):  # type: ignore[no-untyped-def]
        if self is model:
            walks.append(1)
        return original(self, *a, **kw)

    monkeypatch.setattr(type(model), "named_modules", counting)
    t0 = time.perf_counter()
    routed = build_router(model, experts, top_k=3)
    elapsed = time.perf_counter() - t0
    monkeypatch.undo()
    assert len(walks) == 1
    assert elapsed < 10.0, elapsed  # ~0.2 s on an idle 2-core CPU; generous for a loaded machine
    assert len(routed.layers) == 14 and routed.layers["model.layers.1.mlp.down_proj"].num_experts == 256


def test_peft_prototypes_are_batched_like_peft_per_module() -> None:
    """peft_prototype_fn gives the same vector whether a module is computed alone or in a batch."""
    model = tiny_llama()
    experts = random_experts(model, 3, seed=13)
    routed = build_router(model, experts, prototype_fn=peft_prototype_fn(seed=4))
    alone = build_router(tiny_llama(), experts[1:2], prototype_fn=peft_prototype_fn(seed=4))
    name = "model.layers.1.mlp.up_proj"
    assert torch.equal(routed.layers[name].prototypes[1], alone.layers[name].prototypes[0])


def test_given_prototypes_are_used_and_checked() -> None:
    model = tiny_llama()
    experts = random_experts(model, 3, seed=14)
    name = "model.layers.0.self_attn.q_proj"
    p = torch.nn.functional.normalize(torch.randn(3, 64), dim=1)
    routed = build_router(copy.deepcopy(model), experts, prototypes={name: p})
    assert torch.equal(routed.layers[name].prototypes, p)
    with pytest.raises(RouterError, match="shape"):
        build_router(copy.deepcopy(model), experts, prototypes={name: p[:2]})
    with pytest.raises(RouterError, match="no expert targets"):
        build_router(copy.deepcopy(model), experts, prototypes={"model.nope": p})


def test_build_errors_leave_the_model_untouched() -> None:
    model = tiny_llama()
    good = random_experts(model, 2, seed=15)
    q = "model.layers.0.self_attn.q_proj"

    def expert(name: str, modules: dict[str, tuple[Tensor, Tensor]]) -> ExpertTensors:
        return ExpertTensors(name, 1.0, modules)

    cases: list[tuple[dict[str, object], str]] = [
        ({"experts": []}, "at least one expert"),
        ({"experts": [good[0], good[0]]}, "unique"),
        ({"experts": good, "top_k": 0}, "top_k"),
        ({"experts": good, "temperature": 0.0}, "temperature"),
        ({"experts": good, "mixing": "sum"}, "mixing"),
        ({"experts": good, "strategy": "magic"}, "strategy"),
        (
            {
                "experts": [
                    *good,
                    expert("x", {"model.missing": (torch.zeros(2, 64), torch.zeros(64, 2))}),
                ]
            },
            "no module",
        ),
        (
            {
                "experts": [
                    *good,
                    expert(
                        "x",
                        {
                            "model.embed_tokens": (
                                torch.zeros(2, 64),
                                torch.zeros(64, 2),
                            )
                        },
                    ),
                ]
            },
            "only nn.Linear",
        ),
        (
            {
                "experts": [
                    *good,
                    expert("x", {q: (torch.zeros(2, 65), torch.zeros(64, 2))}),
                ]
            },
            "wrong base model",
        ),
        (
            {
                "experts": [
                    *good,
                    expert("x", {q: (torch.zeros(2, 64), torch.zeros(64, 3))}),
                ]
            },
            "expected A",
        ),
        ({"experts": [*good, expert("x", {})]}, "no modules"),
        (
            {
                "experts": good,
                "general": [expert("g", {q: (torch.zeros(4, 64), torch.zeros(64, 4))})],
            },
            "GenKnowSub",
        ),
        (
            {"experts": good, "general": random_experts(model, 1, ranks=(2,))},
            "GenKnowSub.*rank",
        ),
    ]
    for kwargs, match in cases:
        with pytest.raises(RouterError, match=match):
            build_router(model, **kwargs)  # type: ignore[arg-type]
        assert not any(isinstance(m, RoutedLinear) for m in model.modules()), match
    routed = build_router(model, good)
    with pytest.raises(RouterError, match="already routed"):
        build_router(model, good)
    with pytest.raises(RouterError):
        routed.configure(top_k=0)
    routed.configure(top_k=1, temperature=2.0)
    assert all(layer.top_k == 1 and layer.temperature == 2.0 for layer in routed.layers.values())


def test_factor_dtype_narrower_than_model_and_half_after_build() -> None:
    """bf16 experts on an fp32 model; and a routed model cast with .half() afterwards still routes."""
    model = tiny_llama()
    experts = random_experts(model, 5, seed=16, scale=0.1)
    ids = ids_for(11)
    with torch.no_grad():
        ref = build_router(copy.deepcopy(model), experts, top_k=5)(ids).logits
        for strategy in STRATEGIES:
            routed = build_router(
                copy.deepcopy(model),
                experts,
                top_k=5,
                dtype=torch.bfloat16,
                strategy=strategy,
            )
            out = routed(ids).logits
            assert out.dtype == torch.float32
            torch.testing.assert_close(out, ref, atol=0.05, rtol=0.05)
        routed = build_router(copy.deepcopy(model), experts, top_k=5)
        routed.model.to(torch.bfloat16)  # buffers follow the model, prototypes are re-widened to score
        out = routed(ids).logits
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)
