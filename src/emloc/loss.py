"""Answer-token cross-entropy without materialising batch x sequence x vocabulary logits.

The model runs with its output head temporarily replaced by the loss itself: inside the head's call,
only the positions whose next token carries loss are gathered (N x d, N = answer tokens), and the
head's weight is applied to them in chunks of `chunk` tokens under activation checkpointing, so at
most chunk x vocabulary logits exist at any time, in the forward and in the backward pass. For a chat
task this is a few hundred rows instead of B x T; for a 150k vocabulary it is what keeps the loss from
dominating training memory. Computing it inside the head's call also keeps it correct under FSDP and
ZeRO-3, which gather the head's weight only for that call.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .cpu_compute import frozen_linear
from .data import IGNORE
from .families import family_of



def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP and friends
        model = model.module
    return model


def output_head(model: nn.Module) -> nn.Linear | None:
    """The model's output projection, if the hidden-state shortcut is safe for it."""
    inner = _unwrap(model)
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    cfg = getattr(base, "config", None)
    if cfg is not None and family_of(cfg).post_processes_logits(cfg):  # the shortcut would be wrong: full logits
        return None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear) or hasattr(head, "base_layer"):  # absent, or LoRA'd itself
        return None
    return head


def head_logits(h: torch.Tensor, weight: torch.Tensor | nn.Module, bias: torch.Tensor | None) -> torch.Tensor:
    """Logits of hidden states h (N x d): a dense head's weight, or a head module stored otherwise (an
    emulator's quantised head: its class's own map, since the instance's forward is the loss here)."""
    if isinstance(weight, nn.Module):
        return type(weight).forward(weight, h)
    return frozen_linear(h, weight, bias)


def _ce_sum(h: torch.Tensor, weight: torch.Tensor | nn.Module, bias: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head_logits(h, weight, bias).float(), y, reduction="sum")


@contextlib.contextmanager
def head_returns(head: nn.Linear, keep: torch.Tensor, loss_fn: Callable[..., torch.Tensor], targets: tuple[torch.Tensor, ...],
                 chunk: int) -> Iterator[None]:
    """Make the head return the summed loss of the kept positions (a 0-d tensor) instead of logits.

    `loss_fn(h, weight, bias, *targets)` sums the loss of a chunk of positions (h: chunk x d; each
    target: the chunk's rows of `targets`, one row per kept position); `weight` is the head's dense
    weight, or the head itself when it holds none (a quantised head; see `head_logits`). It runs per chunk of `chunk`
    positions under activation checkpointing, so at most chunk x vocabulary logits exist at a time.
    The loss is computed inside the head's own call, i.e. inside the model's forward: under FSDP and
    ZeRO-3 that is where the head's weight is gathered (and its module hooks gather it again for the
    backward pass); read after the forward, it may already be released.
    """
    def forward(x: torch.Tensor) -> torch.Tensor:  # x: B x T x d, the final hidden states
        h = x[:, :-1][keep]
        total = (x.sum() * 0).float()  # keeps the graph connected when no position carries loss
        grad = torch.is_grad_enabled()
        weight = head.weight if isinstance(head.weight, nn.Parameter) else head
        for i in range(0, len(h), chunk):
            args = (h[i:i + chunk], weight, head.bias, *(t[i:i + chunk] for t in targets))
            total = total + (checkpoint(loss_fn, *args, use_reentrant=False) if grad else loss_fn(*args))
        return total

    head.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        del head.forward


def _loss_head(head: nn.Linear, keep: torch.Tensor, y: torch.Tensor, chunk: int) -> contextlib.AbstractContextManager:
    """The head returns the answer tokens' summed NLL (see `head_returns`)."""
    return head_returns(head, keep, _ce_sum, (y[keep],), chunk)


def answer_nll(model: nn.Module, batch: dict[str, torch.Tensor], chunk: int = 256) -> tuple[torch.Tensor, int]:
    """Sum of next-token NLL over answer tokens, and their count.

    Args:
        model: a causal LM or vision-language model (possibly PEFT-, DDP- or FSDP-wrapped).
        batch: `data.collate`'s output on the model's device: input_ids, attention_mask, labels
            (B x T; labels are IGNORE where no loss is taken) and any other model input (`pixel_values`...).
        chunk: tokens per head application.

    Returns:
        (scalar tensor with grad, number of answer tokens).
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    y = batch["labels"][:, 1:]
    keep = y != IGNORE
    n = int(keep.sum())
    head = output_head(model)
    if head is None:
        logits = model(**inputs).logits[:, :-1]
        return F.cross_entropy(logits[keep].float(), y[keep], reduction="sum"), n
    with _loss_head(head, keep, y, chunk):
        total = model(**inputs).logits
    return total.reshape(()), n
