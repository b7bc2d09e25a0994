"""The Gradio studio: Train, Library and Generate tabs on the service layer's job manager.

``build_app(base)`` returns a ``gr.Blocks`` without starting a server; ``serve(...)`` launches
it (127.0.0.1:7860, no share link unless asked). Every tab is a :class:`Panel` in ``PANELS``,
built in ``order``: a later method (quantization, DECOR, content/style, retrieval) adds a tab
with one ``@panel(...)`` function in its own module, named in ``PANEL_MODULES``, and touches
nothing else here. Panels meet through :class:`UIContext`: components they share, page-load
hooks, and wiring that runs once every panel exists (the Library's "Use in Generate").

The page never runs a job itself: it submits to :func:`studio.service.default_manager`, which
queues jobs on one worker thread, and polls the job's status with a timer. The job id is kept
in the browser's local storage, so a reloaded page re-attaches to its job's progress.
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import importlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from studio import service
from studio.errors import StudioError
from studio.home import studio_home

log = logging.getLogger(__name__)

# bundled sample sets (the same folder as studio.loading.ASSETS, without importing torch here)
SAMPLES_DIR = Path(__file__).resolve().parents[1] / "assets" / "samples"
POLL_S = 1.0
MIX_SLOTS = 4  # adapter rows in the Generate tab
SWEEP_WEIGHTS = "0, 0.25, 0.5, 0.75, 1"

# modules whose ``@panel`` functions add tabs (each method's issue adds its own); a module that
# does not exist yet is skipped, as `studio` skips subcommand modules not built yet
PANEL_MODULES: tuple[str, ...] = ("studio.ui_jobs",)

CSS = """
.studio-progress { background: #e5e7eb; border-radius: 4px; height: 10px; width: 100%; overflow: hidden; }
.studio-progress > div { height: 10px; border-radius: 4px; transition: width 0.4s; }
/* gradio stretches a gallery of one image over the whole width: keep tiles thumbnail-sized */
.studio-tiles .grid-container { grid-template-columns: repeat(auto-fill, minmax(110px, 150px)) !important; }
"""


# ---- the panel registry ----------------------------------------------------------------------------
@dataclasses.dataclass
class UIContext:
    """What a panel needs: the job manager, the default base model, and what panels share."""

    manager: service.JobManager
    base: str
    shared: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. "tabs", "generate.add_adapter"
    tab: Any = None  # the gr.Tab being built (panels hook its .select)
    loads: list[tuple[Callable[..., Any], list[Any], list[Any]]] = dataclasses.field(default_factory=list)
    wiring: list[Callable[[], None]] = dataclasses.field(default_factory=list)

    def on_load(self, fn: Callable[..., Any], inputs: list[Any], outputs: list[Any]) -> None:
        """Run ``fn`` when a page (re)loads: restore a job, refresh a list."""
        self.loads.append((fn, inputs, outputs))

    def after_build(self, wire: Callable[[], None]) -> None:
        """Call ``wire()`` once every panel is built (to connect to another panel's components)."""
        self.wiring.append(wire)


PanelBuilder = Callable[[UIContext], None]


@dataclasses.dataclass(frozen=True)
class Panel:
    """One tab: ``build(ctx)`` is called inside its ``gr.Tab``."""

    key: str
    label: str
    build: PanelBuilder
    order: int = 100


PANELS: dict[str, Panel] = {}


def panel(key: str, label: str, order: int = 100) -> Callable[[PanelBuilder], PanelBuilder]:
    """Register ``build(ctx)`` as a tab; it is called inside its ``gr.Tab`` when the app is built."""
    def wrap(build: PanelBuilder) -> PanelBuilder:
        PANELS[key] = Panel(key, label, build, order)
        return build

    return wrap


def load_panel_modules(names: Sequence[str] = PANEL_MODULES) -> None:
    """Import the modules that register extra panels (missing ones are skipped)."""
    for name in names:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                continue
            raise


def sample_sets() -> list[str]:
    """Names of the bundled sample sets (folders under assets/samples)."""
    if not SAMPLES_DIR.is_dir():
        return []
    return sorted(p.name for p in SAMPLES_DIR.iterdir() if p.is_dir() and not p.name.startswith("."))


# ---- views of a job (pure functions of service.status dicts) ---------------------------------------
def job_markdown(st: dict[str, Any] | None) -> str:
    """One or two lines on a job: state, step/total, loss, ETA, error, where the result went."""
    if not st:
        return "No job yet."
    label = f"`{st['label']}`"
    state = st["state"]
    if state == "queued":
        ahead = st.get("position") or 0
        waiting = f"{ahead} job{'s' if ahead != 1 else ''} ahead" if ahead else "next in line"
        return f"**Queued** {label}: {waiting} (jobs run one at a time)."
    parts = [f"**{state.capitalize()}** {label}"]
    if st["total"]:
        parts.append(f"step {st['step']}/{st['total']}")
    elif st.get("phase"):
        parts.append(st["phase"])
    if st.get("loss") is not None:
        parts.append(f"loss {st['loss']:.4f}")
    if state == "running" and st["total"]:
        parts.append(f"ETA {service.format_eta(st.get('eta_s'))}")
    if st.get("elapsed_s") is not None and state != "running":
        parts.append(f"took {service.format_eta(st['elapsed_s'])}")
    text = " · ".join(parts)
    if state == "running" and st.get("messages") and not st["total"]:
        text += f"\n\n{st['messages'][-1]}"
    if st.get("error") and state in ("failed", "cancelled"):
        text += f"\n\n{'**Error:** ' if state == 'failed' else ''}{st['error']}"
    result = st.get("result") if isinstance(st.get("result"), dict) else {}
    if state == "done" and result.get("library_name"):
        text += f"\n\nAdded to the library as `{result['library_name']}`: see the Library tab."
    elif state == "done" and result.get("out"):
        text += f"\n\nSaved to `{result['out']}`."
    return text


def progress_html(st: dict[str, Any] | None) -> str:
    """A progress bar; its state and fraction are also attributes, for tests and screen readers."""
    frac = 0.0 if not st else max(0.0, min(1.0, float(st.get("progress") or 0.0)))
    state = (st or {}).get("state", "idle")
    color = {"failed": "#d9534f", "cancelled": "#999", "done": "#5cb85c"}.get(state, "#4a90d9")
    return (f'<div class="studio-progress" role="progressbar" aria-valuemin="0" aria-valuemax="100" '
            f'aria-valuenow="{frac * 100:.0f}" data-state="{state}" data-progress="{frac:.3f}">'
            f'<div style="background:{color};width:{frac * 100:.1f}%"></div></div>')


def busy_note(manager: service.JobManager, kind: str | None = None) -> str:
    """What the studio is doing for others, for a page with no job of its own ("" when idle)."""
    active = manager.active(kind)
    if not active:
        return ""
    running = [j for j in active if j["state"] == "running"]
    now = ", ".join(f"`{j['label']}`" + (f" (step {j['step']}/{j['total']})" if j["total"] else "") for j in running)
    queued = len(active) - len(running)
    text = f"The studio is busy: {now or 'starting'}" + (f", {queued} more queued" if queued else "")
    return text + ". A job you start now waits its turn."


def job_log(st: dict[str, Any] | None, lines: int = 40) -> str:
    """The job's last messages, one a line."""
    return "\n".join((st or {}).get("messages", [])[-lines:])


def _status_or_none(manager: service.JobManager, job_id: str | None) -> dict[str, Any] | None:
    if not job_id:
        return None
    try:
        return manager.status(job_id)
    except StudioError:
        return None


def cancel_job(manager: service.JobManager, job_id: str | None) -> None:
    """A page's Cancel/Stop button: cancel the job if there is one; a refusal is a warning on the page."""
    import gradio as gr

    if job_id:
        try:
            manager.cancel(job_id)
        except StudioError as exc:
            gr.Warning(str(exc))


def _select_handler(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark ``fn``'s ``evt`` argument as gr.SelectData.

    gradio passes event data by type hint (typing.get_type_hints); under ``from __future__ import
    annotations`` a hint naming the lazily imported ``gr`` cannot be resolved, and gradio would
    silently call the function without it.
    """
    import gradio as gr

    fn.__annotations__ = {"evt": gr.SelectData}
    return fn


def _caption(path: str) -> str:
    return Path(path).stem


def _warn_all(lines: Sequence[str], limit: int = 5) -> None:
    """Show up to ``limit`` lines as toasts (the page's own text has the full list)."""
    import gradio as gr

    for line in lines[:limit]:
        gr.Warning(line)


# ---- Train -------------------------------------------------------------------------------------------
def form_defaults(base: str, kind: str, method: str) -> dict[str, Any]:
    """Steps, rank and learning rate the recipe would pick, shown in the form instead of blanks."""
    from studio.adapters.methods import get_method
    from studio.trainers.recipes import MICRO_DEFAULTS, REAL_DEFAULTS, recipe_lr

    micro = (base or "micro").strip() == "micro"
    recipe = (MICRO_DEFAULTS if micro else REAL_DEFAULTS)[kind]
    m = get_method(method)
    # the recipe's own learning rate (micro scales the method's; the form once showed, and so trained at,
    # the unscaled one: half the CLI's learning rate)
    return {"steps": recipe["steps"], "rank": recipe.get("rank", m.default_rank), "lr": recipe_lr(m, kind, micro)}


_FLOAT_FIELDS = ("prior_weight", "prior_uncond", "trigger_lr", "snr_gamma", "caption_dropout", "tag_dropout", "ema")
_INT_FIELDS = ("batch", "resolution", "class_images", "sample_every", "checkpoint_every", "seed", "warmup",
               "transform_rank", "residual_rank")
_ZERO_IS_DEFAULT = ("batch", "resolution", "transform_rank", "residual_rank")
# fields of one method only: the form drops them for the others (TrainConfig refuses them there)
_METHOD_FIELDS = {"transform_rank": "tlora", "residual": "tlora", "residual_rank": "tlora"}


def train_config(*, source: str, sample_set: str, uploads: Sequence[str] | None, kind: str, name: str, token: str,
                 class_word: str, method: str = "lora", steps: float | None, rank: float | None, lr: float | None,
                 base: str, advanced: dict[str, Any] | None = None) -> tuple[Any, list[str]]:
    """The TrainConfig for the form's values, and warnings about rejected uploads.

    Uploaded images are validated and copied to STUDIO_HOME/uploads/<name>-<time>/; the run
    works in STUDIO_HOME/runs/<name>/ (numbered when taken) and its adapter is added to the
    library when it finishes. Empty or zero numbers mean "the recipe's default".
    """
    from studio.adapters.methods import get_method
    from studio.trainers.config import TrainConfig

    get_method(method or "lora")  # an unknown method fails here, not minutes later on the worker
    warnings: list[str] = []
    name = service.safe_name(name or "")
    if source == "upload":
        if not uploads:
            raise StudioError("no images uploaded: add PNG, JPEG or WebP files, or pick a bundled sample set")
        stem = name or f"{kind}-upload"
        staged = service.stage_uploads(uploads, service.uploads_dir() / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")
        warnings += staged.warnings()
        images = staged.folder
    else:
        if not sample_set or sample_set not in sample_sets():
            known = ", ".join(sample_sets()) or "none"
            raise StudioError(f"sample set {sample_set!r}: not found; choose one of {known}")
        images = SAMPLES_DIR / sample_set
        stem = name or sample_set
    out = service.unique_run_dir(stem)

    def num(v: float | None, cast: type) -> Any:
        return None if v in (None, "", 0) else cast(v)

    fields: dict[str, Any] = {
        "kind": kind, "images": str(images), "base": (base or "micro").strip(), "out": str(out), "name": out.name,
        "token": (token or "sks").strip(), "class_word": (class_word or "").strip(), "method": method or "lora",
        "steps": num(steps, int), "rank": num(rank, int), "lr": num(lr, float),
    }
    for k, v in (advanced or {}).items():
        if v is None or v == "" or (k in _ZERO_IS_DEFAULT and not v) or v == "recipe default":
            continue
        if k in _METHOD_FIELDS and _METHOD_FIELDS[k] != (method or "lora"):
            continue
        if k == "sample_prompts":
            v = [line.strip() for line in str(v).splitlines() if line.strip()]
        elif v in ("on", "off"):
            v = v == "on"
        elif isinstance(v, str):
            v = v.strip()
            if not v:
                continue
            if k in _FLOAT_FIELDS:
                try:
                    v = float(v)
                except ValueError:
                    raise StudioError(f"{k.replace('_', ' ')}: {v!r} is not a number") from None
        fields[k] = int(v) if k in _INT_FIELDS else v
    return TrainConfig.from_dict(fields, source="train form"), warnings


def _set_preview(name: str | None) -> list[tuple[str, str]]:
    if not name or not (SAMPLES_DIR / name).is_dir():
        return []
    return [(str(p), p.stem) for p in sorted((SAMPLES_DIR / name).glob("*.png"))[:12]]


def _kind_of(set_name: str | None) -> str:
    return "style" if (set_name or "").startswith("style") else "subject"


@panel("train", "Train", order=10)
def _train_panel(ctx: UIContext) -> None:
    import gradio as gr

    from studio.adapters.methods import methods

    sets = sample_sets()
    first = next((s for s in sets if _kind_of(s) == "subject"), sets[0] if sets else None)
    first_kind = _kind_of(first)
    defaults = form_defaults(ctx.base, first_kind, "lora")
    job_id = gr.BrowserState(None, storage_key="studio-train-job")
    shown = gr.State([])  # sample paths already in the gallery (no flicker on every poll)
    with gr.Row():
        with gr.Column(scale=1):
            source = gr.Radio([("Bundled sample set", "sample"), ("Upload images", "upload")], value="sample",
                              label="Training images", elem_id="train-source")
            sample_set = gr.Dropdown(sets, value=first, label="Sample set", elem_id="train-sample-set")
            uploads = gr.File(file_count="multiple", file_types=["image", ".txt"], visible=False,
                              elem_id="train-uploads",
                              label=f"Images (at most {service.MAX_UPLOAD_FILES}, "
                                    f"{service.MAX_UPLOAD_BYTES // 2**20} MB each; NAME.txt captions optional)")
            upload_note = gr.Markdown("", elem_id="upload-note")
            preview = gr.Gallery(label="Set preview", columns=6, height=140, allow_preview=False,
                                 value=_set_preview(first))
            with gr.Row():
                kind = gr.Radio(["subject", "style"], value=first_kind, label="Kind")
                method = gr.Dropdown(sorted(methods()), value="lora", label="Method", elem_id="train-method")
                name = gr.Textbox(label="Adapter name", placeholder="default: the set's name")
            with gr.Row():
                token = gr.Textbox("sks", label="Trigger word")
                class_word = gr.Textbox(label="Class word (subjects)", placeholder="e.g. dog; default: shape on micro")
            with gr.Row():
                steps = gr.Number(defaults["steps"], label="Steps", precision=0, minimum=0, elem_id="train-steps")
                rank = gr.Number(defaults["rank"], label="Rank", precision=0, minimum=0)
                lr = gr.Number(defaults["lr"], label="Learning rate", minimum=0, elem_id="train-lr")
            with gr.Accordion("Advanced", open=False, elem_id="train-advanced"):
                base = gr.Textbox(ctx.base, label="Base model", info="micro, a diffusers folder or a .safetensors file")
                with gr.Row():
                    targets = gr.Dropdown(["recipe default", "attention", "attention+resnet", "all"],
                                          value="recipe default", label="Layers")
                    text_encoder = gr.Checkbox(False, label="Also train the text encoder")
                with gr.Row():
                    batch = gr.Number(None, label="Batch size (0: recipe default)", precision=0, minimum=0,
                                      elem_id="train-batch")
                    resolution = gr.Number(None, label="Resolution (0: native)", precision=0, minimum=0)
                    seed = gr.Number(0, label="Seed", precision=0)
                with gr.Row():
                    prior = gr.Checkbox(True, label="Prior preservation (subjects)", elem_id="train-prior")
                    class_images = gr.Number(50, label="Class images", precision=0, minimum=1)
                    scheduler = gr.Dropdown(["constant", "cosine", "linear"], value="constant", label="LR schedule")
                with gr.Row():
                    # numbers where 0 is a real setting are text fields: an empty gr.Number arrives as 0
                    prior_weight = gr.Textbox(label="Prior weight", placeholder="recipe default",
                                              elem_id="train-prior-weight")
                    prior_target = gr.Dropdown(["recipe default", "base", "noise"], value="recipe default",
                                               label="Prior target", elem_id="train-prior-target",
                                               info="base: the base model's own prediction; noise: DreamBooth's")
                    prior_uncond = gr.Textbox(label="Prior on the empty prompt (0-1)", placeholder="recipe default",
                                              elem_id="train-prior-uncond")
                    class_prompt = gr.Textbox(label="Class prompt", placeholder="default: a CLASS-WORD; varied on micro")
                with gr.Row():
                    train_trigger = gr.Dropdown(["recipe default", "on", "off"], value="recipe default",
                                                label="Learn the trigger's embedding", elem_id="train-trigger")
                    trigger_lr = gr.Textbox(label="Trigger learning rate", placeholder="recipe default")
                    snr_gamma = gr.Textbox(label="Min-SNR gamma (0: off)", placeholder="5")
                    ema = gr.Textbox(label="Weight average decay (EMA; 0: off)", placeholder="recipe default",
                                     elem_id="train-ema")
                with gr.Row():
                    subject_word = gr.Textbox(label="Subject word in captions", elem_id="train-subject-word",
                                              placeholder="e.g. rex; replaced by TRIGGER CLASS (found on micro)")
                    caption_dropout = gr.Textbox(label="Caption dropout (0-1)", placeholder="recipe default",
                                                 elem_id="train-caption-dropout")
                    tag_dropout = gr.Textbox(label="Tag dropout (0-1, comma-separated captions)",
                                             placeholder="recipe default", elem_id="train-tag-dropout")
                with gr.Row():  # read only when the method is tlora (docs/tlora.md)
                    transform_rank = gr.Number(None, label="TLoRA transform rank (0: default 4)", precision=0,
                                               minimum=0, elem_id="train-transform-rank")
                    residual = gr.Dropdown(["recipe default", "lora", "tr"], value="recipe default",
                                           label="TLoRA residual", elem_id="train-residual",
                                           info="lora: TLoRA* (default); tr: a tensor ring")
                    residual_rank = gr.Number(None, label="TLoRA residual rank (0: default 4)", precision=0,
                                              minimum=0, elem_id="train-residual-rank")
                with gr.Row():
                    sample_every = gr.Number(0, label="Samples every N steps (0: at the end)", precision=0, minimum=0)
                    checkpoint_every = gr.Number(50, label="Checkpoint every N steps", precision=0, minimum=0)
                sample_prompts = gr.Textbox(label="Sample prompts", lines=2, elem_id="train-sample-prompts",
                                            placeholder="one per line; default: the trigger in a few contexts")
            with gr.Row():
                start = gr.Button("Start training", variant="primary", elem_id="train-start")
                cancel = gr.Button("Cancel", variant="stop", interactive=False, elem_id="train-cancel")
        with gr.Column(scale=1):
            status = gr.Markdown("No job yet.", elem_id="train-status")
            bar = gr.HTML(progress_html(None), elem_id="train-progress")
            samples = gr.Gallery(label="Samples", columns=4, height=320, object_fit="contain", elem_id="train-samples",
                                 elem_classes=["studio-tiles"])
            log_box = gr.Textbox(label="Log", lines=8, max_lines=8, interactive=False, autoscroll=True)
    timer = gr.Timer(POLL_S, active=False)
    private = {"show_progress": "hidden", "api_visibility": "private"}

    def on_source(src: str):
        sample = src == "sample"
        return gr.update(visible=sample), gr.update(visible=not sample), gr.update(visible=sample), ""

    source.change(on_source, source, [sample_set, uploads, preview, upload_note], **private)
    sample_set.change(lambda s: (_set_preview(s), _kind_of(s)), sample_set, [preview, kind], **private)

    shown_defaults = gr.State(defaults)

    def on_defaults(base_: str, kind_: str, method_: str, *current_and_shown: Any):
        """New recipe defaults, in the fields that still hold the old ones (typed values stay)."""
        *current, before = current_and_shown
        after = form_defaults(base_, kind_, method_)
        keys = ("steps", "rank", "lr")
        kept = [after[k] if value in (None, before[k]) else gr.skip() for k, value in zip(keys, current, strict=True)]
        return (*kept, after)

    for trigger in (kind.change, method.change, base.blur):
        trigger(on_defaults, [base, kind, method, steps, rank, lr, shown_defaults], [steps, rank, lr, shown_defaults],
                **private)

    def on_upload(files: list[str] | None):
        """Check the files as soon as they arrive, so bad ones are named before Start."""
        if not files:
            return ""
        check = service.check_uploads(files)
        _warn_all(check.warnings())
        return check.summary()

    uploads.change(on_upload, uploads, upload_note, **private)

    views = [status, bar, samples, log_box, timer, cancel, shown]

    def view(jid: str | None, seen: list[str] | None):
        """The page's own job (others' jobs only as a note: Start stays open, jobs queue)."""
        st = _status_or_none(ctx.manager, jid)
        active = bool(st and st["state"] in ("queued", "running"))
        new_samples = st["samples"] if st else []
        gallery = gr.skip() if new_samples == seen else [(p, _caption(p)) for p in new_samples]
        text = job_markdown(st)
        others = "" if active else busy_note(ctx.manager, "train")
        if others:
            text += f"\n\n{others}"
        # an idle page polls too while others train, so its note stays current
        return (text, progress_html(st), gallery, job_log(st), gr.Timer(active=active or bool(others)),
                gr.update(interactive=active), new_samples)

    form = {"source": source, "sample_set": sample_set, "uploads": uploads, "kind": kind, "name": name,
            "token": token, "class_word": class_word, "method": method, "steps": steps, "rank": rank, "lr": lr,
            "base": base}
    advanced = {"targets": targets, "text_encoder": text_encoder, "batch": batch, "resolution": resolution,
                "seed": seed, "prior": prior, "class_images": class_images, "scheduler": scheduler,
                "sample_every": sample_every, "checkpoint_every": checkpoint_every, "sample_prompts": sample_prompts,
                "prior_weight": prior_weight, "prior_target": prior_target, "prior_uncond": prior_uncond,
                "class_prompt": class_prompt,
                "train_trigger": train_trigger, "trigger_lr": trigger_lr, "snr_gamma": snr_gamma, "ema": ema,
                "subject_word": subject_word, "caption_dropout": caption_dropout, "tag_dropout": tag_dropout,
                "transform_rank": transform_rank, "residual": residual, "residual_rank": residual_rank}

    def on_start(values: dict):
        v = {k: values[c] for k, c in form.items()}
        adv = {k: values[c] for k, c in advanced.items()}
        if v["kind"] != "subject":
            adv["prior"] = None  # prior preservation is a subject recipe's
        try:
            cfg, warns = train_config(**v, advanced=adv)
            _warn_all(warns)
            jid = ctx.manager.submit_train(cfg)
        except StudioError as exc:
            gr.Warning(str(exc))
            return (gr.skip(), f"**Error:** {exc}", *[gr.skip()] * (len(views) - 1))
        return (jid, *view(jid, None))

    start.click(on_start, {*form.values(), *advanced.values()}, [job_id, *views], concurrency_limit=None,
                api_name="train")
    timer.tick(view, [job_id, shown], views, show_progress="hidden", concurrency_limit=None, api_name="train_status")

    def on_cancel(jid: str | None, seen: list[str]):
        cancel_job(ctx.manager, jid)
        return view(jid, seen)

    cancel.click(on_cancel, [job_id, shown], views, concurrency_limit=None, api_name="train_cancel")

    ctx.on_load(lambda jid: view(jid, None), [job_id], views)


# ---- Library -----------------------------------------------------------------------------------------
def adapter_markdown(entry: dict[str, Any]) -> str:
    """An adapter's metadata as a two-column table."""
    from studio.library import format_time

    cfg = entry.get("train_config") or {}
    file = Path(entry["file"])
    size = f"{file.stat().st_size / 2**20:.1f} MB" if file.is_file() else "missing"
    rows = [("Name", entry["name"]), ("Kind", entry.get("kind")), ("Trigger", entry.get("trigger")),
            ("Method", entry.get("method")), ("Base", entry.get("base")), ("Family", entry.get("family")),
            ("Created", format_time(entry["created"]) if entry.get("created") else None),
            ("Description", entry.get("description")), ("Steps", cfg.get("steps")), ("Rank", cfg.get("rank")),
            ("Learning rate", cfg.get("lr")), ("Class word", cfg.get("class_word")),
            ("File", f"{file.name} ({size})")]
    lines = [f"| Adapter | **{html.escape(rows[0][1])}** |", "|---|---|"] + \
        [f"| {k} | {html.escape(str(v))} |" for k, v in rows[1:] if v not in (None, "")]
    return "\n".join(lines)


def _no_samples_cover() -> str:
    """A plain grey cover for adapters without sample images (drawn once, kept under STUDIO_HOME/ui)."""
    path = ui_dir() / "no-samples.png"
    if not path.is_file():
        from PIL import Image, ImageDraw

        path.parent.mkdir(parents=True, exist_ok=True)
        im = Image.new("RGB", (128, 128), (225, 225, 225))
        ImageDraw.Draw(im).text((22, 58), "no samples", fill=(110, 110, 110))
        tmp = path.with_suffix(".tmp.png")
        im.save(tmp)
        tmp.replace(path)
    return str(path)


def ui_dir() -> Path:
    """Files the UI draws itself (placeholder covers): STUDIO_HOME/ui."""
    return studio_home() / "ui"


@panel("library", "Library", order=20)
def _library_panel(ctx: UIContext) -> None:
    import gradio as gr

    entries = gr.State([])
    selected = gr.State(None)  # the selected adapter's name
    with gr.Row():
        query = gr.Textbox(label="Search", placeholder="name or trigger word", scale=4, elem_id="library-search")
        refresh = gr.Button("Refresh", scale=1)
    summary = gr.Markdown("", elem_id="library-summary")
    with gr.Row():
        covers = gr.Gallery(label="Adapters", columns=4, height=420, allow_preview=False, scale=2,
                            elem_id="library-gallery", elem_classes=["studio-tiles"])
        with gr.Column(scale=1):
            details = gr.Markdown("Select an adapter to see its metadata and samples.", elem_id="library-details")
            detail_samples = gr.Gallery(label="Samples", columns=3, height=200, object_fit="contain",
                                        elem_classes=["studio-tiles"])
            with gr.Row():
                use = gr.Button("Use in Generate", variant="primary", interactive=False, elem_id="library-use")
                download = gr.DownloadButton("Download .safetensors", interactive=False, elem_id="library-download")
            with gr.Row():
                new_name = gr.Textbox(label="New name", scale=3, elem_id="library-new-name")
                rename = gr.Button("Rename", interactive=False, scale=1, elem_id="library-rename")
            delete = gr.Button("Delete", variant="stop", interactive=False, elem_id="library-delete")
            with gr.Row(visible=False) as confirm_row:
                confirm = gr.Button("Delete for good", variant="stop", elem_id="library-delete-confirm")
                keep = gr.Button("Keep it")
    with gr.Accordion("Import adapter files", open=False):
        imports = gr.File(file_count="multiple", file_types=[".safetensors"], elem_id="library-import",
                          label=f"Adapter .safetensors files (studio, diffusers, kohya, LyCORIS; at most "
                                f"{service.MAX_ADAPTER_FILES} at once)")
        import_note = gr.Markdown("", elem_id="library-import-note")
    private = {"show_progress": "hidden", "api_visibility": "private"}

    def load(q: str):
        try:
            found = service.list_adapters(q or "")
        except StudioError as exc:
            return [], [], f"**Error:** {exc}"
        cover = [(e["samples"][-1] if e["samples"] else _no_samples_cover(),
                  f"{e['name']} · {e['trigger'] or '-'} ({e['kind'] or '?'})") for e in found]
        text = (f"{len(found)} adapter{'s' if len(found) != 1 else ''}"
                + (f" matching `{q}`" if q else "") if found else
                f"No adapter{' matches' if q else ' yet'}: train one in the Train tab, or import a file below.")
        return found, cover, text

    def cleared():
        """The detail column with nothing selected."""
        return ("Select an adapter to see its metadata and samples.", None, None,
                gr.update(interactive=False), gr.update(value=None, interactive=False), "",
                gr.update(interactive=False), gr.update(interactive=False), gr.update(visible=False))

    listing = [entries, covers, summary]
    detail = [details, detail_samples, selected, use, download, new_name, rename, delete, confirm_row]

    @_select_handler
    def select(found: list[dict], evt):
        if evt.index is None or evt.index >= len(found):
            return cleared()
        e = found[evt.index]
        file = e["file"] if Path(e["file"]).is_file() else None
        return (adapter_markdown(e), [(p, _caption(p)) for p in e["samples"]], e["name"],
                gr.update(interactive=True), gr.update(value=file, interactive=file is not None), e["name"],
                gr.update(interactive=True), gr.update(interactive=True), gr.update(visible=False))

    def reload(q: str, message: str = ""):
        found, cover, text = load(q)
        return (found, cover, f"{message}\n\n{text}" if message else text, *cleared())

    def on_rename(old: str | None, new: str, q: str):
        from studio.library import Library

        if not old:
            return (gr.skip(),) * (len(listing) + len(detail))
        try:
            record = Library().rename(old, (new or "").strip())
        except StudioError as exc:
            gr.Warning(str(exc))
            return (gr.skip(), gr.skip(), f"**Error:** {exc}", *(gr.skip(),) * len(detail))
        return reload(q, f"Renamed `{old}` to `{record.name}`.")

    def on_delete(name_: str | None):
        return gr.update(visible=bool(name_))

    def on_confirm(name_: str | None, q: str):
        from studio.library import Library

        if not name_:
            return reload(q)
        try:
            Library().remove(name_)
        except StudioError as exc:
            gr.Warning(str(exc))
            return reload(q, f"**Error:** {exc}")
        return reload(q, f"Deleted `{name_}`.")

    def on_import(files: list[str] | None, q: str):
        if not files:
            return (gr.skip(),) * (len(listing) + len(detail) + 2)
        added, rejected = service.import_adapters(files)
        lines = [f"{name}: {why}" for name, why in rejected]
        _warn_all(lines)
        note = (f"Imported {', '.join(f'`{n}`' for n in added)}." if added else "Nothing imported.") + \
            ("\n" + "\n".join(f"- {line}" for line in lines) if lines else "")
        return None, *reload(q, note.split("\n")[0])[:len(listing)], *cleared(), note

    outs = [*listing, *detail]
    refresh.click(lambda q: reload(q), query, outs, api_name="library")
    query.submit(lambda q: reload(q), query, outs, api_visibility="private")
    covers.select(select, entries, detail, api_visibility="private")
    rename.click(on_rename, [selected, new_name, query], outs, api_visibility="private")
    delete.click(on_delete, selected, confirm_row, **private)
    keep.click(lambda: gr.update(visible=False), None, confirm_row, **private)
    confirm.click(on_confirm, [selected, query], outs, api_visibility="private")
    imports.upload(on_import, [imports, query], [imports, *outs[:len(listing)], *detail, import_note],
                   api_visibility="private")
    if ctx.tab is not None:  # new adapters appear when the tab is opened again
        ctx.tab.select(lambda q: load(q), query, listing, **private)
    ctx.on_load(lambda q: load(q), [query], listing)

    def wire_use() -> None:
        """The "Use in Generate" button: the Generate panel's add-adapter handler, then that tab."""
        add = ctx.shared.get("generate.add_adapter")
        tabs = ctx.shared.get("tabs")
        if add is None:
            use.visible = False
            return
        fn, inputs, outputs = add
        event = use.click(fn, [selected, *inputs], outputs, **private)
        if tabs is not None:
            event.then(lambda: gr.Tabs(selected="generate"), None, tabs, **private)

    ctx.after_build(wire_use)


# ---- Generate ----------------------------------------------------------------------------------------
def sampling_defaults(base: str) -> dict[str, Any]:
    """Steps and guidance the base model samples with (micro keeps its own), without loading it."""
    from studio.generation import model_defaults

    if (base or "").strip() != "micro":
        return model_defaults(SimpleNamespace())
    from studio.loading import MICRO_DIR

    # model_defaults reads only pipe.studio_source: the micro model's is known without loading it
    return model_defaults(SimpleNamespace(studio_source=SimpleNamespace(kind="micro", path=str(MICRO_DIR))))


def _row_target(name: str | None) -> tuple[str, bool]:
    """A mix row's adapter and whether it is gated: ``gated:NAME`` (what the Auto search fills in)."""
    name = (name or "").strip()
    if name.startswith("gated:"):
        return name[len("gated:"):].strip(), True
    return name, False


def mix_specs(slots: Sequence[Any]) -> list[str]:
    """Spec strings ``NAME:WEIGHT[@START-END]`` of the filled adapter rows.

    ``slots``: (name, weight, start, end) per row, flattened, as the Generate tab's rows hold them. A
    name written ``gated:NAME`` (what the Auto search fills in) is fused with AutoLoRA's gates. A
    name may carry a scope and block weights (``heart:unet:up.1=0.5``, docs/mixing.md); the weight
    and the window are the row's own controls.
    """
    from studio.mixing import AdapterSpec, parse_spec

    specs = []
    for i in range(0, len(slots), 4):
        target, weight, start, end = slots[i:i + 4]
        target, gated = _row_target(target)
        if not target:
            continue
        named = parse_spec(target)
        if named.weight != 1.0 or named.windowed:
            raise StudioError(f"adapter row {target!r}: set its weight and window with the row's slider and "
                              f"fields, not in the name (the name takes a scope and block weights: "
                              f"NAME:unet:up.1=0.5)")
        specs.append(str(AdapterSpec(named.target, float(weight), float(start), float(end), scope=named.scope,
                                     blocks=named.blocks, gated=gated)))
    return specs


def sweep_text(slots: Sequence[Any], which: str | None, weights: str) -> str:
    """The sweep ``SPEC=W1,W2,...`` of the row named ``which`` (default: the first filled row)."""
    from studio.mixing import parse_spec, parse_sweep

    specs = mix_specs(slots)
    if not specs:
        raise StudioError("weight sweep: add an adapter to the mix first; the sweep varies one adapter's weight")
    chosen = next((s for s in specs if which and parse_spec(s).target == which), specs[0])
    text = f"{chosen}={','.join(w.strip() for w in (weights or '').split(',') if w.strip())}"
    parse_sweep(text)  # a clear error for bad weights, before anything is queued
    return text


def parse_prompt_text(prompt: str | None) -> str:
    """The prompt as the model sees it: ``<lora:...>`` tags taken out."""
    from studio.mixing import parse_prompt

    return parse_prompt(prompt or "")[0]


def auto_rows(found: dict[str, Any], gated: bool, slots: Sequence[Any]) -> tuple[list[Any], list[bool], str]:
    """The mix after an Auto search: matching adapters fill free rows (``gated:NAME`` for a gated fusion).

    ``found``: :func:`studio.service.find_adapters`' answer; ``slots``: the rows as the Generate tab
    holds them. Returns (the rows' values, which rows are shown, a Markdown note with every hit,
    its score and what was done with it).
    """
    values = list(slots)
    names = [(values[i] or "").strip() for i in range(0, len(values), 4)]
    plain = {_row_target(n)[0] for n in names if n}
    use_gates = gated and found.get("gates", False)
    lines = ["| adapter | score | |", "|---|---|---|"]
    for hit in found["hits"]:
        target = hit["target"]
        if not hit["match"]:
            what = "not a match: not added" if found.get("note") else \
                f"below the match threshold {found['threshold']:.3f}: not added"
        elif target in plain:
            what = "already in the mix"
        else:
            free = next((i for i, n in enumerate(names) if not n), None)
            if free is None:
                what = f"not added: the mix holds {len(names)} adapters"
            else:
                names[free] = ("gated:" if use_gates else "") + target
                values[4 * free:4 * free + 4] = [names[free], 1.0, 0.0, 1.0]
                plain.add(target)
                what = "added, gated" if use_gates else "added at weight 1"
        lines.append(f"| `{hit['name']}` | {hit['score']:.3f} | {what} |")
    if not found["hits"]:
        lines = ["No adapter found."]
    note = f"Searched the {found['source']}.\n\n" + "\n".join(lines)
    if found.get("note"):
        note += f"\n\n{found['note'][0].upper()}{found['note'][1:]}: no adapter is a match."
    if gated and not found.get("gates", False):
        note += "\n\nNo gate file yet (`studio autolora gates` trains one): the adapters mix with fixed weights."
    elif use_gates:
        note += "\n\nEach gated adapter's mean gate appears in the image parameters (`Gates:`) after generation."
    return values, [bool(n) for n in names], note


def image_caption(info: str) -> str:
    """A gallery caption from an image's infotext: its seed and its adapters."""
    seed = re.search(r"(?:^|, )Seed: (\d+)", info)
    adapters = re.search(r'(?:^|, )Adapters: ("(?:[^"\\]|\\.)*"|[^,]*)', info)
    parts = [f"seed {seed.group(1)}"] if seed else []
    if adapters:
        value = adapters.group(1)
        parts.append(json.loads(value) if value.startswith('"') else value)
    return " · ".join(parts) or (info.splitlines() or [""])[0][:60]


def generation_params(prompt: str | None, negative: str | None, seed: float | None, num: float, steps: float,
                      guidance: float, size: str | None, slots: Sequence[Any], decor: str | None = "",
                      decor_alpha: float | None = None) -> Any:
    """The Generate tab's fields as a checked :class:`studio.generation.GenerationParams`."""
    from studio.generation import GenerationParams, parse_size
    from studio.text.decor import DEFAULT_ALPHA

    w = h = None
    if (size or "").strip():
        w, h = parse_size(size)
    params = GenerationParams(prompt=prompt or "", negative=negative or "",
                              seed=None if seed is None or seed < 0 else int(seed), num=int(num), steps=int(steps),
                              guidance=float(guidance), width=w, height=h, adapters=mix_specs(slots),
                              decor=(decor or "").strip(),
                              decor_alpha=DEFAULT_ALPHA if decor_alpha is None else float(decor_alpha))
    params.validate()
    return params


@panel("generate", "Generate", order=30)
def _generate_panel(ctx: UIContext) -> None:
    import gradio as gr

    from studio.text.decor import DEFAULT_ALPHA

    defaults = sampling_defaults(ctx.base)
    job_id = gr.BrowserState(None, storage_key="studio-generate-job")
    infos = gr.State([])
    with gr.Row():
        with gr.Column(scale=1):
            prompt = gr.Textbox(label="Prompt", lines=2, elem_id="generate-prompt",
                                placeholder="a red circle on a white background",
                                info="<lora:NAME:0.8> in the prompt mixes a library adapter in, as in A1111")
            negative = gr.Textbox(label="Negative prompt", lines=1)
            with gr.Row():
                seed = gr.Number(-1, label="Seed (-1: random)", precision=0, elem_id="generate-seed")
                num = gr.Slider(1, 16, value=4, step=1, label="Images", elem_id="generate-num")
            with gr.Row():
                steps = gr.Slider(1, 150, value=defaults["steps"], step=1, label="Steps", elem_id="generate-steps")
                guidance = gr.Slider(0, 20, value=defaults["guidance"], step=0.5, label="Guidance")
            size = gr.Textbox("", label="Size", placeholder="native, or WxH such as 64x64")
            with gr.Group():
                with gr.Row():
                    pick = gr.Dropdown([], label="Adapter from the library", scale=3, allow_custom_value=True,
                                       elem_id="generate-pick")
                    add = gr.Button("Add", scale=1, elem_id="generate-add")
                rows, slots = [], []
                for i in range(MIX_SLOTS):
                    with gr.Group(visible=False, elem_id=f"mix-row-{i}") as row:
                        with gr.Row(equal_height=True):
                            target = gr.Textbox(label="Adapter", scale=3, elem_id=f"mix-name-{i}",
                                                info="a library name or a file path; NAME:unet:up.1=0.5 adds "
                                                     "a scope and block weights")
                            weight = gr.Slider(-1, 2, value=1.0, step=0.05, label="Weight", scale=4,
                                               elem_id=f"mix-weight-{i}")
                            drop = gr.Button("✕ Remove", scale=1, min_width=60, elem_id=f"mix-remove-{i}")
                        with gr.Row():
                            slot = [target, weight,
                                    gr.Slider(0, 1, value=0.0, step=0.05, label="Active from (fraction of the steps)"),
                                    gr.Slider(0, 1, value=1.0, step=0.05, label="until")]
                    rows.append(row)
                    slots += slot
                    drop.click(lambda: ("", 1.0, 0.0, 1.0, gr.update(visible=False)), None, [*slot, row],
                               show_progress="hidden", api_visibility="private")
                mix_note = gr.Markdown("No adapters: the base model alone.", elem_id="generate-mix")
            with gr.Accordion("Auto: find adapters for the prompt (AutoLoRA)", open=False):
                with gr.Row():
                    auto_k = gr.Slider(1, MIX_SLOTS, value=2, step=1, label="Adapters to find",
                                       elem_id="generate-auto-k")
                    # off by default: on micro the trained gates compose worse than fixed weights (docs/autolora.md)
                    auto_gated = gr.Checkbox(False, label="Gated fusion", elem_id="generate-auto-gated",
                                             info="AutoLoRA's learned gates instead of fixed weights (on micro they "
                                                  "mix worse than weight 1: docs/autolora.md)")
                auto = gr.Button("Find adapters", elem_id="generate-auto")
                auto_note = gr.Markdown("Finds library adapters by what their weights draw, names or not "
                                        "(docs/autolora.md).", elem_id="generate-auto-note")
            with gr.Accordion("Weight sweep and base model", open=False):
                with gr.Row():
                    sweep_which = gr.Dropdown([], label="Adapter to sweep", allow_custom_value=True,
                                              info="default: the first in the mix")
                    sweep_weights = gr.Textbox(SWEEP_WEIGHTS, label="Weights", elem_id="generate-sweep-weights")
                base = gr.Textbox(ctx.base, label="Base model")
            with gr.Accordion("DECOR: keep words out", open=False):
                decor = gr.Textbox("", label="DECOR: unwanted words", elem_id="generate-decor",
                                   placeholder="circle, red",
                                   info="projected out of the prompt embeddings, against leakage (docs/decor.md)")
                decor_alpha = gr.Slider(0, 1, value=DEFAULT_ALPHA, step=0.05, label="DECOR strength (alpha)",
                                        elem_id="generate-decor-alpha")
            with gr.Row():
                go = gr.Button("Generate", variant="primary", elem_id="generate-go")
                sweep = gr.Button("Weight sweep grid", elem_id="generate-sweep")
                stop = gr.Button("Cancel", variant="stop", interactive=False)
            status = gr.Markdown("", elem_id="generate-status")
        with gr.Column(scale=1):
            gallery = gr.Gallery(label="Images", columns=2, height=420, object_fit="contain",
                                 elem_id="generate-gallery")
            params_box = gr.Textbox(label="Parameters", lines=4, interactive=False, buttons=["copy"],
                                    elem_id="generate-params")
    timer = gr.Timer(POLL_S, active=False)
    private = {"show_progress": "hidden", "api_visibility": "private"}
    views = [status, gallery, params_box, timer, stop, infos]

    def names_in_mix(*slot_values: Any) -> list[str]:
        return [n.strip() for n in slot_values[0::4] if (n or "").strip()]

    def on_mix(*slot_values: Any):
        """The mix as spec strings (what the job gets), and the sweep's choices."""
        names = names_in_mix(*slot_values)
        try:
            specs = mix_specs(slot_values)
        except StudioError as exc:
            note = f"**Error:** {exc}"
        else:
            note = ("Mix: " + ", ".join(f"`{s}`" for s in specs)) if specs else "No adapters: the base model alone."
        return note, gr.update(choices=names, value=names[0] if names else None)

    for c in slots:
        c.change(on_mix, slots, [mix_note, sweep_which], **private)

    def add_adapter(name_: str | None, *slot_values: Any):
        """Fill the first free row with ``name_`` at weight 1 over the whole run."""
        name_ = (name_ or "").strip()
        keep = [gr.skip()] * (5 * MIX_SLOTS)
        if not name_:
            gr.Warning("choose an adapter from the library first")
            return keep
        names = slot_values[0::4]
        free = next((i for i, n in enumerate(names) if not (n or "").strip()), None)
        if free is None:
            gr.Warning(f"the mix holds {MIX_SLOTS} adapters; remove one (✕) before adding another")
            return keep
        out = list(keep)
        out[4 * free:4 * free + 4] = [name_, 1.0, 0.0, 1.0]
        out[4 * MIX_SLOTS + free] = gr.update(visible=True)
        return out

    add.click(add_adapter, [pick, *slots], [*slots, *rows], **private)

    def on_auto(prompt_: str, k: float, gated: bool, *slot_values: Any):
        """Search the adapters for the prompt and put the matching ones in free rows."""
        keep = [gr.skip()] * (5 * MIX_SLOTS)
        try:
            found = service.find_adapters(parse_prompt_text(prompt_), int(k))
        except StudioError as exc:
            gr.Warning(str(exc))
            return (*keep, f"**Error:** {exc}")
        values, shown, note = auto_rows(found, gated, slot_values)
        return (*values, *[gr.update(visible=v) for v in shown], note)

    auto.click(on_auto, [prompt, auto_k, auto_gated, *slots], [*slots, *rows, auto_note],
               api_name="generate_auto", show_progress="minimal")
    ctx.shared["generate.add_adapter"] = (add_adapter, slots, [*slots, *rows])

    def library_names():
        try:
            names = [e["name"] for e in service.list_adapters()]
        except StudioError as exc:
            log.warning("%s", exc)
            names = []
        return gr.update(choices=names, value=names[0] if names else None)

    def view(jid: str | None):
        st = _status_or_none(ctx.manager, jid)
        active = bool(st and st["state"] in ("queued", "running"))
        gal, text, info = gr.skip(), gr.skip(), gr.skip()
        if st and st["state"] == "done" and isinstance(st["result"], dict):
            paths, info = list(st["result"].get("images", [])), list(st["result"].get("parameters", []))
            if st["result"].get("grid"):
                paths.insert(0, st["result"]["grid"])
                info.insert(0, st["result"].get("grid_parameters", ""))
            gal = [(p, ("grid · " if i == 0 and st["result"].get("grid") else "") + image_caption(t))
                   for i, (p, t) in enumerate(zip(paths, info, strict=True))]
            text = info[0] if info else ""
        return job_markdown(st) if st else "", gal, text, gr.Timer(active=active), gr.update(interactive=active), info

    def submit(values: list[Any], sweep_: bool, which: str | None = None, weights: str = ""):
        prompt_, negative_, seed_, num_, steps_, guidance_, size_, base_, decor_, alpha_, *slot_values = values
        try:
            params = generation_params(prompt_, negative_, seed_, num_, steps_, guidance_, size_, slot_values,
                                       decor_, alpha_)
            grid = sweep_text(slot_values, which, weights) if sweep_ else None
            jid = ctx.manager.submit_generate(params, base=(base_ or ctx.base).strip(), sweep=grid)
        except StudioError as exc:
            gr.Warning(str(exc))
            return (gr.skip(), f"**Error:** {exc}", *[gr.skip()] * (len(views) - 1))
        return (jid, *view(jid))

    inputs = [prompt, negative, seed, num, steps, guidance, size, base, decor, decor_alpha, *slots]
    go.click(lambda *v: submit(list(v), False), inputs, [job_id, *views], concurrency_limit=None,
             api_name="generate")
    prompt.submit(lambda *v: submit(list(v), False), inputs, [job_id, *views], concurrency_limit=None,
                  api_visibility="private")
    sweep.click(lambda which, weights, *v: submit(list(v), True, which, weights), [sweep_which, sweep_weights, *inputs],
                [job_id, *views], concurrency_limit=None, api_name="generate_sweep")
    timer.tick(view, job_id, views, show_progress="hidden", concurrency_limit=None, api_name="generate_status")

    def on_stop(jid: str | None):
        cancel_job(ctx.manager, jid)
        return view(jid)

    stop.click(on_stop, job_id, views, concurrency_limit=None, api_name="generate_cancel")

    @_select_handler
    def select(info: list[str], evt):
        return info[evt.index] if info and evt.index is not None and evt.index < len(info) else ""

    gallery.select(select, infos, params_box, api_visibility="private")
    if ctx.tab is not None:  # adapters trained since the page loaded
        ctx.tab.select(library_names, None, pick, **private)
    ctx.on_load(view, [job_id], views)
    ctx.on_load(library_names, [], [pick])


# ---- the app -----------------------------------------------------------------------------------------
def build_app(base: str = "micro", manager: service.JobManager | None = None,
              panels: Sequence[str] | None = None) -> Any:
    """The studio as a ``gr.Blocks`` (not launched). ``panels`` picks tabs by key (default: all)."""
    import gradio as gr

    load_panel_modules()
    ctx = UIContext(manager=manager or service.default_manager(), base=base)
    chosen = sorted((p for p in PANELS.values() if panels is None or p.key in panels), key=lambda p: p.order)
    # delete_cache: gradio's copies of uploads and shown images older than a day go, hourly
    with gr.Blocks(title="diffusion-studio", delete_cache=(3600, 86400)) as demo:
        gr.Markdown("## diffusion-studio\nTrain subject and style adapters, keep them, generate with them. "
                    f"Base model: `{base}`.")
        with gr.Tabs() as tabs:
            ctx.shared["tabs"] = tabs
            for p in chosen:
                with gr.Tab(p.label, id=p.key) as tab:
                    ctx.tab = tab
                    p.build(ctx)
                ctx.tab = None
        for wire in ctx.wiring:
            wire()
        for fn, inputs, outputs in ctx.loads:
            demo.load(fn, inputs, outputs, show_progress="hidden", api_visibility="private")
    demo.studio_context = ctx
    return demo


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `python app.py` and `studio ui`."""
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    p.add_argument("--base", default="micro", metavar="SPEC",
                   help="default base model: micro, a diffusers folder or a .safetensors file (default: micro)")
    p.add_argument("--auth", default=None, metavar="USER:PASS", help="require this user name and password")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")


def parse_auth(text: str | None) -> tuple[str, str] | None:
    """``USER:PASS`` as a (user, password) pair; None when not given."""
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise StudioError(f"--auth {text!r}: expected USER:PASS, e.g. --auth alice:secret")
    return user, password


def served_folders() -> list[Path]:
    """The only folders whose files the page may fetch: samples, runs, outputs, the library's adapters.

    Uploads, the library database and everything else under STUDIO_HOME stay private; gradio
    serves its own upload cache besides these.
    """
    from studio.library import Library

    return [SAMPLES_DIR, service.runs_dir(), service.outputs_dir(), Library().adapters_dir, ui_dir()]


def _warm_up() -> None:
    """Import torch, diffusers and the trainer while the first page loads, not when Start is clicked."""
    try:
        importlib.import_module("studio.trainers.loop")
        importlib.import_module("studio.loading")
        importlib.import_module("studio.mixing")
    except Exception:  # noqa: BLE001 - the first job reports a broken install with its own message
        log.debug("warm-up import failed", exc_info=True)


def serve(host: str = "127.0.0.1", port: int = 7860, base: str = "micro", auth: str | None = None,
          share: bool = False, block: bool = True) -> Any:
    """Build and launch the studio; returns the Blocks (``block=False`` returns at once)."""
    import os

    # gradio's usage analytics and version check would call out at every start (DESIGN.md: nothing
    # goes to the network unless the user asks); read when gradio is imported, so before that
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    credentials = parse_auth(auth)
    if host not in ("127.0.0.1", "localhost", "::1") and not credentials:
        log.warning("serving on %s without --auth: anyone who can reach this address can use the studio", host)
    demo = build_app(base)
    demo.queue(default_concurrency_limit=4)
    folders = served_folders()
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    try:
        # max_file_size is the adapter import's limit; training images get their own, smaller one
        # with a message naming the file (service.check_uploads)
        demo.launch(server_name=host, server_port=port, share=share, auth=credentials, inbrowser=False,
                    allowed_paths=[str(f) for f in folders], max_file_size=service.MAX_ADAPTER_BYTES,
                    prevent_thread_lock=True, footer_links=["api", "settings"], css=CSS)
    except OSError as exc:
        raise StudioError(f"--port {port}: cannot listen on {host}:{port} ({exc}); choose another port") from exc
    threading.Thread(target=_warm_up, name="studio-warm-up", daemon=True).start()
    if block:
        try:
            demo.block_thread()
        finally:  # the server stopped (Ctrl-C): a running training saves a checkpoint before the process ends
            demo.studio_context.manager.shutdown(wait=60)
    return demo


def run(args: argparse.Namespace) -> int:
    """`studio ui` / `python app.py` with parsed flags."""
    serve(host=args.host, port=args.port, base=args.base, auth=args.auth, share=args.share)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python app.py [--host H] [--port P] [--base SPEC] [--auth USER:PASS] [--share]`."""
    import sys

    p = argparse.ArgumentParser(prog="app.py", description="The diffusion-studio web UI (Gradio).")
    add_arguments(p)
    p.add_argument("--debug", action="store_true", help="debug logs and tracebacks")
    args = p.parse_args(argv)
    from studio.logs import setup_logging  # the same log format and quiet libraries as `studio ui`

    setup_logging(debug=args.debug, quiet=False)
    try:
        return run(args)
    except StudioError as exc:
        sys.stderr.write(f"app.py: error: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
