"""Stage 1: build a downstream-aware emulator by activation-aware SVD, block by block.

Only one transformer block's weights are in memory at a time: the model skeleton lives on the meta
device, each block is read from the base's safetensors shards, calibrated, compressed, written to
its own output shard, and freed. The inputs of block 0 are captured once by running the embedding
part of the model on each calibration sample; each block then turns them into the next block's
inputs.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from .artifacts import MANIFEST, Stopwatch, fingerprint, peak_memory_mb, read_manifest, staged_output, versions, write_json
from .checkpoint import fault_point
from .data import read_jsonl
from .errors import EmlocError
from .lowrank import EIG_FLOOR, LowRankLinear, allocate_ranks, factorize, rank_for_ratio, saves_parameters, whitened_energy
from .models import (WeightStore, block_linears, copy_tokenizer_files, empty_model, find_blocks, load_config,
                     materialize, parse_device, parse_dtype, resolve_model, to_meta)
from .stats import calibration_ids

log = logging.getLogger("emloc")

SKIP = None  # a ratio rule whose ratio is SKIP keeps matching layers dense
ALLOCATIONS = ("uniform", "energy")


@dataclass
class EmulatorConfig:
    """Settings of `build_emulator`.

    Attributes:
        ratio: fraction of each targeted layer's parameters to keep, in (0, 1]; or a list of
            (regex, ratio-or-None) rules over full layer names, first match wins, None = keep dense,
            layers matching no rule stay dense.
        targets: regex over full layer names restricting which block linears are considered
            (default: every nn.Linear inside the transformer blocks).
        samples: number of calibration records (drawn with `seed`).
        calibration_tokens: if set, keep drawing records past `samples` until the calibration holds at
            least this many tokens (or the data runs out).
        max_length: tokens per calibration record.
        whiten: activation-aware SVD (True) or plain SVD (False, for comparison).
        sequential: feed each block the emulator's own outputs (GPTQ-style) instead of the original's.
        eig_floor: eigenvalue floor as a fraction of the mean eigenvalue.
        seed: sampling seed.
        device: compute device (auto: cuda if available).
        dtype: dtype of the forward passes and of the stored emulator (auto: bf16 on CUDA, fp32 on CPU).
        stats_dtype: dtype of the Gram accumulation and SVD.
        method: `svd` (EMLoC's activation-aware SVD) or a baseline of the same size for comparison:
            `layer-drop` (Offsite-Tuning style) or `channel-prune` (LoRAM style); see emloc.baselines.
        allocation: `uniform` (every compressed layer keeps `ratio` of its parameters) or `energy`
            (each block keeps the same parameter count as uniform, but its layers' ranks are chosen
            from their whitened spectra to minimise the block's summed relative output error; see
            `emloc.lowrank.allocate_ranks`).
    """

    ratio: float | list[tuple[str, float | None]] = 0.5
    targets: str | None = None
    samples: int = 64
    calibration_tokens: int | None = None
    max_length: int = 512
    whiten: bool = True
    sequential: bool = False
    eig_floor: float = EIG_FLOOR
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    stats_dtype: str = "float64"
    method: str = "svd"
    allocation: str = "uniform"


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


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


class _Captured(Exception):
    """Raised by the pre-hook on block 0 once its inputs are stored."""


def _capture_block_inputs(model: nn.Module, block0: nn.Module, samples: list[list[int]], device: torch.device):
    """Run the model up to block 0 for each sample; return [(hidden (1 x T x d), block kwargs)]."""
    store: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def hook(_mod, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        store.append((hidden, kwargs))
        raise _Captured

    handle = block0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for ids in tqdm(samples, desc="capturing block inputs", leave=False):
                try:
                    model(input_ids=torch.tensor([ids], device=device), use_cache=False)
                except _Captured:
                    pass
    finally:
        handle.remove()
    if len(store) != len(samples):
        raise EmlocError("the model never reached its first transformer block; emloc cannot calibrate this architecture")
    return store


def _block_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _block_ranks(bprefix: str, grams: dict[str, torch.Tensor], plan: dict[str, dict[str, Any]],
                 store: WeightStore, device: torch.device, stats_dtype: torch.dtype, cfg: EmulatorConfig) -> dict[str, int]:
    """Allocation `energy`: the block's compressed layers share the parameters uniform ranks would use."""
    energy, shapes, budget = {}, {}, 0
    for rel, g in grams.items():
        full = bprefix + rel
        p = plan[full]
        w = store.get(full + ".weight").to(device=device, dtype=stats_dtype)
        energy[rel] = whitened_energy(w, g if cfg.whiten else None, cfg.eig_floor).cpu()
        shapes[rel] = (p["out_features"], p["in_features"])
        budget += p["rank"] * (p["out_features"] + p["in_features"])
        del w
    return allocate_ranks(energy, shapes, budget)


def build_emulator(base: str | Path, calibration: str | Path, output: str | Path,
                   config: EmulatorConfig | None = None, overwrite: bool = False) -> Path:
    """Build an emulator of `base` calibrated on the user's downstream data.

    Args:
        base: Hugging Face model folder, or a packaged model name (e.g. `smollm2-135m`).
        calibration: JSONL downstream data (see `emloc.data`); records are tokenised whole
            (prompt and answer).
        output: emulator folder to create.
        config: settings; defaults to `EmulatorConfig()`.
        overwrite: replace a non-empty `output`.

    Returns:
        The emulator folder, loadable with `load_emulator`.
    """
    from transformers import AutoTokenizer

    cfg = config or EmulatorConfig()
    watch = Stopwatch()
    rules = _rules(cfg.ratio)
    targets = re.compile(cfg.targets) if cfg.targets else None
    base_dir = resolve_model(base)
    out_path = Path(output).expanduser().resolve()
    if out_path == base_dir:
        raise EmlocError("the emulator output folder is the base model folder; choose a new folder")
    if cfg.method != "svd":
        from .baselines import build_baseline

        if not Path(calibration).expanduser().is_file():
            raise EmlocError(f"calibration data {calibration} not found; give a JSONL file")
        return build_baseline(cfg.method, base_dir, Path(calibration).expanduser().resolve(), out_path, cfg, overwrite)
    if cfg.allocation not in ALLOCATIONS:
        raise EmlocError(f"unknown rank allocation {cfg.allocation!r}; use one of {', '.join(ALLOCATIONS)}")
    device = parse_device(cfg.device)
    dtype = parse_dtype(cfg.dtype, device)
    stats_dtype = {"float64": torch.float64, "float32": torch.float32}[cfg.stats_dtype]

    # Calibration data: seeded draw, optionally extended to a token target.
    tok = AutoTokenizer.from_pretrained(base_dir)
    records = read_jsonl(calibration)
    if cfg.samples < 1:
        raise EmlocError(f"--samples must be at least 1 (got {cfg.samples})")
    if len(records) < cfg.samples:
        log.warning("calibration: %d records asked for but %s holds only %d; using all of them", cfg.samples, calibration, len(records))
    del records
    ids = calibration_ids(calibration, tok, cfg.samples, cfg.max_length, cfg.seed, cfg.calibration_tokens)
    n_tokens = sum(len(i) for i in ids)

    model = empty_model(load_config(base_dir))
    model.eval()
    total_params = sum(p.numel() for p in model.parameters())  # meta tensors know their size
    store = WeightStore(base_dir).align(model)
    blocks_name, blocks = find_blocks(model)
    prefix = blocks_name + "."

    # Which layers get which rank: decided up front so bad rules fail before any compute.
    plan: dict[str, dict[str, Any]] = {}
    used = [False] * len(rules)
    for i, block in enumerate(blocks):
        for rel, lin in block_linears(block):
            full = f"{prefix}{i}.{rel}"
            if targets and not targets.search(full):
                continue
            ratio = None
            for j, (pat, r) in enumerate(rules):
                if pat.search(full):
                    used[j], ratio = True, r
                    break
            m, n = lin.out_features, lin.in_features
            # ratio 1 keeps the layer as it is (the floor in the formula would otherwise still truncate)
            k = rank_for_ratio(m, n, ratio) if ratio is not None and ratio < 1 else None
            if k is not None and not saves_parameters(m, n, k):
                k = None
            plan[full] = {"out_features": m, "in_features": n, "ratio": ratio, "rank": k}
    if not plan:
        raise EmlocError("no linear layer inside the transformer blocks matches --targets; loosen the pattern")
    for (pat, _), hit in zip(rules, used):
        if not hit:
            raise EmlocError(f"ratio rule {pat.pattern!r} matches no layer (names look like {next(iter(plan))}); fix the regex")
    width = max(p["in_features"] for p in plan.values() if p["rank"] is not None) if any(p["rank"] for p in plan.values()) else 0
    if n_tokens < width:
        log.warning("calibration holds %d tokens, fewer than the widest layer input (%d): the statistics are rank-deficient "
                    "and the emulator will overfit them; use more samples or --calibration-tokens %d", n_tokens, width, 8 * width)

    # Everything outside the blocks (embeddings, final norm, head) is loaded once.
    materialize(model, "", store, device, dtype, keep=lambda name: not name.startswith(prefix))
    store.release()
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    inputs = _capture_block_inputs(model, blocks[0], ids, device)

    layers: dict[str, dict[str, Any]] = {}
    n_files = len(blocks) + 1
    weight_map: dict[str, str] = {}
    with staged_output(out_path, overwrite) as tmp:
        bar = tqdm(range(len(blocks)), desc="building emulator", unit="block")
        for i in bar:
            block = blocks[i]
            bprefix = f"{prefix}{i}."
            materialize(block, bprefix, store, device, dtype)
            grams: dict[str, torch.Tensor] = {}
            hooks = []
            for rel, lin in block_linears(block):
                full = bprefix + rel
                if full not in plan or plan[full]["rank"] is None:
                    continue
                grams[rel] = torch.zeros(lin.in_features, lin.in_features, dtype=stats_dtype, device=device)

                def acc(_m, args, _out, rel=rel):
                    x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                    grams[rel] += (x.T @ x).to(stats_dtype)

                hooks.append(lin.register_forward_hook(acc))
            outputs = []
            with torch.no_grad():
                for hidden, kw in inputs:
                    outputs.append(_block_output(block(hidden, **kw)))
            for h in hooks:
                h.remove()
            ranks = _block_ranks(bprefix, grams, plan, store, device, stats_dtype, cfg) \
                if cfg.allocation == "energy" else {}
            for rel, g in list(grams.items()):
                full = bprefix + rel
                if not torch.isfinite(g).all():
                    raise EmlocError(f"non-finite activations entering {full} (dtype {dtype}); use --dtype float32 or check the data")
                lin = block.get_submodule(rel)
                w = store.get(full + ".weight").to(device=device, dtype=stats_dtype)
                if not torch.isfinite(w).all():
                    raise EmlocError(f"non-finite weights in {full} of {base_dir}; the checkpoint is damaged")
                k = ranks.get(rel, plan[full]["rank"])
                fac = factorize(w, g if cfg.whiten else None, k, cfg.eig_floor)
                if cfg.whiten is False:  # report the error on the calibration data all the same
                    we = fac.up @ fac.down
                    d = w - we
                    fac.rel_error = float(torch.trace(d @ g @ d.T) / torch.trace(w @ g @ w.T).clamp(min=1e-300))
                new = LowRankLinear(lin.in_features, lin.out_features, k, lin.bias is not None, device=device, dtype=dtype)
                with torch.no_grad():
                    new.up.copy_(fac.up)
                    new.down.copy_(fac.down)
                    if lin.bias is not None:
                        new.bias.copy_(lin.bias)
                _set_module(block, rel, new)
                m, n = plan[full]["out_features"], plan[full]["in_features"]
                layers[full] = {**plan[full], "rank": k, "rel_error": fac.rel_error, "params_before": m * n,
                                "params_after": k * (m + n)}
                del grams[rel]
            for full, p in plan.items():
                if full.startswith(bprefix) and p["rank"] is None:
                    layers[full] = {**p, "rel_error": 0.0, "params_before": p["out_features"] * p["in_features"],
                                    "params_after": p["out_features"] * p["in_features"]}
            if cfg.sequential:
                with torch.no_grad():
                    outputs = [_block_output(block(hidden, **kw)) for hidden, kw in inputs]
            inputs = [(o, kw) for o, (_, kw) in zip(outputs, inputs)]
            fname = f"model-{i + 1:05d}-of-{n_files:05d}.safetensors"
            tensors = {bprefix + k: v.detach().to("cpu").contiguous() for k, v in block.state_dict().items()}
            save_file(tensors, tmp / fname, metadata={"format": "pt"})
            weight_map.update({k: fname for k in tensors})
            errs = [layers[k]["rel_error"] for k in layers if k.startswith(bprefix)]
            bar.set_postfix(max_rel_err=f"{max(errs):.3g}" if errs else "-")
            to_meta(block)
            store.release()
            del tensors
            fault_point("build_block", i + 1)

        rest_file = f"model-{n_files:05d}-of-{n_files:05d}.safetensors"
        rest = {name: p.detach().to("cpu").contiguous() for name, p in model.named_parameters()
                if not name.startswith(prefix)}
        save_file(rest, tmp / rest_file, metadata={"format": "pt"})
        weight_map.update({k: rest_file for k in rest})
        write_json(tmp / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
        shutil.copy2(base_dir / "config.json", tmp / "config.json")
        copy_tokenizer_files(base_dir, tmp)

        before = sum(v["params_before"] for v in layers.values())
        after = sum(v["params_after"] for v in layers.values())
        manifest = {
            "kind": "emulator",
            "base": str(base_dir),
            "base_fingerprint": fingerprint(base_dir),
            "fingerprint": fingerprint(tmp),
            "blocks": blocks_name,
            "config": cfg,
            "calibration": {"file": str(Path(calibration).expanduser().resolve()), "samples": len(ids),
                            "tokens": n_tokens, "widest_layer_input": width},
            "params": {"base": total_params, "emulator": total_params - before + after,
                       "compressed_layers_before": before, "compressed_layers_after": after},
            "layers": layers,
            "versions": versions(),
            "wall_seconds": round(watch.seconds, 1),
            **peak_memory_mb(),
        }
        write_json(tmp / MANIFEST, manifest)
    print(watch.summary("build", out_path))
    return out_path


def is_emulator(folder: str | Path) -> bool:
    m = read_manifest(folder)
    return bool(m and m.get("kind") == "emulator")


def load_emulator(path: str | Path, device: str = "auto", dtype: str = "auto") -> nn.Module:
    """Load an emulator folder as an ordinary transformers model.

    Its compressed layers are `LowRankLinear` modules (nn.Linear subclasses), so PEFT, HF Trainer,
    TRL and hand-written loops use it like any causal LM.

    Args:
        path: folder written by `build_emulator`.
        device: where to put it (auto: cuda if available).
        dtype: parameter dtype (auto: bf16 on CUDA, fp32 on CPU).
    """
    folder = Path(path).expanduser()
    manifest = read_manifest(folder)
    if manifest is None or manifest.get("kind") != "emulator":
        raise EmlocError(f"{folder} is not an emulator folder (no emloc manifest); build one with `emloc build`")
    dev = parse_device(device)
    dt = parse_dtype(dtype, dev)
    config = load_config(folder)
    model = empty_model(config)
    for name, layer in manifest["layers"].items():
        if layer["rank"] is None:
            continue
        old = model.get_submodule(name)
        _set_module(model, name, LowRankLinear(layer["in_features"], layer["out_features"], layer["rank"],
                                               old.bias is not None, device="meta"))
    materialize(model, "", WeightStore(folder), dev, dt)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise EmlocError(f"{folder} is missing weights ({left[0]}...); rebuild the emulator")
    model.eval()
    model.name_or_path = str(folder.resolve())
    model.config.name_or_path = str(folder.resolve())
    model.emloc_manifest = manifest
    return model
