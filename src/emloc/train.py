"""Stage 2: LoRA fine-tuning on a frozen model (an emulator, or any causal LM for comparison).

The loop runs on `accelerate`, so the same code trains on one CPU, one GPU, or several processes
under `accelerate launch` (DDP, DeepSpeed, FSDP through the user's accelerate config).

Batches are defined globally: optimizer step s consumes the global batch
`order[s*B:(s+1)*B]` of a seeded permutation, split evenly across processes and then into
micro-batches. The loss is the sum over answer tokens divided by the answer tokens of the whole
global batch, so the gradient is the same whatever the number of processes or micro-batches.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .artifacts import (MANIFEST, Stopwatch, check_output, fingerprint, legacy_order, peak_memory_mb, read_manifest,
                        staged_output, versions, write_json)
from .cpu_compute import compute_dtype, upcast_frozen_linears
from .checkpoint import checkpoint_dir, config_key, fault_point, load_checkpoint, save_checkpoint
from .data import Example, sample
from .errors import EmlocError
from .families import family_of
from .lora import _load_initial, _train_last_blocks, default_targets, lora_config  # noqa: F401 (default_targets, lora_config: re-exported)
from .models import check_targets, find_blocks, load_config, parse_device, parse_dtype, resolve_model
from .sharding import load_lora_state, load_optimizer_state, lora_state, optimizer_state, rng_state, set_rng_state, shard_model

log = logging.getLogger("emloc")


@dataclass
class TrainConfig:
    """Settings of `train_adapter`.

    Attributes:
        rank: LoRA rank r.
        alpha: LoRA alpha; the update is scaled by alpha / r (alpha / sqrt(r) with rslora).
        dropout: LoRA dropout.
        rslora: rank-stabilised scaling.
        targets: regex (full match over module names) or comma-separated module names to adapt;
            default: every nn.Linear inside the transformer blocks.
        lr: peak learning rate (AdamW).
        schedule: `cosine`, `linear` or `constant` (with warmup).
        warmup: warmup as a fraction of the steps.
        weight_decay: AdamW weight decay.
        steps: optimizer steps; if None, `epochs` passes over the data.
        epochs: used when `steps` is None.
        batch_size: global batch (records per optimizer step, over all processes).
        micro_batch_size: records per forward pass per process (gradient accumulation makes up the rest).
        max_length: tokens per record (longer ones are truncated).
        gradient_checkpointing: recompute block activations in the backward pass to save memory.
        loss_chunk: answer tokens per output-head application in the loss (chunk x vocabulary fp32
            logits exist at a time, three times over in the backward pass).
        eval_fraction: share of the training file held out for eval loss when no eval file is given.
        eval_every: steps between eval-loss measurements (0: only at the end).
        eval_samples: at most this many held-out records are used for eval loss.
        seed: seed of LoRA init and data order.
        save_every: write a checkpoint (adapter, optimizer, scheduler, step) every N steps (0: never).
        resume: continue from the checkpoint next to the output folder, if there is one.
        device: auto, cpu, cuda (ignored under `accelerate launch`, which decides).
        dtype: dtype of the frozen weights (auto: bf16 on CUDA, fp32 on CPU); LoRA weights stay fp32.
        quantize: `none`, or `nf4` to train on a 4-bit copy of a model folder (QLoRA, with bitsandbytes).
        init_adapter: start from this PEFT adapter's weights; its rank, alpha, rsLoRA and targets
            replace `rank`, `alpha`, `rslora` and `targets`.
        last_blocks: train only the LoRA of the last K blocks; the others keep their initial values
            (with `init_adapter`: refine an adapter transferred from an emulator on the original,
            with exact gradients; no activation of the earlier blocks is kept for the backward pass).
        fsdp: with several processes, shard every block's weights over them (PyTorch FSDP2) instead of giving
            each process a full copy (DDP); also chosen by `accelerate launch --use_fsdp`.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    targets: str | None = None
    lr: float = 2e-4
    schedule: str = "cosine"
    warmup: float = 0.03
    weight_decay: float = 0.0
    steps: int | None = 200
    epochs: float = 1.0
    batch_size: int = 8
    micro_batch_size: int = 8
    max_length: int = 512
    gradient_checkpointing: bool = False
    loss_chunk: int = 256
    eval_fraction: float = 0.1
    eval_every: int = 50
    eval_samples: int = 256
    seed: int = 0
    save_every: int = 0
    resume: bool = False
    device: str = "auto"
    dtype: str = "auto"
    quantize: str = "none"
    init_adapter: str | None = None
    last_blocks: int | None = None
    fsdp: bool = False

    def __post_init__(self) -> None:
        """Settings fail here, before any file is read."""
        positive = {"--rank": self.rank, "--batch-size": self.batch_size, "--micro-batch-size": self.micro_batch_size,
                    "--max-length": self.max_length, "--loss-chunk": self.loss_chunk, "--eval-samples": self.eval_samples}
        if self.steps is not None:
            positive["--steps"] = self.steps
        for flag, value in positive.items():
            if value < 1:
                raise EmlocError(f"{flag} must be at least 1 (got {value})")
        if self.steps is None and not self.epochs > 0:
            raise EmlocError(f"--epochs must be positive (got {self.epochs})")
        if not 0 <= self.eval_fraction < 1:
            raise EmlocError(f"--eval-fraction must be in [0, 1) (got {self.eval_fraction}); the rest is the training set")
        if not self.lr > 0 or not 0 <= self.warmup <= 1 or not 0 <= self.dropout < 1:
            raise EmlocError(f"--lr must be positive, --warmup in [0, 1], --dropout in [0, 1) "
                             f"(got {self.lr}, {self.warmup}, {self.dropout})")
        if self.eval_every < 0 or self.save_every < 0:
            raise EmlocError("--eval-every and --save-every must be 0 (off) or positive")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise EmlocError(f"unknown --schedule {self.schedule!r}; use cosine, linear or constant")
        if self.quantize not in QUANTIZE:
            raise EmlocError(f"unknown --quantize {self.quantize!r}; use one of {', '.join(QUANTIZE)}")
        if self.last_blocks is not None and self.last_blocks < 1:
            raise EmlocError(f"--last-blocks must be at least 1 (got {self.last_blocks})")
        parse_dtype(self.dtype, torch.device("cpu"))
        check_targets(self.targets)


