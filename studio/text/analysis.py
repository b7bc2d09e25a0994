"""`studio decor analyze`: the component analysis of a prompt's encoder outputs, as a table and a PNG.

For each text encoder of the pipeline, the prompt's word-token rows ``X`` (``tokens x width``)
are decomposed, ``X = A S V^T``: the singular values say how many directions the prompt
spreads over, the loadings ``A S`` which tokens make each component. With unwanted words, each
token's share inside their span (what DECOR at alpha 1 removes from it) is listed too.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from studio.text.decor import Components, DecorConfig, decompose, orthonormal_basis, unwanted_share
from studio.text.pipeline import encode, row_masks, segments, token_ids, unwanted_vectors

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EncoderAnalysis:
    """One text encoder's analysis: the components, and per token the unwanted share (or None)."""

    encoder: str
    components: Components
    unwanted_rank: int | None = None
    unwanted_share: list[float] | None = None


def _label(tokenizer: Any, token_id: int) -> str:
    return tokenizer.convert_ids_to_tokens(int(token_id)).replace("</w>", "")


def analyze(pipe: Any, prompt: str, decor: DecorConfig | None = None, rows: str = "words") -> list[EncoderAnalysis]:
    """The component analysis of ``prompt`` on every text encoder of ``pipe`` (adapters as applied to it)."""
    embeds, _ = encode(pipe, [prompt])
    unwanted = unwanted_vectors(pipe, decor)[0] if decor is not None else None
    out = []
    for k, seg in enumerate(segments(pipe)):
        mask = row_masks(seg.tokenizer, [prompt], rows)[0]
        ids = token_ids(seg.tokenizer, [prompt])[0][mask]
        x = embeds[0, :, seg.start:seg.stop][mask.to(embeds.device)].float().cpu()
        comps = decompose(x, [_label(seg.tokenizer, i) for i in ids])
        result = EncoderAnalysis(seg.name, comps)
        if unwanted is not None:
            basis = orthonormal_basis(unwanted[k].float().cpu(), rank=decor.rank)[0]
            result.unwanted_rank = int(basis.shape[0])
            result.unwanted_share = [float(v) for v in unwanted_share(x, basis)]
        out.append(result)
    return out


def format_table(results: list[EncoderAnalysis], prompt: str, decor: DecorConfig | None, top: int = 3) -> str:
    """The analysis as text: components with singular value, energy and top tokens; then the unwanted shares."""
    lines = [f"prompt: {prompt}"]
    for r in results:
        c = r.components
        lines.append(f"{r.encoder}: {len(c.tokens)} tokens, {len(c.singular_values)} components")
        lines.append(f"  {'comp':>4}  {'sigma':>9}  {'energy':>7}  top tokens (loading)")
        for j, s in enumerate(c.singular_values.tolist()):
            tops = "  ".join(f"{t}({v:+.2f})" for t, v in c.top_tokens(j, top))
            lines.append(f"  {j + 1:>4}  {s:>9.3f}  {100 * float(c.energy[j]):>6.1f}%  {tops}")
        if r.unwanted_share is not None and decor is not None:
            lines.append(f"  unwanted {decor.text!r}: basis rank {r.unwanted_rank}; each token's share of its norm "
                         f"inside that span")
            width = max(len(t) for t in c.tokens)
            for t, share in zip(c.tokens, r.unwanted_share):
                lines.append(f"    {t:<{width}}  {share:.3f}")
    return "\n".join(lines)


def to_json(results: list[EncoderAnalysis], prompt: str) -> dict[str, Any]:
    """The analysis as a JSON-able dict."""
    return {"prompt": prompt, "encoders": [
        {"encoder": r.encoder, "tokens": r.components.tokens,
         "singular_values": [float(v) for v in r.components.singular_values],
         "energy": [float(v) for v in r.components.energy],
         "loadings": [[float(v) for v in row] for row in r.components.loadings],
         "unwanted_rank": r.unwanted_rank, "unwanted_share": r.unwanted_share} for r in results]}


def plot(results: list[EncoderAnalysis], path: str | Path, title: str) -> Path:
    """Write the analysis as a PNG: per encoder, singular values as bars and the loadings as a heat map."""
    from studio.text.plots import analysis_figure

    return analysis_figure([(r.encoder, r.components, r.unwanted_share) for r in results], Path(path), title)

