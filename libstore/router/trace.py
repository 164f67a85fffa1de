"""Routing traces: which experts each token chose, per routed module, and how to look at them.

A :class:`RoutingTrace` is what :meth:`libstore.router.model.RoutedModel.explain` yields. Every call of
a routed layer inside the block appends one :class:`RouteRecord` (tokens x top_k expert indices into
``trace.experts`` and their softmax weights, on the CPU). Tokens are in the order the layer saw them:
a forward over a (batch, seq) input gives batch * seq rows, batch-major; each ``generate`` step adds
its own call.

Reading it::

    trace.counts()                  # {module: (E,) long} how often each expert was in a token's top-k
    trace.usage(by="layer")         # (row names, (rows, E) float) share of routing weight per row
    trace.tokens(module)            # (experts (T, k), weights (T, k)) over all calls of one module
    trace.summary(top=3)            # {module: [(expert, share), ...]} the most used experts
    print(trace.format())           # the same as a text table
    trace.plot("routing.png")       # heatmap (matplotlib, Agg canvas; pyplot is not touched)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from libstore.errors import RouterError

__all__ = ["RouteRecord", "RoutingTrace", "layer_index"]

_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_index(module: str) -> int | None:
    """The transformer block number in a module name (``model.layers.3.mlp.up_proj`` -> 3), if any."""
    m = _LAYER.search(module)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class RouteRecord:
    """One call of one routed module.

    Attributes:
        module: the module's name in the base model.
        call: index of this call among the module's calls in this trace (0, 1, ...).
        experts: (tokens, k) long, indices into ``RoutingTrace.experts``, best first.
        weights: (tokens, k) float32 softmax coefficients, rows sum to 1.
    """

    module: str
    call: int
    experts: Tensor
    weights: Tensor


class RoutingTrace:
    """Per layer, module and token: the chosen experts and their weights."""

    def __init__(self, experts: Sequence[str], modules: Sequence[str]) -> None:
        self.experts: tuple[str, ...] = tuple(experts)
        self.modules: tuple[str, ...] = tuple(modules)
        self.records: list[RouteRecord] = []
        self._calls: dict[str, int] = {}

    def record(self, module: str, experts: Tensor, weights: Tensor) -> None:
        """Called by a routed layer while tracing (copies to the CPU)."""
        call = self._calls.get(module, 0)
        self._calls[module] = call + 1
        self.records.append(
            RouteRecord(
                module,
                call,
                experts.detach().to("cpu", torch.long),
                weights.detach().to("cpu", torch.float32),
            )
        )

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        return (
            f"RoutingTrace({len(self.records)} calls, {len(self.experts)} experts, "
            f"{len(self.modules)} modules)"
        )

    # -- queries -----------------------------------------------------------------------------------

    def tokens(self, module: str) -> tuple[Tensor, Tensor]:
        """All tokens one module routed, over all its calls in order: experts (T, k), weights (T, k)."""
        recs = [r for r in self.records if r.module == module]
        if not recs:
            known = module in self.modules
            raise RouterError(
                f"no routed calls recorded for {module!r}"
                + ("" if known else f"; routed modules are e.g. {list(self.modules[:3])}")
            )
        return torch.cat([r.experts for r in recs]), torch.cat([r.weights for r in recs])

    def counts(self, module: str | None = None) -> dict[str, Tensor] | Tensor:
        """How often each expert was in a token's top-k: (E,) long for one module, else a dict."""
        E = len(self.experts)
        if module is not None:
            idx, _ = self.tokens(module)
            return torch.bincount(idx.reshape(-1), minlength=E)
        out: dict[str, Tensor] = {}
        for r in self.records:
            c = torch.bincount(r.experts.reshape(-1), minlength=E)
            out[r.module] = out[r.module] + c if r.module in out else c
        return out

    def weights(self, module: str | None = None) -> dict[str, Tensor] | Tensor:
        """Total routing weight each expert received: (E,) float for one module, else a dict."""
        E = len(self.experts)
        if module is not None:
            idx, w = self.tokens(module)
            return torch.zeros(E).index_add_(0, idx.reshape(-1), w.reshape(-1))
        out: dict[str, Tensor] = {}
        for r in self.records:
            acc = out.setdefault(r.module, torch.zeros(E))
            acc.index_add_(0, r.experts.reshape(-1), r.weights.reshape(-1))
        return out

    def usage(self, by: Literal["module", "layer"] = "module") -> tuple[list[str], Tensor]:
        """Share of routing weight per expert, one row per module (or per block): rows sum to 1."""
        per_module = self.weights()
        assert isinstance(per_module, dict)
        rows: dict[str, Tensor] = {}
        for m in [m for m in self.modules if m in per_module] + [
            m for m in per_module if m not in self.modules
        ]:
            key = m if by == "module" else _layer_label(m)
            rows[key] = rows[key] + per_module[m] if key in rows else per_module[m].clone()
        if not rows:
            raise RouterError("the trace is empty: run the model inside `with routed.explain() as trace:`")
        names = list(rows)
        mat = torch.stack([rows[n] for n in names])
        return names, mat / mat.sum(1, keepdim=True).clamp_min(1e-12)

    def summary(self, top: int = 3) -> dict[str, list[tuple[str, float]]]:
        """Per module, the ``top`` experts by share of routing weight: [(expert, share), ...]."""
        names, mat = self.usage("module")
        out: dict[str, list[tuple[str, float]]] = {}
        for name, row in zip(names, mat, strict=True):
            k = min(top, row.numel())
            vals, idx = torch.topk(row, k)
            out[name] = [
                (self.experts[i], round(float(v), 4))
                for v, i in zip(vals, idx.tolist(), strict=True)
                if v > 0
            ]
        return out

    def format(self, top: int = 3) -> str:
        """:meth:`summary` as a text table."""
        lines = [f"{'module':<48} top experts (share of routing weight)"]
        for module, best in self.summary(top).items():
            lines.append(f"{module:<48} " + ", ".join(f"{e} {s:.2f}" for e, s in best))
        return "\n".join(lines)

    # -- plot --------------------------------------------------------------------------------------

    def plot(
        self,
        path: str | Path,
        *,
        by: Literal["module", "layer", "token"] = "module",
        module: str | None = None,
        max_tokens: int = 256,
    ) -> Path:
        """Save a heatmap of expert usage and return its path.

        ``by="module"`` / ``"layer"``: rows are routed modules (or blocks), columns experts, colour the
        share of routing weight. ``by="token"``: rows are the first ``max_tokens`` tokens of ``module``
        (default: the first routed module), colour each expert's weight for that token.
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        if by == "token":
            module = module or next(
                (m for m in self.modules if any(r.module == m for r in self.records)),
                None,
            )
            if module is None:
                raise RouterError(
                    "the trace is empty: run the model inside `with routed.explain() as trace:`"
                )
            idx, w = self.tokens(module)
            idx, w = idx[:max_tokens], w[:max_tokens]
            mat = torch.zeros(idx.shape[0], len(self.experts)).scatter_(1, idx, w)
            rows = [str(i) for i in range(idx.shape[0])]
            title, ylabel = f"routing weights per token: {module}", "token"
        elif by in ("module", "layer"):
            rows, mat = self.usage(by)
            title, ylabel = f"share of routing weight per {by}", by
        else:
            raise RouterError(f"unknown plot kind {by!r}; use 'module', 'layer' or 'token'")
        n_rows, n_cols = mat.shape
        fig = Figure(
            figsize=(
                min(max(6.0, 4 + 0.25 * n_cols), 40),
                min(max(3.0, 1.5 + 0.22 * n_rows), 60),
            )
        )
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        im = ax.imshow(
            mat.numpy(),
            aspect="auto",
            interpolation="nearest",
            cmap="viridis",
            vmin=0.0,
        )
        fig.colorbar(im, ax=ax)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("expert")
        ax.set_ylabel(ylabel)
        if n_cols <= 64:
            ax.set_xticks(range(n_cols), self.experts, rotation=90, fontsize=7)
        if n_rows <= 80 and by != "token":
            ax.set_yticks(range(n_rows), rows, fontsize=7)
        fig.tight_layout()
        out = Path(path)
        fig.savefig(out, dpi=100)
        return out


def _layer_label(module: str) -> str:
    i = layer_index(module)
    return f"layer {i}" if i is not None else module
