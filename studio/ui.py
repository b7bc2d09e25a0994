"""The Gradio studio: Train, Library and Generate tabs on the service layer's job manager.

``build_app(base)`` returns a ``gr.Blocks`` without starting a server; ``serve(...)`` launches
it (127.0.0.1:7860, no share link unless asked). Every tab is a :class:`Panel` in ``PANELS``,
built in order, so later panels (adapter mixing, quantization, DECOR, content/style,
retrieval) are one ``@panel(...)`` function each and touch nothing else here.

The page never runs a job itself: it submits to :func:`studio.service.default_manager`, which
queues jobs on one worker thread, and polls the job's status with a timer. The job id is kept
in the browser's local storage, so a reloaded page re-attaches to its job's progress.
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from studio import service
from studio.errors import StudioError
from studio.home import studio_home

log = logging.getLogger(__name__)

# bundled sample sets (the same folder as studio.loading.ASSETS, without importing torch here)
SAMPLES_DIR = Path(__file__).resolve().parents[1] / "assets" / "samples"
POLL_S = 1.0


# ---- the panel registry ----------------------------------------------------------------------------
@dataclasses.dataclass
class UIContext:
    """What a panel needs: the job manager, the default base model, and components other panels share."""

    manager: service.JobManager
    base: str
    shared: dict[str, Any] = dataclasses.field(default_factory=dict)
    tab: Any = None  # the gr.Tab being built (panels hook its .select)


@dataclasses.dataclass(frozen=True)
class Panel:
    key: str
    label: str
    build: Callable[[UIContext], None]
    order: int = 100


PANELS: dict[str, Panel] = {}


PanelBuilder = Callable[[UIContext], None]


def panel(key: str, label: str, order: int = 100) -> Callable[[PanelBuilder], PanelBuilder]:
    """Register ``build(ctx)`` as a tab; it is called inside its ``gr.Tab`` when the app is built."""
    def wrap(build: PanelBuilder) -> PanelBuilder:
        PANELS[key] = Panel(key, label, build, order)
        return build

    return wrap


def sample_sets() -> list[str]:
    """Names of the bundled sample sets (folders under assets/samples)."""
    if not SAMPLES_DIR.is_dir():
        return []
    return sorted(p.name for p in SAMPLES_DIR.iterdir() if p.is_dir() and not p.name.startswith("."))


# ---- views of a job (pure functions of service.status dicts) ---------------------------------------
def job_markdown(st: dict[str, Any] | None) -> str:
    """One or two lines on a job: state, step/total, loss, ETA, error."""
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
        text += f"\n\n{'⚠️ ' if state == 'failed' else ''}{st['error']}"
    if state == "done" and isinstance(st.get("result"), dict) and st["result"].get("out"):
        text += f"\n\nSaved to `{st['result']['out']}`."
    return text


def progress_html(st: dict[str, Any] | None) -> str:
    frac = 0.0 if not st else max(0.0, min(1.0, float(st.get("progress") or 0.0)))
    color = {"failed": "#d9534f", "cancelled": "#999"}.get((st or {}).get("state", ""), "#4a90d9")
    return (f'<div class="studio-progress" style="background:#eee;border-radius:4px;height:10px;width:100%">'
            f'<div style="background:{color};width:{frac * 100:.1f}%;height:10px;border-radius:4px"></div></div>')


def job_log(st: dict[str, Any] | None, lines: int = 40) -> str:
    return "\n".join((st or {}).get("messages", [])[-lines:])


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


# ---- Train -------------------------------------------------------------------------------------------
def train_config(*, source: str, sample_set: str, uploads: Sequence[str] | None, kind: str, name: str, token: str,
                 class_word: str, steps: float | None, rank: float | None, lr: float | None, base: str,
                 advanced: dict[str, Any] | None = None) -> tuple[Any, list[str]]:
    """The TrainConfig for the form's values, and warnings about rejected uploads.

    Uploaded images are validated and copied to STUDIO_HOME/uploads/<name>-<time>/; the adapter
    goes to STUDIO_HOME/adapters/<name>/ (a numbered name when that folder exists).
    """
    from studio.trainers.config import TrainConfig

    warnings: list[str] = []
    name = service.safe_name(name or "")
    if source == "upload":
        if not uploads:
            raise StudioError("no images uploaded: add PNG, JPEG or WebP files, or pick a bundled sample set")
        stem = name or f"{kind}-upload"
        staged = service.stage_uploads(uploads, studio_home() / "uploads" / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")
        warnings += staged.warnings()
        images = staged.folder
    else:
        if not sample_set or sample_set not in sample_sets():
            known = ", ".join(sample_sets()) or "none"
            raise StudioError(f"sample set {sample_set!r}: not found; choose one of {known}")
        images = SAMPLES_DIR / sample_set
        stem = name or sample_set
    out = service.unique_adapter_dir(stem)

    def num(v: float | None, cast: type) -> Any:
        return None if v in (None, "", 0) else cast(v)

    fields: dict[str, Any] = {
        "kind": kind, "images": str(images), "base": base or "micro", "out": str(out), "name": out.name,
        "token": (token or "sks").strip(), "class_word": (class_word or "").strip(),
        "steps": num(steps, int), "rank": num(rank, int), "lr": num(lr, float),
    }
    for k, v in (advanced or {}).items():
        if v is None or v == "":
            continue
        if k in ("batch", "resolution") and not v:
            continue
        fields[k] = int(v) if k in ("batch", "resolution", "class_images", "sample_every", "checkpoint_every", "seed",
                                    "warmup") else v
    return TrainConfig.from_dict(fields, source="train form"), warnings


@panel("train", "Train", order=10)
def _train_panel(ctx: UIContext) -> None:
    import gradio as gr

    from studio.adapters.methods import methods

    sets = sample_sets()
    job_id = gr.BrowserState(None, storage_key="studio-train-job")
    shown = gr.State([])  # sample paths already in the gallery (no flicker on every poll)
    with gr.Row():
        with gr.Column(scale=1):
            source = gr.Radio([("Bundled sample set", "sample"), ("Upload images", "upload")], value="sample",
                              label="Training images")
            sample_set = gr.Dropdown(sets, value=sets[0] if sets else None, label="Sample set")
            uploads = gr.File(file_count="multiple", file_types=["image", ".txt"], visible=False,
                              label=f"Images (at most {service.MAX_UPLOAD_FILES}, "
                                    f"{service.MAX_UPLOAD_BYTES // 2**20} MB each; NAME.txt captions optional)")
            preview = gr.Gallery(label="Set preview", columns=6, height=140, allow_preview=False,
                                 value=_set_preview(sets[0]) if sets else None)
            with gr.Row():
                kind = gr.Radio(["subject", "style"], value=_kind_of(sets[0]) if sets else "subject", label="Kind")
                name = gr.Textbox(label="Adapter name", placeholder="default: the set's name")
            with gr.Row():
                token = gr.Textbox("sks", label="Trigger word")
                class_word = gr.Textbox(label="Class word (subjects)", placeholder="e.g. dog; default: shape on micro")
            with gr.Row():
                steps = gr.Number(None, label="Steps", placeholder="recipe default", precision=0, minimum=0)
                rank = gr.Number(None, label="Rank", placeholder="method default", precision=0, minimum=0)
                lr = gr.Number(None, label="Learning rate", placeholder="method default", minimum=0)
            with gr.Accordion("Advanced", open=False):
                base = gr.Textbox(ctx.base, label="Base model", info="micro, a diffusers folder or a .safetensors file")
                with gr.Row():
                    method = gr.Dropdown(sorted(methods()), value="lora", label="Method")
                    targets = gr.Dropdown(["attention", "attention+resnet", "all"], value="attention", label="Layers")
                    text_encoder = gr.Checkbox(False, label="Also train the text encoder")
                with gr.Row():
                    batch = gr.Number(None, label="Batch size", placeholder="recipe default", precision=0, minimum=0)
                    resolution = gr.Number(None, label="Resolution", placeholder="native", precision=0, minimum=0)
                    seed = gr.Number(0, label="Seed", precision=0)
                with gr.Row():
                    prior = gr.Checkbox(True, label="Prior preservation (subjects)")
                    class_images = gr.Number(50, label="Class images", precision=0, minimum=1)
                    scheduler = gr.Dropdown(["constant", "cosine", "linear"], value="constant", label="LR schedule")
                with gr.Row():
                    sample_every = gr.Number(0, label="Samples every N steps (0: at the end)", precision=0, minimum=0)
                    checkpoint_every = gr.Number(50, label="Checkpoint every N steps", precision=0, minimum=0)
            with gr.Row():
                start = gr.Button("Start training", variant="primary")
                cancel = gr.Button("Cancel", variant="stop", interactive=False)
        with gr.Column(scale=1):
            status = gr.Markdown("No job yet.", elem_id="train-status")
            bar = gr.HTML(progress_html(None))
            samples = gr.Gallery(label="Samples", columns=4, height=320, object_fit="contain")
            log_box = gr.Textbox(label="Log", lines=8, max_lines=8, interactive=False, autoscroll=True)
    timer = gr.Timer(POLL_S, active=False)

    def on_source(src: str):
        sample = src == "sample"
        return gr.update(visible=sample), gr.update(visible=not sample), gr.update(visible=sample)

    source.change(on_source, source, [sample_set, uploads, preview], show_progress="hidden", api_visibility="private")

    def on_set(name_: str):
        return _set_preview(name_), _kind_of(name_)

    sample_set.change(on_set, sample_set, [preview, kind], show_progress="hidden", api_visibility="private")

    views = [status, bar, samples, log_box, timer, start, cancel, shown]

    def view(jid: str | None, seen: list[str] | None):
        st = _status_or_none(ctx.manager, jid)
        active = bool(st and st["state"] in ("queued", "running"))
        new_samples = st["samples"] if st else []
        gallery = gr.skip() if new_samples == seen else [(p, _caption(p)) for p in new_samples]
        return (job_markdown(st), progress_html(st), gallery, job_log(st), gr.Timer(active=active),
                gr.update(interactive=not active), gr.update(interactive=active), new_samples)

    def on_start(src, set_, ups, kind_, name_, token_, class_, steps_, rank_, lr_, base_, method_, targets_, te_,
                 batch_, res_, seed_, prior_, class_n, sched_, sample_n, ckpt_n, seen):
        try:
            adv = {"method": method_, "targets": targets_, "text_encoder": bool(te_), "batch": batch_,
                   "resolution": res_, "seed": seed_, "prior": bool(prior_) if kind_ == "subject" else None,
                   "class_images": class_n, "scheduler": sched_, "sample_every": sample_n, "checkpoint_every": ckpt_n}
            cfg, warns = train_config(source=src, sample_set=set_, uploads=ups, kind=kind_, name=name_, token=token_,
                                      class_word=class_, steps=steps_, rank=rank_, lr=lr_, base=base_, advanced=adv)
            for w in warns[:10]:
                gr.Warning(w)
            jid = ctx.manager.submit_train(cfg)
        except StudioError as exc:
            gr.Warning(str(exc))
            return (gr.skip(), f"⚠️ {exc}", *[gr.skip()] * (len(views) - 1))
        return (jid, *view(jid, None))

    start.click(on_start, [source, sample_set, uploads, kind, name, token, class_word, steps, rank, lr, base, method,
                           targets, text_encoder, batch, resolution, seed, prior, class_images, scheduler,
                           sample_every, checkpoint_every, shown],
                [job_id, *views], concurrency_limit=None, api_name="train")
    timer.tick(view, [job_id, shown], views, show_progress="hidden", concurrency_limit=None, api_name="train_status")

    def on_cancel(jid: str | None, seen: list[str]):
        if jid:
            try:
                ctx.manager.cancel(jid)
            except StudioError as exc:
                gr.Warning(str(exc))
        return view(jid, seen)

    cancel.click(on_cancel, [job_id, shown], views, concurrency_limit=None, api_name="train_cancel")

    def attach(jid: str | None, seen: list[str]):
        """On page load: the browser's own job, else the newest queued or running training."""
        if _status_or_none(ctx.manager, jid) is None:
            running = ctx.manager.active("train")
            jid = running[-1]["id"] if running else None
        return (jid, *view(jid, None))

    ctx.shared.setdefault("on_load", []).append((attach, [job_id, shown], [job_id, *views]))


