"""Quantised vocabulary tensors of an emulator: the token embedding and the output head.

Each is vocabulary x hidden. In a small model with a large vocabulary they are a large share of the
weights (Qwen2.5-Coder-1.5B: 467M of its 1.78B parameters, untied), and an emulator that compresses
only the block linears keeps them whole. They carry no LoRA, so the correction never looks at
them: quantising them changes only what training sees (logits through a quantised head), and the
adapter is still corrected layer by layer against the original block linears.

`--vocab-format int8|nf4` stores both with the formats of `emloc.quant`, rounded to nearest (GPTQ
would need the Gram of the final hidden states, which the block-streaming pass does not collect).
A tied embedding is quantised once and the head reads the same codes. The embedding dequantises
only the rows it looks up; the head (a `QuantLinear`) rebuilds its dense weight a block of rows at
a time, so no vocabulary x hidden float copy exists in training.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import EmlocError
from .quant import BASE_BYTES, FORMATS, QuantLinear, dequantize, pack, quantize_rtn

VOCAB_FORMATS = ("keep", *FORMATS)


class QuantEmbedding(nn.Module):
    """A frozen token embedding stored quantised (codes in `qweight`, float16 `scales` per row group).

    Args:
        num_embeddings: V.
        embedding_dim: d.
        fmt: a format of `emloc.quant.FORMATS`.
        dtype: the dtype of the vectors it returns (the model's compute dtype).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, fmt: str, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.fmt = FORMATS[fmt]
        self.out_dtype = dtype or torch.float32
        cols = -(-embedding_dim * self.fmt.bits // 8)
        self.register_buffer("qweight", torch.zeros(num_embeddings, cols, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(num_embeddings, self.fmt.groups(embedding_dim), dtype=torch.float16,
                                                  device=device))

    @property
    def weight(self) -> torch.Tensor:
        """The scales: answers device questions (as `QuantLinear.weight` does); never a dense weight."""
        return self.scales

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (...) -> vectors (... x d): only the looked-up rows are dequantised."""
        flat = ids.reshape(-1)
        rows = dequantize(self.qweight[flat], self.scales[flat], self.fmt, self.embedding_dim, self.out_dtype)
        return rows.view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, format={self.fmt.name}"


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def vocab_modules(model: nn.Module) -> tuple[str, str | None, bool]:
    """(embedding name, head name or None, tied) of a model with a token embedding and a linear head."""
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(embed, nn.Embedding) or not isinstance(head, nn.Linear):
        raise EmlocError("--vocab-format applies to language models with a token embedding and a linear output "
                         "head; this model has none: build with --vocab-format keep")
    return _name_of(model, embed), _name_of(model, head), head.weight is embed.weight


def quantize_vocab(model: nn.Module, fmt: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The stored tensors and the manifest entry of `model`'s quantised embedding and head.

    `model` holds its dense embedding and head (and the head's bias, kept as it is). Returns
    (tensors: {name.qweight, name.scales} per quantised module, entry: {format, embedding, head,
    tied, bytes_bf16, bytes}); the caller drops the dense `name.weight` tensors.
    """
    f = FORMATS[fmt]
    embed_name, head_name, tied = vocab_modules(model)
    tensors: dict[str, torch.Tensor] = {}
    dense = stored = 0
    for name in (embed_name,) if tied else (embed_name, head_name):
        w = model.get_submodule(name).weight.detach().float()
        codes, scales = quantize_rtn(w, f)
        tensors[f"{name}.qweight"], tensors[f"{name}.scales"] = pack(codes, f).cpu(), scales.cpu()
        dense += BASE_BYTES * w.numel()
        stored += f.nbytes(*w.shape)
    entry = {"format": fmt, "embedding": embed_name, "head": head_name, "tied": tied,
             "bytes_bf16": dense, "bytes": stored, "fraction": stored / dense}
    return tensors, entry


def install_vocab(model: nn.Module, entry: dict[str, Any], store: Any, device: torch.device, dtype: torch.dtype) -> None:
    """Put the quantised embedding and head of an emulator's manifest `entry` into `model`, codes read from `store`.

    The head's bias (if any) stays a parameter of the new head, loaded with the others afterwards.
    """
    old_embed = model.get_submodule(entry["embedding"])
    old_head = model.get_submodule(entry["head"])
    embed = QuantEmbedding(old_embed.num_embeddings, old_embed.embedding_dim, entry["format"], device, dtype)
    head = QuantLinear(old_head.in_features, old_head.out_features, entry["format"], 0, old_head.bias is not None,
                       device="meta")
    for key in ("qweight", "scales"):
        embed._buffers[key] = store.get(f"{entry['embedding']}.{key}").to(device)
        # a tied head reads the embedding's codes: the same tensors, stored once
        head._buffers[key] = embed._buffers[key] if entry["tied"] else store.get(f"{entry['head']}.{key}").to(device)
    model.set_input_embeddings(embed)
    model.set_output_embeddings(head)


def vocab_entry_bytes(vocab: int, hidden: int, fmt: str, tied: bool) -> tuple[int, int]:
    """(dense bf16 bytes, stored bytes) of a V x d embedding and head in `fmt` (`keep`: stored = dense)."""
    n = 1 if tied else 2
    dense = n * BASE_BYTES * vocab * hidden
    return dense, dense if fmt == "keep" else n * FORMATS[fmt].nbytes(vocab, hidden)
