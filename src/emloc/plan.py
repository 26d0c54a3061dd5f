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
from pathlib import Path
from typing import Any

from .errors import EmlocError
from .lowrank import rank_for_ratio, saves_parameters

GIB = 2**30
DEFAULT_RATIOS = (1.0, 0.75, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1)
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "float64": 8, "fp64": 8}
# Peak RSS of `python -c "import torch, transformers, peft, emloc"` (torch 2.13 CPU, transformers 5.24,
# peft 0.21), measured by benchmarks/plan_validation.py: 0.386 GiB; re-checked with the emloc command
# line's allocator setting: 394 MB after these imports, 366 MB in `emloc build` before its tokenizer
# and model classes (the tokenizer is counted apart, `tokenizer_bytes`).
CPU_OVERHEAD = int(0.39 * GIB)
# CUDA context, kernels and cuBLAS workspaces outside torch's allocator; typical, not measured here.
CUDA_OVERHEAD = int(0.5 * GIB)
# glibc keeps freed heap blocks (tensors under its dynamic mmap threshold, up to 32 MiB) in the
# process, so a CPU training run's peak RSS can exceed its live tensors: measured on SmolLM2-135M
# (benchmarks/plan_validation.py) at 1.3 / 0.65 x L x BT x A without / with checkpointing. The plan
# predicts the memory in use, what peak RSS shows with EMLOC_MMAP_THRESHOLD=131072 (as `emloc run`
# and benchmarks/memory.py set it; the stage commands keep glibc's defaults for speed, see
# artifacts.return_freed_memory); use these factors for processes with glibc's defaults.
CPU_ALLOCATOR_SLACK = {False: 1.3, True: 0.65}
EMLOC_ALLOCATOR_SLACK = 0.0
# A loaded fast tokenizer (vocabulary, merges, added tokens) stays resident beside the model in every
# emloc command that tokenises data (train, build, correct): after the imports, loading it added 112 MB
# to the RSS for Qwen2.5 (V = 151,936) and 32 MB for SmolLM2 (V = 49,152), ~700-780 bytes per entry.
TOKENIZER_BYTES_PER_ENTRY = 750
# Linux maps a faulted page of a file map together with its neighbours already in the page cache, in
# an aligned window of `fault_around_bytes` (64 KiB by default), so each embedding row read from a
# memory map makes up to 64 KiB resident: with 3,377 distinct ids, 174 MB of Qwen2.5-0.5B's 545 MB
# embedding (expected for ids spread over the vocabulary) rather than 12 MB of rows.
FAULT_AROUND_BYTES = 64 * 2**10
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
        correction: the `emloc correct` mode: auto (the default: weighted's streaming, then the
            original scores the candidates at inference cost), weighted (streams the original's
            blocks over the calibration records for its statistics), paper or none (no statistics).
        method: the emulator method (`emloc build --method`): auto (the default, as `emloc build`),
            svd, quant or svd+quant; a ratio is the fraction of the block linears' bytes, and ratios a
            quantised method cannot reach are dropped.
        vocab_used: distinct token ids in the data (None: assume every row of the vocabulary is read,
            the safe default). Only used on cpu for an untied input embedding stored in the compute
            dtype; see `unread_embedding_bytes`.
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
        tied: the output head shares the input embedding's weight (tie_word_embeddings).
        embedding_rows: rows of the input embedding (normally V).
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
    tied: bool = True
    embedding_rows: int = 0

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
    from .families import family_of
    from .models import block_linears, empty_model, find_blocks

    config, folder = _read_config(model)
    family = family_of(config)
    if not family.plannable:
        raise EmlocError(f"emloc plan predicts language and vision-language models; {family.name} denoisers are not "
                         "planned yet (measure a build and a training step with --steps 2 instead)")
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
    embed, head = meta.get_input_embeddings(), meta.get_output_embeddings()
    tied = head is None or head.weight is embed.weight
    shard = None
    if folder is not None:
        sizes = [p.stat().st_size for p in folder.glob("*.safetensors")]
        shard = max(sizes) if sizes else None
    return ModelShape(layers=len(blocks), hidden=d, intermediate=inter, kv_dim=kv * head_dim,
                      vocab=int(text.vocab_size), total_params=total, nonblock_params=total - sum(block_sizes),
                      block_params=max(block_sizes), linears=linears,
                      largest_tensor=max(params.values()), checkpoint_bytes=DTYPE_BYTES.get(ckpt_name or ""),
                      shard_bytes=shard, full_logits=family_of(config).post_processes_logits(text),
                      tied=tied, embedding_rows=int(embed.weight.shape[0]))


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


