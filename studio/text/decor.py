"""DECOR (Jang et al., arXiv 2412.09169): project unwanted semantics out of prompt embeddings.

The math only, on tensors; :mod:`studio.text.pipeline` applies it to a pipeline's prompt
embeddings. Given the text encoder's output vectors of the unwanted tokens (rows of U,
``k x d``), their SVD ``U = A S V^T`` gives an orthonormal basis ``V`` (``d x r``) of their span
and the projector ``P = V V^T``; a prompt's encoder outputs ``X`` (``tokens x d``) become
``X (I - alpha P)`` on the chosen rows: at ``alpha = 1`` those rows are orthogonal to every
unwanted direction, at ``alpha = 0`` nothing changes (exactly).

Only word tokens of the unwanted texts make the basis: BOS, EOS and padding carry generic
directions shared by every prompt, and projecting those out would damage any prompt alike.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from studio.errors import StudioError

ROWS = ("words", "words+end", "all")
"""Which rows of a prompt's embeddings are projected.

- ``words``: the prompt's word tokens (not BOS, not EOS, not padding).
- ``words+end``: the word tokens and every row after them (EOS and padding): a causal text
  encoder writes a summary of all the words into those rows, so they carry the unwanted
  directions too.
- ``all``: every row, BOS included.
"""

DEFAULT_ALPHA = 1.0
RTOL = 1e-4
REFERENCE_WORDS = ("a", "the", "of", "on", "in", "with", "and", "an", "this", "is", "thing", "object", "picture",
                   "image", "photo")
"""Neutral words whose mean encoder output is the centre for ``center=True``.

