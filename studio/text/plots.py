"""The PNG plots of DECOR: the component analysis and the Pareto plot over alpha.

matplotlib draws them when it is installed; otherwise PIL does (always there with the
studio), so the plots never need an extra package.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

Series = tuple[str, Sequence[float], Sequence[float], Sequence[str]]  # name, xs, ys, point labels
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


def have_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _target(path: Path) -> Path:
    from studio.generation import png_path

    return png_path(path, "--plot", "the plot")


def _save_pil(im: Any, path: Path) -> Path:
    from studio.generation import write_png

    return write_png(im, path)


def _save_mpl(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    tmp = path.with_suffix(".png.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, path)  # never a half-written PNG under the final name
    return path


def _diverging(v: float) -> tuple[int, int, int]:
    """-1 blue, 0 white, +1 red."""
    v = max(-1.0, min(1.0, v))
    if v >= 0:
        return 255, int(255 * (1 - v)), int(255 * (1 - v))
    return int(255 * (1 + v)), int(255 * (1 + v)), 255


# ----------------------------------------------------------------------------- component analysis


def analysis_figure(panels: Sequence[tuple[str, Any, Sequence[float] | None]], path: Path, title: str) -> Path:
    """Per encoder: singular values (bars, energy share on top) beside the token x component loadings.

    ``panels``: (encoder name, :class:`studio.text.decor.Components`, unwanted share per token or None).
    """
    path = _target(Path(path))
    if have_matplotlib():
        return _analysis_mpl(panels, path, title)
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=12)
    cell, pad, bar_w, chart_h = 26, 12, 22, 140
    blocks = []
    for name, comps, share in panels:
        n_tok, n_comp = comps.loadings.shape
        label_w = max(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(t, font=font) for t in comps.tokens) + 8
        width = int(label_w + cell * n_comp + (cell * 2 if share is not None else 0) + 2 * pad)
        width = max(width, int(2 * pad + (bar_w + 4) * n_comp + 60), 320)
        height = 24 + chart_h + 30 + cell * n_tok + 2 * pad + 20
        im = Image.new("RGB", (width, height), "white")
        d = ImageDraw.Draw(im)
        d.text((pad, 4), f"{name}: singular values", fill="black", font=font)
        sv = comps.singular_values.tolist()
        top = max(sv) or 1.0
        for j, s in enumerate(sv):
            x0 = pad + 40 + j * (bar_w + 4)
            h = int(chart_h * s / top)
            d.rectangle([x0, 24 + chart_h - h, x0 + bar_w, 24 + chart_h], fill=PALETTE[0])
            d.text((x0 + 2, 24 + chart_h + 2), str(j + 1), fill="black", font=font)
            d.text((x0, 24 + chart_h - h - 13), f"{100 * float(comps.energy[j]):.0f}%", fill="black", font=font)
        d.text((pad, 24), f"{top:.1f}", fill="gray", font=font)
        y0 = 24 + chart_h + 30
        d.text((pad, y0 - 12), "loadings (blue -, red +)" + ("; last: unwanted share" if share is not None else ""),
               fill="black", font=font)
        scale = float(comps.loadings.abs().max()) or 1.0
        for i, tok in enumerate(comps.tokens):
            y = y0 + 4 + i * cell
            d.text((pad, y + 6), tok, fill="black", font=font)
            for j in range(n_comp):
                x = pad + label_w + j * cell
                d.rectangle([x, y, x + cell - 2, y + cell - 2], fill=_diverging(float(comps.loadings[i, j]) / scale))
            if share is not None:
                x = pad + label_w + n_comp * cell + cell // 2
                d.rectangle([x, y, x + cell - 2, y + cell - 2], fill=_diverging(float(share[i])))
                d.text((x + cell, y + 6), f"{share[i]:.2f}", fill="black", font=font)
        blocks.append(im)
    total_w = sum(b.width for b in blocks)
    fig = Image.new("RGB", (total_w, max(b.height for b in blocks) + 24), "white")
    ImageDraw.Draw(fig).text((12, 4), title, fill="black", font=font)
    x = 0
    for b in blocks:
        fig.paste(b, (x, 24))
        x += b.width
    return _save_pil(fig, path)


def _analysis_mpl(panels: Sequence[tuple[str, Any, Sequence[float] | None]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(panels), figsize=(5 * len(panels), 8), squeeze=False)
    for k, (name, comps, share) in enumerate(panels):
        sv = comps.singular_values.tolist()
        axes[0][k].bar(range(1, len(sv) + 1), sv)
        axes[0][k].set(title=f"{name}: singular values", xlabel="component")
        data = comps.loadings.numpy()
        if share is not None:
            import numpy as np

            data = np.concatenate([data / (abs(data).max() or 1), np.asarray(share)[:, None]], axis=1)
        lim = abs(data).max() or 1
        axes[1][k].imshow(data, cmap="coolwarm", vmin=-lim, vmax=lim, aspect="auto")
        axes[1][k].set_yticks(range(len(comps.tokens)), comps.tokens)
        axes[1][k].set(title="loadings" + (" | unwanted share" if share is not None else ""), xlabel="component")
    fig.suptitle(title)
    fig.tight_layout()
    return _save_mpl(fig, path)


# ----------------------------------------------------------------------------- Pareto plot


def line_plot(series: Sequence[Series], path: str | Path, *, title: str, xlabel: str, ylabel: str) -> Path:
    """Points joined by lines, one colour per series, each point labelled (e.g. its alpha)."""
    path = _target(Path(path))
    if have_matplotlib():
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 5))
        for k, (name, xs, ys, labels) in enumerate(series):
            ax.plot(xs, ys, "o-", color=PALETTE[k % len(PALETTE)], label=name)
            for x, y, t in zip(xs, ys, labels):
                ax.annotate(t, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        ax.legend()
        ax.grid(alpha=0.3)
        return _save_mpl(fig, path)
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=12)
    w, h, left, right, top, bottom = 640, 480, 60, 20, 40, 50
    xs_all = [x for _, xs, _, _ in series for x in xs]
    ys_all = [y for _, _, ys, _ in series for y in ys]
    x_lo, x_hi = min(xs_all), max(xs_all)
    y_lo, y_hi = min(ys_all), max(ys_all)
    x_lo, x_hi = (x_lo - 0.05, x_hi + 0.05) if x_hi - x_lo < 1e-9 else (x_lo - 0.05 * (x_hi - x_lo), x_hi + 0.05 * (x_hi - x_lo))
    y_lo, y_hi = (y_lo - 0.05, y_hi + 0.05) if y_hi - y_lo < 1e-9 else (y_lo - 0.05 * (y_hi - y_lo), y_hi + 0.05 * (y_hi - y_lo))

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x_lo) / (x_hi - x_lo) * (w - left - right),
                h - bottom - (y - y_lo) / (y_hi - y_lo) * (h - top - bottom))

    im = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(im)
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for k in range(5):
        xv, yv = x_lo + k / 4 * (x_hi - x_lo), y_lo + k / 4 * (y_hi - y_lo)
        gx, _ = px(xv, y_lo)
        _, gy = px(x_lo, yv)
        d.line([gx, top, gx, h - bottom], fill=(225, 225, 225))
        d.line([left, gy, w - right, gy], fill=(225, 225, 225))
        d.text((gx - 12, h - bottom + 4), f"{xv:.2f}", fill="black", font=font)
        d.text((left - 40, gy - 6), f"{yv:.2f}", fill="black", font=font)
    d.text((w // 2 - 60, h - 20), xlabel, fill="black", font=font)
    d.text((4, top - 16), ylabel, fill="black", font=font)
    d.text((left, 6), title, fill="black", font=font)
    for k, (name, xs, ys, labels) in enumerate(series):
        color = PALETTE[k % len(PALETTE)]
        pts = [px(x, y) for x, y in zip(xs, ys)]
        if len(pts) > 1:
            d.line(pts, fill=color, width=2)
        for (x, y), t in zip(pts, labels):
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
            d.text((x + 4, y - 14), t, fill=color, font=font)
        d.text((w - right - 200, top + 6 + 16 * k), f"- {name}", fill=color, font=font)
    return _save_pil(im, path)
