"""``libstore route``: build a routed model from a catalog query and generate from a prompt."""

from __future__ import annotations

import click

from libstore.cli.app import State
from libstore.types import PROTOTYPE_METHODS, PrototypeMethod


@click.command()
@click.option("--base", help="Base model folder or Hub id (default: where the base was registered from).")
@click.option("--experts", default="kind=task", show_default=True, help="Query selecting the experts.")
@click.option("--general", help="GenKnowSub on the fly: query selecting general experts to subtract.")
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--top-k", default=3, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option(
    "--method",
    type=click.Choice(PROTOTYPE_METHODS),
    default="exact",
    show_default=True,
    help="Prototype method.",
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
    top_k: int,
    temperature: float,
    method: PrototypeMethod,
    max_new_tokens: int,
    device: str | None,
    explain_png: str | None,
) -> None:
    """Route PROMPT through the experts selected by --experts and print the continuation.

    \b
    Example:
      libstore route --base ./phi3 --experts "kind=task" --prompt "Question: ..." --top-k 3 \\
          --explain routing.png
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


COMMANDS = [route]