def _status_or_none(manager: service.JobManager, job_id: str | None) -> dict[str, Any] | None:
    if not job_id:
        return None
    try:
        return manager.status(job_id)
    except StudioError:
        return None


def _set_preview(name: str | None) -> list[tuple[str, str]]:
    if not name or not (SAMPLES_DIR / name).is_dir():
        return []
    return [(str(p), p.stem) for p in sorted((SAMPLES_DIR / name).glob("*.png"))[:12]]


def _kind_of(set_name: str | None) -> str:
    return "style" if (set_name or "").startswith("style") else "subject"


# ---- Library -----------------------------------------------------------------------------------------
def adapter_markdown(entry: dict[str, Any]) -> str:
    meta = entry.get("metadata", {})
    rows = [("Name", entry["name"]), ("Kind", entry.get("kind")), ("Trigger", entry.get("trigger")),
            ("Method", entry.get("method")), ("Base", entry.get("base")), ("Rank", meta.get("rank")),
            ("Steps", meta.get("steps")), ("Images", meta.get("images")), ("Final loss", meta.get("final_loss")),
            ("Class word", meta.get("class_word")), ("Folder", f"`{entry['path']}`")]
    lines = ["| | |", "|---|---|"] + [f"| {k} | {html.escape(str(v))} |" for k, v in rows if v not in (None, "")]
    return "\n".join(lines)


