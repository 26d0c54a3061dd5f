"""Weight-only quantised emulators: formats, round-to-nearest and GPTQ rounding, and the layer that trains through them.

A quantised weight is a code per entry into a fixed codebook of levels in [-1, 1], times a scale per
group of consecutive inputs of one output row (the group's absolute maximum, stored in float16):

- `int8`: 255 uniform levels (codes 0..254), one scale per output row: 8 bits + 16 / n per weight.
- `nf4`: the 16 NormalFloat levels of QLoRA, one scale per 64 inputs, two codes per byte:
  4.25 bits per weight, 26.6% of bfloat16.

`gptq` rounding (Frantar et al., 2022) quantises the columns of W one at a time and spreads each
column's rounding error over the columns not yet quantised, weighted by the inverse of the input
Gram G the build already collects, which minimises the layer's output error on the calibration
data instead of the weight error; `rtn` rounds every entry to its nearest level.

`QuantLinear` holds only the codes and scales (plus, for the `svd+quant` hybrid, a low-rank term
fitted to the quantisation residual in the same whitened metric as EMLoC's SVD): training memory is
the packed bytes. The dense weight is rebuilt for one layer at a time inside a custom autograd
function that keeps only the codes for the backward pass, so activations never hold a dense copy.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .cpu_compute import compute_dtype
from .errors import EmlocError

# The NormalFloat-4 levels (quantiles of a standard normal, scaled to [-1, 1]; Dettmers et al., 2023).
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)
ROUNDINGS = ("gptq", "rtn")
GPTQ_DAMP = 0.01  # added to the Gram's diagonal, as a fraction of its mean, before GPTQ's Cholesky
SCALE_BYTES = 2  # float16 scales
BASE_BYTES = 2  # byte fractions are counted against the block weights in bfloat16
# entries of one rebuilt slice of a quantised weight, by device type (others: cpu's). On cpu small
# slices keep the process near its live tensors: an output head of a 150k vocabulary would otherwise
# make a vocabulary x hidden float copy in every call. On a GPU each slice costs its own kernels and
# product: a 27648 x 5120 layer rebuilt in 16M-entry slices took 2.2x the time of one slice
# (H200, bf16, 2048 tokens, forward + backward; benchmarks/layer_speed.py), hence 256M there.
ROW_BLOCK_ENTRIES = {"cpu": 1 << 24, "cuda": 1 << 28}


def row_block_entries(device: torch.device | str) -> int:
    """Entries of one rebuilt slice of a quantised weight on `device` (see ROW_BLOCK_ENTRIES)."""
    return ROW_BLOCK_ENTRIES.get(torch.device(device).type, ROW_BLOCK_ENTRIES["cpu"])


@dataclass(frozen=True)
class QuantFormat:
    """A codebook and its grouping.

    Attributes:
        name: `int8` or `nf4`.
        bits: bits per code (8 or 4; 4-bit codes are packed two per byte).
        group: inputs per scale, or None for one scale per output row.
    """

    name: str
    bits: int
    group: int | None

    def levels(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
        """The codebook, ascending (255 or 16 levels in [-1, 1])."""
        if self.name == "int8":
            return torch.arange(-127, 128, dtype=dtype, device=device) / 127
        return torch.tensor(NF4_LEVELS, dtype=dtype, device=device)

    def groups(self, n: int) -> int:
        return 1 if self.group is None else math.ceil(n / self.group)

    def nbytes(self, m: int, n: int) -> int:
        """Bytes of an m x n weight in this format: packed codes plus float16 scales."""
        return m * math.ceil(n * self.bits / 8) + m * self.groups(n) * SCALE_BYTES


FORMATS = {"int8": QuantFormat("int8", 8, None), "nf4": QuantFormat("nf4", 4, 64)}


def format_for(ratio: float, name: str = "auto") -> QuantFormat:
    """The format of `name`, or (auto) the widest one a byte `ratio` of bfloat16 pays for: int8 from 0.5, nf4 from 0.25."""
    if name != "auto":
        if name not in FORMATS:
            raise EmlocError(f"unknown quantisation format {name!r}; use auto, {', '.join(FORMATS)}")
        return FORMATS[name]
    if ratio >= 0.5:
        return FORMATS["int8"]
    if ratio >= 0.25:
        return FORMATS["nf4"]
    raise EmlocError(f"ratio {ratio} is below what 4-bit quantisation keeps (0.25 of the bfloat16 bytes); "
                     "use --method svd for smaller emulators")


def _nearest(v: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level for every entry of `v` (levels ascending)."""
    mids = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(v.contiguous(), mids.to(v.dtype))


