"""The math of TLoRA (Tao et al. 2025) as pure functions; the layer calls them, merges and exports reuse them.

The adapted weight of a layer with base weight ``W0`` (out x in) is::

    W = W0 @ T + s * Delta

* ``T`` (in x in) is a *tensor-ring matrix*. The width factors as ``in = I_1 * ... * I_D`` and
  core ``A_d`` has shape ``(I_d, I_d, R, R)``::

      T[i, j] = trace(A_1[i_1, j_1] @ A_2[i_2, j_2] @ ... @ A_D[i_D, j_D])

* **Flattening order**: a flat index ``i`` and its multi-index ``(i_1, ..., i_D)`` are related
  row-major, ``i_1`` slowest: ``i = ((i_1 * I_2 + i_2) * I_3 + i_3) ...``, which is what
  ``x.reshape(..., I_1, ..., I_D)`` does. Output and input factors of the residual follow the
  same rule, outputs before inputs. ``dense_reference`` spells it out with loops and
  ``tests/test_tlora.py`` checks every fast path against it.
* ``Delta`` (out x in') is a tensor ring over the output factors followed by the input factors
  (and, for a k x k convolution, one more core over the kernel's k*k taps: ``in' = in * k * k``
  in PyTorch's ``(in, kh, kw)`` order), cores of shape ``(n, R', R')``; or a LoRA pair
  ``B @ A`` (the paper's TLoRA*).

Initialisation (``identity_cores``): the diagonal slices ``A_d[i, i]`` are ``R x R`` matrices
``M_d`` with ``M_1 = e_1 e_1^T`` and, for ``d > 1``, ``M_d`` upper block-triangular with a 1 in
the corner; the off-diagonal slices are zero. Then ``M_1 M_2 ... M_D`` has trace exactly 1 in
floating point (every term but ``1 * 1 * ... * 1`` is a product with an exact zero), so
``T = I`` exactly. The random blocks break the symmetry that a constant init (``I / R`` in
every slice) keeps forever: from such a point every ring channel gets the same gradient, and
the ring never uses more than rank 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# the largest single factor a layer width may have: beyond it the transform's cores approach a
# dense in x in matrix and the method saves nothing (a width of 2 * prime, say)
MAX_FACTOR = 32


def factorize(n: int, max_factors: int = 3, max_factor: int = MAX_FACTOR) -> tuple[int, ...] | None:
    """A factorisation ``n = I_1 * ... * I_D`` (2 <= D <= max_factors, every I_d >= 2) with the
    smallest sum of squares (the size of the cores), or None when no such one has factors <= max_factor."""
    best: tuple[int, ...] | None = None

    def rec(rest: int, start: int, acc: tuple[int, ...]) -> None:
        nonlocal best
        if rest == 1 and len(acc) >= 2:
            if best is None or (sum(f * f for f in acc), -len(acc)) < (sum(f * f for f in best), -len(best)):
                best = acc
            return
        if len(acc) == max_factors:
            return
        for f in range(start, min(rest, max_factor) + 1):
            if rest % f == 0:
                rec(rest // f, f, acc + (f,))

    if n >= 4:
        rec(n, 2, ())
    return best


def identity_cores(factors: Sequence[int], rank: int, generator: torch.Generator | None = None,
                   dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Cores ``(I_d, I_d, R, R)`` whose tensor-ring matrix is exactly the identity (see the module doc)."""
    cores = []
    for d, n in enumerate(factors):
        m = torch.zeros(rank, rank, dtype=dtype)
        m[0, 0] = 1.0
        if d > 0 and rank > 1:
            # the first row beyond the corner and the lower-right block are free; the first column stays zero
            m[0, 1:] = torch.randn(rank - 1, generator=generator, dtype=dtype) / math.sqrt(rank)
            m[1:, 1:] = torch.randn(rank - 1, rank - 1, generator=generator, dtype=dtype) / math.sqrt(rank)
        core = torch.zeros(n, n, rank, rank, dtype=dtype)
        idx = torch.arange(n)
        core[idx, idx] = m
        cores.append(core)
    return cores