@panel("library", "Library", order=20)
def _library_panel(ctx: UIContext) -> None:
    import gradio as gr

    entries = gr.State([])
    with gr.Row():
        query = gr.Textbox(label="Search", placeholder="name or trigger word", scale=4)
        refresh = gr.Button("Refresh", scale=1)
    summary = gr.Markdown("")
    with gr.Row():
        covers = gr.Gallery(label="Adapters", columns=4, height=420, allow_preview=False, scale=2)
        with gr.Column(scale=1):
            details = gr.Markdown("Select an adapter to see its metadata and samples.")
            detail_samples = gr.Gallery(label="Samples", columns=3, height=260, object_fit="contain")

    def load(q: str):
        found = service.list_adapters(q or "")
        # an adapter without samples has no cover: it is still named in the summary
        cover = [(e["samples"][-1], f"{e['name']} · {e['trigger'] or '-'} ({e['kind'] or '?'})")
                 for e in found if e["samples"]]
        where = service.adapters_dir()
        text = (f"{len(found)} adapter(s) in `{where}`" if found else
                f"No adapter{' matches' if q else ' yet'}: train one in the Train tab (they are kept in `{where}`).")
        if found and len(cover) < len(found):
            bare = [e["name"] for e in found if not e["samples"]]
            text += f"; {len(bare)} without samples: " + ", ".join(bare)
        return found, cover, text

    @_select_handler
    def select(found: list[dict], evt):
        with_samples = [e for e in found if e["samples"]]
        if evt.index is None or evt.index >= len(with_samples):
            return gr.skip(), gr.skip()
        e = with_samples[evt.index]
        return adapter_markdown(e), [(p, _caption(p)) for p in e["samples"]]

    outs = [entries, covers, summary]
    refresh.click(load, query, outs, api_name="library")
    query.submit(load, query, outs, api_visibility="private")
    covers.select(select, entries, [details, detail_samples], api_visibility="private")
    if ctx.tab is not None:  # new adapters appear when the tab is opened again
        ctx.tab.select(load, query, outs, show_progress="hidden", api_visibility="private")
    ctx.shared.setdefault("on_load", []).append((load, [query], outs))


