"""Evaluation suites on the micro world: the judge, a base model, subject and style adapters, quantization.

Each suite is a function that takes a loaded pipeline (and the judge) and returns a JSON-able
dict; the CLI (`studio eval`), the UI and the trainers' reports call the same functions.

Every suite is deterministic for its settings. The *prompt* sets are fixed designs that do not
depend on the seed (so two models, or two runs, are judged on the same prompts); the seed only
picks the initial noise, one generator per image, so an image does not depend on its batch.

Metrics (all fractions in [0, 1] unless said otherwise):

- judge: accuracy of each judge head on fresh renders of every concept.
- base: prompt following on fully specified prompts of seen concepts (per attribute and
  ``joint``, all four right), and ``heldout_present``: how often the judge sees the held-out
  shape or texture a prompt names (the base model never saw them, so this should be low; an
  adapter that teaches one raises it).
- subject (DreamBench-style): ``subject_fidelity`` (the judge sees the subject's shape, and its
  colour where given and not overridden by the prompt), ``prompt_fidelity`` (the asked
  background/texture/colour is seen), ``diversity`` (see :func:`feature_diversity`) and
  ``base_drift`` (the drop in base joint accuracy on prompts without the trigger once the
  adapter is loaded).
- style: ``style_fidelity`` (the judge sees the style's texture), ``content_fidelity`` (the asked
  shape, colour and background are all seen), ``leakage`` (see :func:`leakage_rate`), ``base_drift``.
- quant: base-suite accuracy of a (quantized) model, its joint-accuracy drop against a
  reference, and the judge-FID between the two models' images on the same prompts and seeds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from studio.errors import StudioError
from studio.micro import configs
from studio.micro.judge import Judge, classify, features, frechet_distance, to_tensor
from studio.micro.world import (
    ATTRIBUTES, BACKGROUNDS, COLORS, HELDOUT_SHAPES, HELDOUT_TEXTURES, IMAGE_SIZE, SEEN_SHAPES, SEEN_TEXTURES,
    SHAPES, TEXTURES, prompt_for, random_scene, render_batch, scenes,
)

log = logging.getLogger(__name__)

JUDGE_SEED = 12345  # fresh renders for the judge suite: not a pre-training seed (those are 0..10)
DESIGN_SEED = 20_251  # fixes the order of the prompt designs; independent of the noise seed
DEFAULT_N = {"judge": 2000, "base": 200, "heldout": 56, "style": 96, "drift": 96}
PER_PROMPT = 4  # subject suite: images per prompt when --n is not given
LORA_FILE = "pytorch_lora_weights.safetensors"
DEFAULT_TRIGGER = "sks"
DEFAULT_CLASS_WORD = "shape"
DOMINANT_SHARE = 0.25  # a training set's shape/colour is "dominant" above this share of its images
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# noise streams: image i of stream s with seed k starts from generator seed k*10^7 + s*10^6 + i
_STREAMS = {"seen": 0, "heldout": 1, "subject": 2, "style": 3, "reference": 4}
_STREAM_SIZE = 1_000_000

Progress = Callable[[int, int], None]


@dataclasses.dataclass
class GenSettings:
    """How the suites sample: denoising steps, guidance, noise seed, images per pipeline call."""

    steps: int = configs.SAMPLING["steps"]
    guidance: float = configs.SAMPLING["guidance"]
    seed: int = 0
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.steps <= 0:
            raise StudioError(f"--steps {self.steps}: must be a positive number of denoising steps")
        if self.guidance < 0:
            raise StudioError(f"--guidance {self.guidance}: must be >= 0 (1 turns guidance off)")
        if self.batch_size <= 0:
            raise StudioError(f"--batch-size {self.batch_size}: must be at least 1")
        if self.seed < 0:
            raise StudioError(f"--seed {self.seed}: must be >= 0")


@dataclasses.dataclass(frozen=True)
class Item:
    """One image to generate: its prompt, its noise seed, and what the judge should see in it."""

    prompt: str
    seed: int
    asked: dict[str, str]  # attribute -> value the prompt asks for
    group: int = 0  # prompt index, for per-prompt statistics (diversity)


# ----------------------------------------------------------------------------- validation


def check_choice(attr: str, value: str, flag: str | None = None) -> str:
    """``value`` if it names a known ``attr`` of the micro world, else a StudioError listing the choices."""
    allowed = ATTRIBUTES[attr]
    if value not in allowed:
        raise StudioError(f"--{flag or attr} {value}: unknown {attr}; choose one of: {', '.join(allowed)}")
    return value


def _check_count(name: str, n: int, minimum: int = 0) -> int:
    if n < minimum:
        raise StudioError(f"--{name} {n}: must be at least {minimum}")
    if n >= _STREAM_SIZE:
        raise StudioError(f"--{name} {n}: must be below {_STREAM_SIZE}")
    return n


def _noise_seed(seed: int, stream: str, i: int) -> int:
    return seed * 10 * _STREAM_SIZE + _STREAMS[stream] * _STREAM_SIZE + i


# ----------------------------------------------------------------------------- prompt designs


def _balanced_design(*pools: Sequence[str], seed: int = DESIGN_SEED) -> list[tuple[str, ...]]:
    """The full factorial of ``pools`` in a fixed shuffled order, interleaved over the first pool.

    Every prefix is balanced over the first pool (within one) and spread over the others, so a
    small ``n`` still covers every shape.
    """
    combos = list(itertools.product(*pools))
    random.Random(seed).shuffle(combos)
    by_first: dict[str, list[tuple[str, ...]]] = {v: [] for v in pools[0]}
    for combo in combos:
        by_first[combo[0]].append(combo)
    rows = max(len(v) for v in by_first.values())
    return [group[k] for k in range(rows) for group in by_first.values() if k < len(group)]


def seen_items(n: int, seed: int = 0) -> list[Item]:
    """The base suite's fixed set: ``n`` fully specified prompts of seen concepts (a prefix of one design)."""
    design = _balanced_design(SEEN_SHAPES, tuple(COLORS), SEEN_TEXTURES, tuple(BACKGROUNDS))
    items = []
    for i in range(n):
        shape, color, texture, background = design[i % len(design)]
        asked = {"shape": shape, "color": color, "background": background, "texture": texture}
        items.append(Item(prompt_for(shape, color, texture, background), _noise_seed(seed, "seen", i), asked, i))
    return items