def emulator_weight_bytes(shape: ModelShape, ratio: float, method: str, w: int) -> int:
    """Bytes of the emulator's weights with floats in `w` bytes: codes and float16 scales as stored
    (`emloc.quant`), factors and the layers kept dense in the compute dtype."""
    from .emulator import layer_plan
    from .quant import BASE_BYTES

    from .emulator import resolve_method

    method = resolve_method(method, [ratio])
    if method == "svd":
        return emulator_params(shape, ratio) * w
    total = shape.total_params * w
    for _, m, n in shape.linears:
        e = layer_plan(m, n, ratio, method)
        if e["rank"] is not None:  # layer_plan counts floats at 2 bytes: recount the factors at w
            total += e["bytes"] - BASE_BYTES * e["rank"] * (m + n) + w * e["rank"] * (m + n) - m * n * w
    return total


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


def tokenizer_bytes(shape: ModelShape) -> int:
    """Host memory of the loaded tokenizer, TOKENIZER_BYTES_PER_ENTRY x V (an empirical fit, see there)."""
    return TOKENIZER_BYTES_PER_ENTRY * shape.vocab


def unread_embedding_bytes(shape: ModelShape, cfg: PlanConfig, stored_in_compute_dtype: bool) -> int:
    """Bytes of the input embedding that are never resident, because the data never looks them up.

    On CPU, a weight whose stored dtype equals the compute dtype is not copied when loaded: both
    transformers' `from_pretrained` and emloc's `WeightStore`/`materialize` keep it memory-mapped
    from the safetensors file (`.to()` is a no-op), and a page of a file map only counts in the
    resident memory once it is read. An embedding lookup reads only the rows of the token ids in
    the data; each read row makes at most max(d x w, FAULT_AROUND_BYTES) resident, so the rest of
    an untied input embedding, V d w - vocab_used x max(d w, 64 KiB), stays on disk (measured on
    Qwen2.5-Coder-0.5B after a forward on 2,048 random ids: 402 MB of its 545 MB embedding were
    not resident; this rule says 415 MB). A tied embedding is also the output
    head, whose matmul reads every row, and a cast (e.g. bf16 checkpoint, fp32 compute) or a copy
    to a GPU makes every row resident; then nothing is subtracted. None for `cfg.vocab_used`
    means every row is assumed read.

    Args:
        stored_in_compute_dtype: the weights file holds the embedding in `cfg.dtype` (for the
            original: the config's dtype; an emulator is always written in its build's compute dtype).
    """
    if cfg.device != "cpu" or cfg.vocab_used is None or shape.tied or not stored_in_compute_dtype:
        return 0
    row = shape.hidden * _dtype_bytes(cfg.dtype)
    full = (shape.embedding_rows or shape.vocab) * row
    return max(0, full - cfg.vocab_used * max(row, FAULT_AROUND_BYTES))


def _host_runtime(shape: ModelShape, cfg: PlanConfig, overhead: int, tokenizer: bool) -> dict[str, int]:
    """The runtime parts of a stage: the process/CUDA overhead, plus on cpu the tokenizer if it loads one."""
    parts = {"runtime": overhead}
    if tokenizer and cfg.device == "cpu":
        parts["tokenizer"] = tokenizer_bytes(shape)
    return parts


