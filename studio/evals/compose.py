"""The compose suite: a subject and a style in one image, from a mix of adapters or one adapter that carries both.

``studio eval compose --base SPEC --adapter A[:W] [--adapter B[:W] ...] --subject SHAPE --texture TEXTURE``

Every adapter is applied together through the mixing layer (:class:`studio.mixing.Mixer`, the
same spec as ``studio generate --adapter``: weights, windows, scopes), so the suite judges
weighted mixes as users make them, and equally one combined adapter (Break-for-Make's output)
whose metadata names a subject trigger and a style trigger.

The prompts follow the subject and style suites' conventions: the subject is ``TOKEN CLASS`` in
the shape's place (as the subject recipe trains it) and the style is the ``in TOKEN style``
suffix (as the style recipe trains it): "a sks shape on a teal background in zwx style" for
every background, "a blue sks shape in zwx style" for every colour but the subject's own. The
prompt set is fixed; the seed only picks the noise.

Metrics (fractions in [0, 1]):

- ``both``: the judge sees the subject's shape and the style's texture in the same image.
- ``subject_fidelity``: the subject's shape is seen; ``style_fidelity``: the texture is seen.
- ``prompt_fidelity``: the background or colour the prompt asks is seen.
- ``leakage``: how often the style's training content (its shapes and colours) shows instead
  of the asked shape/colour (:func:`compose_leakage`; which content: :func:`style_content`).
- ``base_drift``: the drop in the base suite's joint accuracy on prompts without any trigger,
  once the whole mix is loaded (as in the subject and style suites).

Roles (which trigger names the subject, which the style) come from each adapter's safetensors
header: ``studio.kind`` = subject/content with ``studio.trigger`` (and ``studio.class_word``),
``studio.kind`` = style with ``studio.trigger``; an adapter that carries both says
``studio.subject_trigger`` (or ``studio.content_trigger``) and ``studio.style_trigger``, with
``studio.style_captions`` or ``studio.style_train_shapes``/``studio.style_train_colors`` for
its style half's training content. ``--subject-token``/``--style-token`` override them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from studio.errors import StudioError
from studio.evals import suites
from studio.evals.suites import DEFAULT_N, GenSettings, Item, Progress
from studio.micro.judge import Judge
from studio.micro.world import ATTRIBUTES, BACKGROUNDS, COLORS, prompt_for

log = logging.getLogger(__name__)

PER_PROMPT = suites.PER_PROMPT  # images per prompt when --n is not given
# noise streams 0-4 belong to studio.evals.suites; the compose images draw from their own
_COMPOSE_STREAM = 5
SUBJECT_KINDS = ("subject", "content")


# ----------------------------------------------------------------------------- roles


@dataclasses.dataclass(frozen=True)
class Roles:
    """What the prompts say and what leakage counts: triggers, class word, the style's training content."""

    subject_token: str
    class_word: str
    style_token: str
    style_shapes: tuple[str, ...] = ()
    style_colors: tuple[str, ...] = ()
    content_source: str = ""  # where the style's training content was read from ("" when unknown)


def _adapter_path(target: str, home: str | Path | None = None) -> Path:
    """The weights file of an adapter spec's target: an existing path, else a library name."""
    from studio.library import resolve_adapter

    return suites.adapter_file(resolve_adapter(target, home=Path(home) if home else None))


def style_content(captions: Sequence[str]) -> tuple[list[str], list[str], str]:
    """The shapes and colours a style's training captions show: (shapes, colours, rule).

    The dominant ones (over DOMINANT_SHARE of the captions, as the style suite counts them) when
    there are any; a set without dominant content (every image another shape and colour, like
    assets/samples/style-checkered) shows all of what it names, so all of it counts.
    """
    found = suites._concepts_from_captions(captions)
    if found["shape"] or found["color"]:
        return found["shape"], found["color"], "dominant"
    words = [set(re.findall(r"[a-z]+", c.lower())) for c in captions]
    named = {a: sorted({v for w in words for v in ATTRIBUTES[a] if v in w}) for a in ("shape", "color")}
    return named["shape"], named["color"], "all named"


