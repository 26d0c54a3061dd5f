"""Mode `auto` of `emloc correct`: pick the correction that serves the original model best.

The candidates (the uncorrected, the weighted and the paper-corrected adapter) are scored by the
original model's mean loss (answer NLL; a denoiser's MSE) on records of the emulator's calibration file that were not in
its calibration draw, with forward passes only (the original at inference cost, the candidate
adapters attached through PEFT one at a time). Which correction helps depends on the model, the
ratio, the task and how far training moved the LoRA (see the benchmark in the README), so the
choice is measured per adapter rather than fixed.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors.torch import save_file

from .data import sample
from .errors import EmlocError
from .families import family_of
from .models import load_config

log = logging.getLogger("emloc")

SELECT_BATCH = 4  # records per forward pass while scoring the candidates


def calibration_file(explicit: str | None, emanifest: dict[str, Any]) -> Path:
    """The calibration JSONL: `explicit`, else the one recorded in the emulator's manifest."""
    data = Path(explicit or emanifest.get("calibration", {}).get("file", "")).expanduser()
    if not data.is_file():
        raise EmlocError(f"calibration data {data} not found; modes auto and weighted need the records the emulator "
                         "was calibrated on: pass --calibration FILE (or use --mode paper / none)")
    return data


@torch.no_grad()
def select_correction(candidates: dict[str, dict[str, torch.Tensor]], acfg: dict[str, Any], base_dir: Path,
                      emanifest: dict[str, Any], cfg: Any) -> tuple[str, dict[str, float]]:
    """Return the name of the candidate adapter with the lowest NLL of the original, and every score.

    Args:
        candidates: name -> adapter tensors (PEFT key names), all for the original model.
        acfg: the adapter_config to write beside them.
        base_dir: the original model.
        emanifest: the emulator's manifest (calibration file, draw seed and size, max length).
        cfg: the `CorrectConfig` (calibration, device, select_records).
    """
    ecfg = emanifest.get("config", {})
    settings = SimpleNamespace(max_length=int(ecfg.get("max_length", 512)), loss_chunk=256)
    objective = family_of(load_config(base_dir)).objective_for(base_dir, settings)
    examples = sample(objective.load(calibration_file(cfg.calibration, emanifest)), 10**9, int(ecfg.get("seed", 0)))
    used = int(emanifest.get("calibration", {}).get("samples", ecfg.get("samples", 64)))
    held = examples[used: used + cfg.select_records]
    if not held:
        log.warning("the calibration file has no records beyond the calibration draw; auto scores on calibration records")
        held = examples[: cfg.select_records]
    scores = score_candidates(candidates, acfg, base_dir, held, objective, cfg.device, ecfg.get("dtype", "auto"))
    return min(scores, key=lambda k: scores[k]), scores


@torch.no_grad()
def score_candidates(candidates: dict[str, dict[str, torch.Tensor]], acfg: dict[str, Any], base_dir: Path, held: list,
                     objective: Any, device: str, dtype: str) -> dict[str, float]:
    """name -> the original's mean loss on `held` with that candidate adapter attached (forward passes only)."""
    from peft import PeftModel

    from .train import EVAL_SEED, load_model

    net = load_model(base_dir, device, dtype)
    dev = next(net.parameters()).device
    # batches of 4: the original plus three candidate adapters stay under its evaluation's peak (batch 8)
    batches = [list(range(i, min(i + SELECT_BATCH, len(held)))) for i in range(0, len(held), SELECT_BATCH)]
    scores: dict[str, float] = {}
    peft_model = None
    with tempfile.TemporaryDirectory(prefix="emloc-select-") as tmp:
        for name, tensors in candidates.items():
            folder = Path(tmp) / name
            folder.mkdir()
            save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "adapter_model.safetensors")
            (folder / "adapter_config.json").write_text(json.dumps({**acfg, "base_model_name_or_path": str(base_dir)}))
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(net, folder, adapter_name=name)
            else:
                peft_model.load_adapter(folder, adapter_name=name)
            peft_model.set_adapter(name)
            peft_model.eval()
            total, count = 0.0, 0
            for b in batches:  # a denoiser's records draw fixed noise: every candidate sees the same
                items = [held[j] for j in b]
                s = objective.loss_sum(peft_model, items, dev, [EVAL_SEED + j for j in b])
                total, count = total + float(s), count + objective.count(items)
            scores[name] = total / max(count, 1)
    return scores
