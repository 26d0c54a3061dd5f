"""`emloc heal`: fit the emulator to the original before the task LoRA is trained (a transfer-gap remedy).

A LoRA of rank `rank` on every compressed layer of the emulator is trained to reproduce the ORIGINAL
model's next-token distributions on the calibration records: the original's top-k probabilities at
every position, computed once by forward passes of the original (no gradients: inference cost), then
the original is freed and only the emulator trains. The loss is the cross-entropy from the original's
distribution (its top k tokens and the rest of its mass as one bucket) to the emulator's, i.e. their
KL divergence up to a constant. The trained term is folded into the emulator's layers (the SVD
factors, or the quantised layer's low-rank term, grow by `rank`), so the healed emulator is an
emulator folder like any other: the task LoRA trains on it, `emloc correct` corrects against its
(healed) W_e, and only the task LoRA reaches the original. The extra bytes are counted in its manifest.
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .artifacts import MANIFEST, Stopwatch, check_output, fingerprint, peak_memory_mb, read_manifest, save_finite, staged_output, versions, write_json
from .errors import EmlocError
from .lowrank import LowRankLinear
from .quant import QuantLinear

log = logging.getLogger("emloc")

BASE_BYTES = 2  # a float parameter counted in bfloat16, as `--ratio` counts bytes
TEACHER_BATCH = 2  # records per forward of the original: B x T x vocabulary logits exist at a time


@dataclass
class HealConfig:
    """Settings of `heal_emulator`.

    Attributes:
        rank: rank of the healing term added to every compressed layer.
        steps: optimizer steps of the healing.
        batch_size: records per step.
        lr: AdamW learning rate.
        top_k: the original's most probable tokens kept per position (the rest of its mass is one bucket).
        samples: calibration records used (None: as many as the emulator's calibration draw).
        seed: seed of the record draw, the term's initialisation and the batch order.
        device: auto, cpu or cuda.
        dtype: dtype of the frozen weights while healing (auto: the emulator build's).
    """

    rank: int = 8
    steps: int = 50
    batch_size: int = 8
    lr: float = 1e-3
    top_k: int = 32
    samples: int | None = None
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"

    def __post_init__(self) -> None:
        """Settings fail here, before any file is read."""
        for flag, value in {"--rank": self.rank, "--steps": self.steps, "--batch-size": self.batch_size,
                            "--top-k": self.top_k, "--samples": self.samples or 1}.items():
            if value < 1:
                raise EmlocError(f"{flag} must be at least 1 (got {value})")
        if not self.lr > 0:
            raise EmlocError(f"--lr must be positive (got {self.lr})")


@torch.no_grad()
def teacher_targets(base: Path, items: list, top_k: int, device: str, dtype: str, pad_id: int
                    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The original's top-k next-token probabilities per record: [(probs (T-1) x k float32, ids (T-1) x k)]."""
    from .data import collate
    from .train import load_model

    net = load_model(base, device, dtype)
    dev = next(net.parameters()).device
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    for i in tqdm(range(0, len(items), TEACHER_BATCH), desc="original's predictions", unit="batch"):
        chunk = items[i:i + TEACHER_BATCH]
        batch = collate(chunk, pad_id)
        logits = net(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev)).logits
        for j, ex in enumerate(chunk):
            logp = torch.log_softmax(logits[j, : len(ex.input_ids) - 1].float(), dim=-1)
            top = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
            out.append((top.values.exp().cpu(), top.indices.cpu()))
    del net
    return out


def _distill_sum(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, probs: torch.Tensor,
                 ids: torch.Tensor) -> torch.Tensor:
    """Sum over rows of the cross-entropy from the teacher's (top-k + rest) distribution to the student's."""
    logq = torch.log_softmax(F.linear(h, weight, bias).float(), dim=-1)
    top = logq.gather(-1, ids)
    rest_p = (1 - probs.sum(-1)).clamp_min(0)
    rest_q = (1 - top.exp().sum(-1)).clamp_min(1e-6)
    return -(probs * top).sum() - (rest_p * rest_q.log()).sum()


def _batch_loss(model: nn.Module, items: list, targets: list, pad_id: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """(summed distillation loss, positions) of one batch of records on the emulator with its healing term."""
    from .data import collate
    from .loss import head_returns, output_head

    batch = collate(items, pad_id)
    keep = batch["attention_mask"][:, 1:].bool().to(device)
    probs = torch.cat([t[0] for t in targets]).to(device)
    ids = torch.cat([t[1] for t in targets]).to(device)
    head = output_head(model)
    inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
    if head is None:  # logits post-processed by the model: the full logits, then the same loss
        logits = model(**inputs).logits[:, :-1][keep]
        return _distill_sum(logits, torch.eye(logits.shape[-1], device=device, dtype=logits.dtype), None, probs, ids), len(probs)
    with head_returns(head, keep, _distill_sum, (probs, ids), chunk=256):
        total = model(**inputs).logits
    return total.reshape(()), len(probs)


def _fold(model: nn.Module, names: list[str], lora: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float,
          dt: torch.dtype) -> None:
    """Append each layer's trained term (B A, scaled) to its low-rank factors: up' = [up, sB], down' = [down; A]."""
    for name in names:
        layer = model.get_submodule(name)
        a, b = lora[name]
        if not isinstance(layer, (LowRankLinear, QuantLinear)):
            raise EmlocError(f"{name} is not a compressed layer; heal adds its term to compressed layers only")
        down = a.to(dt) if layer.down is None else torch.cat([layer.down.data, a.to(dt)])
        up = (scale * b).to(dt) if layer.up is None else torch.cat([layer.up.data, (scale * b).to(dt)], dim=1)
        layer.down = nn.Parameter(down, requires_grad=False)
        layer.up = nn.Parameter(up, requires_grad=False)
        layer.rank = down.shape[0]


def _train_term(emu: nn.Module, names: list[str], items: list, targets: list, cfg: HealConfig, pad_id: int
                ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[float]]:
    """Train the healing LoRA on the emulator; returns name -> (A r x n, B m x r) and the loss per step (nats/position)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(cfg.seed)
    model = get_peft_model(emu, LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, target_modules=names, lora_dropout=0.0))
    device = next(p for p in model.parameters() if p.requires_grad).device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / cfg.steps)))
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.cat([torch.randperm(len(items), generator=gen) for _ in range(cfg.steps * cfg.batch_size // len(items) + 1)])
    losses: list[float] = []
    model.train()
    for step in tqdm(range(cfg.steps), desc="healing emulator", unit="step"):
        pick = order[step * cfg.batch_size:(step + 1) * cfg.batch_size].tolist()
        total, n = _batch_loss(model, [items[i] for i in pick], [targets[i] for i in pick], pad_id, device)
        (total / max(n, 1)).backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total.item() / max(n, 1))
    terms = {}
    for name in names:
        mod = model.base_model.model.get_submodule(name)
        terms[name] = (mod.lora_A["default"].weight.detach().float(), mod.lora_B["default"].weight.detach().float())
    model.unload()  # the emulator's own layers back, without the LoRA wrappers
    return terms, losses


@torch.no_grad()
def _mean_loss(emu: nn.Module, items: list, targets: list, pad_id: int) -> float:
    """The distillation loss of the emulator as it is, over every record (nats per position)."""
    device = next(emu.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(items), TEACHER_BATCH):
        s, n = _batch_loss(emu, items[i:i + TEACHER_BATCH], targets[i:i + TEACHER_BATCH], pad_id, device)
        total, count = total + float(s), count + n
    return total / max(count, 1)


def heal_emulator(emulator: str | Path, output: str | Path, config: HealConfig | None = None, overwrite: bool = False, *,
                  base: str | Path | None = None, calibration: str | Path | None = None) -> Path:
    """Write a healed copy of `emulator`: its compressed layers fitted to the original's predictions.

    Args:
        emulator: emulator folder (`emloc build`).
        output: healed emulator folder to create.
        config: settings; defaults to `HealConfig()`.
        overwrite: replace a non-empty `output`.
        base: the original model (default: the emulator's).
        calibration: JSONL records (default: the emulator's calibration file).

    Returns:
        The healed emulator folder (train the task LoRA on it as on any emulator).
    """
    from .data import load_examples, sample
    from .emulator import load_emulator
    from .families import family_of
    from .models import copy_tokenizer_files, load_config, load_tokenizer, resolve_model

    cfg = config or HealConfig()
    watch = Stopwatch()
    emu_dir = Path(emulator).expanduser().resolve()
    em = read_manifest(emu_dir)
    if em is None or em.get("kind") != "emulator":
        raise EmlocError(f"{emu_dir} is not an emulator folder; build one with `emloc build`")
    base_dir = resolve_model(base or em["base"])
    if fingerprint(base_dir) != em["base_fingerprint"]:
        raise EmlocError(f"{base_dir} is not the base model the emulator was built from; pass --base with the model used in `emloc build`")
    data = Path(calibration or em.get("calibration", {}).get("file", "")).expanduser()
    if not data.is_file():
        raise EmlocError(f"calibration data {data} not found; pass --calibration FILE")
    out_path = check_output(output, overwrite, (emu_dir, base_dir, data))
    if family_of(load_config(base_dir)).objective.split(":")[-1] != "AnswerNLL":
        raise EmlocError("emloc heal fits next-token predictions: it supports causal and vision-language models, not denoisers")
    names = sorted(n for n, e in em["layers"].items() if e.get("rank") is not None)
    if not names:
        raise EmlocError(f"{emu_dir} has no compressed layer to heal")
    ecfg = em.get("config", {})
    dtype = ecfg.get("dtype", "auto") if cfg.dtype == "auto" else cfg.dtype
    tok = load_tokenizer(base_dir)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    records = load_examples(data, tok, int(ecfg.get("max_length", 512)))
    items = sample(records, cfg.samples or int(em.get("calibration", {}).get("samples", 64)), cfg.seed)

    targets = teacher_targets(base_dir, items, cfg.top_k, cfg.device, dtype, pad_id)  # the original, then freed
    emu = load_emulator(emu_dir, cfg.device, dtype)
    before = _mean_loss(emu, items, targets, pad_id)
    terms, losses = _train_term(emu, names, items, targets, cfg, pad_id)
    float_dtype = next(p.dtype for p in emu.parameters() if p.is_floating_point())
    _fold(emu, names, terms, 1.0, float_dtype)  # lora_alpha = r: scale 1
    after = _mean_loss(emu, items, targets, pad_id)
    log.info("heal: distillation loss of the emulator %.4f -> %.4f nats per position (%d records)", before, after, len(items))

    layers = {k: dict(v) for k, v in em["layers"].items()}
    added = 0
    for name in names:
        e = layers[name]
        extra = cfg.rank * (e["in_features"] + e["out_features"])
        e.update(rank=e["rank"] + cfg.rank, heal_rank=cfg.rank, params_after=e["params_after"] + extra,
                 bytes=e["bytes"] + BASE_BYTES * extra)
        added += extra
    with staged_output(out_path, overwrite, (emu_dir, base_dir, data)) as tmp:
        state, seen = {}, set()
        for k, v in emu.state_dict().items():  # tied weights once
            if v.data_ptr() in seen and v.numel():
                continue
            seen.add(v.data_ptr())
            state[k] = v.detach().to("cpu").contiguous()
        save_finite(state, tmp / "model.safetensors")
        shutil.copy2(emu_dir / "config.json", tmp / "config.json")
        copy_tokenizer_files(emu_dir, tmp)
        params = dict(em["params"], emulator=em["params"]["emulator"] + added,
                      compressed_layers_after=em["params"]["compressed_layers_after"] + added)
        kept = em["bytes"]["emulator_block_linears"] + BASE_BYTES * added
        write_json(tmp / MANIFEST, {
            **em, "fingerprint": fingerprint(tmp), "layers": layers, "params": params,
            "bytes": dict(em["bytes"], emulator_block_linears=kept, fraction=kept / max(em["bytes"]["block_linears_bf16"], 1)),
            "healed": {"from": str(emu_dir), "from_fingerprint": em.get("fingerprint"), "config": asdict(cfg),
                       "records": len(items), "loss_before": before, "loss_after": after, "loss_per_step": losses},
            "versions": versions(), "wall_seconds": round(watch.seconds, 1), **peak_memory_mb(),
        })
    print(watch.summary("heal", out_path))
    return out_path
