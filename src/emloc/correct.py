"""Stage 3: correct a LoRA trained on an emulator so that it applies to the original model.

Per LoRA'd layer, with W the original weight, W_e the emulator's (W_e = W for a layer left dense),
E = W - W_e, and s the LoRA scaling, the adapter B A trained on the emulator becomes B_new A_new:

`auto` (the default) computes the three adapters below (`none`, `weighted`, `paper`) and keeps the
one under which the original model has the lowest answer NLL on records of the calibration file
outside the calibration draw (forward passes of the original only; `emloc.selection`).

`weighted`: keep A, and remove from B the least-squares image of the emulator's
error in the LoRA's input features, measured on the calibration data:

    C = E G A^T (A G A^T)^-1 (m x r),   B_new = B - C / s,   A_new = A,

with G = sum x x^T the Gram matrix of the original layer's inputs on the calibration records. Only
E G A^T = sum (E x)(A x)^T and A G A^T are needed; they are accumulated from the original's
activations as its blocks stream past (`emloc.stream`), with E x = W x - W_e x, so neither G nor E
is formed. C A is the rank-r map through the LoRA's features that
best reproduces E x on the data: after the correction, the original layer's output differs from the
trained emulator layer's by a residual orthogonal (under G) to every LoRA feature A x. This is the
paper's correction solved in the metric of the data instead of the Euclidean one: the emulator's
activation-aware SVD leaves its error where the inputs have little energy, and a Euclidean
projection (below) copies that large, unused error into the adapter.

`paper` (EMLoC, arXiv 2506.12015, kept as the reference):

1. Orthonormalise A: thin SVD A^T = P Sigma_a Q (P: n x r), so B A = B' P^T with B' = B Q^T Sigma_a.
2. C = (W - W_e) P (m x r): what the original computes differently from the emulator on the r
   orthonormal input directions that the LoRA reads.
3. B_new = B' - C / s, A_new = P^T, so that
   W + s B_new A_new = W (I - P P^T) + W_e P P^T + s B A:
   inside the LoRA's input subspace the corrected original layer computes exactly what the trained
   emulator layer did; outside it the original is untouched.
4. Clamp (L): per direction j, if mean|C_j / s| > L * mean|B'_j|, scale C_j down to that bound.

`none` re-targets the adapter unchanged (for comparison).

Everything is computed in fp32 (fp64 on request; the Grams in fp64) one layer at a time, reading W,
the emulator factors and the adapter for that layer only. The result is a new, standard PEFT adapter
folder for the original model.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .artifacts import (MANIFEST, Stopwatch, check_output, fingerprint, legacy_order, peak_memory_mb, read_json_object, read_manifest,
                        save_finite, staged_output, versions, write_json)
from .checkpoint import fault_point
from .errors import EmlocError
from .families import family_of
from .models import WeightStore, empty_model, load_config, open_safetensors, resolve_model
from .stream import BATCH_TOKENS

log = logging.getLogger("emloc")

ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODES = ("auto", "weighted", "paper", "none")


@dataclass
class CorrectConfig:
    """Settings of `correct_adapter`.

    Attributes:
        mode: `auto` (compute `none`, `weighted` and `paper`, keep the one with the lowest answer NLL
            of the original on `select_records` records of the calibration file outside the
            calibration draw), `weighted` (activation-weighted least-squares correction, above),
            `paper` (the EMLoC paper's correction with its clamp) or `none` (re-target unchanged).
        clamp: L of the paper's clamp, or None for its exact correction (mode `paper` only).
        dtype: `float32` or `float64` for the computation; the adapter is saved in float32.
        calibration: JSONL records for the statistics of mode `weighted` (default: the emulator's
            own calibration file and draw, as recorded in its manifest).
        device: where modes `weighted` and `auto` run the original on the calibration records (auto:
            cuda if available).
        select_records: records mode `auto` scores the candidates on.
    """

    mode: str = "auto"
    clamp: float | None = 3.0
    dtype: str = "float32"
    calibration: str | None = None
    device: str = "auto"
    select_records: int = 32

    def __post_init__(self) -> None:
        """Settings fail here, before any file is read."""
        if self.mode not in MODES:
            raise EmlocError(f"unknown --mode {self.mode!r}; use one of {', '.join(MODES)}")
        if self.dtype not in ("float32", "float64"):
            raise EmlocError(f"unknown --dtype {self.dtype!r} for the correction; use float32 or float64")
        if self.clamp is not None and not self.clamp > 0:
            raise EmlocError(f"--clamp must be positive or none (got {self.clamp})")
        if self.select_records < 1:
            raise EmlocError(f"--select-records must be at least 1 (got {self.select_records})")


@dataclass
class LayerCorrection:
    """The corrected factors of one layer and what the correction did.

    Attributes:
        lora_A: A_new (r x n).
        lora_B: B_new (m x r).
        correction_norm: ||C / s||_F after clamping.
        lora_norm: ||B'||_F, the LoRA's own update norm along P.
        clamped: rank directions whose correction was scaled down.
    """

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    correction_norm: float
    lora_norm: float
    clamped: int


def scaling(config: dict[str, Any], module: str, rank: int) -> float:
    """The LoRA scaling s of `module` from an adapter_config (alpha / r, or alpha / sqrt(r) with rsLoRA)."""
    alpha = config.get("lora_alpha", 8)
    for pat, a in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pat})$", module):  # PEFT's rule: a regex over the module name, first match wins
            alpha = a
            break
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def correct_layer(w: torch.Tensor, w_e: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float,
                  clamp: float | None) -> LayerCorrection:
    """Correct one LoRA layer (see the module docstring).

    Args:
        w: original weight W (m x n).
        w_e: emulator weight W_e (m x n).
        a: lora_A (r x n).
        b: lora_B (m x r).
        s: LoRA scaling.
        clamp: L, or None for the exact correction.
    """
    p, sig, q = torch.linalg.svd(a.T, full_matrices=False)  # A^T = P diag(sig) Q; P (n x r), Q (r x r)
    b_prime = (b @ q.T) * sig  # B Q^T Sigma_a
    c = (w - w_e) @ p / s  # (m x r)
    clamped = 0
    if clamp is not None:
        c_mag = c.abs().mean(dim=0)
        bound = clamp * b_prime.abs().mean(dim=0)
        over = c_mag > bound
        clamped = int(over.sum())
        factor = torch.where(over, bound / c_mag.clamp(min=torch.finfo(c.dtype).tiny), torch.ones_like(c_mag))
        c = c * factor
    return LayerCorrection(p.T.contiguous(), (b_prime - c).contiguous(), float(c.norm()), float(b_prime.norm()), clamped)


def weighted_correction(w: torch.Tensor | None, w_e: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, s: float,
                        gram: torch.Tensor | None = None, ridge: float = 1e-8,
                        projected: tuple[torch.Tensor, torch.Tensor] | None = None) -> LayerCorrection:
    """Correct one LoRA layer in the metric of the data (mode `weighted`, see the module docstring).

    Args:
        w: original weight W (m x n) (not needed with `projected`).
        w_e: emulator weight W_e (m x n) (not needed with `projected`).
        a: lora_A (r x n).
        b: lora_B (m x r).
        s: LoRA scaling.
        gram: G = sum x x^T of the original layer's inputs on the calibration data (n x n).
        ridge: added to A G A^T as a fraction of its mean diagonal, so that LoRA features the data
            never excites (A G A^T singular) get no correction instead of an arbitrary one.
        projected: instead of `w`, `w_e` and `gram`: (E G A^T (m x r), A G A^T (r x r)), the only
            products of G the correction uses, accumulated from the activations
            (`ProjectedStatistics`), so no n x n matrix is needed.
    """
    if projected is None:
        g = gram.to(a.dtype)
        ag = a @ g  # (r x n)
        egat, agat = (w - w_e) @ ag.T, ag @ a.T
    else:
        egat, agat = (t.to(a.dtype) for t in projected)
    agat = agat + ridge * agat.diagonal().mean().clamp(min=torch.finfo(a.dtype).tiny) * torch.eye(a.shape[0], dtype=a.dtype)
    c = torch.linalg.solve(agat, egat.T).T / s  # (m x r) = E G A^T (A G A^T)^-1 / s
    return LayerCorrection(a.contiguous(), (b - c).contiguous(), float(c.norm()), float(b.norm()), 0)


class ProjectedStatistics:
    """Accumulates E G A^T = sum (E x)(A x)^T (m x r) and A G A^T (r x r) of one layer, batch by batch.

    E x = W x - W_e x is the original layer's (bias-free) output minus the emulator layer's, so
    neither E nor G is ever formed: per batch of t tokens, t r n multiply-adds plus one emulator
    layer's product (t k (m + n) for a low-rank layer).

    Args:
        a: lora_A (r x n), in the statistics dtype on the compute device.
        emulator: the emulator's layer (`LowRankLinear` or `QuantLinear`, anything with `linear_map`),
            on the same device.
    """

    def __init__(self, a: torch.Tensor, emulator: torch.nn.Module) -> None:
        self.a, self.emulator = a, emulator
        m = emulator.out_features
        self.egat = torch.zeros(m, a.shape[0], dtype=a.dtype, device=a.device)
        self.agat = torch.zeros(a.shape[0], a.shape[0], dtype=a.dtype, device=a.device)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        ax = x @ self.a.T  # t x r
        ex = y - self.emulator.linear_map(x)  # t x m
        self.egat += ex.T @ ax
        self.agat += ax.T @ ax


def _emulator_weight(store: WeightStore, module: str, layer: dict[str, Any] | None, dtype: torch.dtype) -> torch.Tensor:
    from .emulator import load_layer

    if layer is None or layer.get("rank") is None:
        return store.get(f"{module}.weight").to(dtype)
    return load_layer(store, module, layer, torch.device("cpu"), dtype).dense_weight(dtype)


def _lora_modules(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Adapter keys look like `base_model.model.<module>.lora_A.weight`."""
    mods = []
    for k in tensors:
        if k.endswith(".lora_A.weight"):
            mods.append(k[len("base_model.model."):-len(".lora_A.weight")] if k.startswith("base_model.model.") else
                        k[:-len(".lora_A.weight")])
    return mods


def _check_adapter(adapter: Path) -> dict[str, Any]:
    """Validate a LoRA adapter folder that emloc can correct or merge; return its adapter_config."""
    if not adapter.is_dir():
        raise EmlocError(f"adapter folder {adapter} does not exist; give a PEFT adapter folder (e.g. the output of `emloc train`)")
    cfg_path = adapter / "adapter_config.json"
    if not cfg_path.is_file() or not (adapter / ADAPTER_WEIGHTS).is_file():
        raise EmlocError(f"{adapter} is not a PEFT adapter folder (needs adapter_config.json and {ADAPTER_WEIGHTS})")
    config = read_json_object(cfg_path)
    if config.get("peft_type") != "LORA":
        raise EmlocError(f"adapter type {config.get('peft_type')} cannot be corrected; emloc corrects plain LoRA adapters")
    for flag, what in (("use_dora", "DoRA"), ("lora_bias", "LoRA with a trained bias")):
        if config.get(flag):
            raise EmlocError(f"{what} adapters cannot be corrected (the correction is for W + s B A); train plain LoRA")
    if config.get("modules_to_save"):
        raise EmlocError("adapters with modules_to_save cannot be corrected; train LoRA only (no modules_to_save)")
    if config.get("fan_in_fan_out"):
        raise EmlocError("fan_in_fan_out adapters (Conv1D layers) cannot be corrected; emloc handles nn.Linear layers")
    if config.get("bias", "none") != "none":
        raise EmlocError(f"adapters with bias={config['bias']!r} train biases that emloc would drop; train with bias='none'")
    if config.get("trainable_token_indices"):
        raise EmlocError("adapters with trainable_token_indices train embedding rows that emloc would drop; train LoRA only")
    with open_safetensors(adapter / ADAPTER_WEIGHTS) as f:
        extra = [k for k in f.keys() if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if extra:  # embedding LoRA (lora_embedding_A/B), biases, trainable tokens, ...: not W + s B A on a linear layer
        raise EmlocError(f"{adapter} holds {extra[0]}, which emloc cannot correct or merge; train LoRA on linear layers only")
    return config


def _weighted_statistics(cfg: CorrectConfig, emanifest: dict[str, Any], base_dir: Path, modules: list[str],
                         tensors: dict[str, torch.Tensor], emu_store: WeightStore
                         ) -> Iterator[tuple[str, tuple[torch.Tensor, torch.Tensor] | None]]:
    """(module, (E G A^T, A G A^T)) for every LoRA'd layer, block by block, on the emulator's calibration draw.

    Layers the emulator kept dense come first, with None (W_e = W: nothing to correct); then the
    compressed ones, their statistics accumulated from the original's activations as the blocks
    stream past (`ProjectedStatistics`: m x r and r x r per layer).
    """
    from .emulator import load_layer
    from .models import parse_device, parse_dtype, parse_stats_dtype
    from .selection import calibration_file
    from .stream import StreamedModel

    ecfg = emanifest.get("config", {})
    data = calibration_file(cfg.calibration, emanifest)
    layers = emanifest["layers"]
    wanted = {m for m in modules if layers.get(m, {}).get("rank") is not None}
    yield from ((m, None) for m in modules if m not in wanted)
    if not wanted:
        return
    ids, _ = family_of(load_config(base_dir)).calibrate(base_dir, Path(data), ecfg)  # the build's draw, replayed
    device = parse_device(cfg.device)
    dtype = parse_dtype(ecfg.get("dtype", "auto"), device)
    sd = parse_stats_dtype(ecfg.get("stats_dtype", "float64"))
    stream = StreamedModel(base_dir)
    outside = [m for m in wanted if not stream.inside(m)]
    if outside:
        raise EmlocError(f"{outside[0]} is not a linear layer inside the transformer blocks ({stream.blocks_name}); "
                         "emloc corrects LoRA on block linears only")
    last = max(stream.block_index(m) for m in wanted)
    stream.load_outside(device, dtype)
    for step in stream.passes(ids, device, dtype, stats_dtype=sd, batch_tokens=int(ecfg.get("batch_tokens", BATCH_TOKENS)),
                              last=last, desc="calibration statistics"):
        mine = sorted(m for m in wanted if m.startswith(step.prefix))
        acc = {m: ProjectedStatistics(tensors[f"base_model.model.{m}.lora_A.weight"].to(device=device, dtype=sd),
                                      load_layer(emu_store, m, layers[m], device, sd)) for m in mine}
        emu_store.release()
        step.run({m[len(step.prefix):]: (acc[m],) for m in mine})
        for m in mine:
            st = acc.pop(m)
            yield m, (st.egat.cpu(), st.agat.cpu())
            del st


def _correct_tensors(mode: str, cfg: CorrectConfig, tensors: dict[str, torch.Tensor], modules: list[str],
                     acfg: dict[str, Any], emanifest: dict[str, Any], base_dir: Path, stores: tuple[WeightStore, WeightStore],
                     dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The adapter's tensors corrected by `mode` (weighted, paper or none), and the per-layer report."""
    base_store, emu_store = stores
    prefix = "base_model.model."
    report: dict[str, Any] = {}
    new = dict(tensors)
    if mode == "none":
        for mod in modules:
            b = tensors[f"{prefix}{mod}.lora_B.weight"]
            report[mod] = {"scaling": scaling(acfg, mod, b.shape[1]), "correction_norm": 0.0, "lora_norm": float(b.float().norm()),
                           "clamped": 0, "rank": b.shape[1]}
        return new, report
    work = _weighted_statistics(cfg, emanifest, base_dir, modules, tensors, emu_store) if mode == "weighted" \
        else ((m, None) for m in modules)
    for i, (mod, projected) in enumerate(tqdm(work, total=len(modules), desc=f"correcting LoRA ({mode})", unit="layer")):
        fault_point("correct_layer", i)
        ka, kb = f"{prefix}{mod}.lora_A.weight", f"{prefix}{mod}.lora_B.weight"
        a, b = tensors[ka].to(dtype), tensors[kb].to(dtype)
        layer = emanifest["layers"].get(mod)
        s = scaling(acfg, mod, a.shape[0])
        if mode == "weighted":
            if projected is None:  # a layer the emulator kept dense has W_e = W: nothing to correct
                report[mod] = {"scaling": s, "correction_norm": 0.0, "lora_norm": float(b.norm()), "clamped": 0, "rank": a.shape[0]}
                continue
            res = weighted_correction(None, None, a, b, s, projected=projected)
        else:
            w = base_store.get(f"{mod}.weight").to(dtype)
            res = correct_layer(w, _emulator_weight(emu_store, mod, layer, dtype), a, b, s, cfg.clamp)
        if not (torch.isfinite(res.lora_A).all() and torch.isfinite(res.lora_B).all()):
            raise EmlocError(f"the corrected LoRA of {mod} is non-finite; check the adapter and emulator weights")
        new[ka], new[kb] = res.lora_A.float(), res.lora_B.float()
        base_store.release()
        emu_store.release()
        report[mod] = {"scaling": s, "correction_norm": res.correction_norm, "lora_norm": res.lora_norm,
                       "clamped": res.clamped, "rank": a.shape[0]}
    return new, report


def _check_foreign_adapter(acfg: dict[str, Any], emu_dir: Path) -> None:
    """An adapter without emloc's manifest: its recorded model path must be this emulator, if it names an existing folder."""
    named = Path(str(acfg.get("base_model_name_or_path") or "")).expanduser()
    if named.is_dir() and named.resolve() != emu_dir.resolve():
        raise EmlocError(f"the adapter was trained on {named}, not on the emulator {emu_dir}; pass --emulator {named}")
    log.warning("the adapter has no emloc manifest (trained outside `emloc train`): its emulator's weights cannot be "
                "verified by fingerprint; make sure %s was not rebuilt since it was trained", emu_dir)


DIFFUSERS_LORA = "pytorch_lora_weights.safetensors"


def write_diffusers_lora(path: Path, tensors: dict[str, torch.Tensor], acfg: dict[str, Any], prefix: str) -> None:
    """Write PEFT adapter tensors as a diffusers LoRA file: keys `<prefix>.<module>.lora_A.weight`, and the
    LoRA config in the metadata (keys `<prefix>.<field>`), so diffusers uses its `lora_alpha` and
    `alpha_pattern` instead of assuming alpha = r."""
    from safetensors.torch import save_file

    peft_prefix = "base_model.model."
    out = {f"{prefix}.{k[len(peft_prefix):] if k.startswith(peft_prefix) else k}": v.contiguous() for k, v in tensors.items()}
    meta = {f"{prefix}.{k}": sorted(v) if isinstance(v, set) else v for k, v in acfg.items()
            if k not in ("base_model_name_or_path", "revision", "auto_mapping", "task_type")}
    save_file(out, path, metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta, indent=2, sort_keys=True)})


def _inputs(adapter: str | Path, emulator: str | Path | None, base: str | Path | None
            ) -> tuple[Path, dict[str, Any], Path, dict[str, Any], Path]:
    """Find and check the correction's inputs: the adapter, the emulator it was trained on (given,
    or named by the adapter's manifest or PEFT config) and that emulator's base.

    Returns:
        (adapter folder, its adapter_config, emulator folder, emulator manifest, base folder).
    """
    adapter = Path(adapter).expanduser().resolve()
    acfg = _check_adapter(adapter)
    amanifest = read_manifest(adapter) or {}
    emu_dir = Path(emulator or amanifest.get("trained_on") or acfg.get("base_model_name_or_path") or "").expanduser()
    emanifest = read_manifest(emu_dir) if emu_dir.is_dir() else None
    if emanifest is None or emanifest.get("kind") != "emulator":
        raise EmlocError(f"{emu_dir} is not an emulator folder; pass --emulator with the emulator the adapter was trained on")
    if amanifest.get("trained_on_fingerprint") and amanifest["trained_on_fingerprint"] != emanifest.get("fingerprint"):
        raise EmlocError(f"the adapter was trained on a different emulator than {emu_dir} (fingerprint mismatch); "
                         "pass the emulator it was trained on")
    if not amanifest.get("trained_on_fingerprint"):  # trained elsewhere (e.g. HF Trainer): PEFT records the model's path only
        _check_foreign_adapter(acfg, emu_dir)
    base_dir = resolve_model(base or emanifest["base"])
    if fingerprint(base_dir) != emanifest["base_fingerprint"]:
        raise EmlocError(f"{base_dir} is not the base model the emulator was built from (fingerprint mismatch); "
                         f"pass --base with the model used in `emloc build`")
    return adapter, acfg, emu_dir, emanifest, base_dir


def _mode_for(cfg: CorrectConfig, emanifest: dict, emu_dir: Path) -> CorrectConfig:
    """The settings as they apply to this emulator: a structural one (layer drop, channel pruning; its
    manifest's `method`) is mapped onto the original without correction."""
    method = emanifest.get("method", "svd")
    if method != "svd" and cfg.mode not in ("none", "auto"):
        raise EmlocError(f"{emu_dir} is a {method} emulator; its adapters are mapped onto the original without "
                         "correction: use --mode none")
    if method != "svd":
        return replace(cfg, mode="none")
    ecfg = emanifest.get("config", {})
    if cfg.mode == "weighted" and (ecfg.get("sequential") or ecfg.get("whiten") is False):
        # measured on the small bench: weighted removes the emulator's error as the original's
        # inputs see it, which these emulators never minimised; it undid most of the adapter there
        log.warning("%s was built with %s; the weighted correction measured far worse than none on such emulators; "
                    "prefer --mode auto", emu_dir, "--sequential" if ecfg.get("sequential") else "--no-whiten")
    return cfg


def _corrected(cfg: CorrectConfig, tensors: dict[str, torch.Tensor], modules: list[str], acfg: dict, emanifest: dict,
               base_dir: Path, stores: tuple, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict, str, dict[str, float] | None]:
    """The corrected LoRA tensors (named for the original), the per-layer report, the mode used and,
    for `auto`, each candidate's held-out NLL."""
    selection: dict[str, float] | None = None
    chosen = cfg.mode
    if cfg.mode == "auto":
        from .selection import select_correction

        candidates = {m: _correct_tensors(m, cfg, tensors, modules, acfg, emanifest, base_dir, stores, dtype)
                      for m in ("none", "weighted", "paper")}
        chosen, selection = select_correction({m: c[0] for m, c in candidates.items()}, acfg, base_dir, emanifest, cfg)
        new, report = candidates[chosen]
        log.info("auto: chose %s (NLL on %d records outside the calibration draw: %s)", chosen, cfg.select_records,
                 ", ".join(f"{k} {v:.4f}" for k, v in selection.items()))
    else:
        new, report = _correct_tensors(cfg.mode, cfg, tensors, modules, acfg, emanifest, base_dir, stores, dtype)
    if emanifest.get("method", "svd") != "svd":
        from .baselines import to_original

        new = to_original(new, emanifest)
    return new, report, chosen, selection


def correct_adapter(adapter: str | Path, output: str | Path, config: CorrectConfig | None = None, overwrite: bool = False,
                    *legacy: Any, emulator: str | Path | None = None, base: str | Path | None = None) -> Path:
    """Write a corrected copy of an emulator-trained adapter for the original model.

    (The previous positional order, `(adapter, output, emulator, base, config, overwrite)`, still
    works with a warning for one release.)

    Args:
        adapter: PEFT LoRA adapter trained on the emulator.
        output: new adapter folder (the input is never modified).
        emulator: the emulator it was trained on (default: from the adapter's manifest or config).
        base: the original model (default: from the emulator's manifest).
        config: settings; defaults to `CorrectConfig()`.
        overwrite: replace a non-empty `output`.

    Returns:
        The corrected adapter folder; its adapter_config.json names the original model.
    """
    if legacy or not isinstance(config, (CorrectConfig, type(None))) or not isinstance(overwrite, bool):
        legacy_order("correct_adapter", "correct_adapter(adapter, output, config, overwrite, emulator=..., base=...)")
        old = (config, overwrite, *legacy) + (None, False)[len(legacy):]
        emulator, base, config, overwrite = old[0], old[1], old[2], bool(old[3])
    cfg = config or CorrectConfig()
    if cfg.mode not in MODES:
        raise EmlocError(f"unknown correction mode {cfg.mode!r}; use one of {', '.join(MODES)}")
    if cfg.clamp is not None and not cfg.clamp > 0:
        raise EmlocError(f"clamp L must be positive (got {cfg.clamp}); use 'none' to disable it")
    watch = Stopwatch()
    check_output(output, overwrite, (adapter, emulator, base))  # before any work; again below with the inputs found
    adapter, acfg, emu_dir, emanifest, base_dir = _inputs(adapter, emulator, base)
    inputs = (adapter, emu_dir, base_dir)
    out_path = check_output(output, overwrite, inputs)

    cfg = _mode_for(cfg, emanifest, emu_dir)
    dtype = {"float32": torch.float32, "float64": torch.float64}[cfg.dtype]
    tensors = load_file(adapter / ADAPTER_WEIGHTS)
    modules = _lora_modules(tensors)
    if not modules:
        raise EmlocError(f"{adapter} holds no LoRA weights")
    skeleton = empty_model(load_config(base_dir))  # meta device: names only, no memory
    stores = (WeightStore(base_dir).align(skeleton), WeightStore(emu_dir))
    new, report, chosen, selection = _corrected(cfg, tensors, modules, acfg, emanifest, base_dir, stores, dtype)
    with staged_output(out_path, overwrite, inputs) as tmp:
        save_finite({k: v.contiguous() for k, v in new.items()}, tmp / ADAPTER_WEIGHTS)
        fault_point("correct_write", 1)
        acfg["base_model_name_or_path"] = str(base_dir)
        (tmp / "adapter_config.json").write_text(json.dumps(acfg, indent=2) + "\n")
        if (adapter / "README.md").is_file():
            shutil.copy2(adapter / "README.md", tmp / "README.md")
        prefix = family_of(skeleton.config).lora_prefix
        if prefix:  # a denoiser: also the file diffusers' `load_lora_weights` / `load_lora_adapter` read
            write_diffusers_lora(tmp / DIFFUSERS_LORA, new, acfg, prefix)
        clamped = sum(r["clamped"] for r in report.values())
        directions = sum(r["rank"] for r in report.values())
        write_json(tmp / MANIFEST, {
            "kind": "corrected_adapter", "mode": chosen, "adapter": str(adapter), "adapter_fingerprint": fingerprint(adapter),
            "emulator": str(emu_dir.resolve()), "emulator_fingerprint": emanifest.get("fingerprint"),
            "base": str(base_dir), "base_fingerprint": emanifest["base_fingerprint"], "config": cfg,
            "clamped_directions": clamped, "directions": directions, "selection": selection, "layers": report,
            "versions": versions(), "wall_seconds": round(watch.seconds, 1), **peak_memory_mb(),
        })
    if clamped:
        log.info("clamp fired in %d of %d rank directions", clamped, directions)
    print(watch.summary("correct", out_path))
    return out_path