def _training(shape: ModelShape, cfg: PlanConfig, params: int, lora: int, overhead: int, stage: str,
              stored_in_compute_dtype: bool, weight_bytes: int | None = None, dequantized: int = 0) -> Estimate:
    """LoRA training peak: weights + LoRA state + saved activations + the backward's working set + runtime.

    - frozen weights: params x w (or `weight_bytes` for a quantised emulator), less the embedding
      rows never read (`unread_embedding_bytes`); a quantised emulator also rebuilds one layer's
      dense weight at a time (`dequantized`: the largest layer's m n x w).
    - LoRA: params, fp32 grads and AdamW's two fp32 moments: lora x 16 bytes.
    - saved activations, with checkpointing: the input of every block, L x BT x d x w; without:
      every block's A, L x BT x A (A = `block_activation_bytes`).
    - block backward: one block's A recomputed plus its gradients, 2 x BT x A, with checkpointing;
      the gradients flowing through one block, BT x A, without.
    - loss: with full logits (loss_chunk None, or a family that post-processes logits)
      BT x V x (w + 12): the logits (kept in the output through the whole backward) and three fp32
      B x T x V tensors alive together in the loss (log-softmax output, its gradient, the logits'
      gradient); for large vocabularies this dominates, and it is added to the block backward.
      With emloc's chunked loss, which recomputes each chunk's logits in the backward pass (nothing
      is kept from the forward), the recomputed fp32 logits and two fp32 gradients for
      c = min(loss_chunk, BT) tokens, c x V x (4 + 8), plus the final hidden states BT x d x w
      (every token assumed to carry loss). The loss's backward ends before the first block's
      backward starts, so then only the larger of the two counts ("backward working set"); on
      SmolLM2-135M and Qwen2.5-Coder-0.5B (CPU, fp32, 8 x 256 tokens) the sum over-predicted the
      measured peak RSS by ~150 and ~430 MB, the larger of the two is within 3%.
    - on cpu, glibc heap slack: none for emloc's processes (see EMLOC_ALLOCATOR_SLACK).
    - runtime: the process or CUDA overhead; on cpu also the tokenizer (`tokenizer_bytes`).
    """
    w = _dtype_bytes(cfg.dtype)
    tokens = cfg.batch * cfg.seq_len
    act = block_activation_bytes(shape, w, cfg.rank) * tokens
    ckpt = cfg.gradient_checkpointing
    saved = shape.layers * tokens * shape.hidden * w if ckpt else shape.layers * act
    block = 2 * act if ckpt else act
    parts = {"weights": params * w if weight_bytes is None else weight_bytes, "dequantized layer": dequantized,
             "unread embedding rows": -unread_embedding_bytes(shape, cfg, stored_in_compute_dtype),
             "lora+grads+adam": lora * 16, "saved activations": saved}
    if cfg.loss_chunk is None or shape.full_logits:
        parts |= {"block backward": block, "logits+loss": tokens * shape.vocab * (w + 12)}
    else:
        loss = min(cfg.loss_chunk, tokens) * shape.vocab * 12 + tokens * shape.hidden * w
        parts["backward working set"] = max(block, loss)
    parts |= _host_runtime(shape, cfg, overhead, tokenizer=True)
    if cfg.device == "cpu":
        parts["allocator slack"] = int(EMLOC_ALLOCATOR_SLACK * shape.layers * act)
    return Estimate(stage, parts, params=params)


def _inference(shape: ModelShape, cfg: PlanConfig, overhead: int) -> Estimate:
    """One forward of the original at B x T (as `model(input_ids)` with the KV cache on).

    weights P w, less the embedding rows never read (`unread_embedding_bytes`) + KV cache
    2 L BT d_kv w + one block's working set BT (4 d + 3 I) w (residual, normed input, and the MLP's
    gate, up and product, which bound the attention part too) + logits BT V w (transformers 5
    returns them in the compute dtype) + the runtime overhead (no tokenizer: the ids are given).
    """
    w = _dtype_bytes(cfg.dtype)
    tokens = cfg.batch * cfg.seq_len
    d, inter = shape.hidden, shape.intermediate
    unread = unread_embedding_bytes(shape, cfg, shape.checkpoint_bytes == w)
    return Estimate("inference", {"weights": shape.total_params * w, "unread embedding rows": -unread,
                                  "kv cache": 2 * shape.layers * tokens * shape.kv_dim * w,
                                  "activations": tokens * (4 * d + 3 * inter) * w, "logits": tokens * shape.vocab * w,
                                  "runtime": overhead}, params=shape.total_params)


def svd_workspace(m: int, n: int, s: int, k: int | None = None) -> int:
    """Peak bytes of one layer's decomposition in `emloc build` (its Gram excluded), in a dtype of s bytes.

    Output side (m <= n, `emloc.lowrank.output_spectrum`): W, W W^T, C = W G W^T + lambda W W^T, its
    eigenvectors and ~2 m^2 of LAPACK workspace, then U_k^T W and U_k: m n + 5 m^2 + k (m + n).
    Input side (m > n, `input_spectrum` after the shared `input_eigh` of G: n^2 vectors + 2 n^2
    workspace): W, W S, U = W S V (m n each), (W S)^T (W S), its eigenvectors and workspace (3 n^2),
    then the factors: 3 m n + 6 n^2 + k (m + n). k defaults to min(m, n) / 2.
    """
    k = min(m, n) // 2 if k is None else k
    if m <= n:
        return s * (m * n + 5 * m * m + k * (m + n))
    return s * (3 * m * n + 6 * n * n + k * (m + n))