# ---- Generate ----------------------------------------------------------------------------------------
@panel("generate", "Generate", order=30)
def _generate_panel(ctx: UIContext) -> None:
    import gradio as gr

    job_id = gr.BrowserState(None, storage_key="studio-generate-job")
    infos = gr.State([])
    with gr.Row():
        with gr.Column(scale=1):
            prompt = gr.Textbox(label="Prompt", lines=2, placeholder="a red circle on a white background")
            negative = gr.Textbox(label="Negative prompt", lines=1)
            with gr.Row():
                seed = gr.Number(-1, label="Seed (-1: random)", precision=0)
                num = gr.Slider(1, 16, value=4, step=1, label="Images")
            with gr.Row():
                steps = gr.Slider(1, 100, value=20, step=1, label="Steps")
                guidance = gr.Slider(0, 20, value=5.0, step=0.5, label="Guidance")
            size = gr.Textbox("", label="Size", placeholder="native, or WxH such as 64x64")
            base = gr.Textbox(ctx.base, label="Base model")
            with gr.Row():
                go = gr.Button("Generate", variant="primary")
                stop = gr.Button("Cancel", variant="stop", interactive=False)
            status = gr.Markdown("")
        with gr.Column(scale=1):
            gallery = gr.Gallery(label="Images", columns=2, height=420, object_fit="contain")
            params_box = gr.Textbox(label="Parameters", lines=4, interactive=False, buttons=["copy"])
    timer = gr.Timer(POLL_S, active=False)
    views = [status, gallery, params_box, timer, go, stop, infos]

    def view(jid: str | None):
        st = _status_or_none(ctx.manager, jid)
        active = bool(st and st["state"] in ("queued", "running"))
        gal, text, info = gr.skip(), gr.skip(), gr.skip()
        if st and st["state"] == "done" and isinstance(st["result"], dict):
            paths, info = st["result"].get("images", []), st["result"].get("parameters", [])
            gal = [(p, (i.splitlines() or [""])[0]) for p, i in zip(paths, info)]
            text = info[0] if info else ""
        return (job_markdown(st) if st else "", gal, text, gr.Timer(active=active),
                gr.update(interactive=not active), gr.update(interactive=active), info)

    def on_go(prompt_, negative_, seed_, num_, steps_, guidance_, size_, base_):
        from studio.generation import GenerationParams, parse_size

        try:
            w = h = None
            if (size_ or "").strip():
                w, h = parse_size(size_)
            params = GenerationParams(prompt=prompt_ or "", negative=negative_ or "",
                                      seed=None if seed_ is None or seed_ < 0 else int(seed_), num=int(num_),
                                      steps=int(steps_), guidance=float(guidance_), width=w, height=h)
            jid = ctx.manager.submit_generate(params, base=(base_ or ctx.base).strip())
        except StudioError as exc:
            gr.Warning(str(exc))
            return (gr.skip(), f"⚠️ {exc}", *[gr.skip()] * (len(views) - 1))
        return (jid, *view(jid))

    inputs = [prompt, negative, seed, num, steps, guidance, size, base]
    go.click(on_go, inputs, [job_id, *views], concurrency_limit=None, api_name="generate")
    prompt.submit(on_go, inputs, [job_id, *views], concurrency_limit=None, api_visibility="private")
    timer.tick(view, job_id, views, show_progress="hidden", concurrency_limit=None, api_name="generate_status")

    def on_stop(jid: str | None):
        if jid:
            try:
                ctx.manager.cancel(jid)
            except StudioError as exc:
                gr.Warning(str(exc))
        return view(jid)

    stop.click(on_stop, job_id, views, concurrency_limit=None, api_name="generate_cancel")

    @_select_handler
    def select(info: list[str], evt):
        return info[evt.index] if info and evt.index is not None and evt.index < len(info) else ""

    gallery.select(select, infos, params_box, api_visibility="private")
    ctx.shared.setdefault("on_load", []).append((view, [job_id], views))


