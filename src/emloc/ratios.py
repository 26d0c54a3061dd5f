"""Which layers an emulator compresses, and how: ratio rules (`--ratio`, `--ratio-table`), the
method `auto` resolves to, and each layer's plan (rank or quantisation format, bytes), decided from
the meta skeleton before any weight is read, so bad rules fail first."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from .errors import EmlocError
from .lowrank import aligned_rank, rank_for_ratio, saves_parameters
from .families import family_of
from .models import block_linears
from .quant import BASE_BYTES, FORMATS, format_for

if TYPE_CHECKING:
    from .emulator import EmulatorConfig
    from .stream import StreamedModel

SKIP = None  # a ratio rule whose ratio is SKIP keeps matching layers dense
QUANT_METHODS = ("quant", "svd+quant")
# `auto`: the method that recovered the most of full LoRA's gain on the original at the requested
# bytes in the `budget` bench (docs/bench/budget-*.md): quant where int8 or NF4 fits, svd below
AUTO_QUANT_FROM = 0.25


def resolve_method(method: str, ratios: list[float | None]) -> str:
    """`auto` -> `quant` when every compressed layer keeps at least 0.25 of its bytes, else `svd`."""
    if method != "auto":
        return method
    kept = [r for r in ratios if r is not None and r < 1]
    return "quant" if all(r >= AUTO_QUANT_FROM for r in kept) else "svd"



def _rules(ratio: float | list[tuple[str, float | None]]) -> list[tuple[re.Pattern, float | None]]:
    rules = [(".*", ratio)] if isinstance(ratio, (int, float)) else list(ratio)
    out = []
    for pat, r in rules:
        if r is not None and not (isinstance(r, (int, float)) and 0 < r <= 1):
            raise EmlocError(f"compression ratio {r!r} for {pat!r} is outside (0, 1]; give the fraction of parameters to keep, e.g. 0.5")
        try:
            out.append((re.compile(pat), None if r is None else float(r)))
        except re.error as exc:
            raise EmlocError(f"ratio rule {pat!r} is not a valid regular expression: {exc}") from None
    return out


def parse_ratio_table(path: str | Path) -> list[tuple[str, float | None]]:
    """Read a ratio table: a JSON or YAML list of `{regex: ratio}` or `[regex, ratio]` items, in order.

    A ratio of `skip`, `dense` or null keeps the matching layers dense.
    """
    import yaml

    p = Path(path).expanduser()
    if not p.is_file():
        raise EmlocError(f"ratio table {p} does not exist; give a JSON/YAML list of [regex, ratio] rules")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise EmlocError(f"ratio table {p} is not valid JSON/YAML: {str(exc).splitlines()[0]}") from None
    if isinstance(data, dict) and "ratio" in data:
        data = data["ratio"]
    items: list[tuple[str, Any]] = []
    if isinstance(data, list):
        for it in data:
            if isinstance(it, dict) and len(it) == 1:
                items.append(next(iter(it.items())))
            elif isinstance(it, (list, tuple)) and len(it) == 2:
                items.append((it[0], it[1]))
            else:
                raise EmlocError(f"ratio table {p}: item {it!r} is not a [regex, ratio] pair")
    elif isinstance(data, dict):
        items = list(data.items())
    else:
        raise EmlocError(f"ratio table {p} must be a list of [regex, ratio] rules")
    out: list[tuple[str, float | None]] = []
    for pat, r in items:
        if r is None or (isinstance(r, str) and r.lower() in ("skip", "dense", "none")):
            out.append((str(pat), None))
        else:
            try:
                out.append((str(pat), float(r)))
            except (TypeError, ValueError):
                raise EmlocError(f"ratio table {p}: ratio {r!r} for {pat!r} is not a number or 'skip'") from None
    return out


def layer_plan(m: int, n: int, ratio: float | None, method: str = "svd", quant_format: str = "auto") -> dict[str, Any]:
    """How one (m x n) layer is compressed at `ratio` of its bytes: its manifest entry before the build.

    `rank` is None for a layer kept dense; `kind` is `lowrank` or `quant`; `bytes` counts the
    stored layer with its float tensors in bfloat16 (the base's bytes at the same count: 2 m n).
    """
    entry: dict[str, Any] = {"out_features": m, "in_features": n, "ratio": ratio, "rank": None, "kind": "dense",
                             "bytes": BASE_BYTES * m * n}
    if ratio is None or ratio >= 1:  # ratio 1 keeps the layer (the formulas would still truncate it)
        return entry
    if method in QUANT_METHODS:
        fmt = format_for(ratio, quant_format) if method == "quant" else FORMATS["nf4" if quant_format == "auto" else quant_format]
        k = 0
        if method == "svd+quant":  # the bytes left after the quantised weight buy a bfloat16 low-rank term
            k = aligned_rank(int((ratio * BASE_BYTES * m * n - fmt.nbytes(m, n)) // (BASE_BYTES * (m + n))))
            if k < 1:
                raise EmlocError(f"ratio {ratio} leaves no bytes for a low-rank term beside {fmt.name} "
                                 f"({fmt.nbytes(m, n) / (BASE_BYTES * m * n):.3f} of a {m}x{n} layer); raise --ratio or use --method quant")
        return {**entry, "kind": "quant", "format": fmt.name, "rank": k,
                "bytes": fmt.nbytes(m, n) + BASE_BYTES * k * (m + n)}
    k = rank_for_ratio(m, n, ratio)
    if not saves_parameters(m, n, k):
        return entry
    return {**entry, "kind": "lowrank", "rank": k, "bytes": BASE_BYTES * k * (m + n)}


def _plan_layers(stream: StreamedModel, rules: list[tuple[re.Pattern, float | None]], targets: re.Pattern | None,
                 cfg: EmulatorConfig, vision: tuple[str, nn.ModuleList] | None = None
                 ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Which layers get which rank, in the blocks and (where a ratio-table rule names them) in the
    vision tower's blocks `vision`; decided before any weight is read, so bad rules fail first."""
    used = [False] * len(rules)
    compress = family_of(stream.model.config).compress
    if targets is None and compress:  # the family's default: e.g. a UNet's transformer layers only
        targets = re.compile(compress)
    plan = _plan_stack(list(zip(stream.prefixes, stream.blocks)), rules, targets, cfg, used, True)
    if not plan:
        raise EmlocError("no linear layer inside the transformer blocks matches --targets; loosen the pattern")
    vision_plan = (_plan_stack([(f"{vision[0]}.{i}.", b) for i, b in enumerate(vision[1])], rules, targets, cfg, used,
                               every=False) if vision else {})
    for (pat, _), hit in zip(rules, used):
        if not hit:
            raise EmlocError(f"ratio rule {pat.pattern!r} matches no layer (names look like {next(iter(plan))}); fix the regex")
    return plan, vision_plan


def _plan_stack(blocks: list[tuple[str, nn.Module]], rules: list[tuple[re.Pattern, float | None]], targets: re.Pattern | None,
                cfg: EmulatorConfig, used: list[bool], every: bool) -> dict[str, dict[str, Any]]:
    """The plan of (block prefix, block) pairs: every layer (unmatched ones dense), or with
    `every=False` only the layers a rule compresses."""
    plan: dict[str, dict[str, Any]] = {}
    for prefix, block in blocks:
        for rel, lin in block_linears(block):
            full = f"{prefix}{rel}"
            if targets and not targets.search(full):
                continue
            ratio = None
            for j, (pat, r) in enumerate(rules):
                if pat.search(full):
                    used[j], ratio = True, r
                    break
            if every or ratio is not None:
                plan[full] = layer_plan(lin.out_features, lin.in_features, ratio, cfg.method, cfg.quant_format)
    return plan