def statistics_bytes(m: int, n: int, s: int) -> int:
    """Bytes of the statistics `emloc build` keeps for one compressed (m x n) layer: the smaller Gram.

    Outputs' Gram (m x m) when m <= n, inputs' (n x n) otherwise (`emloc.emulator.statistics_side`).
    """
    return min(m, n) ** 2 * s


def calibration_forward_tokens(cfg: PlanConfig) -> int:
    """Padded tokens per calibration forward: records are batched up to `BATCH_TOKENS` (one at least)."""
    from .stream import BATCH_TOKENS

    return max(cfg.calibration_len, min(BATCH_TOKENS, cfg.calibration_samples * cfg.calibration_len))


def _build(shape: ModelShape, cfg: PlanConfig, ratio: float, overhead: int) -> Estimate:
    """`emloc build`: the larger of its block loop and, on cpu, its final save (`_build_save`).

    Block loop (`_build_loop`): resident weights and calibration, plus the larger of statistics
    accumulation and decomposition.
    - the runtime and, on cpu, the tokenizer; the non-block weights as far as they are resident
      (`nonblock_resident`: on cpu, memory-mapped, an untied head is not read until the end) and
      one block, in the compute dtype; the calibration hidden states twice (block inputs and
      outputs), 2 x S x T_c x d x w.
    - statistics: every compressed layer's smaller Gram (`statistics_bytes`) in the stats dtype (s
      bytes), plus, while one batch of t = `calibration_forward_tokens` tokens is accumulated, its
      widest activation cast to the stats dtype and one product, t x I x s + I'^2 s (I' the widest
      side whose Gram is kept).
    - decomposition, one layer at a time in module order: the statistics not yet consumed (this
      layer's and those after it) plus `svd_workspace` of that layer; the worst layer counts.
    - one calibration batch through the block, t (4 d + 3 I) w.
    """
    loop = _build_loop(shape, cfg, ratio, overhead)
    if cfg.device != "cpu":
        return loop
    save = _build_save(shape, cfg, overhead)
    return loop if loop.total >= save.total else save


def _build_loop(shape: ModelShape, cfg: PlanConfig, ratio: float, overhead: int) -> Estimate:
    """The block loop of `emloc build` (see `_build`)."""
    w, s = _dtype_bytes(cfg.dtype), _dtype_bytes(cfg.stats_dtype)
    per = shape.per_block
    block = [(m, n, k) for (_, m, n), k in zip(shape.linears[:per], layer_ranks(shape, ratio)[:per]) if k is not None]
    stats = [statistics_bytes(m, n, s) for m, n, _ in block]
    t = calibration_forward_tokens(cfg)
    kept = max((min(m, n) for m, n, _ in block), default=0)
    accumulate = sum(stats) + t * shape.intermediate * s + kept * kept * s if block else 0
    factorise = max((sum(stats[i:]) + svd_workspace(m, n, s, k) for i, (m, n, k) in enumerate(block)), default=0)
    d = shape.hidden
    calib = 2 * cfg.calibration_samples * cfg.calibration_len * d * w
    forward = t * (4 * d + 3 * shape.intermediate) * w
    parts = {"non-block weights": nonblock_resident(shape, cfg, shape.checkpoint_bytes == w),
             "one block": shape.block_params * w, "calibration states": calib,
             "statistics + decomposition": max(accumulate, factorise), "forward": forward,
             **_host_runtime(shape, cfg, overhead, tokenizer=True)}
    return Estimate("build", parts)


