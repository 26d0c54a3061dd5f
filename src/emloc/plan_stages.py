"""The predicted peak of each EMLoC stage (training, inference, build, correct, auto's selection,
merge) as named parts, from the model's shape (`emloc.plan_formulas`). See `emloc.plan` for the
notation and what is counted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .plan_formulas import (CPU_OVERHEAD, EMLOC_ALLOCATOR_SLACK, Estimate, ModelShape, _dtype_bytes, block_activation_bytes,
                            layer_ranks, tokenizer_bytes, unread_embedding_bytes)

if TYPE_CHECKING:
    from .plan import PlanConfig


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


def quant_workspace(m: int, n: int, s: int, rank: int, device: str = "cuda") -> int:
    """Peak bytes of one layer's quantisation in `emloc build` beside its input Gram, in a dtype of s bytes.

    GPTQ alone (`emloc.quant.gptq_factor`, the Gram's memory reused): one more n x n while the
    inverse is factored on cpu, two on a GPU (measured on an H200: a 7B-shaped build peaked 1.5 GB
    above one, as if `cholesky_inverse` solved against an identity there), beside W (m n); then
    the factor in the Gram's place, W and its working copy, the int64 codes, the rebuilt weight and
    the error's triangular solve: m n (4 s + 8). With the
    hybrid's residual term (rank > 0) the Gram is kept: GPTQ's own two n x n, then the input
    eigendecomposition (n^2 vectors + 2 n^2 workspace), the residual and its factors.
    """
    factor = 1 if device == "cpu" else 2
    if rank:
        return s * ((2 + factor) * n * n + 3 * m * n + rank * (m + n)) + 8 * m * n
    return max(s * (factor * n * n + m * n), m * n * (4 * s + 8))


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
    - statistics: every compressed layer's smaller Gram (`statistics_bytes`; a quantised emulator:
      its input Gram, `_block_statistics`) in the stats dtype (s
      bytes), plus, while one batch of t = `calibration_forward_tokens` tokens is accumulated, its
      widest activation cast to the stats dtype and one product, t x I x s + I'^2 s (I' the widest
      side whose Gram is kept).
    - decomposition, one layer at a time in module order: the statistics not yet consumed (this
      layer's and those after it) plus `svd_workspace` (`quant_workspace`) of that layer; the worst
      layer counts.
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
    stats, work, kept = _block_statistics(shape, cfg, ratio, s)
    t = calibration_forward_tokens(cfg)
    accumulate = sum(stats) + t * shape.intermediate * s + kept * kept * s if stats else 0
    factorise = max((sum(stats[i:]) + wk for i, wk in enumerate(work)), default=0)
    d = shape.hidden
    calib = 2 * cfg.calibration_samples * cfg.calibration_len * d * w
    forward = t * (4 * d + 3 * shape.intermediate) * w
    parts = {"non-block weights": nonblock_resident(shape, cfg, shape.checkpoint_bytes == w),
             "one block": shape.block_params * w, "calibration states": calib,
             "statistics + decomposition": max(accumulate, factorise), "forward": forward,
             **_host_runtime(shape, cfg, overhead, tokenizer=True)}
    return Estimate("build", parts)


def _block_statistics(shape: ModelShape, cfg: PlanConfig, ratio: float, s: int) -> tuple[list[int], list[int], int]:
    """(statistics bytes and decomposition workspace of each compressed layer of a block, the side of
    the largest Gram formed). A quantised emulator keeps every layer's input Gram (n x n, GPTQ's
    Hessian; `quant_workspace`), the SVD the smaller one (`statistics_bytes`, `svd_workspace`)."""
    from .emulator import resolve_method
    from .ratios import layer_plan

    method = resolve_method(cfg.method, [ratio])
    if method == "svd":
        block = [(m, n, k) for (_, m, n), k in zip(shape.linears[:shape.per_block], layer_ranks(shape, ratio)[:shape.per_block])
                 if k is not None]
        return [statistics_bytes(m, n, s) for m, n, _ in block], [svd_workspace(m, n, s, k) for m, n, k in block], \
            max((min(m, n) for m, n, _ in block), default=0)
    plans = [layer_plan(m, n, ratio, method) for _, m, n in shape.linears[:shape.per_block]]
    return [p["in_features"] ** 2 * s for p in plans], \
        [quant_workspace(p["out_features"], p["in_features"], s, p["rank"], cfg.device) for p in plans], max(p["in_features"] for p in plans)


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