def _captions(meta: dict[str, str], key: str, file: Path) -> list[str] | None:
    raw = meta.get(key)
    if not raw:
        return None
    try:
        captions = json.loads(raw)
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise TypeError("not a list of strings")
    except (json.JSONDecodeError, TypeError) as exc:
        raise StudioError(f"--adapter {file}: metadata {key} is not a JSON list of strings ({exc})") from exc
    return captions


def _folder_content(folder: Path, judge: Judge) -> tuple[list[str], list[str], str]:
    captions = [p.read_text(errors="replace") for p in sorted(folder.glob("*.txt"))]
    if captions:
        shapes, colors, rule = style_content(captions)
        return shapes, colors, f"{folder} captions ({rule})"
    shapes, colors = suites.training_concepts(folder, judge)  # no captions: the judge reads the images
    return shapes, colors, f"{folder} images (dominant)"


def resolve_roles(adapters: Sequence[Any], *, subject_token: str | None = None, style_token: str | None = None,
                  class_word: str | None = None, train_images: str | Path | None = None,
                  judge: Judge | None = None, home: str | Path | None = None) -> Roles:
    """Read every adapter's header for the subject trigger, the style trigger and the style's training content.

    Explicit tokens win over metadata. A StudioError names the missing role and the flag that fixes it.
    """
    from studio.mixing import as_spec

    subj: list[tuple[str, str | None, Path]] = []  # (trigger, class word, file)
    style: list[tuple[str, Path]] = []
    content: tuple[list[str], list[str], str] | None = None
    for spec in (as_spec(a) for a in adapters):
        file = _adapter_path(spec.target, home)
        meta = suites.adapter_metadata(file)
        kind = meta.get("studio.kind", "").strip().lower()
        s_tok = meta.get("studio.subject_trigger") or meta.get("studio.content_trigger")
        if not s_tok and kind in SUBJECT_KINDS:
            s_tok = meta.get("studio.trigger")
        if s_tok:
            subj.append((s_tok, meta.get("studio.subject_class_word") or meta.get("studio.class_word"), file))
        st_tok = meta.get("studio.style_trigger") or (meta.get("studio.trigger") if kind == "style" else None)
        if st_tok:
            style.append((st_tok, file))
            if content is None:
                content = _meta_content(meta, file, combined=kind != "style")
    for role, found in (("subject", [s[0] for s in subj]), ("style", [s[0] for s in style])):
        if len(set(found)) > 1:
            log.warning("compose suite: %d adapters name %s triggers %s; the prompts use the first",
                        len(found), role, ", ".join(found))
    s_tok = subject_token or (subj[0][0] if subj else None)
    st_tok = style_token or (style[0][0] if style else None)
    missing = [r for r, t in (("subject", s_tok), ("style", st_tok)) if not t]
    if missing:
        raise StudioError(f"no adapter's metadata says which trigger names the {' and the '.join(missing)} "
                          f"(studio.kind subject/style with studio.trigger, or studio.subject_trigger / "
                          f"studio.style_trigger); pass {' and '.join(f'--{r}-token WORD' for r in missing)}")
    if s_tok == st_tok and len(adapters) > 1:
        log.warning("compose suite: the subject and the style adapter share the trigger %r: their learned trigger "
                    "embeddings overwrite each other and the prompt cannot tell them apart; train one with "
                    "another --token", s_tok)
    cw = class_word or next((c for _, c, _ in subj if c), None) or suites.DEFAULT_CLASS_WORD
    if train_images is not None:
        folder = Path(train_images).expanduser()
        if not folder.is_dir():
            raise StudioError(f"--train-images {folder}: no such folder; pass the folder of the style's training "
                              f"images")
        if judge is None:
            raise StudioError("--train-images needs the judge (to read images without captions)")
        content = _folder_content(folder, judge)
    shapes, colors, source = content or ([], [], "")
    return Roles(s_tok, cw, st_tok, tuple(shapes), tuple(colors), source if (shapes or colors) else "")


