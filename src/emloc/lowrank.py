"""Activation-aware (whitened) truncated SVD, and the two-factor layer that stores its result.

Notation (see docs/method): a linear layer computes `y = W x + b` with `W` (m out x n in). Over the
calibration tokens, `G = sum x x^T` (n x n). With `S S^T = G`,
`||X W^T - X W_e^T||_F^2 = ||(W - W_e) S||_F^2`, so truncating the SVD of `W S` gives the rank-k
`W_e` with the smallest output error on the calibration activations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .cpu_compute import frozen_linear

EIG_FLOOR = 1e-7  # eigenvalues are floored at EIG_FLOOR * mean eigenvalue (trace(G) / n)


# ranks are rounded down to a multiple of this: on a GPU a bf16 product whose inner or outer size is
# not a multiple of 8 misses the tensor-core kernels (H200, a 18944 x 3584 layer at 4096 tokens,
# forward + backward: rank 1507 took 4.49 ms, rank 1504 0.78 ms, the dense layer 1.46 ms;
# benchmarks/layer_speed.py)
RANK_ALIGN = 8


def aligned_rank(k: int) -> int:
    """k rounded down to a multiple of RANK_ALIGN; ranks below it are kept as they are."""
    return k - k % RANK_ALIGN if k >= RANK_ALIGN else k


def rank_for_ratio(m: int, n: int, ratio: float) -> int:
    """Rank k that keeps at most `ratio` of an (m x n) layer's parameters: floor(ratio * m n / (m + n)),
    rounded down to a multiple of RANK_ALIGN (at least 1)."""
    return max(1, aligned_rank(math.floor(ratio * m * n / (m + n))))


def saves_parameters(m: int, n: int, k: int) -> bool:
    """Whether two factors of rank k are smaller than the dense (m x n) matrix."""
    return k * (m + n) < m * n


def floor_value(trace: torch.Tensor | float, n: int, floor: float = EIG_FLOOR) -> float:
    """The eigenvalue floor lambda = `floor` x mean eigenvalue of G (trace(G) / n)."""
    mean = float(trace) / n
    return floor * max(mean, torch.finfo(torch.float64).tiny)


def whitening_factor(gram: torch.Tensor, floor: float = EIG_FLOOR) -> tuple[torch.Tensor, torch.Tensor]:
    """Square-root factor of the floored Gram matrix G + lambda I, and its inverse, by eigendecomposition.

    Args:
        gram: G (n x n), symmetric positive semi-definite, e.g. sum of x x^T over tokens.
        floor: lambda = `floor * trace(G) / n` is added to every eigenvalue, so rank-deficient
            statistics (fewer tokens than n) still give a finite inverse.

    Returns:
        (S, S_inv), both (n x n) in G's dtype, with S S^T = G + lambda I and
        S_inv = diag(1/sqrt(l)) Q^T, never a general matrix inverse.
    """
    evals, q, _ = input_eigh(gram, floor)
    root = evals.sqrt()
    return q * root, (q / root).T


def input_eigh(gram: torch.Tensor, floor: float = EIG_FLOOR) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Eigenvalues (ascending) and eigenvectors of G + lambda I (n x n), and lambda; shared by layers reading one input."""
    g = (gram + gram.T) / 2
    evals, q = torch.linalg.eigh(g)
    lam = floor_value(torch.trace(g), g.shape[0], floor)
    return evals.clamp(min=0) + lam, q, lam


@dataclass
class Factorization:
    """Result of compressing one layer.

    Attributes:
        up: (m x k) = U_k Sigma_k^{1/2}.
        down: (k x n) = Sigma_k^{1/2} V_k^T S^{-1}.
        rel_error: ||(W - W_e) S||_F^2 / ||W S||_F^2, the relative output error on the calibration data.
    """

    up: torch.Tensor
    down: torch.Tensor
    rel_error: float