def residual_cores(sizes: Sequence[int], rank: int, generator: torch.Generator | None = None,
                   dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Tensor-ring residual cores ``(n, R', R')``: the first zero (so Delta = 0), the others random."""
    cores = [torch.zeros(sizes[0], rank, rank, dtype=dtype)]
    for n in sizes[1:]:
        cores.append(torch.randn(n, rank, rank, generator=generator, dtype=dtype) / math.sqrt(rank))
    return cores


def tr_matrix(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """The dense (prod I_d x prod J_d) matrix of cores ``(I_d, J_d, R, R)``, merging one core at a time."""
    g = cores[0]
    if len(cores) == 1:
        return torch.diagonal(g, dim1=2, dim2=3).sum(-1)
    for c in cores[1:-1]:
        i, j, r0, _ = g.shape
        k, l, _, r2 = c.shape
        g = torch.einsum("ijab,klbc->ikjlac", g, c).reshape(i * k, j * l, r0, r2)
    c = cores[-1]
    # the last merge closes the ring at once: no (in, in, R, R) intermediate
    return torch.einsum("ijab,klba->ikjl", g, c).reshape(g.shape[0] * c.shape[0], g.shape[1] * c.shape[1])


def tr_tensor(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """The flat vector (prod n_k) of a tensor ring with cores ``(n_k, R, R)``."""
    return tr_matrix([c.unsqueeze(1) for c in cores]).reshape(-1)


def tr_apply(cores: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``x @ T.T`` over the last dimension of ``x`` without building T: contract one core at a time.

    Cost about ``N * in * sum(I_d) * R^2`` against ``N * in^2`` for the dense product.
    """
    lead = x.shape[:-1]
    n = math.prod(lead) if lead else 1
    c = cores[0]
    z = torch.einsum("njr,ijab->nriab", x.reshape(n, c.shape[1], -1), c)  # (N, J_rest, I_1, R, R)
    iprev = c.shape[0]
    for c in cores[1:]:
        r0, rb = z.shape[-2], z.shape[-1]
        jrest = z.shape[1] // c.shape[1]
        z = z.reshape(n, c.shape[1], jrest, iprev, r0, rb)
        z = torch.einsum("nkrpab,lkbc->nrplac", z, c)
        iprev *= c.shape[0]
        z = z.reshape(n, jrest, iprev, r0, c.shape[-1])
    return torch.diagonal(z, dim1=-2, dim2=-1).sum(-1).reshape(*lead, iprev)


def dense_reference(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """T built entry by entry from the definition (slow; for tests of the flattening order)."""
    ins = [c.shape[0] for c in cores]
    outs = [c.shape[1] for c in cores]
    t = torch.zeros(math.prod(ins), math.prod(outs), dtype=cores[0].dtype)
    for i in range(t.shape[0]):
        ii = _unravel(i, ins)
        for j in range(t.shape[1]):
            jj = _unravel(j, outs)
            m = cores[0][ii[0], jj[0]]
            for d in range(1, len(cores)):
                m = m @ cores[d][ii[d], jj[d]]
            t[i, j] = torch.trace(m)
    return t


def _unravel(flat: int, sizes: Sequence[int]) -> list[int]:
    out = []
    for s in reversed(sizes):
        out.append(flat % s)
        flat //= s
    return out[::-1]


def residual_matrix(cores: Sequence[torch.Tensor], out_features: int) -> torch.Tensor:
    """Delta (out x in') of a tensor-ring residual: output cores first, then input (and kernel) cores."""
    return tr_tensor(cores).reshape(out_features, -1)


def transformed_weight(w0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``W0 @ T`` over the input channels; for a convolution weight (out, in, kh, kw) too."""
    if w0.dim() == 2:
        return w0 @ t
    return torch.einsum("oikl,ij->ojkl", w0, t)


def delta_weight(w0: torch.Tensor, transform: Sequence[torch.Tensor], residual: torch.Tensor | None,
                 scale: float, multiplier: float = 1.0) -> torch.Tensor:
    """The adapter's whole update ``multiplier * (W0 T - W0 + scale * Delta)`` in W0's shape.

    ``residual`` is Delta as (out x in'), already a dense matrix. Used by merges, exports and mixes.
    """
    t = tr_matrix(transform).to(w0.dtype)
    d = transformed_weight(w0, t) - w0
    if residual is not None:
        d = d + scale * residual.reshape(w0.shape).to(w0.dtype)
    return d * multiplier


def transform_params(factors: Sequence[int], rank: int) -> int:
    """Stored values of the transform cores."""
    return sum(f * f for f in factors) * rank * rank


def residual_params(out_features: int, in_flat: int, out_factors: Sequence[int], in_factors: Sequence[int],
                    kind: str, rank: int) -> int:
    """Stored values of the residual (tensor ring over out+in factors, or a LoRA pair)."""
    if kind == "lora":
        return rank * (out_features + in_flat)
    return (sum(out_factors) + sum(in_factors)) * rank * rank