def _meta_content(meta: dict[str, str], file: Path, *, combined: bool) -> tuple[list[str], list[str], str] | None:
    """The style's training content recorded in its header (a combined adapter: its style half's keys only)."""
    prefix = "studio.style_" if combined else "studio."
    shapes = suites._meta_list(meta, f"{prefix}train_shapes", "shape")
    colors = suites._meta_list(meta, f"{prefix}train_colors", "color")
    if shapes or colors:
        return shapes, colors, f"{file.name} metadata {prefix}train_shapes/colors"
    key = "studio.style_captions" if combined else "studio.captions"
    captions = _captions(meta, key, file) or (_captions(meta, "studio.style_captions", file) if not combined else None)
    if captions:
        shapes, colors, rule = style_content(captions)
        return shapes, colors, f"{file.name} metadata {key} ({rule})"
    return None


# ----------------------------------------------------------------------------- prompts


def compose_prompts(subject_token: str, class_word: str, style_token: str,
                    color: str | None = None) -> list[tuple[str, dict[str, str]]]:
    """The subject in the style on every background, and in every colour but its own."""
    noun, tail = f"{subject_token} {class_word}", f" in {style_token} style"
    specs = [(prompt_for(shape=noun, background=bg) + tail, {"background": bg}) for bg in BACKGROUNDS]
    specs += [(prompt_for(shape=noun, color=c) + tail, {"color": c}) for c in COLORS if c != color]
    return specs


def compose_items(roles: Roles, subject: str, texture: str, *, color: str | None = None, n: int | None = None,
                  seed: int = 0) -> list[Item]:
    """``n`` images cycling over :func:`compose_prompts` (default PER_PROMPT per prompt); each asks the
    subject's shape and the style's texture, plus its background or colour (the subject's ``color``
    where the prompt names none and it is given)."""
    specs = compose_prompts(roles.subject_token, roles.class_word, roles.style_token, color)
    n = PER_PROMPT * len(specs) if n is None else n
    items = []
    for i in range(n):
        prompt, extra = specs[i % len(specs)]
        asked = {"shape": subject, "texture": texture, **extra}
        if color is not None and "color" not in asked:
            asked["color"] = color
        seed_i = seed * 10 * suites._STREAM_SIZE + _COMPOSE_STREAM * suites._STREAM_SIZE + i
        items.append(Item(prompt, seed_i, asked, i % len(specs)))
    return items


# ----------------------------------------------------------------------------- metrics


def compose_leakage(seen: dict[str, np.ndarray], items: Sequence[Item], train_shapes: Sequence[str],
                    train_colors: Sequence[str]) -> float | None:
    """:func:`studio.evals.suites.leakage_rate` over the attributes each item asks (a colour is not always asked).

    Over every (image, attribute) pair whose asked shape (colour) is not among the style's
    training shapes (colours): the fraction where the judge sees one of them instead.
    """
    events: list[bool] = []
    for attr, train in (("shape", set(train_shapes)), ("color", set(train_colors))):
        if train:
            events += [seen[attr][i] in train for i, it in enumerate(items)
                       if attr in it.asked and it.asked[attr] not in train]
    return suites._mean(events)


@contextlib.contextmanager
def mix_applied(pipe: Any, adapters: Sequence[Any], home: str | Path | None = None) -> Iterator[Any]:
    """Context in which ``pipe`` carries every adapter of the mix (fused when static, hooked when windowed)."""
    from studio.mixing import Mixer

    try:
        mix = Mixer(pipe, list(adapters), home=home)
        mix.apply()
    except StudioError:
        raise
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise StudioError(f"--adapter {', '.join(map(str, adapters))}: cannot be loaded into this base model "
                          f"({first[:300]})") from exc
    try:
        yield pipe
    finally:
        mix.remove()


@dataclasses.dataclass
class DriftReference:
    """The drift set's base images (no adapter), made once and reused for many mixes (a weight grid)."""

    settings: GenSettings
    items: list[Item]
    images: torch.Tensor


