"""The AutoLoRA adapter zoo: small adapters of micro-world concepts, trained through the batch runner.

Each zoo entry is one *concept* of the micro world: a subject (a shape in a colour, held-out
shapes and pre-trained ones), a style (a texture over pre-trained content) or a combination (a
shape in a texture, any colour). Its images come from the renderer with the renderer's captions,
and it trains through ``studio batch`` (the same runner users have) with small explicit
settings: a zoo adapter only needs to be distinguishable, not good. Every fifth concept of the
list is held out of encoder training; the list is ordered so that each held-out concept's
words (shape, colour, texture) occur in training concepts too.

The zoo is a folder: ``zoo.json`` (the concepts, their captions, which are held out) and one
sub-folder per adapter with ``pytorch_lora_weights.safetensors`` (fp16 when ``--half``).

*Replicas* (``--replicas R``) train each training concept R more times, from other renders and
another random initialisation (``NAME-r1``, ...). They are encoder training data only: the
encoder learns what a concept's adapters share across inits and image sets, and galleries
(retrieval, the full-zoo recall, gate pairs) list one adapter per concept (:func:`gallery`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
import string
from pathlib import Path
from typing import Any

from studio.errors import StudioError

log = logging.getLogger(__name__)

ZOO_FILE = "zoo.json"
HOLDOUT_EVERY = 5  # every 5th concept (index % 5 == 4) is held out: 20 %


@dataclasses.dataclass(frozen=True)
class Concept:
    """One zoo adapter's concept; ``kind`` is subject, style or combo."""

    kind: str
    shape: str | None = None
    color: str | None = None
    texture: str | None = None

    @property
    def name(self) -> str:
        parts = {"subject": [self.shape, self.color], "style": [self.texture],
                 "combo": [self.texture, self.shape]}[self.kind]
        return f"{self.kind}-" + "-".join(p for p in parts if p)

    def prompt(self) -> str:
        """A short prompt that describes the concept (the retrieval query of the eval)."""
        if self.kind == "subject":
            return f"a {self.color} {self.shape}"
        if self.kind == "style":
            return f"a shape with a {self.texture} pattern"
        return f"a {self.texture} {self.shape}"


def _c(spec: str) -> Concept:
    kind, _, rest = spec.partition(":")
    a = rest.split("-")
    if kind == "subject":
        return Concept("subject", shape=a[0], color=a[1])
    if kind == "style":
        return Concept("style", texture=a[0])
    return Concept("combo", shape=a[1], texture=a[0])


# Ordered: every 5th entry is held out and its words appear in earlier training entries.
CONCEPTS: tuple[Concept, ...] = tuple(_c(s) for s in (
    "subject:heart-red", "subject:star-blue", "style:checkered", "subject:crescent-yellow", "subject:heart-blue",
    "subject:arrow-green", "subject:circle-purple", "style:zigzag", "combo:checkered-heart", "subject:star-red",
    "subject:square-orange", "style:striped", "subject:crescent-purple", "subject:arrow-red", "combo:zigzag-star",
    "subject:triangle-pink", "style:dotted", "subject:heart-green", "subject:star-yellow", "subject:crescent-green",
    "subject:diamond-brown", "combo:checkered-arrow", "subject:heart-yellow", "subject:cross-green",
    "subject:arrow-orange",
    "combo:checkered-star", "subject:hexagon-blue", "combo:zigzag-crescent", "combo:zigzag-heart",
    "subject:heart-purple",
    "subject:circle-yellow", "combo:checkered-crescent", "subject:square-red", "subject:arrow-blue",
    "subject:star-orange",
    "combo:zigzag-arrow", "subject:triangle-blue", "subject:star-pink", "subject:hexagon-orange",
    "subject:crescent-brown",
))


def is_heldout(index: int) -> bool:
    """Whether the zoo's ``index``-th concept is kept out of encoder training."""
    return index % HOLDOUT_EVERY == HOLDOUT_EVERY - 1


def random_name(seed: int) -> str:
    """A name that says nothing (the metadata-free case AutoLoRA exists for)."""
    rng = random.Random(seed)
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(8))


@dataclasses.dataclass(frozen=True)
class ZooSettings:
    """How the zoo's adapters train (small on purpose; see docs/autolora.md)."""

    images: int = 8
    steps: int = 100
    rank: int = 4
    targets: str = "attention"
    seed: int = 0


def gallery_index(entries: list[dict[str, Any]]) -> list[int]:
    """Positions of the entries that are not replicas: one adapter per concept."""
    return [i for i, e in enumerate(entries) if not e.get("replica")]