def _build_save(shape: ModelShape, cfg: PlanConfig, overhead: int) -> Estimate:
    """The end of `emloc build` on cpu: writing the non-block weights reads every page of them.

    Every non-block weight is then resident (a memory-mapped head and embedding are read in full;
    safetensors writes from the tensors' memory, without a copy), beside the last block's outputs,
    S x T_c x d x w, the runtime and the tokenizer. Measured on Qwen2.5-Coder-0.5B (fp32, untied
    545 MB embedding and head, float32 statistics): 1592 MB after this save against a block-loop
    peak of 1314 MB; with float64 statistics the block loop is the larger (1953 MB).
    """
    w = _dtype_bytes(cfg.dtype)
    parts = {"non-block weights": shape.nonblock_params * w,
             "calibration states": cfg.calibration_samples * cfg.calibration_len * shape.hidden * w,
             **_host_runtime(shape, cfg, overhead, tokenizer=True)}
    return Estimate("build", parts)


def merge_chunk_bytes(shape: ModelShape, wc: int) -> int:
    """Resident bytes of `emloc merge`'s fullest output shard, for weights stored with wc bytes.

    merge reads tensors from a memory map of the base's shards and adds them to an output shard,
    written (without a copy: safetensors writes from the tensors' memory) once it holds
    `merge.MAX_SHARD_BYTES` (256 MiB) or more; the map is then reopened, which unmaps the pages read.
    A tensor without LoRA stays a view of the map: only its read pages are resident, once. A tensor
    with LoRA (a block linear) is replaced by a new merged tensor, while the pages read for W stay
    mapped until the reopen: twice its bytes. So the fullest shard is the larger of
    - the largest tensor, once: a non-block tensor (the embedding or head) past 256 MiB is written
      nearly alone (measured: Qwen2.5-0.5B, 545 MB embedding, merge peak 577 MB above the runtime);
    - a 256 MiB shard of block linears (at most the blocks' bytes), twice.
    """
    from .merge import MAX_SHARD_BYTES

    blocks = (shape.total_params - shape.nonblock_params) * wc
    return max(shape.largest_tensor * wc, 2 * min(MAX_SHARD_BYTES, blocks))


def nonblock_resident(shape: ModelShape, cfg: PlanConfig, stored_in_compute_dtype: bool) -> int:
    """Resident bytes of the weights outside the blocks while `build` / `correct` stream the blocks.

    Both materialise the non-block weights once and run only the embedding part of the model
    (block 0's inputs). When those weights stay memory-mapped (on cpu, stored in the compute dtype,
    see `unread_embedding_bytes`), an untied output head is never read there, so it is not resident,
    and the embedding's rows the data never uses are not either. Otherwise all of them count.
    """
    w = _dtype_bytes(cfg.dtype)
    full = shape.nonblock_params * w
    if cfg.device != "cpu" or shape.tied or not stored_in_compute_dtype:
        return full
    head = (shape.embedding_rows or shape.vocab) * shape.hidden * w
    return full - head - unread_embedding_bytes(shape, cfg, stored_in_compute_dtype)


def _correct(shape: ModelShape, cfg: PlanConfig, lora: int, ratio: float) -> Estimate:
    """`emloc correct` at `ratio` (the smallest candidate is used: it compresses the most layers).

    - always: the adapter twice in fp32 (input and output), 2 x lora x 4, and the process overhead.
    - mode paper / none: for the largest layer W as read and W, W_e and W - W_e in fp32, m n (w + 12).
    - mode weighted, which streams the original block by block over the calibration records (as
      `build` does) and accumulates per compressed layer E G A^T (m x r) and A G A^T (r x r) from
      the activations (`emloc.correct.ProjectedStatistics`): the tokenizer, the non-block weights
      (`nonblock_resident`), one block, the calibration states twice (2 x S x T_c x d x w), the
      block's emulator factors and LoRA A in the stats dtype (s bytes), and one batch of t =
      `calibration_forward_tokens` tokens: the layer's inputs, outputs and E x in the stats dtype,
      t (d + 2 I) s, plus its forward, t (4 d + 3 I) w. On cuda the streaming runs on the GPU; the
      host holds the adapter.
    """
    if cfg.correction == "auto":
        from dataclasses import replace

        weighted = _correct(shape, replace(cfg, correction="weighted"), lora, ratio)
        select = _selection(shape, cfg, lora)
        return weighted if weighted.total >= select.total or cfg.device != "cpu" else select
    w, s = _dtype_bytes(cfg.dtype), _dtype_bytes(cfg.stats_dtype)
    parts = {"adapter x2": 2 * lora * 4, "runtime": CPU_OVERHEAD}
    if cfg.correction != "weighted":
        return Estimate("correct", parts | {"one layer": shape.largest_layer * (12 + w)}, host=True)
    if cfg.device != "cpu":
        return Estimate("correct", parts, host=True)
    block = [(m, n, k) for (_, m, n), k in zip(shape.linears[:shape.per_block], layer_ranks(shape, ratio)[:shape.per_block])
             if k is not None]
    t, d = calibration_forward_tokens(cfg), shape.hidden
    factors = sum(k * (m + n) + cfg.rank * (n + m) for m, n, k in block) * s
    parts |= {"tokenizer": tokenizer_bytes(shape),
              "non-block weights": nonblock_resident(shape, cfg, shape.checkpoint_bytes == w),
              "one block": shape.block_params * w,
              "calibration states": 2 * cfg.calibration_samples * cfg.calibration_len * d * w,
              "factors + statistics": factors + t * (d + 2 * shape.intermediate) * s,
              "forward": t * (4 * d + 3 * shape.intermediate) * w}
    return Estimate("correct", parts, host=True)