def drift_reference(pipe: Any, drift_n: int, settings: GenSettings) -> DriftReference:
    """Generate the drift set without adapters (a prefix of the base suite's prompts)."""
    items = suites.seen_items(drift_n, settings.seed)
    return DriftReference(settings, items, suites.generate(pipe, items, settings))


def compose_suite(pipe: Any, judge: Judge, adapters: Sequence[Any], *, subject: str, texture: str,
                  color: str | None = None, subject_token: str | None = None, style_token: str | None = None,
                  class_word: str | None = None, train_images: str | Path | None = None, n: int | None = None,
                  drift_n: int = DEFAULT_N["drift"], settings: GenSettings | None = None,
                  progress: Progress | None = None, home: str | Path | None = None,
                  reference: DriftReference | None = None, roles: Roles | None = None,
                  decor: Any = None) -> dict[str, Any]:
    """A subject and a style together: ``adapters`` (spec strings or AdapterSpecs) applied as one mix.

    ``reference``: the drift set's base images from :func:`drift_reference` with the same
    settings and ``drift_n`` (a weight grid generates them once). ``roles``: from
    :func:`resolve_roles` when the caller has read them already (else read here). ``decor``: a
    :class:`studio.text.decor.DecorConfig` applied to the composed prompts (not to the drift set,
    as in the subject and style suites).
    """
    settings = settings or GenSettings()
    suites.check_choice("shape", subject, "subject")
    suites.check_choice("texture", texture)
    if color is not None:
        suites.check_choice("color", color)
    suites._check_count("drift-n", drift_n, 0)
    if n is not None:
        suites._check_count("n", n, 1)
    if not adapters:
        raise StudioError("eval compose: no --adapter given; pass the subject and style adapters (or one that "
                          "carries both)")
    roles = roles or resolve_roles(adapters, subject_token=subject_token, style_token=style_token, class_word=class_word,
                          train_images=train_images, judge=judge, home=home)
    if roles.content_source:
        log.info("compose suite: the style's training content from %s: shapes %s, colours %s", roles.content_source,
                 ", ".join(roles.style_shapes) or "-", ", ".join(roles.style_colors) or "-")
    else:
        log.warning("compose suite: leakage not measured (null): the style's training content is unknown; pass "
                    "--train-images DIR, or train the style with the studio so its adapter records its captions")
    items = compose_items(roles, subject, texture, color=color, n=n, seed=settings.seed)
    log.info("compose suite: %d prompts like %r, %d images", len({it.group for it in items}), items[0].prompt,
             len(items))
    t0 = time.perf_counter()
    if reference is not None and (len(reference.items) != drift_n or reference.settings != settings):
        raise StudioError(f"compose drift reference has {len(reference.items)} images at {reference.settings}; "
                          f"this run asks drift_n={drift_n} at {settings}: make it with the same ones")
    ref = reference if reference is not None else drift_reference(pipe, drift_n, settings)
    from studio.text.pipeline import decor_applied

    with mix_applied(pipe, adapters, home):
        with decor_applied(pipe, decor):
            images = suites.generate(pipe, items, settings, progress)
        after = suites.generate(pipe, ref.items, settings)
    seen = suites.read_attributes(images, judge)
    drifted, drift_per_attribute = suites.drift(ref.images, after, ref.items, judge)
    subject_ok = seen["shape"] == subject
    style_ok = seen["texture"] == texture
    both = subject_ok & style_ok
    prompt_ok = np.array([all(seen[a][i] == v for a, v in it.asked.items() if a in ("background", "color"))
                          for i, it in enumerate(items)], dtype=bool)
    result = {
        "suite": "compose", "n": len(items),
        "both": suites._mean(both), "subject_fidelity": suites._mean(subject_ok),
        "style_fidelity": suites._mean(style_ok), "prompt_fidelity": suites._mean(prompt_ok),
        "leakage": compose_leakage(seen, items, roles.style_shapes, roles.style_colors),
        "base_drift": drifted, "drift_by_attribute": drift_per_attribute,
        "adapters": [str(a) for a in adapters],
        "decor": None if decor is None else {"unwanted": list(decor.unwanted), "alpha": decor.alpha, "rows": decor.rows},
        "triggers": {"subject": f"{roles.subject_token} {roles.class_word}", "style": roles.style_token},
        "leakage_content": {"shapes": list(roles.style_shapes), "colors": list(roles.style_colors),
                            "source": roles.content_source or None},
        # what the judge read instead, when it missed: the commonest shapes and textures
        "shape_seen": dict(Counter(seen["shape"].tolist()).most_common()),
        "texture_seen": dict(Counter(seen["texture"].tolist()).most_common()),
        "by_prompt": suites.by_prompt(items, both=both, subject=subject_ok, style=style_ok, prompt=prompt_ok),
    }
    suites._timed("compose", len(items) + (drift_n if reference is not None else 2 * drift_n), t0)
    return result