def factorize(weight: torch.Tensor, gram: torch.Tensor | None, rank: int, floor: float = EIG_FLOOR) -> Factorization:
    """Rank-`rank` factorisation of `weight` that minimises output error on the activations behind `gram`.

    Args:
        weight: W (m x n).
        gram: G (n x n) of the layer's inputs, or None for plain (unwhitened) SVD.
        rank: k, 1 <= k <= min(m, n).
        floor: eigenvalue floor, see `whitening_factor`.

    Returns:
        A `Factorization` in the dtype of `gram` (or of `weight` if plain); the caller casts.
    """
    w = weight.to(gram.dtype if gram is not None else weight.dtype)
    if gram is not None:
        s, s_inv = whitening_factor(gram, floor)
        ws = w @ s
    else:
        ws = w
    u, sigma, vh = torch.linalg.svd(ws, full_matrices=False)
    root = sigma[:rank].sqrt()
    up = u[:, :rank] * root
    down = root[:, None] * vh[:rank]
    if gram is not None:
        down = down @ s_inv
    if gram is not None:  # measured on the data (G), without the floor's share
        d = w - up @ down
        g = gram.to(w.dtype)
        rel = float(torch.trace(d @ g @ d.T) / torch.trace(w @ g @ w.T).clamp(min=torch.finfo(w.dtype).tiny))
    else:
        energy = sigma.square()
        rel = float(energy[rank:].sum() / energy.sum().clamp(min=torch.finfo(energy.dtype).tiny))
    return Factorization(up, down, rel)


@dataclass
class Spectrum:
    """The whitened spectrum of one layer: W (G + lambda I) W^T = U diag(energy) U^T, descending.

    For any S with S S^T = G + lambda I, the left singular vectors of W S are U and its squared
    singular values are `energy`, so the best rank-k W_e in the calibration metric is U_k U_k^T W:
    no S^{-1} is ever needed (docs/method.md, "Building at the floor").

    Attributes:
        u: U (m x K), columns by decreasing energy, K >= every rank asked for.
        energy: the squared whitened singular values (descending).
        weight: W (m x n) in the statistics dtype.
        lam: the eigenvalue floor lambda inside `energy` (0 for plain SVD).
    """

    u: torch.Tensor
    energy: torch.Tensor
    weight: torch.Tensor
    lam: float = 0.0

    def factors(self, rank: int) -> Factorization:
        """up = U_k Sigma_k^{1/2} (m x k), down = Sigma_k^{-1/2} U_k^T W (k x n), as `factorize` splits them.

        The relative error is measured on the calibration data (G), without the floor's share.
        """
        uk = self.u[:, :rank]
        proj = uk.T @ self.weight  # U_k^T W
        root = self.energy[:rank].clamp(min=0).sqrt().sqrt()
        root = torch.where(root > 0, root, torch.ones_like(root))  # W has no energy there: any split gives U U^T W
        # energy beyond k = tr(D (G + lambda I) D^T) with D = (I - U_k U_k^T) W, ||D||^2 = ||W||^2 - ||U_k^T W||^2
        w2, p2 = float(self.weight.square().sum()), float(proj.square().sum())
        tail = float(self.energy[rank:].sum()) - self.lam * max(w2 - p2, 0.0)
        total = float(self.energy.sum()) - self.lam * w2
        return Factorization(uk * root, proj / root[:, None], max(tail, 0.0) / max(total, torch.finfo(torch.float64).tiny))


def output_spectrum(weight: torch.Tensor, output_gram: torch.Tensor, input_trace: torch.Tensor | float,
                    floor: float = EIG_FLOOR) -> Spectrum:
    """Spectrum from the layer's output statistics: eigh of W G W^T + lambda W W^T (m x m).

    The cheap side when m <= n: an m x m eigendecomposition instead of an n x n one plus an SVD.

    Args:
        weight: W (m x n).
        output_gram: sum (Wx)(Wx)^T = W G W^T (m x m), bias-free outputs.
        input_trace: trace(G) (for the floor).
        floor: see `whitening_factor`.
    """
    w = weight.to(output_gram.dtype)
    lam = floor_value(input_trace, w.shape[1], floor)
    c = output_gram + lam * (w @ w.T)
    evals, u = torch.linalg.eigh((c + c.T) / 2)
    return Spectrum(u.flip(1), evals.flip(0).clamp(min=0), w, lam)


