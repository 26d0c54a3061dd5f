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
import torch.nn.functional as F
from torch import nn

EIG_FLOOR = 1e-7  # eigenvalues are floored at EIG_FLOOR * mean eigenvalue (trace(G) / n)


def rank_for_ratio(m: int, n: int, ratio: float) -> int:
    """Rank k that keeps `ratio` of an (m x n) layer's parameters: floor(ratio * m n / (m + n))."""
    return max(1, math.floor(ratio * m * n / (m + n)))


def saves_parameters(m: int, n: int, k: int) -> bool:
    """Whether two factors of rank k are smaller than the dense (m x n) matrix."""
    return k * (m + n) < m * n


def whitening_factor(gram: torch.Tensor, floor: float = EIG_FLOOR) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric square-root factor of a Gram matrix, and its inverse, by eigendecomposition.

    Args:
        gram: G (n x n), symmetric positive semi-definite, e.g. sum of x x^T over tokens.
        floor: eigenvalues below `floor * trace(G) / n` are raised to it, so rank-deficient
            statistics (fewer tokens than n) still give a finite inverse.

    Returns:
        (S, S_inv), both (n x n) in G's dtype, with S S^T = G (up to the floor) and
        S_inv = diag(1/sqrt(l)) Q^T, never a general matrix inverse.
    """
    g = (gram + gram.T) / 2
    evals, q = torch.linalg.eigh(g)
    mean = torch.clamp(evals.sum() / g.shape[0], min=torch.finfo(g.dtype).tiny)
    evals = torch.clamp(evals, min=floor * mean)
    root = evals.sqrt()
    return q * root, (q / root).T


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
    energy = sigma.square()
    total = energy.sum().clamp(min=torch.finfo(energy.dtype).tiny)
    return Factorization(up, down, float(energy[rank:].sum() / total))


def whitened_energy(weight: torch.Tensor, gram: torch.Tensor | None, floor: float = EIG_FLOOR) -> torch.Tensor:
    """Squared singular values of W S (descending): the output energy each rank direction carries.

    Dropping direction j of a layer adds sigma_j^2 to its squared output error on the calibration
    data (plain SVD: on isotropic inputs). Values only, no vectors: cheaper than `factorize`.
    """
    w = weight.to(gram.dtype if gram is not None else weight.dtype)
    ws = w @ whitening_factor(gram, floor)[0] if gram is not None else w
    return torch.linalg.svdvals(ws).square()


def allocate_ranks(energy: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], budget: int) -> dict[str, int]:
    """Ranks that spend `budget` factor parameters where they remove the most relative output error.

    Each layer keeps at least rank 1 and at most the largest rank that still saves parameters. A
    direction j of layer i costs (m_i + n_i) parameters and removes sigma_ij^2 / sum_j sigma_ij^2 of
    that layer's relative error; directions are taken by that gain per parameter, best first (the
    gains of a layer decrease with j, so this greedy order is optimal for the sum of relative errors,
    up to the parameters left over at the end).

    Args:
        energy: layer -> squared singular values, descending (`whitened_energy`).
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
        return F.linear(F.linear(x, self.down), self.up, self.bias)

    def dense_weight(self) -> torch.Tensor:
        """W_e = up @ down (m x n)."""
        return self.up @ self.down

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.bias is not None}"
