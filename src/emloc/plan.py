"""Predict the peak memory of every EMLoC stage from a model's config alone, and pick a ratio.

Nothing here loads weights: the model is built on the meta device (`emloc.models.empty_model`), which
gives exact parameter counts and the shapes of the block linears; the rest comes from the config
(hidden size d, MLP width I, key/value width d_kv = kv_heads x head_dim, vocabulary V, blocks L).

Notation: B x T tokens per step (batch x seq_len); w bytes per weight/activation element in the
compute dtype (2 for bf16/fp16, 4 for fp32); r the LoRA rank; s the bytes of the SVD statistics dtype
(8 for float64). Every total also holds a constant runtime overhead (the Python/torch process on CPU,
the CUDA context on GPU). The estimates count live tensors the way transformers 5 / PEFT / emloc
create them and assume a fused attention kernel (SDPA: no T x T score matrix). On CPU, for
SmolLM2-135M, they came within 4% of the measured peak of live tensors and within 7% of the peak RSS
(benchmarks/plan_validation.py); the CUDA overhead and the large-model terms are not measured here,
so treat them as approximations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import EmlocError
from .lowrank import rank_for_ratio, saves_parameters

GIB = 2**30
DEFAULT_RATIOS = (1.0, 0.75, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1)
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "float64": 8, "fp64": 8}
# Peak RSS of `python -c "import torch, transformers, peft, emloc"` (torch 2.13 CPU, transformers 5.24,
# peft 0.21), measured by benchmarks/plan_validation.py: 0.386 GiB.
CPU_OVERHEAD = int(0.39 * GIB)
# CUDA context, kernels and cuBLAS workspaces outside torch's allocator; typical, not measured here.
CUDA_OVERHEAD = int(0.5 * GIB)
# glibc keeps freed heap blocks (tensors under its dynamic mmap threshold, up to 32 MiB) in the
# process, so a CPU training run's peak RSS can exceed its live tensors: measured on SmolLM2-135M
# (benchmarks/plan_validation.py) at 1.3 / 0.65 x L x BT x A without / with checkpointing. The emloc
# command line sets a fixed 128 KiB mmap threshold (cli._return_freed_memory), which removes it, so
# the prediction for emloc's own processes carries no slack; use these factors for other processes.
CPU_ALLOCATOR_SLACK = {False: 1.3, True: 0.65}
EMLOC_ALLOCATOR_SLACK = 0.0
SHARD_BYTES = 5 * 10**9  # shard size assumed when only a config is known (Hub checkpoints use <= 5 GB)


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


@dataclass
class ModelShape:
    """What the predictions need to know about a model (from its config and meta skeleton).

    Attributes:
        layers: number of transformer blocks L.
        hidden: d.
        intermediate: I (the widest block linear when the config does not say).
        kv_dim: d_kv = key/value heads x head dim.
        vocab: V.
        total_params: every parameter, tied ones once.
        nonblock_params: parameters outside the blocks (embeddings, final norm, untied head).
        block_params: parameters of the largest block.
        linears: (name, m out, n in) of every nn.Linear inside the blocks, in module order.
        largest_tensor: elements of the largest parameter.
        checkpoint_bytes: bytes per element of the checkpoint (from the config's dtype), or None.
        shard_bytes: size of the largest *.safetensors file, when a model folder was given.
        full_logits: the family post-processes logits (soft-capping, scaling), so emloc's loss
            computes full B x T x V logits for it (see emloc.loss).
    """

    layers: int
    hidden: int
    intermediate: int
    kv_dim: int
    vocab: int
    total_params: int
    nonblock_params: int
    block_params: int
    linears: list[tuple[str, int, int]]
    largest_tensor: int
    checkpoint_bytes: int | None = None
    shard_bytes: int | None = None
    full_logits: bool = False

    @property
    def per_block(self) -> int:
        """Block linears per block (LoRA layers per block)."""
        return len(self.linears) // self.layers

    @property
    def largest_layer(self) -> int:
        """m x n of the largest block linear."""
        return max(m * n for _, m, n in self.linears)


@dataclass
class Estimate:
    """One predicted peak, in bytes, as a sum of named parts.

    Attributes:
        stage: what runs (e.g. `train`, `build`).
        parts: part name -> bytes; the peak is their sum.
        host: True for stages that always run on the CPU (correct, merge).
        params: parameters of the model held by the stage, where that is meaningful.
    """

    stage: str
    parts: dict[str, int]
    host: bool = False
    params: int | None = None

    @property
    def total(self) -> int:
        return sum(self.parts.values())


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


def gb(nbytes: float) -> str:
    """Bytes as GB (2^30 bytes, as torch and nvidia-smi count) with 2 decimals."""
    return f"{nbytes / GIB:.2f} GB"


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


def _dtype_bytes(name: str) -> int:
    if name not in DTYPE_BYTES:
        raise EmlocError(f"unknown dtype {name!r}; use one of bf16, fp16, fp32")
    return DTYPE_BYTES[name]


def _read_config(model: Any) -> tuple[Any, Path | None]:
    from .models import PACKAGED_MODELS, cache_dir, load_config

    if hasattr(model, "to_dict") and hasattr(model, "model_type"):
        return model, None
    key = str(model)
    path = cache_dir() / "models" / key if key in PACKAGED_MODELS else Path(key).expanduser()
    if path.is_file() and path.name.endswith(".json"):
        path = path.parent
    if not (path / "config.json").is_file():
        raise EmlocError(f"{path} has no config.json; give a model folder (weights not needed) or a config object"
                         + (" (packaged models are converted by their first `emloc build`)" if key in PACKAGED_MODELS else ""))
    return load_config(path), path


def model_shape(model: Any) -> ModelShape:
    """Read a `ModelShape` from a model folder, a config.json, a packaged name or a config object.

    The model is built on the meta device; no weight is read. With a folder, the largest
    *.safetensors file size is recorded for the merge estimate.
    """
    from .loss import LOGIT_POSTPROCESSING
    from .models import block_linears, empty_model, find_blocks

    config, folder = _read_config(model)
    meta = empty_model(config)
    blocks_name, blocks = find_blocks(meta)
    params = {id(p): p.numel() for p in meta.parameters()}  # tied parameters once
    total = sum(params.values())
    block_sizes = [sum(p.numel() for p in b.parameters()) for b in blocks]
    linears = [(f"{blocks_name}.{i}.{rel}", lin.out_features, lin.in_features)
               for i, b in enumerate(blocks) for rel, lin in block_linears(b)]
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    d = int(text.hidden_size)
    heads = int(getattr(text, "num_attention_heads", 1) or 1)
    head_dim = int(getattr(text, "head_dim", None) or d // heads)
    kv = int(getattr(text, "num_key_value_heads", None) or heads)
    inter = int(getattr(text, "intermediate_size", None) or max(m for _, m, _ in linears))
    ckpt = getattr(config, "dtype", None)
    ckpt_name = str(ckpt).replace("torch.", "") if ckpt is not None else None
    shard = None
    if folder is not None:
        sizes = [p.stat().st_size for p in folder.glob("*.safetensors")]
        shard = max(sizes) if sizes else None
    return ModelShape(layers=len(blocks), hidden=d, intermediate=inter, kv_dim=kv * head_dim,
                      vocab=int(text.vocab_size), total_params=total, nonblock_params=total - sum(block_sizes),
                      block_params=max(block_sizes), linears=linears,
                      largest_tensor=max(params.values()), checkpoint_bytes=DTYPE_BYTES.get(ckpt_name or ""),
                      shard_bytes=shard, full_logits=any(getattr(text, a, None) not in (None, 1, 1.0)
                                                         for a in LOGIT_POSTPROCESSING))


def layer_ranks(shape: ModelShape, ratio: float) -> list[int | None]:
    """Rank of every block linear at `ratio`, None where it stays dense (emloc.emulator's rule)."""
    out: list[int | None] = []
    for _, m, n in shape.linears:
        k = rank_for_ratio(m, n, ratio) if ratio < 1 else None
        out.append(k if k is not None and saves_parameters(m, n, k) else None)
    return out


def emulator_params(shape: ModelShape, ratio: float) -> int:
    """Parameters of the emulator at `ratio`: every compressed (m x n) layer holds k (m + n) instead of m n."""
    saved = sum(m * n - k * (m + n) for (_, m, n), k in zip(shape.linears, layer_ranks(shape, ratio)) if k is not None)
    return shape.total_params - saved


def block_activation_bytes(shape: ModelShape, w: int, rank: int) -> int:
    """Bytes one block saves for backward, per token, with LoRA on all its linears.

    (9 d + 4 I) w: the block input and post-attention residual (kept by the two RMSNorms), the two
    normed inputs (kept by LoRA A), q, k, v after RoPE (k, v repeated to all heads under a padding
    mask), the attention output and its reshaped copy (o_proj's input), and the MLP's gate, up,
    act(gate) and product (4 I). With bf16/fp16 weights add (8 d + I) x 4: the RMSNorms' fp32 copies
    of their inputs and PEFT's fp32 copy of each LoRA layer's input (3 d for q, k, v, d for o, 2 d for
    gate and up, I for down). Plus r x 4 per LoRA layer (A's output).
    """
    d, inter = shape.hidden, shape.intermediate
    extra = (8 * d + inter) * 4 if w < 4 else 0
    return (9 * d + 4 * inter) * w + extra + shape.per_block * rank * 4


def _training(shape: ModelShape, cfg: PlanConfig, params: int, lora: int, overhead: int, stage: str) -> Estimate:
    """LoRA training peak: weights + LoRA state + saved activations + loss buffers + overhead.

    - frozen weights: params x w.
    - LoRA: params, fp32 grads and AdamW's two fp32 moments: lora x 16 bytes.
    - activations, with checkpointing: the input of every block, L x BT x d x w, plus one block
      recomputed and its gradients, 2 x BT x A; without: every block's A, (L + 1) x BT x A
      (A = `block_activation_bytes`, the + 1 for the gradients flowing through one block).
    - loss: with full logits (loss_chunk None) BT x V x (w + 12): the logits (kept in the output) and
      three fp32 B x T x V tensors alive together in the loss (log-softmax output, its gradient, the
      logits' gradient); for large vocabularies this dominates. With emloc's chunked loss, which
      recomputes each chunk's logits in the backward pass (nothing is kept from the forward), the
      recomputed fp32 logits and two fp32 gradients for c = min(loss_chunk, BT) tokens,
      c x V x (4 + 8), plus the final hidden states BT x d x w (every token assumed to carry loss).
    - on cpu, glibc heap slack: none for emloc's processes (see EMLOC_ALLOCATOR_SLACK).
    """
    w = _dtype_bytes(cfg.dtype)
    tokens = cfg.batch * cfg.seq_len
    act = block_activation_bytes(shape, w, cfg.rank) * tokens
    if cfg.gradient_checkpointing:
        acts = shape.layers * tokens * shape.hidden * w + 2 * act
    else:
        acts = (shape.layers + 1) * act
    if cfg.loss_chunk is None or shape.full_logits:
        loss = tokens * shape.vocab * (w + 12)
    else:
        loss = min(cfg.loss_chunk, tokens) * shape.vocab * 12 + tokens * shape.hidden * w
    parts = {"weights": params * w, "lora+grads+adam": lora * 16, "activations": acts, "logits+loss": loss,
             "runtime": overhead}
    if cfg.device == "cpu":
        parts["allocator slack"] = int(EMLOC_ALLOCATOR_SLACK * shape.layers * act)
    return Estimate(stage, parts, params=params)


def _inference(shape: ModelShape, cfg: PlanConfig, overhead: int) -> Estimate:
    """One forward of the original at B x T (as `model(input_ids)` with the KV cache on).

    weights P w + KV cache 2 L BT d_kv w + one block's working set BT (4 d + 3 I) w (residual, normed
    input, and the MLP's gate, up and product, which bound the attention part too) + logits BT V w
    (transformers 5 returns them in the compute dtype).
    """
    w = _dtype_bytes(cfg.dtype)
    tokens = cfg.batch * cfg.seq_len
    d, inter = shape.hidden, shape.intermediate
    return Estimate("inference", {"weights": shape.total_params * w, "kv cache": 2 * shape.layers * tokens * shape.kv_dim * w,
                                  "activations": tokens * (4 * d + 3 * inter) * w, "logits": tokens * shape.vocab * w,
                                  "runtime": overhead}, params=shape.total_params)


def svd_workspace(m: int, n: int, s: int) -> int:
    """Peak bytes of `emloc.lowrank.factorize` on an (m x n) layer in a dtype of s bytes (Gram excluded).

    Eigendecomposition phase: W, the symmetrised G, its eigenvectors and LAPACK's 2 n^2 workspace,
    4 n^2 + m n. SVD phase: S, S^-1, W, W S, its copy and the thin factors and ~4 p^2 of LAPACK
    workspace (p = min(m, n)), 2 n^2 + 4 m n + 5 p^2. The larger of the two, times s.
    """
    p = min(m, n)
    return s * max(4 * n * n + m * n, 2 * n * n + 4 * m * n + 5 * p * p)


def _build(shape: ModelShape, cfg: PlanConfig, ratio: float, overhead: int) -> Estimate:
    """`emloc build`: resident weights and calibration, plus the larger of Gram accumulation and SVD.

    - resident: the non-block weights (embeddings, head) and one block, in the compute dtype; the
      calibration hidden states twice (block inputs and outputs), 2 x S x T_c x d x w.
    - Gram accumulation: every compressed layer's n x n Gram in the stats dtype (s bytes) plus, for
      the widest input, the fp32 product x^T x and its cast, n^2 (4 + s).
    - factorisation, one layer at a time in module order: the Grams not yet freed (this layer's and
      those after it) plus `svd_workspace` of that layer; the worst layer counts.
    - one calibration record through the block, T_c (4 d + 3 I) w.
    """
    w, s = _dtype_bytes(cfg.dtype), _dtype_bytes(cfg.stats_dtype)
    per = shape.per_block
    block = list(zip(shape.linears[:per], layer_ranks(shape, ratio)[:per]))
    grams = [n * n * s if k is not None else 0 for (_, _, n), k in block]
    widest = max((n for (_, _, n), k in block if k is not None), default=0)
    accumulate = sum(grams) + widest * widest * (4 + (s if s != 4 else 0))
    factorise = max((sum(grams[i:]) + svd_workspace(m, n, s) for i, ((_, m, n), k) in enumerate(block) if k is not None),
                    default=0)
    d = shape.hidden
    calib = 2 * cfg.calibration_samples * cfg.calibration_len * d * w
    forward = cfg.calibration_len * (4 * d + 3 * shape.intermediate) * w
    parts = {"non-block weights": shape.nonblock_params * w, "one block": shape.block_params * w,
             "calibration states": calib, "grams + svd": max(accumulate, factorise), "forward": forward,
             "runtime": overhead}
    return Estimate("build", parts)


def _host_stages(shape: ModelShape, cfg: PlanConfig, lora: int) -> tuple[Estimate, Estimate]:
    """`emloc correct` and `emloc merge`, which run on the CPU one layer / one shard at a time.

    - correct: the adapter twice in fp32 (input and output), 2 x lora x 4, plus for the largest layer
      W as read and W, W_e and W - W_e in fp32, m n (w + 12).
    - merge: tensors are read one at a time and written in output shards of `merge.MAX_SHARD_BYTES`
      (256 MiB); the input map is reopened after each output shard, so two such chunks (the output
      being filled and the pages read for it), at least the largest tensor, the adapter in fp32,
      and for the largest layer the fp32 W, B A and sum, m n (w + 12).
    """
    w = _dtype_bytes(cfg.dtype)
    layer = shape.largest_layer * (12 + w)
    correct = Estimate("correct", {"adapter x2": 2 * lora * 4, "one layer": layer, "runtime": CPU_OVERHEAD}, host=True)
    from .merge import MAX_SHARD_BYTES

    wc = shape.checkpoint_bytes or w
    chunk = max(min(MAX_SHARD_BYTES, shape.total_params * wc), shape.largest_tensor * wc)
    merge = Estimate("merge", {"output chunk x2": 2 * chunk, "adapter": lora * 4, "one layer": shape.largest_layer * (12 + wc),
                               "runtime": CPU_OVERHEAD}, host=True)
    return correct, merge


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
    if cfg.stats_dtype not in ("float64", "float32"):
        raise EmlocError(f"unknown stats dtype {cfg.stats_dtype!r}; use float64 or float32")
    if not cfg.ratios or any(not (0 < r <= 1) for r in cfg.ratios):
        raise EmlocError(f"ratios {cfg.ratios!r} must be fractions in (0, 1]")
    if min(cfg.batch, cfg.seq_len, cfg.rank, cfg.calibration_samples, cfg.calibration_len, cfg.loss_chunk or 1) < 1:
        raise EmlocError("batch, seq_len, rank, loss_chunk and the calibration sizes must be at least 1")
    shape = model if isinstance(model, ModelShape) else model_shape(model)
    overhead = CPU_OVERHEAD if cfg.device == "cpu" else CUDA_OVERHEAD
    lora = sum(cfg.rank * (m + n) for _, m, n in shape.linears)
    ratios = sorted({float(r) for r in cfg.ratios}, reverse=True)
    lora_training = _training(shape, cfg, shape.total_params, lora, overhead, "train")
    training = {r: _training(shape, cfg, emulator_params(shape, r), lora, overhead, "train") for r in ratios}
    correct, merge = _host_stages(shape, cfg, lora)
    return Plan(config=cfg, shape=shape, overhead=overhead, lora_params=lora, inference=_inference(shape, cfg, overhead),
                lora_training=lora_training, training=training,
                build={r: _build(shape, cfg, r, overhead) for r in ratios if r < 1},
                correct=correct, merge=merge)


def format_plan(plan: Plan) -> str:
    """A markdown report: the original's inference and LoRA training, a table by ratio, the recommendation."""
    c = plan.config
    where = "GPU" if c.device == "cuda" else "CPU"
    lines = [f"Memory plan: batch {c.batch} x {c.seq_len} tokens, {c.dtype}, LoRA r={c.rank}, "
             f"{'with' if c.gradient_checkpointing else 'no'} gradient checkpointing, {where} "
             f"(1 GB = 2^30 bytes; runtime overhead {gb(plan.overhead)} included)", "",
             f"- inference of the original: {gb(plan.inference.total)}",
             f"- LoRA training on the original: {gb(plan.lora_training.total)}",
             f"- LoRA parameters: {plan.lora_params:,}", "",
             "| ratio | params | build | train | correct (CPU) | merge (CPU) | fits |",
             "|---:|---:|---:|---:|---:|---:|:---:|"]
    for r in sorted(plan.training, reverse=True):
        t = plan.training[r]
        build = gb(plan.build[r].total) if r < 1 else "-"
        correct = gb(plan.correct.total) if r < 1 else "-"
        fits = "?" if c.budget is None else ("no" if plan.shortfall(r) else "yes")
        size = f"{t.params / 1e9:.2f} B" if (t.params or 0) >= 1e9 else f"{(t.params or 0) / 1e6:.1f} M"
        lines.append(f"| {r:g} | {size} | {build} | {gb(t.total)} | {correct} | {gb(plan.merge.total)} | {fits} |")
    rec = plan.recommend()
    lines += ["", rec.message]
    return "\n".join(lines)