def input_spectrum(weight: torch.Tensor, eig: tuple[torch.Tensor, torch.Tensor, float]) -> Spectrum:
    """Spectrum from the input statistics, for m > n: SVD of W S with S from `input_eigh(G)` (shared).

    Args:
        weight: W (m x n).
        eig: (eigenvalues, eigenvectors) of G + lambda I, and lambda, from `input_eigh`.
    """
    evals, q, lam = eig
    w = weight.to(q.dtype)
    ws = w @ (q * evals.sqrt())  # W S (m x n), m > n
    if ws.dtype != torch.float64:
        u, sigma, _ = torch.linalg.svd(ws, full_matrices=False)
        return Spectrum(u, sigma.square(), w, lam)
    # float64: the n x n eigendecomposition of (W S)^T (W S) = V diag(sigma^2) V^T, U = W S V / sigma, is
    # 2-3x faster than the SVD; squaring costs eps * sigma_1^2 / sigma_j^2 in U's column j, negligible in float64
    # for every kept direction, and the discarded ones enter only through their (accurate) eigenvalues.
    evals2, v = torch.linalg.eigh(ws.T @ ws)
    energy, v = evals2.flip(0).clamp(min=0), v.flip(1)
    sigma = energy.sqrt()
    u = (ws @ v) / torch.where(sigma > 0, sigma, torch.ones_like(sigma))
    return Spectrum(u, energy, w, lam)


def allocate_ranks(energy: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], budget: int) -> dict[str, int]:
    """Ranks that spend `budget` factor parameters where they remove the most relative output error.

    Each layer keeps at least rank 1 and at most the largest rank that still saves parameters. A
    direction j of layer i costs (m_i + n_i) parameters and removes sigma_ij^2 / sum_j sigma_ij^2 of
    that layer's relative error; directions are taken by that gain per parameter, best first (the
    gains of a layer decrease with j, so this greedy order is optimal for the sum of relative errors,
    up to the parameters left over at the end).

    Args:
        energy: layer -> squared whitened singular values, descending (`Spectrum.energy`).
        shapes: layer -> (m, n).
        budget: total factor parameters, sum_i k_i (m_i + n_i), e.g. what uniform ranks would use.

    Returns:
        layer -> rank.
    """
    names = list(energy)
    cost = {k: shapes[k][0] + shapes[k][1] for k in names}
    cap = {k: max(1, min(len(energy[k]), (shapes[k][0] * shapes[k][1] - 1) // cost[k])) for k in names}
    ranks = dict.fromkeys(names, 1)
    left = budget - sum(cost.values())
    gains, owners, steps = [], [], []
    for i, k in enumerate(names):
        e = energy[k].double()
        rel = e / e.sum().clamp(min=torch.finfo(torch.float64).tiny)
        gains.append(rel[1:cap[k]] / cost[k])
        owners.append(torch.full((max(cap[k] - 1, 0),), i, dtype=torch.long))
        steps.append(torch.arange(1, max(cap[k], 1)))
    if left <= 0 or not gains:
        return ranks
    g, o, j = torch.cat(gains), torch.cat(owners), torch.cat(steps)
    # equal gains go round-robin across layers (earlier directions first), not all to one layer
    by_step = torch.argsort(j, stable=True)
    order = by_step[torch.argsort(g[by_step], descending=True, stable=True)]
    for i in o[order].tolist():
        c = cost[names[i]]
        if c <= left:  # a layer whose next direction does not fit takes no later one (same cost)
            ranks[names[i]] += 1
            left -= c
    return ranks


class LowRankLinear(nn.Linear):
    """A linear layer stored as two factors: y = up (down x) + bias.

    It is an `nn.Linear` (same `in_features` / `out_features`, so PEFT's LoRA wraps it with A and B of
    exactly the shapes they would have on the original layer) but it holds no dense weight:
    `weight` is only the `up` factor, exposed so that code asking a linear layer for its device and
    dtype gets an answer. Do not merge an adapter into it; merge into the original model instead.

    Args:
        in_features: n.
        out_features: m.
        rank: k.
        bias: whether the layer has a bias (kept from the original layer).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        nn.Module.__init__(self)  # skip nn.Linear's dense weight allocation
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        kw = {"device": device, "dtype": dtype}
        self.down = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.up = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.register_parameter("bias", nn.Parameter(torch.empty(out_features, **kw)) if bias else None)

    @property
    def weight(self) -> nn.Parameter:  # type: ignore[override]
        return self.up

    def reset_parameters(self) -> None:  # nn.Linear API; factors are always loaded, never initialised
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return frozen_linear(frozen_linear(x, self.down), self.up, self.bias)  # float32 products where bf16 is slow

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W_e = up @ down (m x n), in `dtype` (default: the factors')."""
        dt = dtype or self.up.dtype
        return self.up.to(dt) @ self.down.to(dt)

    def linear_map(self, x: torch.Tensor) -> torch.Tensor:
        """W_e x without the bias, in x's dtype (x: ... x n)."""
        return frozen_linear(frozen_linear(x, self.down.to(x.dtype)), self.up.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.bias is not None}"
