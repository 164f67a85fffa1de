"""``libstore route``: build a routed model from a catalog query and generate from a prompt."""

from __future__ import annotations

from typing import Any

import click

from libstore.cli.app import State
from libstore.cli.options import allow_routing_base_mismatch, option_kwargs
from libstore.cli.output import echo_json, json_option
from libstore.types import MIXINGS, PROTOTYPE_METHODS, ROUTER_NAMES, PrototypeMethod, RouterName

_top_n = click.option(
    "--top-n", default=1, show_default=True, type=click.IntRange(min=1), help="arrow: prototypes per module."
)
_method = click.option(
    "--method",
    type=click.Choice(PROTOTYPE_METHODS),
    default="exact",
    show_default=True,
    help="Prototype method.",
)
_seed = click.option(
    "--seed",
    default=0,
    show_default=True,
    type=int,
    help="--method peft: seed of the power iteration's start vector (PEFT's rng_seed; its tests use 42).",
)


@click.command()
@click.option("--base", help="Base model folder or Hub id (default: where the base was registered from).")
@click.option("--experts", default="kind=task", show_default=True, help="Query selecting the experts.")
@click.option("--general", help="GenKnowSub on the fly: query selecting general experts to subtract.")
@click.option("--prompt", required=True, help="Text to continue.")
@click.option(
    "--router",
    type=click.Choice(ROUTER_NAMES),
    default="arrow",
    show_default=True,
    help="How tokens choose experts (arrow: top singular vector; spectr: whole spectrum of ΔW).",
)
@_top_n
@click.option(
    "--per-sequence",
    is_flag=True,
    help="Route each sequence once, from the prompt's tokens, and keep those experts while generating.",
)
@click.option("--top-k", default=3, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True))
@_method
@_seed
@click.option(
    "--joint-prototypes",
    is_flag=True,
    help="mttl experts with tie_params: one prototype for the tied modules, as mttl's Arrow (warns "
    "where that changes the routing).",
)
@click.option("--max-new-tokens", default=20, show_default=True, type=click.IntRange(min=1))
@click.option("--device", help="cpu, cuda, cuda:1 ... (default: cpu).")
@click.option(
    "--explain",
    "explain_png",
    type=click.Path(dir_okay=False),
    help="Write a PNG of which experts each layer chose, and print a summary.",
)
@click.pass_obj
def route(
    state: State,
    base: str | None,
    experts: str,
    general: str | None,
    prompt: str,
    router: RouterName,
    top_n: int,
    per_sequence: bool,
    top_k: int,
    temperature: float,
    method: PrototypeMethod,
    seed: int,
    joint_prototypes: bool,
    max_new_tokens: int,
    device: str | None,
    explain_png: str | None,
) -> None:
    """Route PROMPT through the experts selected by --experts and print the continuation.

    \b
    Example:
      libstore route --base ./phi3 --experts "kind=task" --prompt "Question: ..." --top-k 3 \\
          --explain routing.png
      libstore route --base ./phi3 --router spectr --per-sequence --prompt "Question: ..."
    """
    import torch
    from transformers import AutoTokenizer

    lib = state.lib
    model = lib.routed_model(
        base,
        experts=experts,
        top_k=top_k,
        temperature=temperature,
        general=general,
        method=method,
        device=device,
        router=router,
        top_n=top_n,
        granularity="sequence" if per_sequence else "token",
        seed=seed,
        joint_prototypes=joint_prototypes,
    )
    source = base or lib.base(lib.get(model.experts[0]).base_model).source
    tokenizer = AutoTokenizer.from_pretrained(source)
    batch = tokenizer(prompt, return_tensors="pt").to(device or "cpu")
    with torch.inference_mode(), model.explain() as trace:
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    click.echo(tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True))
    if explain_png:
        trace.plot(explain_png)
        click.echo(trace.format(), err=True)
        click.echo(f"Routing plot written to {explain_png}", err=True)


@click.command("export-routed")
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("--experts", default="kind=task", show_default=True, help="Query selecting the experts.")
@click.option("--prompt", required=True, help="The prompt whose experts are chosen (once, for it).")
@click.option("--base", help="Base model folder or Hub id (default: where the base was registered from).")
@click.option("--router", type=click.Choice(ROUTER_NAMES), default="arrow", show_default=True)
@click.option("--general", help="GenKnowSub on the fly: query selecting general experts to subtract.")
@click.option("--top-k", default=3, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True))
@_top_n
@_method
@click.option(
    "--mixing",
    type=click.Choice(MIXINGS),
    default="output",
    show_default=True,
    help="output: mix the experts' outputs (PEFT); parameter: mix their A and B (mttl).",
)
@_seed
@click.option("--overwrite", is_flag=True, help="Replace DEST if it exists.")
@allow_routing_base_mismatch
@json_option
@click.pass_obj
def export_routed(
    state: State, /, dest: str, prompt: str, base: str | None, as_json: bool, **kw: Any
) -> None:
    """Write the experts PROMPT is routed to (per sequence) as one exact PEFT adapter at DEST.

    Each module's mixture of its top-k experts becomes one LoRA (A's stacked, B's weighted), so any
    engine that loads PEFT adapters (vLLM, LoRAX, TGI) serves exactly the routed model for that
    prompt: PeftModel.from_pretrained(base, DEST).

    \b
    Example:
      libstore export-routed ./served/q17 --experts kind=task --prompt "Question: ..." --top-k 2
    """
    from libstore.ops.export_routed import ExportRoutedOptions

    report = state.lib.export_routed(dest, prompt=prompt, base=base, **option_kwargs(ExportRoutedOptions, kw))
    if as_json:
        echo_json(report)
        return
    click.echo(
        f"Wrote {report.path}: rank {report.rank}, {len(report.modules)} modules, "
        f"experts {', '.join(report.experts)}"
    )


COMMANDS = [route, export_routed]
