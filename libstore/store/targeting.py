"""Which modules a PEFT LoRA config targets — PEFT's answer, computed in bounded time. No torch.

PEFT (``peft.tuners.tuners_utils.check_target_module_exists``, 0.21) matches a string
``target_modules`` or ``exclude_modules`` with ``re.fullmatch(pattern, key)`` and reads a layer index
with ``re.match(rf"(?:^|.*?\\.){layers_pattern}\\.(?P<idx>\\d+)\\.", key)``. Those patterns come
from configs libstore did not write, so one may be invalid (``re.error``) or backtrack for hours
(``(a+)+$`` on a long name). Every regex match here therefore runs in Python's ``re`` — PEFT's own
engine — inside a short-lived isolated child process (``python -I -S``) with a deadline
(:data:`REGEX_DEADLINE_S`, timed by the child itself, so a slow start under load does not count);
an invalid pattern, or one still running at the deadline, is refused with
:class:`ValidationError` naming the field. Results are cached per (pattern, name), so a batch
of adapters sharing one config starts one child.

Why this engine (measured on this project's 2-core machine, Python 3.11, 128 Llama module names):

* google-re2 (linear time, 3-6 µs per name) is not PEFT's semantics: it reads ``q_proj{,1}`` as a
  literal where ``re`` reads ``{0,1}`` (fullmatch of ``q_proj``: False vs True), refuses lookarounds
  and backreferences, and it would *accept* a pattern on which ``re`` backtracks for hours, so every
  later ``PeftModel.from_pretrained`` of the stored adapter would hang.
* the ``regex`` package with ``timeout=`` (3 µs per name) answers ``(a+)+$`` in 0.5 ms thanks to its
  own safeguards while ``re`` hangs (same problem), and reads ``[[:alpha:]]`` as a POSIX class where
  ``re`` reads a set.
* ``re`` in a child process is exact by construction and refuses exactly what would make PEFT hang
  on these names; the cost is one process start (~20 ms) per config with patterns not seen before.
  ``re`` in-process under a signal timer would be cheaper but only works in the main thread.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from libstore.errors import ValidationError

#: Wall-clock budget for all regex matches of one call (one child process, timed from its start).
REGEX_DEADLINE_S = 2.0
#: Longest pattern accepted (PEFT-saved regexes are a few hundred characters).
MAX_PATTERN_CHARS = 16_384
_CACHE_MAX = 1 << 16

#: PEFT's layer-index regexes (``_DEFAULT_LAYER`` is ours to run: fixed and linear enough).
_DEFAULT_LAYER = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")


def _layer_regex(layers_pattern: str) -> str:
    return rf"(?:^|.*?\.){layers_pattern}\.(?P<idx>\d+)\."


# A check: (kind, pattern, name). kind "full": bool(re.fullmatch); "layer": the int index of
# re.match(...)["idx"] or None; "search": re.search(...).group() or None; "compile": True. A result
# is {"r": value} or {"e": error text}.
_Check = tuple[str, str, str]
_cache: dict[_Check, dict[str, Any]] = {}

# The child starts its own timer once it runs, so a slow start on a loaded machine is never taken
# for a slow pattern; ``re`` checks for signals while it matches, so SIGALRM stops it mid-match.
_CHILD = r"""
import json, re, signal, sys, warnings
try:
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (1 << 31, 1 << 31))
except Exception:
    pass
warnings.simplefilter("ignore")
class Late(Exception):
    pass
def late(*_):
    raise Late
if hasattr(signal, "setitimer"):
    signal.signal(signal.SIGALRM, late)
    signal.setitimer(signal.ITIMER_REAL, float(sys.argv[1]))
try:
    for line in sys.stdin:
        kind, pattern, name = json.loads(line)
        try:
            rx = re.compile(pattern)
        except (re.error, OverflowError, RecursionError, ValueError, MemoryError) as e:
            out = {"e": f"{type(e).__name__}: {e}"}
        else:
            if kind == "full":
                out = {"r": rx.fullmatch(name) is not None}
            elif kind == "search":
                m = rx.search(name)
                out = {"r": None if m is None else m.group()}
            elif kind == "layer":
                m = rx.match(name)
                idx = m.groupdict().get("idx") if m else None
                out = {"r": None if idx is None else int(idx)}
            else:
                out = {"r": True}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()
except Late:
    sys.stdout.write('{"late": true}\n')