QUANTIZE = ("none", "nf4")


def load_model(path: str | Path, device: str = "auto", dtype: str = "auto", quantize: str = "none") -> nn.Module:
    """Load an emulator folder, a model folder or a packaged model name as a causal LM.

    `quantize="nf4"` loads a model folder as QLoRA does: every linear but the output head in bitsandbytes' 4-bit
    NormalFloat (blocks of 64, no double quantisation), computing in `dtype`.
    """
    from .emulator import is_emulator, load_emulator

    if quantize not in QUANTIZE:
        raise EmlocError(f"unknown --quantize {quantize!r}; use one of {', '.join(QUANTIZE)}")
    if Path(str(path)).expanduser().is_dir() and is_emulator(Path(str(path)).expanduser()):
        if quantize != "none":
            raise EmlocError("--quantize applies to a model folder, not to an emulator (build one with --method quant)")
        model = load_emulator(path, device, dtype)
    else:
        folder = resolve_model(path)
        dev = parse_device(device)
        if quantize == "nf4":
            model = _load_nf4(folder, dev, parse_dtype(dtype, dev))
        else:
            model = family_of(load_config(folder)).load(folder, dtype=parse_dtype(dtype, dev)).to(dev)
            model.eval()
        if not isinstance(getattr(model, "name_or_path", None), str):  # diffusers models do not record their folder
            model.name_or_path = str(folder)
    upcast_frozen_linears(model)  # bf16 on a CPU without bf16 units: frozen products in float32
    return model


def _load_nf4(folder: Path, device: torch.device, dtype: torch.dtype) -> nn.Module:
    try:
        from transformers import BitsAndBytesConfig
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise EmlocError("--quantize nf4 needs bitsandbytes; pip install 'emloc[qlora]'") from None
    # the 4-bit layers compute in float32 where bf16 products are slow (see cpu_compute), returning x's dtype
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype(dtype, device))
    model = family_of(load_config(folder)).load(folder, quantization_config=q, dtype=dtype, device_map={"": str(device)})
    model.eval()
    return model


