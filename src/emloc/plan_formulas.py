"""The memory formulas behind `emloc plan`: a model's shape from its config, and the bytes each
stage holds at its peak (training, inference, build, correct, auto's selection, merge), as named parts.

See `emloc.plan` for the notation, what is counted and how the figures were checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import EmlocError
from .lowrank import rank_for_ratio, saves_parameters

if TYPE_CHECKING:
    from .plan import PlanConfig

GIB = 2**30
DEFAULT_RATIOS = (1.0, 0.75, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1)
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "float64": 8, "fp64": 8}
# Peak RSS of `python -c "import torch, transformers, peft, emloc"` (torch 2.13 CPU, transformers 5.24,
# peft 0.21), measured by benchmarks/plan_validation.py: 0.386 GiB; re-checked with the emloc command
# line's allocator setting: 394 MB after these imports, 366 MB in `emloc build` before its tokenizer
# and model classes (the tokenizer is counted apart, `tokenizer_bytes`).
CPU_OVERHEAD = int(0.39 * GIB)
# CUDA context, kernels and cuBLAS workspaces outside torch's allocator: device memory in use minus
# torch's reserved memory was 0.68 GiB after inference and 0.75 GiB after LoRA training (H200, torch
# 2.11 + CUDA 13; benchmarks/cuda_memory.py)
CUDA_OVERHEAD = int(0.75 * GIB)
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


def gb(nbytes: float) -> str:
    """Bytes as GB (2^30 bytes, as torch and nvidia-smi count) with 2 decimals."""
    return f"{nbytes / GIB:.2f} GB"


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
