"""The LoRA emloc trains: its default targets (a family fact), its config, and starting from or
freezing part of an existing adapter (`--init-adapter`, `--last-blocks`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from torch import nn

from .artifacts import read_json_object
from .errors import EmlocError
from .families import family_of
from .models import block_linears, find_blocks


def default_targets(model: nn.Module) -> str:
    """A PEFT `target_modules` regex covering every nn.Linear inside the blocks of every stack (or,
    for a family that names its usual targets, those of them the blocks have)."""
    family = family_of(model.config)
    parts = []
    for name, blocks in family.find_stacks(model):
        many = isinstance(blocks, nn.ModuleList)  # else one module that is a block (a UNet's mid block)
        rel = sorted({n for b in (blocks if many else [blocks]) for n, _ in block_linears(b)})
        if family.default_targets is not None:  # names as users write them: the layer's last parts (`to_q`, `ff.net.2`)
            rel = [r for r in rel if any(r == t or r.endswith("." + t) for t in family.default_targets)]
        if rel:
            index = r"\.\d+" if many else ""
            parts.append(rf"{re.escape(name)}{index}\.(?:{'|'.join(re.escape(r) for r in rel)})")
    if not parts:
        raise EmlocError("the model's blocks hold no nn.Linear layer to put LoRA on")
    return parts[0] if len(parts) == 1 else "(?:" + "|".join(parts) + ")"


def lora_config(model: nn.Module, cfg: Any):
    from peft import LoraConfig

    if cfg.init_adapter:  # the adapter to start from decides the LoRA's shape
        f = Path(cfg.init_adapter).expanduser() / "adapter_config.json"
        if not f.is_file():
            raise EmlocError(f"--init-adapter {cfg.init_adapter} is not a PEFT adapter folder (no adapter_config.json)")
        a = read_json_object(f)
        return LoraConfig(r=a["r"], lora_alpha=a["lora_alpha"], lora_dropout=cfg.dropout, use_rslora=a.get("use_rslora", False),
                          target_modules=a["target_modules"], bias="none", task_type=family_of(model.config).task_type)
    if cfg.rank < 1:
        raise EmlocError(f"--rank must be at least 1 (got {cfg.rank})")
    targets: Any = cfg.targets or default_targets(model)
    if cfg.targets and "," in cfg.targets:
        targets = [t.strip() for t in cfg.targets.split(",") if t.strip()]
    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, use_rslora=cfg.rslora,
                      target_modules=targets, bias="none", task_type=family_of(model.config).task_type)


def _load_initial(peft_model: nn.Module, folder: Path) -> None:
    """Set the LoRA weights from an adapter folder; every weight of the model's LoRA must be in it."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    f = folder / "adapter_model.safetensors"
    if not f.is_file():
        raise EmlocError(f"--init-adapter {folder} has no adapter_model.safetensors")
    result = set_peft_model_state_dict(peft_model, load_file(f))
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing:
        raise EmlocError(f"--init-adapter {folder} lacks {missing[0]}; it was trained for another model")


def _train_last_blocks(peft_model: nn.Module, k: int) -> None:
    """Freeze the LoRA weights outside the last `k` blocks."""
    name, blocks = find_blocks(peft_model.get_base_model())
    if not 1 <= k <= len(blocks):
        raise EmlocError(f"--last-blocks must be between 1 and the model's {len(blocks)} blocks (got {k})")
    pat = re.compile(rf"{re.escape(name)}\.(\d+)\.")
    for pname, p in peft_model.named_parameters():
        hit = pat.search(pname)
        if p.requires_grad and (hit is None or int(hit.group(1)) < len(blocks) - k):
            p.requires_grad_(False)