def heldout_items(n: int, seed: int = 0) -> list[Item]:
    """Prompts naming a held-out shape (even items) or a held-out texture (odd items), all four attributes given.

    Only the held-out attribute is in ``asked``: it is what ``heldout_present`` checks.
    """
    rng = random.Random(DESIGN_SEED + 1)
    items = []
    for i in range(n):
        color, background = rng.choice(tuple(COLORS)), rng.choice(tuple(BACKGROUNDS))
        if i % 2 == 0:
            shape, texture = HELDOUT_SHAPES[(i // 2) % len(HELDOUT_SHAPES)], rng.choice(SEEN_TEXTURES)
            asked = {"shape": shape}
        else:
            shape, texture = rng.choice(SEEN_SHAPES), HELDOUT_TEXTURES[(i // 2) % len(HELDOUT_TEXTURES)]
            asked = {"texture": texture}
        items.append(Item(prompt_for(shape, color, texture, background), _noise_seed(seed, "heldout", i), asked, i))
    return items


def subject_prompts(token: str, class_word: str, color: str | None = None) -> list[tuple[str, dict[str, str]]]:
    """Re-contextualisation (every background) and property (seen textures, other colours) prompts."""
    noun = f"{token} {class_word}"
    specs = [(prompt_for(shape=noun, background=bg), {"background": bg}) for bg in BACKGROUNDS]
    specs += [(prompt_for(shape=noun, texture=t), {"texture": t}) for t in SEEN_TEXTURES]
    specs += [(prompt_for(shape=noun, color=c), {"color": c}) for c in COLORS if c != color]
    return specs


def subject_items(token: str, class_word: str, *, color: str | None = None, n: int | None = None,
                  seed: int = 0) -> list[Item]:
    """``n`` images cycling over :func:`subject_prompts` (default: PER_PROMPT images per prompt)."""
    specs = subject_prompts(token, class_word, color)
    n = PER_PROMPT * len(specs) if n is None else n
    return [Item(specs[i % len(specs)][0], _noise_seed(seed, "subject", i), specs[i % len(specs)][1], i % len(specs))
            for i in range(n)]


def style_items(token: str, texture: str, *, n: int = DEFAULT_N["style"], seed: int = 0) -> list[Item]:
    """"a {color} {shape} on a {bg} background in {token} style" over seen shapes, colours, backgrounds."""
    design = _balanced_design(SEEN_SHAPES, tuple(COLORS), tuple(BACKGROUNDS), seed=DESIGN_SEED + 2)
    items = []
    for i in range(n):
        shape, color, background = design[i % len(design)]
        prompt = f"{prompt_for(shape, color, background=background)} in {token} style"
        asked = {"shape": shape, "color": color, "background": background, "texture": texture}
        items.append(Item(prompt, _noise_seed(seed, "style", i), asked, i))
    return items


# ----------------------------------------------------------------------------- generation and judging


def _images_to_judge(images: Any) -> torch.Tensor:
    """Pipeline output -> float (N,3,64,64) in [0,1] on the CPU (other sizes are resized, antialiased)."""
    if isinstance(images, torch.Tensor):
        x = images
    elif isinstance(images, np.ndarray):
        x = torch.from_numpy(images)
        x = x.permute(0, 3, 1, 2) if x.shape[-1] == 3 else x
    else:  # list of PIL images
        x = to_tensor(list(images))
    x = x.detach().to("cpu", torch.float32)
    if x.shape[-1] != IMAGE_SIZE or x.shape[-2] != IMAGE_SIZE:
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(0, 1)


@torch.no_grad()
def generate(pipe: Any, items: Sequence[Item], settings: GenSettings, progress: Progress | None = None) -> torch.Tensor:
    """Generate one image per item, ``settings.batch_size`` prompts per pipeline call; (N,3,64,64) in [0,1]."""
    out: list[torch.Tensor] = []
    bs = settings.batch_size
    for start in range(0, len(items), bs):
        chunk = items[start : start + bs]
        gens = [torch.Generator(device="cpu").manual_seed(it.seed) for it in chunk]
        result = pipe([it.prompt for it in chunk], num_inference_steps=settings.steps,
                      guidance_scale=settings.guidance, generator=gens, output_type="pt")
        out.append(_images_to_judge(result.images))
        if progress is not None:
            progress(min(start + bs, len(items)), len(items))
        log.debug("generated %d/%d images", min(start + bs, len(items)), len(items))
    if not out:
        return torch.zeros(0, 3, IMAGE_SIZE, IMAGE_SIZE)
    return torch.cat(out)


def read_attributes(images: torch.Tensor, judge: Judge) -> dict[str, np.ndarray]:
    """The judge's reading of each attribute, as names (arrays of str)."""
    pred = classify(images, judge)
    return {a: np.array(ATTRIBUTES[a])[pred[a]] if len(pred[a]) else np.array([], dtype=str) for a in ATTRIBUTES}


def _hits(seen: dict[str, np.ndarray], items: Sequence[Item], attr: str) -> np.ndarray:
    """Boolean per item: the judge sees the asked value of ``attr`` (items must all ask it)."""
    return np.array([seen[attr][i] == it.asked[attr] for i, it in enumerate(items)], dtype=bool)


def _mean(x: np.ndarray | list) -> float | None:
    x = np.asarray(x, dtype=float)
    return float(x.mean()) if x.size else None


def prompt_accuracy(seen: dict[str, np.ndarray], items: Sequence[Item]) -> dict[str, float | None]:
    """Per-attribute accuracy over fully specified items, and ``joint`` (all four right)."""
    hits = {a: _hits(seen, items, a) for a in ATTRIBUTES}
    acc: dict[str, float | None] = {a: _mean(h) for a, h in hits.items()}
    acc["joint"] = _mean(np.all(np.stack(list(hits.values())), axis=0)) if items else None
    return acc


def heldout_presence(seen: dict[str, np.ndarray], items: Sequence[Item]) -> float | None:
    """Fraction of held-out items where the judge sees the held-out shape/texture that was prompted."""
    return _mean([seen[a][i] == v for i, it in enumerate(items) for a, v in it.asked.items()])


def _timed(name: str, n_images: int, t0: float) -> None:
    dt = time.perf_counter() - t0
    log.info("%s suite: %d images in %.1f s (%.2f s/image)", name, n_images, dt, dt / max(1, n_images))


# ----------------------------------------------------------------------------- suites


def judge_suite(judge: Judge, *, n: int = DEFAULT_N["judge"], seed: int = JUDGE_SEED) -> dict[str, Any]:
    """Accuracy of every judge head on ``n`` fresh renders of every concept (held-out ones included)."""
    _check_count("n", n, 1)
    t0 = time.perf_counter()
    scene_list = list(scenes(seed, n, shapes=SHAPES, textures=TEXTURES))
    seen = read_attributes(to_tensor(render_batch(scene_list)), judge)
    acc = {a: float(np.mean(seen[a] == np.array([getattr(s, a) for s in scene_list]))) for a in ATTRIBUTES}
    _timed("judge", n, t0)
    return {"suite": "judge", "accuracy": acc, "n": n}


def base_suite(pipe: Any, judge: Judge, *, n: int = DEFAULT_N["base"], heldout_n: int = DEFAULT_N["heldout"],
               settings: GenSettings | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Prompt following on ``n`` fixed fully specified prompts of seen concepts, and held-out presence."""
    settings = settings or GenSettings()
    _check_count("n", n, 1)
    _check_count("heldout-n", heldout_n, 0)
    t0 = time.perf_counter()
    seen_set, held_set = seen_items(n, settings.seed), heldout_items(heldout_n, settings.seed)
    images = generate(pipe, seen_set + held_set, settings, progress)  # one list: full batches
    seen = read_attributes(images, judge)
    split = {a: v[:n] for a, v in seen.items()}, {a: v[n:] for a, v in seen.items()}
    result = {"suite": "base", "n": n, "accuracy": prompt_accuracy(split[0], seen_set),
              "heldout_present": heldout_presence(split[1], held_set)}
    _timed("base", n + heldout_n, t0)
    return result


@dataclasses.dataclass
class QuantReference:
    """A reference model's side of the quant suite, computed once and reusable against many models."""

    n: int
    settings: GenSettings
    accuracy: dict[str, float | None]
    features: np.ndarray


def quant_reference(reference: Any, judge: Judge, *, n: int = DEFAULT_N["base"], settings: GenSettings | None = None,
                    progress: Progress | None = None) -> QuantReference:
    """Generate the reference's images for the quant suite and keep what the suite compares with."""
    settings = settings or GenSettings()
    _check_count("n", n, 2)  # a Frechet distance needs a covariance: two images at least
    items = seen_items(n, settings.seed)
    images = generate(reference, items, settings, progress)
    return QuantReference(n, settings, prompt_accuracy(read_attributes(images, judge), items), features(images, judge))


def quant_suite(pipe: Any, reference: Any, judge: Judge, *, n: int = DEFAULT_N["base"],
                settings: GenSettings | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Base-suite accuracy of ``pipe``, its joint drop against ``reference``, and their judge-FID.

    ``reference`` is a pipeline, or a :class:`QuantReference` made with the same ``n`` and settings
    (a bench comparing many models with one reference generates its images once).
    """
    settings = settings or GenSettings()
    _check_count("n", n, 2)
    t0 = time.perf_counter()
    if isinstance(reference, QuantReference):
        if (reference.n, reference.settings) != (n, settings):
            raise StudioError(f"quant reference was made with n={reference.n}, {reference.settings}; "
                              f"this suite asks n={n}, {settings}: make the reference with the same ones")
        ref = reference
    else:
        ref = quant_reference(reference, judge, n=n, settings=settings, progress=progress)
    items = seen_items(n, settings.seed)
    images = generate(pipe, items, settings, progress)
    acc = prompt_accuracy(read_attributes(images, judge), items)
    fid = frechet_distance(features(images, judge), ref.features)
    if not np.isfinite(fid):
        raise StudioError(f"judge-FID is not finite ({fid}): the generated images hold NaN or infinite values; "
                          f"check the model's dtype (try --dtype fp32)")
    _timed("quant", n if isinstance(reference, QuantReference) else 2 * n, t0)
    return {"suite": "quant", "accuracy": acc, "accuracy_drop": ref.accuracy["joint"] - acc["joint"],
            "judge_fid": max(fid, 0.0)}  # rounding can leave -1e-12 where the sets are identical


# ----------------------------------------------------------------------------- adapters


def adapter_file(path: str | Path) -> Path:
    """The LoRA safetensors file of ``path``: the file itself, or the one in a folder."""
    p = Path(path).expanduser()
    fix = f"pass a LoRA .safetensors file or a folder holding {LORA_FILE}"
    if not p.exists():
        raise StudioError(f"--adapter {p}: no such file or folder; {fix}")
    if p.is_dir():
        if (p / LORA_FILE).is_file():
            return p / LORA_FILE
        found = sorted(p.glob("*.safetensors"))
        if len(found) != 1:
            raise StudioError(f"--adapter {p}: folder holds {len(found)} .safetensors files and no {LORA_FILE}; {fix}")
        return found[0]
    if p.suffix.lower() != ".safetensors":
        raise StudioError(f"--adapter {p}: not a .safetensors file; {fix}")
    return p


def adapter_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of an adapter's safetensors header (``studio.trigger`` and friends)."""
    from safetensors import SafetensorError, safe_open

    file = adapter_file(path)
    try:
        with safe_open(str(file), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise StudioError(f"--adapter {file}: not a readable safetensors file ({exc})") from exc


def _meta_list(meta: dict[str, str], key: str, attr: str) -> list[str]:
    """A list-valued metadata entry (JSON list or comma-separated), checked against the world's names."""
    raw = meta.get(key, "").strip()
    if not raw:
        return []
    try:
        values = json.loads(raw) if raw.startswith("[") else [v.strip() for v in raw.split(",") if v.strip()]
    except json.JSONDecodeError as exc:
        raise StudioError(f"adapter metadata {key}={raw!r}: malformed JSON list ({exc})") from exc
    for v in values:
        if v not in ATTRIBUTES[attr]:
            raise StudioError(f"adapter metadata {key}: unknown {attr} {v!r}; choose from {', '.join(ATTRIBUTES[attr])}")
    return list(values)


def _apply_adapter(pipe: Any, path: str | Path) -> None:
    """Fuse the adapter at ``path`` into ``pipe`` (the mixer: base speed, trigger embeddings included)."""
    from studio.mixing import AdapterSpec, Mixer

    file = adapter_file(path)
    try:
        Mixer(pipe, [AdapterSpec(target=str(file))]).apply()  # a spec object: a path may hold ':' or '@'
    except (StudioError, ValueError, KeyError, RuntimeError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise StudioError(f"--adapter {file}: cannot be loaded into this base model ({first[:300]})") from exc


def _remove_adapter(pipe: Any) -> None:
    """Undo :func:`_apply_adapter`: the pipeline is the base model again (unfused exactly)."""
    pipe._studio_mix.remove()


@contextlib.contextmanager
def adapter_applied(pipe: Any, path: str | Path) -> Iterator[Any]:
    """Context in which ``pipe`` carries the adapter at ``path``."""
    _apply_adapter(pipe, path)
    try:
        yield pipe
    finally:
        _remove_adapter(pipe)


def _drift_images(pipe: Any, drift_n: int, settings: GenSettings) -> tuple[list[Item], torch.Tensor]:
    items = seen_items(drift_n, settings.seed)  # a prefix of the base suite's set
    return items, generate(pipe, items, settings)


def drift(before: torch.Tensor, after: torch.Tensor, items: Sequence[Item],
          judge: Judge) -> tuple[float | None, dict[str, float | None]]:
    """The drift set read once: ``base_drift`` (joint) and the drop per attribute (which one the adapter hurts)."""
    if not items:
        return None, {}
    b, a = prompt_accuracy(read_attributes(before, judge), items), prompt_accuracy(read_attributes(after, judge), items)
    per = {k: None if b[k] is None or a[k] is None else round(b[k] - a[k], 4) for k in b}
    return base_drift(b["joint"], a["joint"]), per


def by_prompt(items: Sequence[Item], **scores: Sequence[bool]) -> dict[str, dict[str, float]]:
    """Each score's mean per prompt: where an adapter fails (a background, a colour, a texture)."""
    out: dict[str, dict[str, float]] = {}
    for i, it in enumerate(items):
        row = out.setdefault(it.prompt, {k: 0.0 for k in scores} | {"n": 0})
        row["n"] += 1
        for k, v in scores.items():
            row[k] += float(v[i])
    for row in out.values():
        for k in scores:
            row[k] = round(row[k] / row["n"], 4)
    return out


def by_asked(items: Sequence[Item], attrs: Sequence[str], **scores: Sequence[bool]) -> dict[str, dict[str, dict[str, float]]]:
    """Each score's mean per asked value of each attribute (e.g. style fidelity per shape, colour, background)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for attr in attrs:
        groups: dict[str, list[int]] = {}
        for i, it in enumerate(items):
            if attr in it.asked:
                groups.setdefault(it.asked[attr], []).append(i)
        out[attr] = {v: {k: round(float(np.mean([s[i] for i in idx])), 4) for k, s in scores.items()} | {"n": len(idx)}
                     for v, idx in sorted(groups.items())}
    return out


def base_drift(before: float | None, after: float | None) -> float | None:
    """Drop in base joint accuracy once the adapter is loaded (positive: the adapter hurts the base)."""
    return None if before is None or after is None else before - after


# ----------------------------------------------------------------------------- diversity and leakage


def _mean_pairwise(feats: np.ndarray) -> float:
    d = np.sqrt(((feats[:, None, :] - feats[None, :, :]) ** 2).sum(-1))
    iu = np.triu_indices(len(feats), k=1)
    return float(d[iu].mean())


def _majority(values: Sequence[str]) -> str:
    return Counter(values).most_common(1)[0][0]


def feature_diversity(images: torch.Tensor, items: Sequence[Item], seen: dict[str, np.ndarray], judge: Judge,
                      *, subject: str, color: str | None, seed: int) -> float | None:
    """Variation among the subject images, relative to the renderer's own jitter.

    For each prompt with two images or more: the mean pairwise distance between the judge
    features of its images, against the same for real renders of one scene (the subject's shape;
    the asked attribute; the given ``color``; the judge's majority reading for anything left
    unspecified) under the renderer's position, size, rotation and texture-phase jitter, as
    many renders as images. ``diversity`` = mean over prompts of the first / mean of the second:
    about 1 means the images vary like real renders of the subject, 0 means identical copies.
    None when no prompt has two images.
    """
    groups: dict[int, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(it.group, []).append(i)
    groups = {g: idx for g, idx in groups.items() if len(idx) >= 2}
    if not groups:
        return None
    feats = features(images, judge)
    gen_d, ref_scenes, ref_sizes = [], [], []
    rng = random.Random(_noise_seed(seed, "reference", 0))
    for g, idx in sorted(groups.items()):
        gen_d.append(_mean_pairwise(feats[idx]))
        spec = {"shape": subject}
        for attr in ("color", "texture", "background"):
            asked = items[idx[0]].asked.get(attr)
            spec[attr] = asked or (color if attr == "color" and color else _majority([seen[attr][i] for i in idx]))
        pools = {"shapes": [spec["shape"]], "colors": [spec["color"]], "textures": [spec["texture"]],
                 "backgrounds": [spec["background"]]}
        ref_scenes += [random_scene(rng, **pools) for _ in idx]
        ref_sizes.append(len(idx))
    ref_feats = features(to_tensor(render_batch(ref_scenes)), judge)
    ref_d, start = [], 0
    for size in ref_sizes:
        ref_d.append(_mean_pairwise(ref_feats[start : start + size]))
        start += size
    ref = float(np.mean(ref_d))
    return float(np.mean(gen_d)) / ref if ref > 0 else None


def leakage_rate(seen: dict[str, np.ndarray], items: Sequence[Item], train_shapes: Sequence[str],
                 train_colors: Sequence[str]) -> float | None:
    """How often the style's training content shows up where the prompt asks for other content.

    Over every (image, attribute) pair where the prompt asks for a shape not among
    ``train_shapes`` (a colour not among ``train_colors``), the fraction where the judge sees
    one of the training shapes (colours) instead. None when there is nothing to count.
    """
    events: list[bool] = []
    for attr, train in (("shape", set(train_shapes)), ("color", set(train_colors))):
        if not train:
            continue
        events += [seen[attr][i] in train for i, it in enumerate(items) if it.asked[attr] not in train]
    return _mean(events)


def _dominant(values: Sequence[str]) -> list[str]:
    counts = Counter(values)
    total = max(1, len(values))
    return sorted(v for v, c in counts.items() if c / total > DOMINANT_SHARE)


def _concepts_from_captions(captions: Sequence[str]) -> dict[str, list[str]]:
    """Dominant shapes and colours named by captions (an attribute no caption names: empty)."""
    words = [set(re.findall(r"[a-z]+", c.lower())) for c in captions]
    found: dict[str, list[str]] = {}
    for attr in ("shape", "color"):
        named = [v for w in words for v in ATTRIBUTES[attr] if v in w]
        found[attr] = _dominant(named) if named else []
    return found


def training_concepts(folder: str | Path, judge: Judge) -> tuple[list[str], list[str]]:
    """Dominant shapes and colours of a style's training set: from its .txt captions, else judged.

    An attribute's dominant values are those in more than DOMINANT_SHARE of the images; an
    attribute that the captions never name is read off the images by the judge.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise StudioError(f"--train-images {folder}: no such folder; pass the folder of the style's training images")
    captions = [p.read_text(errors="replace") for p in sorted(folder.glob("*.txt"))]
    found = _concepts_from_captions(captions)
    missing = [a for a, v in found.items() if not v]
    if missing:
        paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            if not captions:
                raise StudioError(f"--train-images {folder}: no images ({', '.join(IMAGE_SUFFIXES)}) and no .txt "
                                  f"captions in it")
            return found["shape"], found["color"]
        from PIL import Image

        imgs = []
        for p in paths:
            with Image.open(p) as im:
                imgs.append(im.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC))
        seen = read_attributes(to_tensor(imgs), judge)
        for attr in missing:
            found[attr] = _dominant(list(seen[attr]))
    return found["shape"], found["color"]


# ----------------------------------------------------------------------------- adapter suites


def subject_suite(pipe: Any, judge: Judge, adapter: str | Path, *, subject: str, color: str | None = None,
                  token: str | None = None, class_word: str | None = None, n: int | None = None,
                  drift_n: int = DEFAULT_N["drift"], settings: GenSettings | None = None,
                  progress: Progress | None = None, decor: Any = None) -> dict[str, Any]:
    """DreamBench-style evaluation of a subject adapter whose subject is a ``subject`` shape (of ``color``).

    ``decor``: a :class:`studio.text.decor.DecorConfig` applied to the subject images (not the drift set).
    """
    settings = settings or GenSettings()
    check_choice("shape", subject, "subject")
    if color is not None:
        check_choice("color", color)
    _check_count("drift-n", drift_n, 0)
    if n is not None:
        _check_count("n", n, 1)
    meta = adapter_metadata(adapter)
    token = token or meta.get("studio.trigger") or DEFAULT_TRIGGER
    class_word = class_word or meta.get("studio.class_word") or DEFAULT_CLASS_WORD
    items = subject_items(token, class_word, color=color, n=n, seed=settings.seed)
    log.info("subject suite: %d prompts like %r, %d images", len({it.group for it in items}), items[0].prompt,
             len(items))
    t0 = time.perf_counter()
    images, drift_items, before, after = _adapter_run(pipe, adapter, items, drift_n, settings, progress, decor)
    seen = read_attributes(images, judge)
    drifted, drift_per_attribute = drift(before, after, drift_items, judge)
    subject_ok = [seen["shape"][i] == subject and (color is None or "color" in it.asked or seen["color"][i] == color)
                  for i, it in enumerate(items)]
    prompt_ok = [all(seen[a][i] == v for a, v in it.asked.items()) for i, it in enumerate(items)]
    result = {
        "suite": "subject", "n": len(items),
        "subject_fidelity": _mean(subject_ok), "prompt_fidelity": _mean(prompt_ok),
        "diversity": feature_diversity(images, items, seen, judge, subject=subject, color=color, seed=settings.seed),
        "base_drift": drifted, "drift_by_attribute": drift_per_attribute,
        "by_prompt": by_prompt(items, subject=subject_ok, prompt=prompt_ok),
    }
    _timed("subject", len(items) + 2 * drift_n, t0)
    return result


def _adapter_run(pipe: Any, adapter: str | Path, items: list, drift_n: int, settings: GenSettings,
                 progress: Progress | None, decor: Any = None) -> tuple:
    """The suite's images with the adapter (and DECOR), and the drift set's images without and with the adapter."""
    from studio.text.pipeline import decor_applied

    drift_items, before = _drift_images(pipe, drift_n, settings)
    with adapter_applied(pipe, adapter):
        with decor_applied(pipe, decor):
            images = generate(pipe, items, settings, progress)
        after = generate(pipe, drift_items, settings)
    return images, drift_items, before, after


def style_suite(pipe: Any, judge: Judge, adapter: str | Path, *, texture: str, token: str | None = None,
                train_images: str | Path | None = None, n: int = DEFAULT_N["style"],
                drift_n: int = DEFAULT_N["drift"], settings: GenSettings | None = None,
                progress: Progress | None = None, decor: Any = None) -> dict[str, Any]:
    """Evaluation of a style adapter whose style is the ``texture`` texture (``decor``: as for subject_suite)."""
    settings = settings or GenSettings()
    check_choice("texture", texture)
    _check_count("n", n, 1)
    _check_count("drift-n", drift_n, 0)
    meta = adapter_metadata(adapter)
    token = token or meta.get("studio.trigger") or DEFAULT_TRIGGER
    if train_images is not None:
        train_shapes, train_colors = training_concepts(train_images, judge)
        source = str(train_images)
    else:
        train_shapes = _meta_list(meta, "studio.train_shapes", "shape")
        train_colors = _meta_list(meta, "studio.train_colors", "color")
        source = "adapter metadata"
        if not (train_shapes or train_colors) and meta.get("studio.captions"):
            try:  # the studio's trainer records (up to 50 of) the training captions
                found = _concepts_from_captions(json.loads(meta["studio.captions"]))
            except (json.JSONDecodeError, TypeError, AttributeError) as exc:
                raise StudioError(f"--adapter {adapter}: metadata studio.captions is not a JSON list of "
                                  f"strings ({exc})") from exc
            train_shapes, train_colors = found["shape"], found["color"]
            source = "the training captions in the adapter metadata"
    if train_shapes or train_colors:
        log.info("style suite: training content from %s: shapes %s, colours %s", source, train_shapes or "-",
                 train_colors or "-")
    else:
        log.warning("style suite: leakage not measured (null): the training images' dominant shape/colour is unknown; "
                    "pass --train-images DIR, or train with the studio so the adapter records them")
    items = style_items(token, texture, n=n, seed=settings.seed)
    t0 = time.perf_counter()
    images, drift_items, before, after = _adapter_run(pipe, adapter, items, drift_n, settings, progress, decor)
    seen = read_attributes(images, judge)
    drifted, drift_per_attribute = drift(before, after, drift_items, judge)
    content = np.all(np.stack([_hits(seen, items, a) for a in ("shape", "color", "background")]), axis=0)
    styled = _hits(seen, items, "texture")
    result = {
        "suite": "style", "n": len(items),
        "style_fidelity": _mean(styled),
        "content_fidelity": _mean(content),
        "leakage": leakage_rate(seen, items, train_shapes, train_colors),
        "base_drift": drifted, "drift_by_attribute": drift_per_attribute,
        # where the style fails: per asked shape, colour and background; what the judge read instead
        "by_asked": by_asked(items, ("shape", "color", "background"), style=styled, content=content),
        "texture_seen": dict(Counter(seen["texture"].tolist()).most_common()),
    }
    _timed("style", len(items) + 2 * drift_n, t0)
    return result