"""
#: How long the child may take to start before it is given up (a safety net for a stuck machine).
_START_SLACK_S = 60.0


def _run(checks: Sequence[_Check], fields: Mapping[_Check, str], where: str) -> dict[_Check, dict[str, Any]]:
    """Evaluate ``checks`` (cached ones from the cache, the rest in one child process within the
    deadline) and return every result."""
    results = {c: r for c in checks if (r := _cache.get(c)) is not None}
    todo = [c for c in dict.fromkeys(checks) if c not in results]
    if not todo:
        return results
    for kind, pattern, _ in todo:
        if len(pattern) > MAX_PATTERN_CHARS:
            field = fields[(kind, pattern, _)]
            raise ValidationError(
                f"{where}: {field} is a regular expression of {len(pattern)} characters, over the "
                f"{MAX_PATTERN_CHARS}-character limit; list the module names instead",
                path=where,
                field=field,
            )
    stdin = "".join(json.dumps(c) + "\n" for c in todo)
    cmd = [sys.executable, "-I", "-S", "-c", _CHILD, str(REGEX_DEADLINE_S)]
    try:
        done = subprocess.run(
            cmd,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=REGEX_DEADLINE_S + _START_SLACK_S,
            check=False,
        )
        out, failed = done.stdout, done.returncode != 0
    except subprocess.TimeoutExpired as e:
        partial = e.stdout or ""
        out, failed = partial if isinstance(partial, str) else partial.decode(), True
    lines = out.splitlines()
    if failed and lines and not out.endswith("\n"):
        lines.pop()  # a line cut off by the kill
    if lines and lines[-1] == '{"late": true}':
        lines.pop()  # the child's own deadline: the first unanswered check is the slow one
    if len(_cache) + len(todo) > _CACHE_MAX:
        _cache.clear()
    for check, line in zip(todo, lines, strict=False):
        results[check] = _cache[check] = json.loads(line)
    if len(lines) < len(todo):
        kind, pattern, name = stuck = todo[len(lines)]
        field = fields[stuck]
        raise ValidationError(
            f"{where}: {field}={pattern!r:.200} did not finish matching {name!r} within "
            f"{REGEX_DEADLINE_S:g} s (catastrophic backtracking); PEFT matches it with Python's re "
            f"and would hang on it too. Simplify the pattern or list the module names",
            path=where,
            field=field,
        )
    return results


def _result(res: Mapping[str, Any], check: _Check, field: str, where: str) -> Any:
    if "e" in res:
        raise ValidationError(
            f"{where}: {field}={check[1]!r:.200} is not a valid regular expression ({res['e']}); "
            f"PEFT matches it with Python's re",
            path=where,
            field=field,
        )
    return res["r"]


def _patterns(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


def untargeted(
    config: Mapping[str, Any], modules: Iterable[str], *, where: str = "adapter config"
) -> list[str]:
    """The ``modules`` on which PEFT would *not* put a LoRA layer given ``config``, in order.

    Mirrors ``check_target_module_exists`` for the fields libstore allows. Raises
    :class:`ValidationError` (``field`` set, ``path=where``) for an invalid pattern or one that does
    not finish within :data:`REGEX_DEADLINE_S`.
    """
    names = list(modules)
    targets = config.get("target_modules")
    exclude = config.get("exclude_modules")
    layers = config.get("layers_to_transform")
    using_layers = layers is not None and layers != []
    layers_pattern = config.get("layers_pattern")
    layer_patterns = [_layer_regex(p) for p in _patterns(layers_pattern)] if layers_pattern else []
    target_rx = isinstance(targets, str) and targets.lower() != "all-linear"

    checks: list[_Check] = []
    fields: dict[_Check, str] = {}

    def need(kind: str, pattern: str, name: str, field: str) -> None:
        check = (kind, pattern, name)
        checks.append(check)
        fields.setdefault(check, field)

    for p in layer_patterns:  # refused if invalid even where no name reaches it
        need("compile", p, "", "layers_pattern")
    for name in names:
        if isinstance(exclude, str) and exclude:
            need("full", exclude, name, "exclude_modules")
        if target_rx:
            need("full", str(targets), name, "target_modules")
        if using_layers:
            for p in layer_patterns:
                need("layer", p, name, "layers_pattern")
    results = _run(checks, fields, where)
    for check in checks:  # every invalid pattern is refused, whether PEFT would reach it or not
        _result(results[check], check, fields[check], where)

    def get(kind: str, pattern: str, name: str) -> Any:
        return results[(kind, pattern, name)]["r"]

    def targeted(name: str) -> bool:
        if exclude:
            if isinstance(exclude, str):
                if get("full", exclude, name):
                    return False
            elif name in exclude or any(name.endswith(f".{e}") for e in exclude):
                return False
        if isinstance(targets, str):
            return not target_rx or bool(get("full", targets, name))
        if not isinstance(targets, list):
            return False
        if name in targets:
            return True
        if not any(name.endswith(f".{t}") for t in targets):
            return False
        if not using_layers:
            return True
        if layer_patterns:
            idx = next((i for p in layer_patterns if (i := get("layer", p, name)) is not None), None)
        else:
            m = _DEFAULT_LAYER.match(name)
            idx = int(m["idx"]) if m else None
        if idx is None:
            return False
        return idx == layers if isinstance(layers, int) else idx in (layers or ())

    return [n for n in names if not targeted(n)]


def search_matches(pattern: str, names: Sequence[str], *, where: str, field: str) -> dict[str, str | None]:
    """``re.search(pattern, name).group()`` (or ``None``) for each name, in bounded time like
    :func:`untargeted` (a pattern from a file libstore did not write may be invalid or hang)."""
    checks = [("search", pattern, n) for n in names]
    fields = dict.fromkeys(checks, field)
    results = _run(checks, fields, where)
    return {c[2]: _result(results[c], c, field, where) for c in checks}


def is_targeted(module: str, config: Mapping[str, Any]) -> bool:
    """Would PEFT put a LoRA layer on ``module`` given this config? (See :func:`untargeted`.)"""
    return not untargeted(config, [module])