# ----------------------------------------------------------------------------- CLI


def add_parser(esub: argparse._SubParsersAction) -> None:
    """Register ``studio eval compose`` on the ``studio eval`` group."""
    from studio.evals.cli import _common, _generation

    c = esub.add_parser(
        "compose", help="a subject and a style together: a mix of adapters, or one that carries both",
        description="Prompts 'a SUBJ CLASS on a BG background in STYLE style' and 'a COLOR SUBJ CLASS in STYLE "
                    "style' with every --adapter applied as one mix (weights, windows: the studio generate spec); "
                    "the judge checks the subject's shape and the style's texture in each image.")
    _common(c)
    _generation(c, f"images, cycling over the prompts (default {PER_PROMPT} per prompt)", None)
    c.add_argument("--adapter", action="append", required=True, metavar="SPEC",
                   help="an adapter of the mix, NAME_OR_PATH[:WEIGHT][@START-END] (repeat for each)")
    c.add_argument("--subject", required=True, metavar="SHAPE", help="the subject's shape, e.g. heart")
    c.add_argument("--texture", required=True, help="the texture the style should produce, e.g. checkered")
    c.add_argument("--color", default=None, help="the subject's colour, when it has one (asked where no colour is)")
    c.add_argument("--subject-token", default=None,
                   help="the subject's trigger (default: the metadata of the subject adapter)")
    c.add_argument("--style-token", default=None,
                   help="the style's trigger (default: the metadata of the style adapter)")
    c.add_argument("--class-word", default=None,
                   help="class noun after the subject trigger (default: metadata studio.class_word, else 'shape')")
    c.add_argument("--train-images", default=None, metavar="DIR",
                   help="the style's training set (captions or images): its shapes/colours for leakage "
                        "(default: the style adapter's recorded captions)")
    c.add_argument("--drift-n", type=int, default=DEFAULT_N["drift"],
                   help=f"base prompts without triggers, for base_drift (default {DEFAULT_N['drift']}; 0: skip)")
    from studio.commands.generate import add_decor_args

    add_decor_args(c)
    c.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``studio eval compose``: cheap checks first (a typo should not cost a model load), then the suite."""
    from studio.commands.generate import decor_from_args, load_from_args
    from studio.evals.cli import _emit, _load_judge
    from studio.mixing import parse_spec

    suites.check_choice("shape", args.subject, "subject")
    suites.check_choice("texture", args.texture)
    if args.color is not None:
        suites.check_choice("color", args.color)
    specs = [parse_spec(a) for a in args.adapter]
    judge = _load_judge(args.judge)
    # every adapter exists and every role is known before the model loads
    roles = resolve_roles(specs, subject_token=args.subject_token, style_token=args.style_token, class_word=args.class_word,
                  train_images=args.train_images, judge=judge)
    settings = GenSettings(steps=args.steps, guidance=args.guidance, seed=args.seed, batch_size=args.batch_size)
    decor = decor_from_args(args)
    pipe = load_from_args(args)
    result = compose_suite(pipe, judge, specs, subject=args.subject, texture=args.texture, color=args.color,
                           subject_token=args.subject_token, style_token=args.style_token,
                           class_word=args.class_word, train_images=args.train_images, n=args.n,
                           drift_n=args.drift_n, settings=settings, roles=roles, decor=decor)
    return _emit(result, args.json)