# ---- the app -----------------------------------------------------------------------------------------
def build_app(base: str = "micro", manager: service.JobManager | None = None,
              panels: Sequence[str] | None = None) -> Any:
    """The studio as a ``gr.Blocks`` (not launched). ``panels`` picks tabs by key (default: all)."""
    import gradio as gr

    ctx = UIContext(manager=manager or service.default_manager(), base=base)
    chosen = sorted((p for p in PANELS.values() if panels is None or p.key in panels), key=lambda p: p.order)
    with gr.Blocks(title="diffusion-studio") as demo:
        gr.Markdown("## diffusion-studio\nTrain subject and style adapters, keep them, generate with them. "
                    f"Base model: `{base}`.")
        with gr.Tabs():
            for p in chosen:
                with gr.Tab(p.label, id=p.key) as tab:
                    ctx.tab = tab
                    p.build(ctx)
                ctx.tab = None
        for fn, inputs, outputs in ctx.shared.get("on_load", []):
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
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise StudioError(f"--auth {text!r}: expected USER:PASS, e.g. --auth alice:secret")
    return user, password


def serve(host: str = "127.0.0.1", port: int = 7860, base: str = "micro", auth: str | None = None,
          share: bool = False, block: bool = True) -> Any:
    """Build and launch the studio; returns the Blocks (``block=False`` returns at once)."""
    credentials = parse_auth(auth)
    if host not in ("127.0.0.1", "localhost", "::1") and not credentials:
        log.warning("serving on %s without --auth: anyone who can reach this address can use the studio", host)
    demo = build_app(base)
    demo.queue(default_concurrency_limit=4)
    home = studio_home()
    home.mkdir(parents=True, exist_ok=True)
    try:
        demo.launch(server_name=host, server_port=port, share=share, auth=credentials, inbrowser=False,
                    allowed_paths=[str(home), str(SAMPLES_DIR)], max_file_size=service.MAX_UPLOAD_BYTES,
                    prevent_thread_lock=not block, footer_links=["api", "settings"])
    except OSError as exc:
        raise StudioError(f"--port {port}: cannot listen on {host}:{port} ({exc}); choose another port") from exc
    if block:  # the server stopped (Ctrl-C): a running training saves a checkpoint before the process ends
        demo.studio_context.manager.shutdown(wait=60)
    return demo


def run(args: argparse.Namespace) -> int:
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
        print(f"app.py: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
