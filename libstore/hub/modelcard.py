"""The generated ``README.md`` of a library repo: what is in it and how to load it.

Deterministic (no dates) so that an unchanged library renders the same bytes and a push with
nothing to do creates no commit. Names in the card come from a validated manifest, and free text
(tasks, tags, sources) is escaped for Markdown tables.
"""

from __future__ import annotations

import re
from pathlib import Path

from libstore.hub.manifest import MANIFEST_FILE, Manifest, expert_folder

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
MAX_ROWS = 1000


def _cell(text: object) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").replace("`", "'")


def _yaml_str(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _hub_base_ids(manifest: Manifest) -> list[str]:
    """Base-model sources that look like Hub ids (local paths would fail the Hub's metadata check)."""
    out = []
    for b in manifest.base_models.values():
        if _HUB_ID.fullmatch(b.source) and not Path(b.source).exists():
            out.append(b.source)
    return sorted(set(out))


def render(manifest: Manifest, repo_id: str) -> str:
    """The model card for ``repo_id`` holding ``manifest``."""
    experts = sorted(manifest.experts.values(), key=lambda e: e.name)
    kinds: dict[str, int] = {}
    for e in experts:
        kinds[e.kind] = kinds.get(e.kind, 0) + 1
    lines = ["---", "library_name: peft", "tags:", "- libstore", "- lora", "- peft"]
    bases = _hub_base_ids(manifest)
    if bases:
        lines.append("base_model:")
        lines += [f"- {_yaml_str(b)}" for b in bases]
    lines += ["---", "", f"# {_cell(repo_id)}", ""]
    summary = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "no experts yet"
    lines += [
        (
            f"A library of LoRA experts managed with libstore: {len(experts)} experts ({summary}). "
            f"`{MANIFEST_FILE}` describes every expert (kind, tasks, tags, rank, modules, file hashes, "
            f"derivations, clusterings and cached Arrow prototypes); each expert is a PEFT folder "
            f"under `experts/<name>/`."
        ),
        "",
    ]
    if manifest.base_models:
        lines += ["## Base models", "", "| name | source | architecture | fingerprint |", "|---|---|---|---|"]
        for b in sorted(manifest.base_models.values(), key=lambda b: b.name):
            src = b.source + (f"@{b.revision}" if b.revision else "")
            lines.append(
                f"| {_cell(b.name)} | {_cell(src)} | {_cell(b.architecture)} | {b.fingerprint[:12]} |"
            )
        lines.append("")
    lines += [
        "## Experts",
        "",
        "| name | kind | base | rank | tasks | tags | derived by | sha256 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in experts[:MAX_ROWS]:
        derived = e.lineage.method if e.lineage else ""
        lines.append(
            f"| {e.name} | {e.kind} | {e.base_model} | {e.rank} | {_cell(', '.join(e.tasks))} | "
            f"{_cell(', '.join(e.tags))} | {_cell(derived)} | {e.sha256[:12]} |"
        )
    if len(experts) > MAX_ROWS:
        lines.append(f"| ... | {len(experts) - MAX_ROWS} more, see {MANIFEST_FILE} | | | | | | |")
    lines.append("")
    if manifest.clusterings:
        lines += ["## Clusterings", ""]
        for c in sorted(manifest.clusterings.values(), key=lambda c: c.name):
            lines.append(
                f"- `{c.name}`: {_cell(c.method)}, k={c.k}, {_cell(c.metric)} similarity, "
                f"{len(c.inputs)} experts"
            )
        lines.append("")
    example = experts[0].name if experts else "<name>"
    base_src = next(iter(sorted(manifest.base_models.values(), key=lambda b: b.name)), None)
    base_id = base_src.source if base_src else "<base model>"
    lines += [
        "## Load one expert with PEFT",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f"base = AutoModelForCausalLM.from_pretrained({base_id!r})",
        f"model = PeftModel.from_pretrained(base, {repo_id!r}, subfolder={expert_folder(example)!r})"
        if experts
        else f"model = PeftModel.from_pretrained(base, {repo_id!r}, subfolder='experts/<name>')",
        "```",
        "",
        "## Use the whole library with libstore",
        "",
        "```bash",
        "libstore init ./lib",
        f"libstore remote add origin {repo_id}",
        "libstore pull origin                      # experts, tags, tasks, derivations, prototypes",
        "libstore ls 'kind=task'",
        "```",
        "",
        (
            "Then build an Arrow-routed model over a catalog query with libstore's router "
            "(for example all task experts, top-k 3), on CPU or GPU."
        ),
        "",
    ]
    return "\n".join(lines)
