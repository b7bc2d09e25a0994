"""The judge: a small CNN that reads the micro world's attributes off an image.

One head per attribute (shape over every shape including held-out ones, colour, background,
texture). Its penultimate features give a Frechet distance between two image sets
("judge-FID"). Trained on the renderer by ``studio micro pretrain``; weights in assets/judge.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn
from safetensors.torch import load_file, save_file

from studio.micro.world import ATTRIBUTES

FEATURE_DIM = 128


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.SiLU())


class Judge(nn.Module):
    """CNN with a shared trunk and one linear head per attribute. Input: (N,3,64,64) in [0,1]."""

    def __init__(self) -> None:
        super().__init__()
        # one conv per scale keeps a training step cheap on two CPU cores; the world is simple
        self.trunk = nn.Sequential(
            _conv(3, 32), nn.MaxPool2d(2),  # 32x32
            _conv(32, 64), nn.MaxPool2d(2),  # 16x16
            _conv(64, 128), nn.MaxPool2d(2),  # 8x8
            _conv(128, 128), _conv(128, FEATURE_DIM), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.heads = nn.ModuleDict({a: nn.Linear(FEATURE_DIM, len(v)) for a, v in ATTRIBUTES.items()})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features, shape (N, 128)."""
        return self.trunk(images * 2.0 - 1.0)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(images)
        return {a: head(f) for a, head in self.heads.items()}


def default_judge_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "assets" / "judge"


def save_judge(judge: Judge, folder: str | Path) -> None:
    """Write the judge's weights (fp16 safetensors) and its label lists."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16 if v.is_floating_point() else v.dtype).contiguous()
             for k, v in judge.state_dict().items()}
    save_file(state, str(folder / "judge.safetensors"))
    (folder / "labels.json").write_text(json.dumps({a: list(v) for a, v in ATTRIBUTES.items()}, indent=1))


_CACHE: dict[str, Judge] = {}


def load_judge(folder: str | Path | None = None, *, reload: bool = False) -> Judge:
    """Load the committed judge (cached per folder), in eval mode, fp32 on CPU."""
    folder = Path(folder) if folder else default_judge_dir()
    key = str(folder.resolve())
    if key not in _CACHE or reload:
        path = folder / "judge.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: judge weights missing; run `studio micro pretrain` to make them")
        labels = json.loads((folder / "labels.json").read_text())
        if labels != {a: list(v) for a, v in ATTRIBUTES.items()}:
            raise ValueError(f"{folder}: judge labels do not match this version's micro world; retrain it")
        judge = Judge()
        judge.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()})
        _CACHE[key] = judge.eval()
    return _CACHE[key]


def to_tensor(images: np.ndarray | list) -> torch.Tensor:
    """uint8 (N,H,W,3) array or list of PIL images -> float (N,3,H,W) in [0,1]."""
    arr = np.stack([np.asarray(im.convert("RGB")) if hasattr(im, "convert") else np.asarray(im) for im in images]) \
        if isinstance(images, list) else np.asarray(images)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0


@torch.no_grad()
def classify(images: np.ndarray | list | torch.Tensor, judge: Judge | None = None,
             batch_size: int = 256) -> dict[str, np.ndarray]:
    """Predicted class index per attribute for each image."""
    judge = judge or load_judge()
    x = images if isinstance(images, torch.Tensor) else to_tensor(images)
    outs: dict[str, list[np.ndarray]] = {a: [] for a in ATTRIBUTES}
    for i in range(0, len(x), batch_size):
        logits = judge(x[i : i + batch_size])
        for a in ATTRIBUTES:
            outs[a].append(logits[a].argmax(-1).numpy())
    return {a: np.concatenate(v) if v else np.zeros(0, dtype=int) for a, v in outs.items()}


@torch.no_grad()
def features(images: np.ndarray | list | torch.Tensor, judge: Judge | None = None,
             batch_size: int = 256) -> np.ndarray:
    """Penultimate judge features, (N, 128) float64."""
    judge = judge or load_judge()
    x = images if isinstance(images, torch.Tensor) else to_tensor(images)
    return np.concatenate([judge.features(x[i : i + batch_size]).double().numpy()
                           for i in range(0, len(x), batch_size)])


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (the FID formula)."""
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    cov_a, cov_b = np.cov(feats_a, rowvar=False), np.cov(feats_b, rowvar=False)
    # sqrt of cov_a @ cov_b via the symmetric form, stable without scipy
    w, v = np.linalg.eigh(cov_a)
    sa = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = sa @ cov_b @ sa
    wm = np.linalg.eigvalsh((m + m.T) / 2)
    tr_sqrt = np.sqrt(np.clip(wm, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_sqrt)


def judge_fid(images_a, images_b, judge: Judge | None = None) -> float:
    """Frechet distance between two image sets in the judge's feature space."""
    return frechet_distance(features(images_a, judge), features(images_b, judge))
