"""AutoLoRA's math as pure functions: weight tokens, effective low-rank forms, InfoNCE, gates.

AutoLoRA (arXiv 2508.02107) reads an adapter's *weights*: for each adapted layer a learned
probe vector ``x`` gives the token ``x A^T B^T`` straight from the LoRA factors (``A``: r x d_in,
``B``: d_out x r), so the dense ``dW = B A`` is never built. Everything here is free of modules
and state: :mod:`studio.autolora.encoder` and :mod:`studio.autolora.gates` call these.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def probe_tokens(probes: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Tokens ``x A^T B^T`` for probes ``(P, d_in)`` and batched factors ``down (N, r, d_in)``, ``up (N, d_out, r)``.

    Returns ``(N, P, d_out)``. Two thin matmuls (``P x r`` then ``P x d_out``): the cost is linear
    in the rank, and zero-padded ranks (adapters of a smaller rank in one batch) add exact zeros.
    """
    h = torch.einsum("pi,nri->npr", probes, down)
    return torch.einsum("npr,nor->npo", h, up)


def gram_tokens(probes: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Tokens ``B (A A^T) B^T y`` = ``dW dW^T y`` for output-side probes ``y (P, d_out)``: ``(N, P, d_out)``.

    A LoRA trained briefly from a random ``A`` has ``dW ~ M A^T A`` (the gradient seen through a random
    rank-r projection), so ``dW`` itself carries that projection's noise while ``dW dW^T ~ M M^T`` does
    not, in expectation. Built from the factors: r x r and thin products, never the dense ``dW``.
    """
    gram = torch.einsum("nri,nsi->nrs", down, down)  # A A^T (N, r, r)
    h = torch.einsum("po,nor->npr", probes, up)  # y B (N, P, r)
    return torch.einsum("npr,nrs,nos->npo", h, gram, up)


def rms_normalize(tokens: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Each token over its root-mean-square: adapters trained with other learning rates, steps or alphas
    differ in scale by orders of magnitude; what a layer does is its direction."""
    return tokens / tokens.pow(2).mean(-1, keepdim=True).add(eps).sqrt()


def effective_lowrank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(down, up)`` with ``up @ down ~= delta`` (``d_out x d_in``), the best rank-``rank`` form by SVD.

    Non-LoRA methods (LoHa, LoKr, DoRA, TLoRA, ...) are encoded from this form; it is exact when the
    delta's rank is at most ``rank``. The singular values are split evenly (``sqrt(s)`` on each side),
    and signs are fixed by the largest entry of each left vector, so the result is deterministic.
    """
    d = delta.double().flatten(1)
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    # numerically zero directions carry nothing: a rank-3 delta gives 3 factors, not ``rank``
    k = max(1, min(rank, int((s > s[0] * 1e-6).sum()) if s.numel() and s[0] > 0 else 1))
    u, s, vh = u[:, :k], s[:k], vh[:k]
    sign = torch.sign(u.gather(0, u.abs().argmax(0, keepdim=True))).squeeze(0)
    sign[sign == 0] = 1.0
    u, vh = u * sign, vh * sign[:, None]
    root = s.sqrt()
    return (vh * root[:, None]).float(), (u * root).float()


def info_nce(a: torch.Tensor, t: torch.Tensor, logit_scale: torch.Tensor | float,
             groups: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP's loss) of paired rows: adapter vectors ``a`` and text vectors ``t`` (N x D).

    ``logit_scale`` is the log of the inverse temperature (learnable or fixed). ``groups`` (N ints):
    rows of one group (adapters of one concept: a zoo's replicas) are left out of each other's
    negatives; without it, two adapters of one concept, paired with two captions of that concept,
    are pushed apart for being alike (false negatives).
    """
    a = F.normalize(a, dim=-1)
    t = F.normalize(t, dim=-1)
    scale = logit_scale.exp() if isinstance(logit_scale, torch.Tensor) else torch.tensor(logit_scale).exp()
    logits = scale * a @ t.t()
    if groups is not None:
        same = groups[:, None] == groups[None, :]
        same.fill_diagonal_(False)  # the pair itself stays: it is the positive
        logits = logits.masked_fill(same, float("-inf"))
    labels = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def cosine_scores(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every query row with every key row (Q x K)."""
    return F.normalize(queries.float(), dim=-1) @ F.normalize(keys.float(), dim=-1).t()


def recall_at(scores: torch.Tensor, truth: torch.Tensor, k: int) -> float:
    """Fraction of queries (rows of ``scores``) whose true key index ranks in the top ``k``.

    Ties are broken against the truth (a key that scores equal to the true one ranks above it), so a
    constant scorer gets no credit it did not earn.
    """
    true = scores.gather(1, truth[:, None])
    rank = (scores >= true).sum(1) - 1  # keys scoring at least as high as the truth, itself excluded
    return float((rank < k).float().mean())


def gate_values(y0n: torch.Tensor, yin: torch.Tensor, w_base: torch.Tensor, w_lora: torch.Tensor,
                w_cross: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """AutoLoRA's gates ``sigmoid(w_base LN(y0) + w_lora LN(y_i) + w_cross LN(y0) LN(y_i) + b)``.

    ``y0n``: the layer-normalized base output ``(..., C)``; ``yin``: the layer-normalized outputs of the
    adapters ``(K, ..., C)``; the weights are per adapter slot and channel ``(K, C)``. One independent
    sigmoid per adapter, token and channel (not a softmax over adapters).
    """
    shape = (yin.shape[0],) + (1,) * (yin.dim() - 2) + (yin.shape[-1],)
    z = (w_base.view(shape) * y0n.unsqueeze(0) + w_lora.view(shape) * yin
         + w_cross.view(shape) * y0n.unsqueeze(0) * yin + b.view(shape))
    return torch.sigmoid(z)


def gated_sum(y0: torch.Tensor, ys: torch.Tensor, gates: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    """``y0 + sum_i w_out_i * g_i * y_i``; ``ys``/``gates``: ``(K, ..., C)``, ``w_out``: ``(K,)``."""
    shape = (ys.shape[0],) + (1,) * (ys.dim() - 1)
    return y0 + (w_out.view(shape) * gates * ys).sum(0)