A text encoder's outputs share a large common direction (on micro the first component of a
prompt's word rows holds about three quarters of their energy); the span of the unwanted words
contains it, and projecting it out damages every token alike. Centred, DECOR removes only
how the unwanted words differ from an ordinary word.
"""  # singular values below RTOL * the largest are noise, not directions of the span


@dataclasses.dataclass(frozen=True)
class DecorConfig:
    """What DECOR removes from the prompt embeddings, and how strongly.

    ``unwanted``: words or phrases (``"circle, red"`` is two); ``alpha`` in [0, 1]; ``rows``: one
    of :data:`ROWS`; ``pooled``: also project SDXL's pooled embedding (in its own space);
    ``rank``: keep at most this many basis vectors (None: the whole span); ``center``: take the
    span of the unwanted vectors minus the mean of :data:`REFERENCE_WORDS`' vectors, and project
    the prompt rows about that mean (an affine projection: ``c + (x - c)(I - alpha P)``).
    """

    unwanted: tuple[str, ...]
    alpha: float = DEFAULT_ALPHA
    rows: str = "words"
    pooled: bool = False
    rank: int | None = None
    center: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.unwanted, str):
            object.__setattr__(self, "unwanted", split_phrases(self.unwanted))
        object.__setattr__(self, "unwanted", tuple(p.strip() for p in self.unwanted if p.strip()))
        if not self.unwanted:
            raise StudioError("--decor: give the unwanted words or phrases, comma-separated, e.g. \"circle, red\"")
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise StudioError(f"--decor-alpha {self.alpha}: must be in [0, 1] (0: no change, 1: full projection)")
        if self.rows not in ROWS:
            raise StudioError(f"--decor-rows {self.rows}: choose one of {', '.join(ROWS)}")
        if self.rank is not None and self.rank <= 0:
            raise StudioError(f"--decor-rank {self.rank}: must be at least 1")

    @property
    def text(self) -> str:
        """The unwanted phrases as one comma-separated string (as typed in the CLI and infotext)."""
        return ", ".join(self.unwanted)


def split_phrases(text: str) -> tuple[str, ...]:
    """'circle, red' -> ('circle', 'red'); blanks dropped."""
    return tuple(p.strip() for p in text.split(",") if p.strip())


def orthonormal_basis(vectors: torch.Tensor, *, rank: int | None = None,
                      rtol: float = RTOL) -> tuple[torch.Tensor, torch.Tensor]:
    """An orthonormal basis of the span of ``vectors`` (``k x d``), from their SVD.

    Returns ``(basis, singular_values)``: ``basis`` is ``r x d`` (rows orthonormal, computed in
    float64), the right singular vectors whose singular values exceed ``rtol`` times the largest,
    at most ``rank`` of them; ``singular_values`` are all ``min(k, d)`` of them.
    """
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise ValueError(f"expected a non-empty (k, d) matrix of vectors, got shape {tuple(vectors.shape)}")
    _, s, vh = torch.linalg.svd(vectors.detach().to(torch.float64), full_matrices=False)
    keep = int((s > rtol * s[0]).sum()) if s[0] > 0 else 0
    if rank is not None:
        keep = min(keep, rank)
    return vh[:keep], s


def projector(basis: torch.Tensor) -> torch.Tensor:
    """``P = V V^T`` (``d x d``) for an orthonormal basis given as rows (``r x d``)."""
    return basis.transpose(0, 1) @ basis


def project(x: torch.Tensor, basis: torch.Tensor, alpha: float, rows: torch.Tensor | None = None,
            center: torch.Tensor | None = None) -> torch.Tensor:
    """``x (I - alpha P)`` on the rows where ``rows`` is true (all rows when None); other rows unchanged.

    With ``center`` (a ``d`` vector ``c``): ``c + (x - c)(I - alpha P)``, the projection about ``c``.

    ``x``: ``(..., tokens, d)``; ``basis``: ``r x d`` orthonormal rows; ``rows``: bool
    ``(..., tokens)``. Computed in float32 at least (fp16 embeddings lose the small
    differences), returned in ``x``'s dtype. ``alpha = 0`` or an empty basis returns ``x``
    itself. Gradients flow through ``x`` (not through the basis).
    """
    if alpha == 0 or basis.shape[0] == 0:
        return x
    work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    b = basis.to(device=x.device, dtype=work.dtype)
    about = work if center is None else work - center.to(device=x.device, dtype=work.dtype)
    # (x V) V^T: two thin matmuls instead of the d x d projector
    removed = (about @ b.transpose(0, 1)) @ b
    if rows is not None:
        removed = removed * rows.to(device=x.device, dtype=work.dtype).unsqueeze(-1)
    return (work - alpha * removed).to(x.dtype)


def row_mask(input_ids: torch.Tensor, bos_id: int | None, eos_id: int | None, rows: str) -> torch.Tensor:
    """Bool ``(batch, tokens)``: the rows of each prompt that :func:`project` changes (see :data:`ROWS`).

    The word tokens are those after BOS and before the first EOS (a tokenizer that pads with
    another token, like SDXL's second one, is handled the same way; a truncated prompt has its
    EOS in the last row).
    """
    if rows not in ROWS:
        raise StudioError(f"--decor-rows {rows}: choose one of {', '.join(ROWS)}")
    n, t = input_ids.shape
    pos = torch.arange(t).expand(n, t)
    if rows == "all":
        return torch.ones(n, t, dtype=torch.bool)
    start = 1 if bos_id is not None and bool((input_ids[:, 0] == bos_id).all()) else 0
    after_bos = pos >= start
    if rows == "words+end":
        return after_bos
    is_eos = input_ids == eos_id if eos_id is not None else torch.zeros(n, t, dtype=torch.bool)
    first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full((n,), t))
    return after_bos & (pos < first_eos.unsqueeze(1))


@dataclasses.dataclass
class Components:
    """The SVD of a set of token vectors: what :func:`decompose` returns.

    ``singular_values`` (``c``); ``loadings`` (``tokens x c``): each token's coordinate on each
    component (``A S``: the rows of ``U = A S V^T`` in the basis ``V``); ``energy`` (``c``): each
    component's share of the squared Frobenius norm; ``tokens``: the labels.
    """

    tokens: list[str]
    singular_values: torch.Tensor
    loadings: torch.Tensor
    energy: torch.Tensor
    basis: torch.Tensor

    def top_tokens(self, component: int, k: int = 3) -> list[tuple[str, float]]:
        """The ``k`` tokens loading most (in absolute value) on ``component``, with their loadings."""
        col = self.loadings[:, component]
        order = torch.argsort(col.abs(), descending=True)[:k]
        return [(self.tokens[i], float(col[i])) for i in order.tolist()]


def decompose(vectors: torch.Tensor, tokens: Sequence[str]) -> Components:
    """Component analysis of token vectors (``tokens x d``): singular values and token loadings."""
    if vectors.shape[0] != len(tokens):
        raise ValueError(f"{vectors.shape[0]} vectors for {len(tokens)} token labels")
    a, s, vh = torch.linalg.svd(vectors.detach().to(torch.float64), full_matrices=False)
    total = float((s**2).sum())
    energy = s**2 / total if total > 0 else torch.zeros_like(s)
    return Components(list(tokens), s, a * s, energy, vh)


def unwanted_share(vectors: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Per vector, the fraction of its norm inside the span of ``basis``: ``|x P| / |x|`` (0 for a zero vector)."""
    x = vectors.detach().to(torch.float64)
    b = basis.to(torch.float64)
    inside = ((x @ b.transpose(0, 1)) @ b).norm(dim=-1)
    norm = x.norm(dim=-1)
    return torch.where(norm > 0, inside / norm.clamp_min(1e-300), torch.zeros_like(norm))
