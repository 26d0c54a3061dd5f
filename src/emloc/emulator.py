"""Stage 1: build a downstream-aware emulator by activation-aware SVD, block by block.

Only one transformer block's weights are in memory at a time (`emloc.stream`): each block is read
from the base's safetensors shards, run on the calibration batches while hooks collect the smallest
statistics its layers need, compressed, written to its own output shard, and freed.

Per compressed layer W (m x n), the whitened SVD needs the left singular vectors of W S
(S S^T = G + lambda I, G the Gram of the layer's inputs): when m <= n they are the eigenvectors of
the m x m Gram of the layer's own outputs (plus lambda W W^T), so no n x n matrix is formed; when
m > n, one eigendecomposition of the n x n input Gram serves every layer reading that input
(gate/up), followed by the SVD of W S. See `emloc.lowrank.Spectrum`.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .artifacts import (MANIFEST, Stopwatch, check_output, fingerprint, peak_memory_mb, read_manifest, save_finite, staged_output,
                        versions, write_json)
from .checkpoint import fault_point
from .errors import EmlocError
from .families import family_of
from .lowrank import (EIG_FLOOR, LowRankLinear, Spectrum, allocate_ranks, input_eigh, input_spectrum, output_spectrum)
from .models import (WeightStore, check_targets, copy_tokenizer_files, empty_model, find_blocks, load_config,
                     materialize, parse_device, parse_dtype, parse_stats_dtype, resolve_model)
from .ratios import (AUTO_QUANT_FROM, QUANT_METHODS, SKIP, _plan_layers, _plan_stack, _rules, layer_plan,  # noqa: F401
                     parse_ratio_table, resolve_method)
from .quant import (BASE_BYTES, FORMATS, ROUNDINGS, QuantLinear, damped_error, gptq_factor, pack, quantize_gptq, quantize_rtn,
                    weighted_error)
from .stream import BATCH_TOKENS, INPUT_GRAM, OUTPUT_GRAM, BlockPass, LayerStats, StreamedModel
from .vocab import VOCAB_FORMATS, install_vocab, quantize_vocab, vocab_modules

log = logging.getLogger("emloc")

ALLOCATIONS = ("uniform", "energy")
METHODS = ("auto", "svd", *QUANT_METHODS, "layer-drop", "channel-prune")

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
        draws: (denoisers) seeded (noise, timestep) pairs per calibration image.
        max_length: tokens per calibration record.
        whiten: activation-aware SVD (True) or plain SVD (False, for comparison).
        sequential: feed each block the emulator's own outputs (GPTQ-style) instead of the original's.
        eig_floor: eigenvalue floor as a fraction of the mean eigenvalue.
        seed: sampling seed.
        device: compute device (auto: cuda if available).
        dtype: dtype of the forward passes and of the stored emulator (auto: bf16 on CUDA, fp32 on CPU).
        stats_dtype: dtype of the statistics and the decompositions (float64 or float32).
        batch_tokens: padded tokens per calibration forward (records are batched by length).
        method: `auto` (the default: `quant` when every ratio is at least 0.25, else `svd`; the
            measured best, see the README's "The best adapter in your memory"),
            `svd` (EMLoC's activation-aware SVD, the paper's), `quant` (weight-only quantisation, see
            emloc.quant), `svd+quant` (NF4 plus a whitened low-rank term fitted to the quantisation
            residual with the bytes left over), or a baseline of the same size for comparison:
            `layer-drop` (Offsite-Tuning style) or `channel-prune` (LoRAM style); see emloc.baselines.
            For every method `ratio` is the fraction of the block weights' bytes kept, counted
            against bfloat16 (for `svd`: the fraction of parameters, as stored in the base's dtype).
        quant_format: `auto` (int8 from ratio 0.5, else nf4), `int8` or `nf4` (methods quant and svd+quant).
        rounding: `gptq` (error feedback through the calibration Gram) or `rtn` (round to nearest).
        allocation: `uniform` (every compressed layer keeps `ratio` of its parameters) or `energy`
            (each block keeps the same parameter count as uniform, but its layers' ranks are chosen
            from their whitened spectra to minimise the block's summed relative output error; see
            `emloc.lowrank.allocate_ranks`).
        vocab_format: the token embedding and output head (vocabulary x hidden each, up to a quarter
            of a small model's weights): `keep` them as they are, or store them quantised (`int8`,
            `nf4`, rounded to nearest; see `emloc.vocab`). They carry no LoRA, so the correction is
            unchanged; training sees logits through the quantised head.
    """

    ratio: float | list[tuple[str, float | None]] = 0.5
    targets: str | None = None
    samples: int = 64
    calibration_tokens: int | None = None
    draws: int = 4
    max_length: int = 512
    whiten: bool = True
    sequential: bool = False
    eig_floor: float = EIG_FLOOR
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    stats_dtype: str = "float64"
    batch_tokens: int = BATCH_TOKENS
    method: str = "auto"
    allocation: str = "uniform"
    quant_format: str = "auto"
    rounding: str = "gptq"
    vocab_format: str = "keep"

    def __post_init__(self) -> None:
        """Settings fail here, before any file is read."""
        _rules(self.ratio)
        for flag, value in {"--samples": self.samples, "--max-length": self.max_length, "--batch-tokens": self.batch_tokens,
                            "--calibration-tokens": self.calibration_tokens or 1}.items():
            if value < 1:
                raise EmlocError(f"{flag} must be at least 1 (got {value})")
        if not (self.eig_floor > 0 and math.isfinite(self.eig_floor)):
            raise EmlocError(f"--eig-floor must be positive (got {self.eig_floor}); a zero floor divides by the zero "
                             "eigenvalues of rank-deficient statistics")
        choices = {"method": (self.method, METHODS), "rounding": (self.rounding, ROUNDINGS),
                   "allocation": (self.allocation, ALLOCATIONS), "quant-format": (self.quant_format, ("auto", *FORMATS)),
                   "vocab-format": (self.vocab_format, VOCAB_FORMATS)}
        for flag, (value, allowed) in choices.items():
            if value not in allowed:
                raise EmlocError(f"unknown --{flag} {value!r}; use one of {', '.join(allowed)}")
        parse_stats_dtype(self.stats_dtype)
        parse_dtype(self.dtype, torch.device("cpu"))
        check_targets(self.targets, lists=False)


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _compress_vision(base_dir: Path, blocks_name: str, plan: dict[str, dict[str, Any]], records: list, shard: Any,
                     device: torch.device, dtype: torch.dtype, stats_dtype: torch.dtype, cfg: EmulatorConfig) -> dict[str, dict[str, Any]]:
    """Stream the vision tower's blocks over the calibration images, compress the planned layers and
    write each block with `shard(index, tensors)`; the language model is never read."""
    images = [r for r in records if r.extras]
    if not images:
        raise EmlocError("the ratio table compresses vision-tower layers, but no calibration record has an image; "
                         "calibrate on image records")
    vs = StreamedModel(base_dir, blocks=blocks_name)
    vs.load_outside(device, dtype, skip=(find_blocks(vs.model)[0],))
    layers: dict[str, dict[str, Any]] = {}
    for step in vs.passes(images, device, dtype, stats_dtype=stats_dtype, batch_tokens=cfg.batch_tokens,
                          sequential=cfg.sequential, desc="compressing the vision tower"):
        layers.update(_compress_block(step, plan, vs.store, device, dtype, stats_dtype, cfg))
        shard(step.index, {step.prefix + k: v.detach().to("cpu").contiguous() for k, v in step.block.state_dict().items()})
    return layers


