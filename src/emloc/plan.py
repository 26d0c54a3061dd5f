"""Predict the peak memory of every EMLoC stage from a model's config alone, and pick a ratio.

Nothing here loads weights: the model is built on the meta device (`emloc.models.empty_model`), which
gives exact parameter counts and the shapes of the block linears; the rest comes from the config
(hidden size d, MLP width I, key/value width d_kv = kv_heads x head_dim, vocabulary V, blocks L).

Notation: B x T tokens per step (batch x seq_len); w bytes per weight/activation element in the
compute dtype (2 for bf16/fp16, 4 for fp32); r the LoRA rank; s the bytes of the SVD statistics dtype
(8 for float64). Every total also holds a constant runtime overhead (the Python/torch process on CPU,
the CUDA context on GPU) and, on CPU, the tokenizer where the stage loads one. The estimates count
live tensors the way transformers 5 / PEFT / emloc create them and assume a fused attention kernel
(SDPA: no T x T score matrix). On CPU they also count what is resident of memory-mapped weights:
weights stored in the compute dtype are not copied when loaded, so pages never read (embedding rows
the data never uses, an untied head `build` and `correct` never apply) are not resident
(`unread_embedding_bytes`, `nonblock_resident`). Against peak RSS measured by
benchmarks/memory.py on CPU (fp32, batch 8 x 256) for SmolLM2-135M and Qwen2.5-Coder-0.5B, every
stage came within 15% (README, "Memory"); the CUDA overhead and the large-model terms are not
measured here, so treat them as approximations.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from .errors import EmlocError
# the formulas live in plan_formulas (shapes, bytes) and plan_stages (each stage's peak); re-exported here
from .plan_formulas import (CPU_OVERHEAD, CUDA_OVERHEAD, DEFAULT_RATIOS, GIB, Estimate, ModelShape, _dtype_bytes,  # noqa: F401
                            emulator_params, emulator_weight_bytes, gb, layer_ranks, model_shape)
from .plan_stages import _build, _correct, _inference, _merge, _training, merge_chunk_bytes  # noqa: F401



@dataclass
class PlanConfig:
    """Settings of `predict`.

    Attributes:
        batch: sequences per forward pass (B).
        seq_len: tokens per sequence (T).
        rank: LoRA rank r (LoRA on every nn.Linear inside the blocks, as `emloc train` does).
        dtype: compute dtype of weights and activations: bf16, fp16 or fp32.
        ratios: candidate compression ratios, tried from the largest; 1.0 means plain LoRA on the original.
        gradient_checkpointing: whether training recomputes block activations in the backward pass.
        loss_chunk: tokens per output-head application in emloc's answer-token loss (emloc.loss, 256
            in `emloc train`); None for full B x T x V logits (a model called with `labels=`).
        calibration_samples: calibration records of `emloc build`.
        calibration_len: tokens per calibration record.
        budget: memory available on the compute device in bytes, or None to only report.
        device: cuda or cpu; on cpu every stage uses host memory and the process overhead is added.
        stats_dtype: float64 or float32, the Gram/SVD dtype of `emloc build`.
        host_budget: host memory in bytes for the CPU-only stages (correct, merge) when device is cuda;
            None: not checked. On cpu, `budget` applies to every stage.
        correction: the `emloc correct` mode: auto (the default: weighted's streaming, then the
            original scores the candidates at inference cost), weighted (streams the original's
            blocks over the calibration records for its statistics), paper or none (no statistics).
        method: the emulator method (`emloc build --method`): auto (the default, as `emloc build`),
            svd, quant or svd+quant; a ratio is the fraction of the block linears' bytes, and ratios a
            quantised method cannot reach are dropped.
        vocab_used: distinct token ids in the data (None: assume every row of the vocabulary is read,
            the safe default). Only used on cpu for an untied input embedding stored in the compute
            dtype; see `unread_embedding_bytes`.
        vocab_format: `emloc build --vocab-format`: keep (the default), int8 or nf4 for the emulator's
            token embedding and output head.
    """

    batch: int = 1
    seq_len: int = 2048
    rank: int = 8
    dtype: str = "bf16"
    ratios: tuple[float, ...] = DEFAULT_RATIOS
    gradient_checkpointing: bool = True
    loss_chunk: int | None = 256
    calibration_samples: int = 64
    calibration_len: int = 512
    budget: int | None = None
    device: str = "cuda"
    stats_dtype: str = "float64"
    host_budget: int | None = None
    correction: str = "auto"
    vocab_used: int | None = None
    method: str = "auto"
    vocab_format: str = "keep"


@dataclass
class Recommendation:
    """The largest candidate ratio whose every stage fits, or None and why not.

    Attributes:
        ratio: the recommended ratio (1.0: plain LoRA, no emulator needed), or None.
        message: one or more plain sentences for the user.
        over: for the smallest candidate when nothing fits: stage -> bytes above its budget.
    """

    ratio: float | None
    message: str
    over: dict[str, int] = field(default_factory=dict)


@dataclass
class Plan:
    """Predicted peaks of every stage for one model and `PlanConfig`.

    Attributes:
        config: the settings.
        shape: the model's shape.
        overhead: runtime overhead included in every device-stage total.
        lora_params: LoRA parameters (the same on the original and on any emulator).
        inference: one forward of the original at B x T.
        lora_training: LoRA training on the original.
        training: ratio -> LoRA training on the emulator at that ratio (1.0: the original).
        build: ratio -> `emloc build` at that ratio.
        correct: `emloc correct` (host).
        merge: `emloc merge` (host).
    """

    config: PlanConfig
    shape: ModelShape
    overhead: int
    lora_params: int
    inference: Estimate
    lora_training: Estimate
    training: dict[float, Estimate]
    build: dict[float, Estimate]
    correct: Estimate
    merge: Estimate

    def training_at(self, ratio: float) -> Estimate:
        """EMLoC training estimate at `ratio` (must be one of the candidates)."""
        return self.training[float(ratio)]

    def stages(self, ratio: float) -> list[Estimate]:
        """The stages a run at `ratio` needs: plain LoRA + merge at 1.0, else build, train, correct, merge."""
        if ratio >= 1:
            return [self.lora_training, self.merge]
        return [self.build[ratio], self.training[ratio], self.correct, self.merge]

    def _budgets(self, budget: int | None, host_budget: int | None) -> tuple[int | None, int | None]:
        budget = self.config.budget if budget is None else budget
        host_budget = self.config.host_budget if host_budget is None else host_budget
        return budget, budget if self.config.device == "cpu" else host_budget

    def shortfall(self, ratio: float, budget: int | None = None, host_budget: int | None = None) -> dict[str, int]:
        """Stage -> bytes above its budget for a run at `ratio` (empty: everything fits).

        Device stages (build, train) are checked against `budget`; host stages (correct, merge)
        against `host_budget` on cuda (unchecked if None), against `budget` on cpu. Defaults come
        from the config.
        """
        budget, host_budget = self._budgets(budget, host_budget)
        out = {}
        for e in self.stages(ratio):
            limit = host_budget if e.host else budget
            if limit is not None and e.total > limit:
                out[e.stage] = e.total - limit
        return out

    def recommend(self, budget: int | None = None, host_budget: int | None = None) -> Recommendation:
        """Pick the largest candidate ratio whose every checked stage fits (see `shortfall`)."""
        budget, host_budget = self._budgets(budget, host_budget)
        if budget is None:
            return Recommendation(None, "no memory budget given; pass one to get a recommendation")
        note = ""
        if self.inference.total > budget:
            note = (f" Note: inference of the original at batch {self.config.batch} x {self.config.seq_len} needs "
                    f"{gb(self.inference.total)}, above the budget; using the merged model will need offloading or "
                    "quantisation.")
        ratios = sorted(self.training, reverse=True)
        for ratio in ratios:
            if not self.shortfall(ratio, budget, host_budget):
                what = "plain LoRA on the original fits, no emulator needed" if ratio >= 1 else \
                    f"EMLoC at ratio {ratio:g}: every stage fits"
                peak = max(e.total for e in self.stages(ratio) if not e.host or self.config.device == "cpu")
                return Recommendation(ratio, f"recommended ratio {ratio:g} ({what}; peak {gb(peak)} of {gb(budget)})."
                                      + note)
        smallest = ratios[-1]
        miss = self.shortfall(smallest, budget, host_budget)
        why = "; ".join(f"{stage} needs {gb(self._stage(smallest, stage).total)} ({gb(b)} over)" for stage, b in miss.items())
        return Recommendation(None, f"nothing fits {gb(budget)}: even at the smallest ratio {smallest:g}, {why}." + note, miss)

    def _stage(self, ratio: float, stage: str) -> Estimate:
        return next(e for e in self.stages(ratio) if e.stage == stage)


def parse_size(text: str | int) -> int:
    """`24GB`, `24G`, `24GiB` -> 24 * 2^30 (also M/MB/MiB, T/TB); a plain integer is bytes."""
    if isinstance(text, int):
        return text
    s = text.strip().upper().replace("IB", "B")
    units = {"TB": 2**40, "T": 2**40, "GB": GIB, "G": GIB, "MB": 2**20, "M": 2**20, "B": 1}
    for suffix, mult in units.items():
        if s.endswith(suffix):
            try:
                return int(float(s[: -len(suffix)]) * mult)
            except ValueError:
                break
    try:
        return int(float(s))
    except ValueError:
        raise EmlocError(f"memory size {text!r} is not understood; write e.g. 24GB or 80GiB") from None


def predict(model: Any, cfg: PlanConfig | None = None) -> Plan:
    """Predict the peak memory of inference, LoRA training and every EMLoC stage, from the config alone.

    Args:
        model: a model folder (weights not needed), a config.json, a packaged model name already
            converted, a transformers config object, or a `ModelShape` (to reuse one).
        cfg: settings; defaults to `PlanConfig()`.

    Returns:
        A `Plan`; `plan.recommend()` picks a ratio for `cfg.budget`, `format_plan(plan)` prints it.
    """
    cfg = cfg or PlanConfig()
    if cfg.device not in ("cuda", "cpu"):
        raise EmlocError(f"unknown device {cfg.device!r}; use cuda or cpu")
    _dtype_bytes(cfg.dtype)
    if cfg.correction not in ("auto", "weighted", "paper", "none"):
        raise EmlocError(f"unknown correction mode {cfg.correction!r}; use auto, weighted, paper or none")
    if cfg.stats_dtype not in ("float64", "float32"):
        raise EmlocError(f"unknown stats dtype {cfg.stats_dtype!r}; use float64 or float32")
    if not cfg.ratios or any(not (0 < r <= 1) for r in cfg.ratios):
        raise EmlocError(f"ratios {cfg.ratios!r} must be fractions in (0, 1]")
    if cfg.method not in ("auto", "svd", "quant", "svd+quant"):
        raise EmlocError(f"unknown method {cfg.method!r}; emloc plan knows auto, svd, quant and svd+quant")
    from .vocab import VOCAB_FORMATS

    if cfg.vocab_format not in VOCAB_FORMATS:
        raise EmlocError(f"unknown --vocab-format {cfg.vocab_format!r}; use one of {', '.join(VOCAB_FORMATS)}")
    if cfg.method in ("quant", "svd+quant"):  # below its smallest format a quantised emulator does not exist
        from .emulator import layer_plan

        def reachable(r: float) -> bool:
            try:
                return r >= 1 or bool(layer_plan(4096, 4096, r, cfg.method))
            except EmlocError:
                return False
        cfg = replace(cfg, ratios=tuple(r for r in cfg.ratios if reachable(r)) or (1.0,))
    if min(cfg.batch, cfg.seq_len, cfg.rank, cfg.calibration_samples, cfg.calibration_len, cfg.loss_chunk or 1) < 1:
        raise EmlocError("batch, seq_len, rank, loss_chunk and the calibration sizes must be at least 1")
    shape = model if isinstance(model, ModelShape) else model_shape(model)
    overhead = CPU_OVERHEAD if cfg.device == "cpu" else CUDA_OVERHEAD
    lora = sum(cfg.rank * (m + n) for _, m, n in shape.linears)
    ratios = sorted({float(r) for r in cfg.ratios}, reverse=True)
    original_stored = shape.checkpoint_bytes == _dtype_bytes(cfg.dtype)
    lora_training = _training(shape, cfg, shape.total_params, lora, overhead, "train", original_stored)
    # an emulator's weights are written in the compute dtype of its build, assumed to be cfg.dtype
    from .emulator import resolve_method
    from .quant import row_block_entries

    largest = max(m * n for _, m, n in shape.linears) * _dtype_bytes(cfg.dtype)
    training = {}
    for r in ratios:
        quantised = r < 1 and resolve_method(cfg.method, [r]) != "svd"
        vocab = cfg.vocab_format != "keep" and r < 1
        weights = emulator_weight_bytes(shape, r, cfg.method, _dtype_bytes(cfg.dtype)) - vocab_saving(shape, cfg) if r < 1 else None
        rebuilt = max(largest if quantised else 0, min(shape.vocab * shape.hidden, row_block_entries(cfg.device)) * _dtype_bytes(cfg.dtype) if vocab else 0)
        # a quantised embedding is codes, never the compute dtype: no rows are subtracted as unread
        training[r] = _training(shape, cfg, shape.total_params if quantised else emulator_params(shape, r), lora, overhead,
                                "train", (r < 1 or original_stored) and not vocab, weights, rebuilt)
    correct, merge = _correct(shape, cfg, lora, min(ratios)), _merge(shape, cfg, lora)
    return Plan(config=cfg, shape=shape, overhead=overhead, lora_params=lora, inference=_inference(shape, cfg, overhead),
                lora_training=lora_training, training=training,
                build={r: _build(shape, cfg, r, overhead) for r in ratios if r < 1},
                correct=correct, merge=merge)


def vocab_saving(shape: ModelShape, cfg: PlanConfig) -> int:
    """Bytes an emulator saves with a quantised embedding and head (`cfg.vocab_format`), against them in cfg.dtype."""
    from .vocab import vocab_entry_bytes

    if cfg.vocab_format == "keep":
        return 0
    dense_bf16, stored = vocab_entry_bytes(shape.embedding_rows or shape.vocab, shape.hidden, cfg.vocab_format, shape.tied)
    return dense_bf16 // 2 * _dtype_bytes(cfg.dtype) - stored


def format_plan(plan: Plan) -> str:
    """A markdown report: the original's inference and LoRA training, a table by ratio, the recommendation."""
    c = plan.config
    where = "GPU" if c.device == "cuda" else "CPU"
    vocab = "" if c.vocab_format == "keep" else f" with {c.vocab_format} embedding and head"
    lines = [f"Memory plan: {c.method} emulator{vocab}, batch {c.batch} x {c.seq_len} tokens, {c.dtype}, LoRA r={c.rank}, "
             f"{'with' if c.gradient_checkpointing else 'no'} gradient checkpointing, {where} "
             f"(1 GB = 2^30 bytes; runtime overhead {gb(plan.overhead)} included)", "",
             f"- inference of the original: {gb(plan.inference.total)}",
             f"- LoRA training on the original: {gb(plan.lora_training.total)}",
             f"- LoRA parameters: {plan.lora_params:,}", "",
             "| ratio | params | weights | build | train | correct (CPU) | merge (CPU) | fits |",
             "|---:|---:|---:|---:|---:|---:|---:|:---:|"]
    for r in sorted(plan.training, reverse=True):
        t = plan.training[r]
        build = gb(plan.build[r].total) if r < 1 else "-"
        correct = gb(plan.correct.total) if r < 1 else "-"
        fits = "?" if c.budget is None else ("no" if plan.shortfall(r) else "yes")
        size = f"{t.params / 1e9:.2f} B" if (t.params or 0) >= 1e9 else f"{(t.params or 0) / 1e6:.1f} M"
        lines.append(f"| {r:g} | {size} | {gb(t.parts['weights'])} | {build} | {gb(t.total)} | {correct} | {gb(plan.merge.total)} | {fits} |")
    rec = plan.recommend()
    lines += ["", rec.message + stats_dtype_hint(plan, rec)]
    return "\n".join(lines)


def stats_dtype_hint(plan: Plan, rec: Recommendation) -> str:
    """A sentence when float32 build statistics would let a larger ratio fit than `rec` (else "").

    A quantised emulator's build keeps every layer's input Gram for GPTQ: at float64 a 32B model's
    27648-wide down_proj alone holds 6 GB three times over on a GPU.
    """
    c = plan.config
    if c.budget is None or c.stats_dtype != "float64":
        return ""
    alt = predict(plan.shape, replace(c, stats_dtype="float32"))
    alt_rec = alt.recommend()
    if alt_rec.ratio is None or (rec.ratio is not None and alt_rec.ratio <= rec.ratio):
        return ""
    build = f"build {gb(alt.build[alt_rec.ratio].total)}, " if alt_rec.ratio < 1 else ""
    return (f" With --stats-dtype float32 (the build's statistics in single precision) ratio {alt_rec.ratio:g} fits "
            f"({build}peak {gb(max(e.total for e in alt.stages(alt_rec.ratio) if not e.host or c.device == 'cpu'))}).")