def _scale(block: torch.Tensor) -> torch.Tensor:
    """Per-row absolute maximum of `block` (rows x inputs), rounded to float16 as it will be stored."""
    s = block.abs().amax(dim=1).clamp(min=torch.finfo(torch.float16).tiny).to(torch.float16)
    return s.clamp(max=torch.finfo(torch.float16).max).to(block.dtype)


def quantize_rtn(w: torch.Tensor, fmt: QuantFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Round every entry of `w` (m x n) to its nearest level. Returns (codes (m x n, int64), scales (m x groups, fp16))."""
    m, n = w.shape
    g = fmt.group or n
    levels = fmt.levels(w.dtype, w.device)
    codes = torch.empty(m, n, dtype=torch.long, device=w.device)
    scales = torch.empty(m, fmt.groups(n), dtype=w.dtype, device=w.device)
    for j, start in enumerate(range(0, n, g)):
        blk = w[:, start:start + g]
        s = _scale(blk)
        scales[:, j] = s
        codes[:, start:start + g] = _nearest(blk / s[:, None], levels)
    return codes, scales.to(torch.float16)


@dataclass
class GptqFactor:
    """The factor GPTQ feeds errors through: U upper triangular with U^T U = H^-1, H = G' + lam I.

    G' is the Gram with the diagonal of inputs never seen (`dead`) set to 1. `damped_error` measures
    a layer's error on the calibration data from it, so the n x n Gram need not outlive the factor.
    """

    u: torch.Tensor
    lam: float
    dead: torch.Tensor


def gptq_factor(gram: torch.Tensor, damp: float = GPTQ_DAMP, overwrite: bool = False) -> GptqFactor:
    """Damp `gram` (n x n) and factor its inverse (`GptqFactor`).

    With `overwrite` the Gram's memory is reused and its values destroyed: when the caller holds no
    other reference (pass it straight from the statistics), at most two n x n matrices exist at once
    on cpu (three on a GPU, measured) instead of four: a 7B-shaped build (down_proj n = 18944,
    float64) peaked 5.85 GiB lower on an H200.
    """
    H = gram if overwrite else gram.clone()
    del gram
    dead = torch.diagonal(H) <= 0
    H[dead, dead] = 1.0  # inputs never seen: their weights cannot matter on this data
    lam = damp * float(torch.diagonal(H).mean())
    H.diagonal().add_(lam)
    # each step replaces H, so one input and one output of a factorisation are alive at a time
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    return GptqFactor(torch.linalg.cholesky(H, upper=True), lam, dead)


def quantize_gptq(w: torch.Tensor, gram: torch.Tensor | GptqFactor, fmt: QuantFormat, damp: float = GPTQ_DAMP,
                  block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ: quantise `w` (m x n) column by column, feeding each column's error forward through G^-1.

    Args:
        w: weight (m x n), any float dtype (computed in `gram`'s dtype).
        gram: G (n x n), the Gram of the layer's inputs on the calibration data, or its `gptq_factor`.
        fmt: the target format; a group's scale is taken from its (already error-corrected) columns
            when the first of them is reached, as in the reference implementation.
        damp: Tikhonov damping as a fraction of mean(diag G) (unused when given a factor).
        block: columns per lazy batch (a multiple of the group).

    Returns:
        (codes (m x n, int64), scales (m x groups, float16)).
    """
    factor = gram if isinstance(gram, GptqFactor) else gptq_factor(gram, damp)
    U = factor.u
    m, n = w.shape
    W = w.to(U.dtype).clone()
    W[:, factor.dead] = 0.0
    g = fmt.group or n
    block = max(block // g, 1) * g if fmt.group else block
    levels = fmt.levels(W.dtype, W.device)
    codes = torch.empty(m, n, dtype=torch.long, device=W.device)
    scales = torch.empty(m, fmt.groups(n), dtype=W.dtype, device=W.device)
    row_scale = _scale(W) if fmt.group is None else None
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        err = torch.zeros_like(W1)
        s = row_scale
        for i in range(i2 - i1):
            col = i1 + i
            if fmt.group is not None and col % g == 0:
                s = _scale(W1[:, i:i + g])
                scales[:, col // g] = s
            c = _nearest(W1[:, i] / s, levels)
            codes[:, col] = c
            e = (W1[:, i] - levels[c] * s) / U1[i, i]
            W1[:, i:].addr_(e, U1[i, i:], alpha=-1.0)  # in place: no m x block temporary per column
            err[:, i] = e
        W[:, i2:].addmm_(err, U[i1:i2, i2:], alpha=-1.0)
    if row_scale is not None:
        scales[:, 0] = row_scale
    return codes, scales.to(torch.float16)


def pack(codes: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Codes (m x n, 0 <= code < 2^bits) as stored: uint8, two 4-bit codes per byte (low nibble first)."""
    c = codes.to(torch.uint8)
    if fmt.bits == 8:
        return c
    if c.shape[1] % 2:
        c = F.pad(c, (0, 1))
    return c[:, 0::2] | (c[:, 1::2] << 4)


def unpack(packed: torch.Tensor, fmt: QuantFormat, n: int) -> torch.Tensor:
    """Inverse of `pack`: codes (m x n, uint8)."""
    if fmt.bits == 8:
        return packed
    return torch.stack((packed & 15, packed >> 4), dim=2).reshape(packed.shape[0], -1)[:, :n]


def dequantize(packed: torch.Tensor, scales: torch.Tensor, fmt: QuantFormat, n: int, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight (m x n) in `dtype` from packed codes and float16 scales.

    Runs in every forward and backward of a `QuantLinear`, so it makes one m x n temporary in `dtype`
    besides the codes (int8: arithmetic on the codes; NF4: one table lookup per byte).
    """
    m = packed.shape[0]
    # in-place arithmetic: one m x n temporary per call (each is a fresh mapping under a small
    # EMLOC_MMAP_THRESHOLD, and this runs for every layer in every forward and backward)
    if fmt.name == "int8":  # level = (code - 127) / 127
        return packed.to(dtype).sub_(127).mul_(scales.to(dtype) / 127)
    # one lookup per byte into a 256 x 2 table of (low, high) levels: no unpacked codes, half the lookups
    w = F.embedding(packed.int(), _pair_table(fmt, dtype, packed.device)).view(m, -1)
    g = fmt.group or n
    if n % g == 0 and w.shape[1] == n:
        w.view(m, n // g, g).mul_(scales.to(dtype)[:, :, None])
        return w
    return w[:, :n] * scales.to(dtype).repeat_interleave(g, dim=1)[:, :n]


@functools.lru_cache(maxsize=32)
def _pair_table(fmt: QuantFormat, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """256 x 2: the (low, high) 4-bit levels of every byte. Cached: made per call, its copy from the
    host would synchronise a GPU in every layer's forward and backward."""
    b = torch.arange(256, device=device)
    levels = fmt.levels(dtype, device)
    return torch.stack((levels[b & 15], levels[b >> 4]), dim=1)


class _FrozenLinear(torch.autograd.Function):
    """y = M x for a frozen layer M whose dense weight is rebuilt on demand, in forward and in backward.

    Autograd would otherwise keep the dequantised weight of every layer alive until the backward
    pass, which is the dense model again; here only the input's gradient is computed, from the codes.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "QuantLinear") -> torch.Tensor:  # type: ignore[override]
        ctx.layer = layer
        return layer.linear_map(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return ctx.layer.transposed_map(grad), None


class QuantLinear(nn.Linear):
    """A frozen linear layer stored quantised: y = Q x + up (down x) + bias.

    Q is the dequantised weight (codes in `qweight`, float16 `scales`); `up` (m x k) and `down` (k x n)
    are the optional low-rank term of the `svd+quant` hybrid (k = 0: none). Like `LowRankLinear` it is
    an `nn.Linear` for PEFT's sake; `weight` is the `scales` buffer, which only answers device
    questions (its dtype is float16, so PEFT keeps the LoRA weights in their own dtype).

    Args:
        in_features: n.
        out_features: m.
        fmt: the format's name (see `FORMATS`).
        rank: k of the low-rank term (0 for none).
        bias: whether the layer has a bias (kept from the original layer).
    """

    def __init__(self, in_features: int, out_features: int, fmt: str, rank: int = 0, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        nn.Module.__init__(self)  # no dense weight
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.fmt = FORMATS[fmt]
        cols = math.ceil(in_features * self.fmt.bits / 8)
        self.register_buffer("qweight", torch.zeros(out_features, cols, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, self.fmt.groups(in_features), dtype=torch.float16, device=device))
        kw = {"device": device, "dtype": dtype}
        self.up = nn.Parameter(torch.empty(out_features, rank, **kw), requires_grad=False) if rank else None
        self.down = nn.Parameter(torch.empty(rank, in_features, **kw), requires_grad=False) if rank else None
        self.register_parameter("bias", nn.Parameter(torch.empty(out_features, **kw)) if bias else None)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self.scales

    def reset_parameters(self) -> None:  # nn.Linear API; the layer is always loaded, never initialised
        pass

    def quantized(self, dtype: torch.dtype, rows: slice = slice(None)) -> torch.Tensor:
        """Q (m x n, or the given rows of it) in `dtype`."""
        return dequantize(self.qweight[rows], self.scales[rows], self.fmt, self.in_features, dtype)

    def row_blocks(self) -> list[slice]:
        """Slices of output rows rebuilt at a time (one slice for a layer up to `row_block_entries`)."""
        step = max(1, row_block_entries(self.qweight.device) // self.in_features)
        return [slice(i, i + step) for i in range(0, self.out_features, step)]

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W_e = Q + up @ down (m x n)."""
        w = self.quantized(dtype)
        return w + self.up.to(dtype) @ self.down.to(dtype) if self.rank else w

    def linear_map(self, x: torch.Tensor) -> torch.Tensor:
        """W_e x without the bias, in x's dtype (x: ... x n)."""
        # float32 products on CPUs without bf16 units (see cpu_compute), of the weight dequantised in
        # x's dtype, so that the layer is the same function on every machine
        cd = compute_dtype(x.dtype, x.device)
        xc, blocks = x.to(cd), self.row_blocks()
        if len(blocks) == 1:
            y = F.linear(xc, self.quantized(x.dtype).to(cd))
        else:
            y = torch.cat([F.linear(xc, self.quantized(x.dtype, rows).to(cd)) for rows in blocks], dim=-1)
        if self.rank:
            y = y + F.linear(F.linear(xc, self.down.to(cd)).to(x.dtype).to(cd), self.up.to(cd))
        return y.to(x.dtype)

    def transposed_map(self, g: torch.Tensor) -> torch.Tensor:
        """W_e^T g (g: ... x m)."""
        cd = compute_dtype(g.dtype, g.device)
        gc = g.to(cd)
        y = sum(gc[..., rows] @ self.quantized(g.dtype, rows).to(cd) for rows in self.row_blocks())
        if self.rank:
            y = y + (gc @ self.up.to(cd)).to(g.dtype).to(cd) @ self.down.to(cd)
        return y.to(g.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _FrozenLinear.apply(x, self) if torch.is_grad_enabled() and x.requires_grad else self.linear_map(x)
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt.name}, "
                f"rank={self.rank}, bias={self.bias is not None}")


def damped_error(w: torch.Tensor, w_e: torch.Tensor, factor: GptqFactor) -> float:
    """`weighted_error` from the GPTQ factor instead of the Gram (equal up to rounding).

    With H = U^-1 U^-T, tr(E H E^T) = ||E U^-1||^2 (one triangular solve, m x n); the damping adds
    lam ||E||^2 and the unit diagonal of the unseen inputs ||E_dead||^2, both subtracted.
    """
    u = factor.u

    def quad(a: torch.Tensor) -> torch.Tensor:
        a = a.to(u.dtype)
        x = torch.linalg.solve_triangular(u, a, upper=True, left=False)  # a U^-1
        return x.square().sum() - factor.lam * a.square().sum() - a[:, factor.dead].square().sum()

    num, den = quad(w - w_e).clamp(min=0), quad(w)
    return float(num / den.clamp(min=torch.finfo(u.dtype).tiny))


def weighted_error(w: torch.Tensor, w_e: torch.Tensor, gram: torch.Tensor) -> float:
    """tr(E G E^T) / tr(W G W^T), E = W - W_e: the relative output error on the calibration data."""
    d = (w - w_e).to(gram.dtype)
    wg = w.to(gram.dtype)
    num = torch.einsum("ij,jk,ik->", d, gram, d)
    den = torch.einsum("ij,jk,ik->", wg, gram, wg)
    return float(num / den.clamp(min=torch.finfo(gram.dtype).tiny))