def _schedule(optimizer, cfg: TrainConfig, steps: int):
    from transformers import get_scheduler

    if cfg.schedule not in ("cosine", "linear", "constant"):
        raise EmlocError(f"unknown --schedule {cfg.schedule!r}; use cosine, linear or constant")
    name = "constant_with_warmup" if cfg.schedule == "constant" else cfg.schedule
    return get_scheduler(name, optimizer, num_warmup_steps=math.ceil(cfg.warmup * steps), num_training_steps=steps)


EVAL_SEED = 10**6  # held-out records draw their noise from fixed seeds (denoisers): the same grid every evaluation


@torch.no_grad()
def eval_loss(model: nn.Module, examples: list, micro: int, objective: Any, device: torch.device,
              accelerator=None) -> float:
    """The objective's mean held-out loss over `examples` (sharded over processes): answer-token NLL,
    or a denoiser's MSE per pixel on a fixed (noise, t) draw per record.

    Every process runs the same number of forward passes: under FSDP each one is a collective, so a
    process with fewer records repeats its first one and discards the result.
    """
    was = model.training
    model.eval()
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    mine = list(range(len(examples)))[rank::world]
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for i in range(0, math.ceil(len(examples) / world), micro):
        part = mine[i:i + micro] or [0]
        items = [examples[j] for j in part]
        nll = objective.loss_sum(model, items, device, [EVAL_SEED + j for j in part])
        if mine[i:i + micro]:
            total += torch.tensor([float(nll), objective.count(items)], dtype=torch.float64, device=device)
    if accelerator is not None and world > 1:
        total = accelerator.reduce(total, reduction="sum")
    model.train(was)
    return float(total[0] / total[1].clamp(min=1))