def gallery(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One adapter per concept: the entries that are not replicas (what retrieval answers with)."""
    return [entries[i] for i in gallery_index(entries)]


def planned(n: int, replicas: int) -> list[tuple[int, int, Concept, str]]:
    """(concept index, replica, concept, adapter name) of every adapter of an ``n``-concept zoo."""
    plan = [(i, 0, c, c.name) for i, c in enumerate(CONCEPTS[:n])]
    plan += [(i, r, c, f"{c.name}-r{r}") for r in range(1, replicas + 1)
             for i, c in enumerate(CONCEPTS[:n]) if not is_heldout(i)]
    return plan


def _render(concept: Concept, out: Path, n: int, seed: int) -> None:
    from studio.micro.cli import render_set

    if concept.kind == "subject":
        render_set(out, n, seed, shape=concept.shape, color=concept.color, texture="solid", caption="full",
                   overwrite=True)
    elif concept.kind == "style":
        render_set(out, n, seed, shape="seen", color="any", texture=concept.texture, caption="content",
                   overwrite=True)
    else:
        render_set(out, n, seed, shape=concept.shape, color="any", texture=concept.texture, caption="full",
                   overwrite=True)


def _job(concept: Concept, name: str, images: Path, out: Path, s: ZooSettings, seed: int) -> str:
    kind = "style" if concept.kind == "style" else "subject"
    fields = {
        "kind": kind, "images": str(images), "base": "micro", "out": str(out), "name": name,
        "rank": s.rank, "targets": s.targets, "steps": s.steps, "prior": False, "train_trigger": False,
        "flip": 0.5,  # the subject recipe's default until session 12: a rebuild reproduces the committed zoo
        "ema": 0.0,  # likewise: micro subjects save a weight average since session 14
        "sample_every": 0, "checkpoint_every": 0, "seed": seed, "register": False,
    }
    return "".join(f"{k} = {json.dumps(v)}\n" for k, v in fields.items())


def build_zoo(out: str | os.PathLike, n: int, settings: ZooSettings = ZooSettings(), *, half: bool = True,
              cluster: str | None = None, replicas: int = 0) -> dict[str, Any]:
    """Render, train (``studio batch``) and index ``n`` zoo adapters in ``out``; returns the index.

    ``replicas`` more adapters of each training concept (other renders and init seeds) are trained
    too. Re-running continues: adapters that finished earlier (in the batch runner's work folder,
    or already published in ``out`` and its index) are not trained again.
    """
    from studio.trainers.cli import run_batch

    if not 1 <= n <= len(CONCEPTS):
        raise StudioError(f"--n {n}: the zoo has {len(CONCEPTS)} concepts; choose 1 to {len(CONCEPTS)}")
    if replicas < 0:
        raise StudioError(f"--replicas {replicas}: must be 0 or more")
    root = Path(out)
    work = root / ".work"
    done = {}
    if (root / ZOO_FILE).is_file():  # published earlier: kept as they are (the committed zoo grows in place)
        done = {e["name"]: e for e in json.loads((root / ZOO_FILE).read_text())["adapters"]
                if (root / e["path"] / "pytorch_lora_weights.safetensors").is_file()}
    plan = planned(n, replicas)
    jobs = []
    for i, r, concept, name in plan:
        if name in done:
            continue
        images = work / "images" / name
        if not images.is_dir() or not any(images.glob("*.png")):
            _render(concept, images, settings.images, settings.seed * 1000 + i + 100_000 * r)
        job = work / "jobs" / f"{i:02d}-{name}.toml"
        job.parent.mkdir(parents=True, exist_ok=True)
        job.write_text(_job(concept, name, images, work / "adapters" / name, settings, settings.seed + i + 1000 * r))
        jobs.append(str(job))
    status = 0
    if jobs:
        args = argparse.Namespace(jobs=jobs, logs=str(work / "logs"), resume=True, cluster=cluster, num_cpus=1,
                                  num_gpus=None, max_retries=3, unschedulable_timeout=60.0, connect_timeout=5.0)
        status = run_batch(args)
    entries = []
    for i, r, concept, name in plan:
        if name in done:
            entries.append({**done[name], "replica": r} if r else done[name])
            continue
        src = work / "adapters" / name
        images = work / "images" / name
        captions = [p.read_text().strip() for p in sorted(images.glob("*.txt"))]
        if not (src / "pytorch_lora_weights.safetensors").is_file():
            log.warning("zoo adapter %s did not train (see %s); left out", name, work / "logs")
            continue
        _copy_adapter(src, root / name, half)
        entry = {"name": name, "random_name": random_name(1000 + i + 100_000 * r), "kind": concept.kind,
                 "shape": concept.shape, "color": concept.color, "texture": concept.texture,
                 "prompt": concept.prompt(), "captions": captions, "heldout": is_heldout(i) and not r,
                 "trigger": "sks", "path": name}
        entries.append({**entry, "replica": r} if r else entry)
    index = {"base": "micro", "settings": dataclasses.asdict(settings), "adapters": entries}
    tmp = root / (ZOO_FILE + ".tmp")
    tmp.write_text(json.dumps(index, indent=1) + "\n")
    os.replace(tmp, root / ZOO_FILE)
    if status:
        log.warning("some zoo jobs failed; the index lists the %d that trained", len(entries))
    return index


def _copy_adapter(src: Path, dst: Path, half: bool) -> None:
    """The adapter file (fp16 when ``half``: the zoo is committed) with its header; no samples."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    f = src / "pytorch_lora_weights.safetensors"
    with safe_open(str(f), framework="pt") as fh:
        meta = dict(fh.metadata() or {})
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    if half:
        tensors = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in tensors.items()}
    # the build machine's paths say nothing, and captions would hand the retrieval its answer in the header
    for key in ("studio.train_config", "studio.captions"):
        meta.pop(key, None)
    dst.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst / f.name), metadata=meta)


def load_zoo(folder: str | os.PathLike) -> dict[str, Any]:
    """The zoo index of ``folder`` (paths made absolute)."""
    root = Path(folder)
    f = root / ZOO_FILE
    if not f.is_file():
        raise StudioError(f"{root}: no {ZOO_FILE}; build a zoo with `studio autolora zoo --n N --out {root}`")
    index = json.loads(f.read_text())
    for e in index["adapters"]:
        e["file"] = str(root / e["path"] / "pytorch_lora_weights.safetensors")
    return index
