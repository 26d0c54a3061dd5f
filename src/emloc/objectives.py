"""Training objectives, one per kind of model: what a record is, how a batch's loss is summed, and
what it is normalised by. A family names its objective (`Family.objective`); `emloc train` and the
held-out loss ask it and never test the model's kind.

- `AnswerNLL`: causal and vision-language models: next-token NLL on the answer tokens (see
  `emloc.loss`), normalised by the answer tokens of the global batch.
- `FlowMatching`: diffusers denoisers: rectified flow's velocity MSE (see `emloc.diffusion`) with
  seeded noise and timesteps per record and step, normalised by the pixels of the global batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn


class AnswerNLL:
    """Answer-token NLL of text (or image-text) records."""

    label = "answer NLL"

    def __init__(self, model_dir: Path, cfg: Any) -> None:
        from .models import load_processor, load_tokenizer

        self.tok = load_tokenizer(model_dir)
        self.processor = load_processor(model_dir)
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else (self.tok.eos_token_id or 0)
        self.cfg = cfg

    def load(self, path: str | Path) -> list:
        from .data import load_examples

        return load_examples(path, self.tok, self.cfg.max_length, self.processor)

    def count(self, items: list) -> int:
        from .data import IGNORE, collate

        return int((collate(items, self.pad_id)["labels"][:, 1:] != IGNORE).sum())

    def loss_sum(self, model: nn.Module, items: list, device: torch.device, seeds: list[int]) -> torch.Tensor:
        from .data import collate
        from .loss import answer_nll

        batch = {k: v.to(device) for k, v in collate(items, self.pad_id).items()}
        return answer_nll(model, batch, getattr(self.cfg, "loss_chunk", 256))[0]


class FlowMatching:
    """Velocity MSE of a denoiser on image records, noise and timestep drawn from each record's seed."""

    label = "denoising MSE"

    def __init__(self, model_dir: Path, cfg: Any) -> None:
        from .diffusion import image_shape
        from .families import family_of
        from .models import load_config

        config = load_config(model_dir)
        self.family = family_of(config).name
        self.channels, self.size = image_shape(config)

    def load(self, path: str | Path) -> list:
        from .diffusion import read_records

        return read_records(path, self.channels, self.size)

    def count(self, items: list) -> int:
        return sum(r.pixels.numel() for r in items)

    def loss_sum(self, model: nn.Module, items: list, device: torch.device, seeds: list[int]) -> torch.Tensor:
        from .diffusion import flow_loss

        return flow_loss(model, self.family, items, device, seeds)
