"""``Library``'s routed-adapter export and evaluation methods (routers on held-out data, recorded)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from libstore.api.base import Facade, PathLike
from libstore.types import EvalRecord, ExpertQuery, Mixing, PrototypeMethod, RouterName, RouterSpec

if TYPE_CHECKING:
    from libstore.ops.evaluate import Comparison, Evaluation
    from libstore.ops.export_routed import RoutedExport


class EvalMethods(Facade):
    def export_routed(
        self,
        dest: PathLike,
        *,
        prompt: str,
        experts: str | ExpertQuery = "kind=task",
        base: Any = None,
        tokenizer: Any = None,
        router: RouterName = "arrow",
        top_k: int = 3,
        temperature: float = 1.0,
        general: str | ExpertQuery | None = None,
        top_n: int = 1,
        method: PrototypeMethod = "exact",
        mixing: Mixing = "output",
        overwrite: bool = False,
        allow_base_mismatch: bool = False,
        seed: int = 0,
    ) -> RoutedExport:
        """Route ``prompt`` once and write that mixture as one exact PEFT adapter at ``dest``
        (see ``libstore.ops.export_routed``): ``PeftModel.from_pretrained(base, dest)`` serves it."""
        from libstore.ops.export_routed import ExportRoutedOptions, export_routed

        options = ExportRoutedOptions(
            experts=experts,
            router=router,
            top_k=top_k,
            temperature=temperature,
            general=general,
            top_n=top_n,
            method=method,
            mixing=mixing,
            overwrite=overwrite,
            allow_base_mismatch=allow_base_mismatch,
            seed=seed,
        )
        return export_routed(self._ctx, dest, prompt=prompt, options=options, base=base, tokenizer=tokenizer)

    # --- evaluation ------------------------------------------------------------------------

    def evaluate(
        self,
        data: PathLike,
        *,
        experts: str | ExpertQuery = "kind=task",
        routers: Iterable[str | RouterSpec] = ("arrow", "spectr", "uniform"),
        base: Any = None,
        tokenizer: Any = None,
        top_k: int = 3,
        temperature: float = 1.0,
        batch_size: int = 32,
        name: str | None = None,
        record: bool = True,
        device: str | None = None,
        allow_base_mismatch: bool = False,
    ) -> EvalRecord:
        """Held-out loss, exact match and routing accuracy of each router on a JSONL file of
        ``{"input", "target", "task"}`` examples, recorded in the catalog (``libstore.ops.evaluate``)."""
        from libstore.ops.evaluate import EvalOptions, evaluate

        options = EvalOptions(
            experts=experts,
            routers=tuple(routers),
            top_k=top_k,
            temperature=temperature,
            batch_size=batch_size,
            name=name,
            record=record,
            device=device,
            allow_base_mismatch=allow_base_mismatch,
        )
        return evaluate(self._ctx, data, options=options, base=base, tokenizer=tokenizer)

    def evals(self) -> list[Evaluation]:
        """Every recorded evaluation (oldest first), each with ``.stale`` and ``.stale_reasons``."""
        from libstore.ops.evaluate import evaluations

        return evaluations(self._ctx)

    def evaluation(self, name: str) -> Evaluation:
        from libstore.ops.evaluate import evaluation

        return evaluation(self._ctx, name)

    def compare_evals(self, names: Iterable[str], *, metric: str = "exact_match") -> Comparison:
        from libstore.ops.evaluate import compare

        return compare(self._ctx, list(names), metric=metric)

    def remove_eval(self, name: str) -> None:
        from libstore.ops.evaluate import remove

        remove(self._ctx, name)

    def plot_eval(self, name: str, path: PathLike, *, metric: str = "exact_match") -> Path:
        """A heatmap of one metric, routers x tasks (matplotlib)."""
        from libstore.ops.evaluate import evaluation, plot

        return plot(evaluation(self._ctx, name).record, path, metric=metric)