def statistics_side(m: int, n: int) -> str:
    """The statistics a compressed (m x n) layer needs: its outputs' Gram (m x m) when m <= n, else its inputs'.

    The smaller Gram suffices for the whitened SVD (see `emloc.lowrank.Spectrum`).
    """
    return OUTPUT_GRAM if m <= n else INPUT_GRAM


def _shared_eigh(cache: list, gram: torch.Tensor, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`input_eigh(gram)`, computed once for the equal Grams of layers that read one input (gate/up)."""
    for g, eig in cache:
        if g.shape == gram.shape and torch.equal(g, gram):
            return eig
    eig = input_eigh(gram, floor)
    cache.append((gram, eig))
    return eig


def _checked_weight(store: WeightStore, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The layer's weight in `dtype` on `device`; a damaged (non-finite) checkpoint is refused."""
    w = store.get(name + ".weight").to(device=device, dtype=dtype)
    if not torch.isfinite(w).all():
        raise EmlocError(f"non-finite weights in {name}; the checkpoint is damaged")
    return w


def _check_statistics(name: str, trace: torch.Tensor | float) -> None:
    """A layer with all-zero (or non-finite) statistics never saw the calibration data: its whitening would divide by ~0."""
    if not float(trace) > 0:
        raise EmlocError(f"{name} received no calibration input (its statistics are zero or not finite): the model's "
                         "forward never reaches it; exclude it with --targets")


def _spectra(step: BlockPass, compressed: dict[str, dict[str, Any]], store: WeightStore, device: torch.device,
             stats_dtype: torch.dtype, cfg: EmulatorConfig) -> Iterator[tuple[str, Spectrum, torch.Tensor | None]]:
    """Run the block on the calibration batches, then yield (layer, spectrum, plain SVD's Gram) one layer at a time.

    Only the block's statistics (the smaller Gram per layer) stay alive; each layer's decomposition
    is made when it is asked for, so a consumer that factors it at once holds one at a time.
    """
    def weight(rel: str) -> torch.Tensor:
        return _checked_weight(store, step.prefix + rel, device, stats_dtype)

    if not cfg.whiten:  # plain SVD ignores the data; the input Gram only measures its error on it
        stats = step.run({rel: (INPUT_GRAM,) for rel in compressed})
        for rel in compressed:
            w = weight(rel)
            u, sigma, _ = torch.linalg.svd(w, full_matrices=False)
            yield rel, Spectrum(u, sigma.square(), w), stats.pop(rel).input_gram
        return
    sides = {rel: statistics_side(p["out_features"], p["in_features"]) for rel, p in compressed.items()}
    stats = step.run({rel: (side,) for rel, side in sides.items()})
    eigs: list = []
    for rel, side in sides.items():
        st = stats.pop(rel)
        _check_statistics(step.prefix + rel, st.input_trace if side == OUTPUT_GRAM else torch.trace(st.input_gram))
        if side == OUTPUT_GRAM:
            yield rel, output_spectrum(weight(rel), st.output_gram, st.input_trace, cfg.eig_floor), None
        else:
            yield rel, input_spectrum(weight(rel), _shared_eigh(eigs, st.input_gram, cfg.eig_floor)), None
        del st


def _compress_block(step: BlockPass, plan: dict[str, dict[str, Any]], store: WeightStore, device: torch.device,
                    dtype: torch.dtype, stats_dtype: torch.dtype, cfg: EmulatorConfig) -> dict[str, dict[str, Any]]:
    """Replace the block's planned layers by `LowRankLinear`s; return their manifest entries."""
    compressed = {full[len(step.prefix):]: p for full, p in plan.items()
                  if full.startswith(step.prefix) and p["rank"] is not None}
    layers: dict[str, dict[str, Any]] = {}
    for full, p in plan.items():
        if full.startswith(step.prefix) and p["rank"] is None:
            layers[full] = {**p, "rel_error": 0.0, "params_before": p["out_features"] * p["in_features"],
                            "params_after": p["out_features"] * p["in_features"]}
    if not compressed:
        return layers
    if cfg.method in QUANT_METHODS:
        return {**layers, **_quantize_block(step, compressed, store, device, dtype, stats_dtype, cfg)}
    work: Iterable[tuple[str, Spectrum, torch.Tensor | None]] = _spectra(step, compressed, store, device, stats_dtype, cfg)
    ranks = {rel: p["rank"] for rel, p in compressed.items()}
    if cfg.allocation == "energy":  # every spectrum of the block is needed before the first rank is known
        work = list(work)
        budget = sum(p["rank"] * (p["out_features"] + p["in_features"]) for p in compressed.values())
        ranks = allocate_ranks({rel: sp.energy.cpu() for rel, sp, _ in work},
                               {rel: (p["out_features"], p["in_features"]) for rel, p in compressed.items()}, budget)
    for rel, sp, gram in work:
        k, p = ranks[rel], compressed[rel]
        fac = sp.factors(k)
        if gram is not None:  # plain SVD: its error measured on the calibration data all the same
            d = sp.weight - fac.up @ fac.down
            fac.rel_error = float(torch.trace(d @ gram @ d.T) / torch.trace(sp.weight @ gram @ sp.weight.T).clamp(min=1e-300))
        if not (torch.isfinite(fac.up).all() and torch.isfinite(fac.down).all()):
            raise EmlocError(f"the factors of {step.prefix + rel} are not finite; check the weights and --eig-floor")
        del sp, gram
        lin = step.block.get_submodule(rel)
        new = LowRankLinear(lin.in_features, lin.out_features, k, lin.bias is not None, device=device, dtype=dtype)
        with torch.no_grad():
            new.up.copy_(fac.up)
            new.down.copy_(fac.down)
            if lin.bias is not None:
                new.bias.copy_(lin.bias)
        _set_module(step.block, rel, new)
        m, n = p["out_features"], p["in_features"]
        layers[step.prefix + rel] = {**p, "rank": k, "rel_error": fac.rel_error, "params_before": m * n, "params_after": k * (m + n),
                                   "bytes": BASE_BYTES * k * (m + n)}
    return layers


def _quantize_block(step: BlockPass, compressed: dict[str, dict[str, Any]], store: WeightStore, device: torch.device,
                    dtype: torch.dtype, stats_dtype: torch.dtype, cfg: EmulatorConfig) -> dict[str, dict[str, Any]]:
    """Replace the block's planned layers by `QuantLinear`s (GPTQ or RTN, plus the hybrid's residual term)."""
    stats = step.run({rel: (INPUT_GRAM,) for rel in compressed})
    eigs: list = []
    layers: dict[str, dict[str, Any]] = {}
    for rel, p in compressed.items():
        st = stats.pop(rel)
        _check_statistics(step.prefix + rel, torch.trace(st.input_gram))
        w = _checked_weight(store, step.prefix + rel, device, stats_dtype)
        fmt = FORMATS[p["format"]]
        # GPTQ without a residual term needs the Gram only to factor it: handed over with no other
        # reference, its memory is reused (two n x n matrices at once on cpu, three on a GPU, not four)
        factor, gram = (gptq_factor(_take_gram(st), overwrite=True), None) if cfg.rounding == "gptq" and not p["rank"] \
            else (None, st.input_gram)
        codes, scales = quantize_rtn(w, fmt) if cfg.rounding == "rtn" else quantize_gptq(w, factor or gram, fmt)
        lin = step.block.get_submodule(rel)
        new = QuantLinear(lin.in_features, lin.out_features, fmt.name, p["rank"], lin.bias is not None, device=device, dtype=dtype)
        with torch.no_grad():
            new.qweight.copy_(pack(codes, fmt))
            new.scales.copy_(scales)
            if p["rank"]:  # the residual's whitened SVD: what the quantised weight misses, where the data looks
                residual = w - new.quantized(stats_dtype)
                fac = input_spectrum(residual, _shared_eigh(eigs, gram, cfg.eig_floor)).factors(p["rank"])
                new.up.copy_(fac.up)
                new.down.copy_(fac.down)
            if lin.bias is not None:
                new.bias.copy_(lin.bias)
        w_e = new.dense_weight(stats_dtype)
        if not torch.isfinite(w_e).all():
            raise EmlocError(f"the quantised weight of {step.prefix + rel} is not finite; check the base's weights")
        _set_module(step.block, rel, new)
        m, n = p["out_features"], p["in_features"]
        error = weighted_error(w, w_e, gram) if gram is not None else damped_error(w, w_e, factor)
        layers[step.prefix + rel] = {**p, "rounding": cfg.rounding, "rel_error": error,
                                     "params_before": m * n, "params_after": m * n + p["rank"] * (m + n)}
        del gram, factor, w, w_e, codes, scales
    return layers


def _take_gram(st: LayerStats) -> torch.Tensor:
    """The input Gram of `st`, leaving no reference to it behind (so its consumer may reuse its memory)."""
    gram, st.input_gram = st.input_gram, None
    return gram


def _save_rest(stream: StreamedModel, vision_prefix: str | None, vocab_format: str, path: Path,
               weight_map: dict[str, str]) -> dict[str, Any] | None:
    """Write every parameter outside the compressed stacks (embedding, norms, head) to `path`.

    Returns the vocabulary entry of the manifest when the embedding and head are stored quantised.
    """
    rest = {name: p.detach().to("cpu").contiguous() for name, p in stream.model.named_parameters()
            if not stream.inside(name) and not (vision_prefix and name.startswith(vision_prefix))}
    vocab = None
    if vocab_format != "keep":
        codes, vocab = quantize_vocab(stream.model, vocab_format)
        rest = {k: v for k, v in rest.items() if k not in (f"{vocab['embedding']}.weight", f"{vocab['head']}.weight")}
        rest.update(codes)
    save_finite(rest, path)
    weight_map.update({k: path.name for k in rest})
    return vocab


def _totals(layers: dict[str, dict[str, Any]], total_params: int) -> dict[str, Any]:
    """The manifest's parameter and byte counts over the compressed layers."""
    before = sum(v["params_before"] for v in layers.values())
    after = sum(v["params_after"] for v in layers.values())
    dense_bytes = sum(BASE_BYTES * v["params_before"] for v in layers.values())
    kept_bytes = sum(v["bytes"] for v in layers.values())
    return {"params": {"base": total_params, "emulator": total_params - before + after,
                       "compressed_layers_before": before, "compressed_layers_after": after},
            # the block linears' bytes with float tensors counted in bfloat16 (what `ratio` means)
            "bytes": {"block_linears_bf16": dense_bytes, "emulator_block_linears": kept_bytes,
                      "fraction": kept_bytes / max(dense_bytes, 1)}}


def _checked(cfg: EmulatorConfig, rules: list[tuple[Any, float]]) -> EmulatorConfig:
    """`cfg` validated again (its fields may have been set after construction), with `method="auto"`
    resolved so that the manifest records what was built; before any I/O."""
    cfg = replace(cfg)  # reruns __post_init__
    if cfg.method == "auto":
        cfg = replace(cfg, method=resolve_method("auto", [r for _, r in rules]))
        if cfg.allocation != "uniform" or not cfg.whiten:
            cfg = replace(cfg, method="svd")  # options that exist for SVD only ask for SVD
    if cfg.method in QUANT_METHODS and (cfg.allocation != "uniform" or not cfg.whiten):
        raise EmlocError(f"--allocation and --no-whiten apply to --method svd only, not {cfg.method}")
    if cfg.method not in ("svd", *QUANT_METHODS) and cfg.vocab_format != "keep":
        raise EmlocError(f"--vocab-format applies to the svd and quant methods, not {cfg.method}")
    return cfg


def _widest_input(plan: dict[str, dict[str, Any]], n_tokens: int) -> int:
    """The widest compressed layer's input, with a warning when the calibration has fewer tokens."""
    width = max((p["in_features"] for p in plan.values() if p["rank"] is not None), default=0)
    if n_tokens < width:
        log.warning("calibration holds %d tokens, fewer than the widest layer input (%d): the statistics are rank-deficient "
                    "and the emulator will overfit them; use more samples or --calibration-tokens %d", n_tokens, width, 8 * width)
    return width


def _build_baseline(base_dir: Path, calibration: str | Path, out_path: Path, cfg: EmulatorConfig, overwrite: bool) -> Path:
    """A structural emulator (layer drop, channel pruning): `emloc.baselines` builds it."""
    from .baselines import build_baseline

    if not Path(calibration).expanduser().is_file():
        raise EmlocError(f"calibration data {calibration} not found; give a JSONL file")
    return build_baseline(cfg.method, base_dir, Path(calibration).expanduser().resolve(), out_path, cfg, overwrite)


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
    cfg = config or EmulatorConfig()
    watch = Stopwatch()
    rules = _rules(cfg.ratio)
    targets = re.compile(cfg.targets) if cfg.targets else None
    cfg = _checked(cfg, rules)
    stats_dtype = parse_stats_dtype(cfg.stats_dtype)
    base_dir = resolve_model(base)
    out_path = check_output(output, overwrite, (base_dir, calibration))
    if cfg.method not in ("svd", *QUANT_METHODS):
        return _build_baseline(base_dir, calibration, out_path, cfg, overwrite)
    device = parse_device(cfg.device)
    dtype = parse_dtype(cfg.dtype, device)

    # Calibration data, as the model's family reads it: a seeded draw of records (a denoiser's with
    # seeded noise and timesteps), optionally extended to a token target.
    ids, n_tokens = family_of(load_config(base_dir)).calibrate(base_dir, Path(calibration).expanduser(), asdict(cfg))

    stream = StreamedModel(base_dir)
    model = stream.model
    total_params = sum(p.numel() for p in model.parameters())  # meta tensors know their size
    # the vision tower is compressed only where a ratio table's rule names its layers
    vision = None if isinstance(cfg.ratio, (int, float)) else family_of(model.config).vision_blocks(model)
    plan, vision_plan = _plan_layers(stream, rules, targets, cfg, vision)
    if cfg.vocab_format != "keep":
        vocab_modules(model)  # a model without a token embedding and a linear head fails before anything is written
    vision_prefix = vision[0] + "." if vision_plan else None
    width = _widest_input(plan, n_tokens)

    layers: dict[str, dict[str, Any]] = {}
    n_vision = len(vision[1]) if vision and vision_plan else 0
    n_files = n_vision + len(stream.blocks) + 1
    weight_map: dict[str, str] = {}
    with staged_output(out_path, overwrite, (base_dir, calibration)) as tmp:

        def shard(index: int, tensors: dict[str, torch.Tensor]) -> None:  # shard files: vision blocks, blocks, the rest
            fname = f"model-{index + 1:05d}-of-{n_files:05d}.safetensors"
            save_finite(tensors, tmp / fname)
            weight_map.update({k: fname for k in tensors})

        if vision_plan:
            layers.update(_compress_vision(base_dir, vision[0], vision_plan, ids, shard, device, dtype, stats_dtype, cfg))
        stream.load_outside(device, dtype)  # the vision tower as it is: the blocks are calibrated on the original's features
        for step in stream.passes(ids, device, dtype, stats_dtype=stats_dtype, batch_tokens=cfg.batch_tokens,
                                  sequential=cfg.sequential, desc="building emulator"):
            layers.update(_compress_block(step, plan, stream.store, device, dtype, stats_dtype, cfg))
            shard(n_vision + step.index, {step.prefix + k: v.detach().to("cpu").contiguous() for k, v in step.block.state_dict().items()})
            fault_point("build_block", step.index + 1)

        vocab = _save_rest(stream, vision_prefix, cfg.vocab_format, tmp / f"model-{n_files:05d}-of-{n_files:05d}.safetensors", weight_map)
        write_json(tmp / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
        shutil.copy2(base_dir / "config.json", tmp / "config.json")
        copy_tokenizer_files(base_dir, tmp)
        write_json(tmp / MANIFEST, {
            "kind": "emulator", "base": str(base_dir), "base_fingerprint": fingerprint(base_dir), "fingerprint": fingerprint(tmp),
            "family": family_of(model.config).name, "blocks": stream.blocks_name,
            **({"vision_blocks": vision[0]} if vision and vision_plan else {}),
            "config": cfg,
            "calibration": {"file": str(Path(calibration).expanduser().resolve()), "samples": len(ids),
                            "tokens": n_tokens, "widest_layer_input": width},
            **_totals(layers, total_params), **({"vocab": vocab} if vocab else {}), "layers": layers,
            "versions": versions(), "wall_seconds": round(watch.seconds, 1), **peak_memory_mb(),
        })
    print(watch.summary("build", out_path))
    return out_path


def emulator_layer(entry: dict[str, Any], bias: bool, device: torch.device | str | None,
                   dtype: torch.dtype | None) -> nn.Linear:
    """An empty layer of the kind a compressed layer's manifest `entry` describes (LowRankLinear or QuantLinear)."""
    if entry.get("kind") == "quant":
        return QuantLinear(entry["in_features"], entry["out_features"], entry["format"], entry["rank"], bias,
                           device=device, dtype=dtype)
    return LowRankLinear(entry["in_features"], entry["out_features"], entry["rank"], bias, device=device, dtype=dtype)


def load_layer(store: WeightStore, name: str, entry: dict[str, Any], device: torch.device,
               dtype: torch.dtype) -> nn.Linear:
    """One compressed layer `name` of an emulator folder, read alone (floats in `dtype`; codes as stored)."""
    layer = emulator_layer(entry, f"{name}.bias" in store, device, dtype)
    with torch.no_grad():
        for key, t in layer.state_dict().items():
            t.copy_(store.get(f"{name}.{key}"))
    return layer


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
    store = WeightStore(folder)
    if manifest.get("vocab"):  # before the parameters are read: the dense embedding and head are not stored
        install_vocab(model, manifest["vocab"], store, dev, dt)
    for name, layer in manifest["layers"].items():
        if layer["rank"] is not None:
            _set_module(model, name, emulator_layer(layer, model.get_submodule(name).bias is not None, "meta", None))
    materialize(model, "", store, dev, dt)
    for name, mod in model.named_modules():  # codes and scales are buffers, loaded as stored (the vocabulary's: above)
        if isinstance(mod, QuantLinear) and name in manifest["layers"]:
            for key in ("qweight", "scales"):
                mod._buffers[key] = store.get(f"{name}.{key}").to(dev)
    if hasattr(model, "tie_weights") and not manifest.get("vocab"):  # a quantised tied head already shares the codes
        model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise EmlocError(f"{folder} is missing weights ({left[0]}...); rebuild the emulator")
    model.eval()
    model.name_or_path = str(folder.resolve())
    if not isinstance(model.config, dict):  # a diffusers config is frozen
        model.config.name_or_path = str(folder.resolve())
    model.emloc_manifest = manifest
    return model