def _accelerator(cfg: TrainConfig):
    """The process setup; CPU-only machines run on CPU even with `--device auto` (else every process is rank 0)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType

    # every rank loads the same frozen buffers (a quantised emulator's codes: most of its weights), so
    # DDP need not broadcast them from rank 0 before every forward, as it does by default
    accelerator = Accelerator(cpu=cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()),
                              kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # DeepSpeed's engine owns the optimizer step (accelerate steps it on every micro-batch) and its
        # ZeRO-3 partitions need its own gather; emloc's loop does neither, so it refuses rather than train wrongly.
        raise EmlocError("emloc train does not run under DeepSpeed; shard the model with --fsdp (FSDP2) instead, "
                         "or drop the DeepSpeed config to train with DDP")
    if cfg.batch_size % accelerator.num_processes:
        raise EmlocError(f"--batch-size {cfg.batch_size} must be divisible by the number of processes ({accelerator.num_processes})")
    return accelerator


def split_off(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """(held-out, training) records: a seeded `fraction` of `records` held out (none below 10 records)."""
    if fraction <= 0 or len(records) < 10:
        return [], records
    shuffled = sample(records, len(records), seed)
    n_eval = max(1, int(len(records) * fraction))
    return shuffled[:n_eval], shuffled[n_eval:]


def _split(train_ex: list[Example], held: list[Example] | None, cfg: TrainConfig) -> tuple[list[Example], list[Example]]:
    """Training and held-out records: `held` if given, else `eval_fraction` of the training file."""
    if held is None:
        held, train_ex = split_off(train_ex, cfg.eval_fraction, cfg.seed + 1)
    if not train_ex:
        raise EmlocError("no training records left after holding out --eval-fraction; lower it or pass --eval-data")
    return train_ex, (held or [])[: cfg.eval_samples]


def _peft(net: nn.Module, cfg: TrainConfig, sharded: bool) -> nn.Module:
    """The LoRA model: initial weights, frozen blocks, checkpointing and (with `sharded`) FSDP2, in that order."""
    from peft import get_peft_model

    torch.manual_seed(cfg.seed)  # identical LoRA init on every process
    try:
        peft_model = get_peft_model(net, lora_config(net, cfg))
    except ValueError as exc:
        if "not found in the base model" in str(exc) or "target modules" in str(exc).lower():
            raise EmlocError(f"--targets matches no layer of the model ({cfg.targets}); check the module names") from None
        raise
    if cfg.init_adapter:
        _load_initial(peft_model, Path(cfg.init_adapter).expanduser())
    if cfg.last_blocks:
        _train_last_blocks(peft_model, cfg.last_blocks)
    if cfg.gradient_checkpointing:
        peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        peft_model.enable_input_require_grads()
    if sharded:
        shard_model(peft_model, find_blocks(peft_model.get_base_model())[1])
    return peft_model


def _data_order(n: int, cfg: TrainConfig, steps: int) -> list[int]:
    """Global data order: seeded permutations, one per epoch, concatenated."""
    rng = random.Random(cfg.seed)
    order: list[int] = []
    while len(order) < steps * cfg.batch_size:
        perm = list(range(n))
        rng.shuffle(perm)
        order += perm
    return order


def _gather_rng(accelerator, device: torch.device) -> list[dict[str, torch.Tensor]]:
    mine = rng_state(device)
    if accelerator.num_processes == 1:
        return [mine]
    import torch.distributed as dist

    states: list[Any] = [None] * accelerator.num_processes
    dist.all_gather_object(states, mine)
    return states


class _Loop:
    """One training run's moving parts: the step, the checkpoint (collective parts on every rank) and the resume."""

    def __init__(self, accelerator, model: nn.Module, raw: nn.Module, optimizer, scheduler, cfg: TrainConfig,
                 objective: Any, sharded: bool) -> None:
        self.acc, self.model, self.raw, self.opt, self.sched, self.cfg = accelerator, model, raw, optimizer, scheduler, cfg
        self.objective, self.sharded = objective, sharded
        self.world, self.device = accelerator.num_processes, accelerator.device
        self.micro = min(cfg.micro_batch_size, cfg.batch_size // self.world)

    def step(self, batch: list, seeds: list[int]) -> float:
        """One optimizer step on a global batch (`seeds`: one per record, for a denoiser's noise);
        returns the batch's mean loss (over all processes)."""
        mine = list(zip(batch, seeds))[self.acc.process_index::self.world]
        n_global = self.objective.count(batch)
        loss_sum = 0.0
        chunks = [mine[i:i + self.micro] for i in range(0, len(mine), self.micro)]
        for j, chunk in enumerate(chunks):
            # DDP: reduce gradients once, after the last micro-batch (FSDP2 reduce-scatters every one; same sum)
            ctx = self.acc.no_sync(self.model) if j < len(chunks) - 1 and not self.sharded else contextlib.nullcontext()
            with ctx:
                nll = self.objective.loss_sum(self.model, [c[0] for c in chunk], self.device, [c[1] for c in chunk])
                loss = nll / max(n_global, 1)
                # DDP and FSDP average gradients over processes; scale so the result is sum / n_global.
                self.acc.backward(loss * self.world)
            loss_sum += float(loss.detach())
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        total = torch.tensor(loss_sum, device=self.device)
        if self.world > 1:
            total = self.acc.reduce(total, reduction="sum")
        return float(total)

    def run(self, train_ex: list, held: list, order: list[int], steps: range, rows: list[dict[str, Any]],
            ckpt: Path, key: str) -> list[dict[str, Any]]:
        """Train `steps` (global step numbers, from the resumed one to the last), appending one log row
        per step to `rows` (evaluated on `held` every `eval_every` and at the end); checkpoints into `ckpt`."""
        cfg = self.cfg
        for step in tqdm(steps, desc="training LoRA", unit="step", disable=not self.acc.is_main_process,
                         initial=steps.start, total=steps.stop):
            step_start = time.perf_counter()
            span = range(step * cfg.batch_size, (step + 1) * cfg.batch_size)
            loss = self.step([train_ex[order[i]] for i in span], [cfg.seed * 1_000_003 + i for i in span])
            row: dict[str, Any] = {"step": step + 1, "loss": round(loss, 6), "lr": self.sched.get_last_lr()[0],
                                   "seconds": round(time.perf_counter() - step_start, 3)}  # the step alone, no eval
            if not math.isfinite(row["loss"]):
                raise EmlocError(f"training loss became non-finite at step {step + 1}; lower --lr or use --dtype float32")
            last = step + 1 == steps.stop
            if held and (last or (cfg.eval_every and (step + 1) % cfg.eval_every == 0)):
                row["eval_loss"] = round(eval_loss(self.model, held, self.micro, self.objective, self.device, self.acc), 6)
            rows.append(row)
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and not last:
                self.save(ckpt, key, step + 1, rows)
            fault_point("train_step", step + 1)
        return rows

    def save(self, folder: Path, key: str, step: int, rows: list[dict[str, Any]]) -> None:
        adapter, optim = lora_state(self.raw), optimizer_state(self.raw, _torch_optimizer(self.opt))  # collectives
        rngs = _gather_rng(self.acc, self.device)
        if self.acc.is_main_process:
            save_checkpoint(folder, key, step, rows, adapter, optim, self.sched.state_dict(), rngs)
        self.acc.wait_for_everyone()

    def resume(self, folder: Path, key: str) -> tuple[int, list[dict[str, Any]]]:
        state = load_checkpoint(folder, key)
        if state is None:
            log.warning("no checkpoint in %s; starting from step 0", folder)
            return 0, []
        load_lora_state(self.raw, state["adapter"])
        load_optimizer_state(self.raw, _torch_optimizer(self.opt), state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        rngs = state["rng"]
        if len(rngs) != self.world:
            log.warning("the checkpoint was written by %d processes, this run has %d: dropout noise will differ", len(rngs), self.world)
        set_rng_state(rngs[self.acc.process_index % len(rngs)], self.device)
        return state["step"], state["log"]


def _torch_optimizer(opt):
    return getattr(opt, "optimizer", opt)  # accelerate's wrapper holds the torch optimizer


def _load(model: str | Path, cfg: TrainConfig, device: torch.device) -> tuple[torch.nn.Module, Path, dict | None, Any]:
    """The frozen model, its folder, its manifest (an emulator's, or None) and its family's objective."""
    model_path = Path(str(model)).expanduser()
    net = load_model(model, device=str(device), dtype=cfg.dtype, quantize=cfg.quantize)
    source = read_manifest(model_path) if model_path.is_dir() else None
    model_dir = Path(net.name_or_path)
    return net, model_dir, source, family_of(load_config(model_dir)).objective_for(model_dir, cfg)


def _provenance(model_dir: Path, source: dict | None, cfg: TrainConfig, data: str | Path, eval_data: str | Path | None) -> dict:
    """The adapter manifest's inputs: what it was trained on (and that model's base) and with what."""
    return {
        "kind": "adapter",
        "trained_on": str(model_dir),
        "trained_on_kind": source.get("kind") if source else "base",
        "trained_on_fingerprint": fingerprint(model_dir),
        "base": source.get("base") if source and source.get("kind") == "emulator" else str(model_dir),
        "config": cfg,
        "data": str(Path(data).expanduser().resolve()),
        "eval_data": str(Path(eval_data).expanduser().resolve()) if eval_data else None,
    }


def _model_size(raw: torch.nn.Module, n_trainable: int) -> dict[str, int]:
    return {
        "trainable_params": n_trainable,
        "model_params": sum(p.numel() for p in raw.parameters()) - n_trainable,  # DTensors count their full size
        # frozen weights as held: parameters and buffers (a quantised emulator's codes are buffers)
        "model_bytes": sum(t.numel() * t.element_size() for t in (*raw.parameters(), *raw.buffers()) if not t.requires_grad),
    }


def train_adapter(model: str | Path, data: str | Path, output: str | Path, config: TrainConfig | None = None,
                  overwrite: bool = False, *legacy: Any, eval_data: str | Path | None = None) -> Path:
    """Train a LoRA adapter on a frozen model and save it as a standard PEFT adapter folder.

    Every stage takes its required inputs, then output, config and overwrite; optional inputs are
    keywords. (The previous order, `(model, data, output, config, eval_data, overwrite)`, still
    works with a warning for one release.)

    Args:
        model: an emulator folder (the EMLoC path), or a model folder / packaged name (plain LoRA).
        data: JSONL training data (see `emloc.data`).
        output: adapter folder to create (`adapter_config.json`, `adapter_model.safetensors`,
            `manifest.json`, `loss_log.jsonl`, `loss.png`).
        config: settings; defaults to `TrainConfig()`.
        eval_data: JSONL held-out data; if None, `config.eval_fraction` of `data` is held out.
        overwrite: replace a non-empty `output`.

    Returns:
        The adapter folder.
    """
    if legacy or not isinstance(overwrite, bool):  # (model, data, output, config, eval_data, overwrite)
        legacy_order("train_adapter", "train_adapter(model, data, output, config, overwrite, eval_data=...)")
        eval_data, overwrite = overwrite, bool(legacy[0]) if legacy else False
    cfg = config or TrainConfig()
    watch = Stopwatch()
    inputs = (model, data, eval_data, cfg.init_adapter)
    out_path = check_output(output, overwrite, inputs)
    accelerator = _accelerator(cfg)
    main, world, device = accelerator.is_main_process, accelerator.num_processes, accelerator.device
    sharded = (cfg.fsdp or accelerator.distributed_type.name == "FSDP") and world > 1
    if cfg.fsdp and world == 1:
        log.warning("--fsdp has nothing to shard over with one process; training unsharded")

    net, model_dir, source, objective = _load(model, cfg, device)
    train_ex, held = _split(objective.load(data), objective.load(eval_data) if eval_data is not None else None, cfg)
    steps = cfg.steps if cfg.steps else max(1, math.ceil(cfg.epochs * len(train_ex) / cfg.batch_size))

    peft_model = _peft(net, cfg, sharded)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = _schedule(optimizer, cfg, steps)
    raw = peft_model
    if not sharded:  # FSDP2 is already applied (`_peft`); accelerate would wrap the model in DDP
        peft_model, optimizer = accelerator.prepare(peft_model, optimizer)
    peft_model.train()
    loop = _Loop(accelerator, peft_model, raw, optimizer, scheduler, cfg, objective, sharded)
    order = _data_order(len(train_ex), cfg, steps)

    ckpt = checkpoint_dir(out_path)
    key = config_key(cfg, fingerprint(model_dir), data, eval_data)
    start, log_rows = loop.resume(ckpt, key) if cfg.resume else (0, [])
    if start:
        log.info("resuming from step %d of %d (%s)", start, steps, ckpt)
    loop_start = time.perf_counter()
    log_rows = loop.run(train_ex, held, order, range(start, steps), log_rows, ckpt, key)
    state = lora_state(raw)  # a collective under FSDP: every process gathers, the main one writes
    accelerator.wait_for_everyone()
    if main:
        with staged_output(out_path, overwrite, inputs) as tmp:
            raw.save_pretrained(tmp, state_dict=state)
            (tmp / "loss_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log_rows))
            _plot_losses(log_rows, tmp / "loss.png", objective.label)
            seconds_per_step = (time.perf_counter() - loop_start) / max(1, steps - start)
            write_json(tmp / MANIFEST, {
                **_provenance(model_dir, source, cfg, data, eval_data), "train_records": len(train_ex), "eval_records": len(held),
                "steps": steps, **_model_size(raw, n_trainable),
                "final_loss": log_rows[-1]["loss"], "final_eval_loss": log_rows[-1].get("eval_loss"),
                "processes": world, "sharded": sharded, "seconds_per_step": round(seconds_per_step, 3),
                "versions": versions(), "wall_seconds": round(watch.seconds, 1), **peak_memory_mb(),
            })
        shutil.rmtree(ckpt, ignore_errors=True)  # the finished adapter supersedes it
        print(watch.summary("train", out_path))
    accelerator.wait_for_everyone()
    return out_path


def _plot_losses(rows: list[dict[str, Any]], path: Path, label: str = "answer NLL") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train", lw=1)
    ev = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