def _selection(shape: ModelShape, cfg: PlanConfig, lora: int) -> Estimate:
    """Mode auto's selection phase (`emloc.selection`): the original scores three candidate adapters.

    The original's weights as inference holds them (less the unread embedding rows), the three
    candidates and PEFT's copies of them in fp32 (6 x lora x 4), a batch of 8 calibration records
    through one block, 8 T_c (4 d + 3 I) w, the answer loss's fp32 logits for one chunk, 256 V x 4,
    the tokenizer and the runtime. On cuda this phase runs on the GPU, inside the inference budget.
    """
    w = _dtype_bytes(cfg.dtype)
    tokens = 8 * cfg.calibration_len
    return Estimate("correct", {
        "original weights": shape.total_params * w - unread_embedding_bytes(shape, cfg, shape.checkpoint_bytes == w),
        "candidate adapters": 6 * lora * 4, "activations": tokens * (4 * shape.hidden + 3 * shape.intermediate) * w,
        "logits chunk": min(256, tokens) * shape.vocab * 4, "tokenizer": tokenizer_bytes(shape), "runtime": CPU_OVERHEAD},
        host=True)


def _merge(shape: ModelShape, cfg: PlanConfig, lora: int) -> Estimate:
    """`emloc merge`, on the CPU one output shard at a time.

    The fullest output shard (`merge_chunk_bytes`), the adapter in fp32, and the merge of the largest
    layer: B A and its scaled copy in fp32, 8 m n, plus the fp32 copy of W when the checkpoint is not
    fp32 (4 m n); the process overhead (merge loads no tokenizer).
    """
    wc = shape.checkpoint_bytes or _dtype_bytes(cfg.dtype)
    return Estimate("merge", {"output shard": merge_chunk_bytes(shape, wc), "adapter": lora * 4,
                              "one layer": shape.largest_layer * (8 if wc == 4 else 12), "runtime": CPU_OVERHEAD},
                    host=True)


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

    largest = max(m * n for _, m, n in shape.linears) * _dtype_bytes(cfg.dtype)
    training = {}
    for r in ratios:
        quantised = r < 1 and resolve_method(cfg.method, [r]) != "svd"
        training[r] = _training(shape, cfg, shape.total_params if quantised else emulator_params(shape, r), lora, overhead,
                                "train", r < 1 or original_stored,
                                emulator_weight_bytes(shape, r, cfg.method, _dtype_bytes(cfg.dtype)) if r < 1 else None,
                                largest if quantised else 0)
    correct, merge = _correct(shape, cfg, lora, min(ratios)), _merge(shape, cfg, lora)
    return Plan(config=cfg, shape=shape, overhead=overhead, lora_params=lora, inference=_inference(shape, cfg, overhead),
                lora_training=lora_training, training=training,
                build={r: _build(shape, cfg, r, overhead) for r in ratios if r < 1},
                correct=correct, merge=merge)


def format_plan(plan: Plan) -> str:
    """A markdown report: the original's inference and LoRA training, a table by ratio, the recommendation."""
    c = plan.config
    where = "GPU" if c.device == "cuda" else "CPU"
    lines = [f"Memory plan: {c.method} emulator, batch {c.batch} x {c.seq_len} tokens, {c.dtype}, LoRA r={c.rank}, "
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
    lines += ["", rec.message]
    return "\n".join(lines)
