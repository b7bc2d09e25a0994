"""The service layer: jobs (train, generate, ...) with progress events and cancellation.

The CLI and the Gradio UI are two thin faces on it. A :class:`JobManager` runs jobs one at a
time on a single worker thread, so several users' trainings queue instead of fighting over
the CPU or GPU; each job keeps its event history, so a page that is reloaded re-attaches to
a running job's progress by asking for its status again. Everything returned is a plain dict
of JSON-able values; nothing here imports gradio.

``default_manager()`` is the process-wide manager the UI uses; tests build their own with an
injected train function.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import itertools
import logging
import os
import re
import shutil
import threading
import time
import traceback
import unicodedata
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from studio.errors import StudioError
from studio.home import studio_home

log = logging.getLogger(__name__)

STATES = ("queued", "running", "done", "failed", "cancelled")
FINISHED = ("done", "failed", "cancelled")
MAX_EVENTS = 5000  # per job; messages and sample paths are kept whole beside the capped history
KEEP_FINISHED = 100  # finished jobs remembered by a manager

# uploads from the browser
MAX_UPLOAD_FILES = 50
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
IMAGE_SUFFIX = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "BMP": ".bmp", "GIF": ".gif", "TIFF": ".tiff"}

TrainFn = Callable[..., Any]  # train(cfg, on_event=..., cancel=...) -> TrainResult-like
JobFn = Callable[[Callable[[Any], None], threading.Event], Any]  # fn(emit, cancel) -> result


class Cancelled(StudioError):
    """A job stopped because the user cancelled it."""

    exit_code = 130


@dataclasses.dataclass
class _Job:
    id: str
    kind: str
    label: str
    fn: JobFn
    params: dict[str, Any]
    state: str = "queued"
    created: float = dataclasses.field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    phase: str = ""
    step: int = 0
    total: int = 0
    loss: float | None = None
    lr: float | None = None
    eta_s: float | None = None
    messages: list[str] = dataclasses.field(default_factory=list)
    samples: list[str] = dataclasses.field(default_factory=list)
    events: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=MAX_EVENTS))
    seq: int = 0
    result: Any = None
    error: str | None = None
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)


def _event_dict(ev: Any) -> dict[str, Any]:
    """An Event dataclass (or a dict, or a bare message) as a plain dict."""
    if dataclasses.is_dataclass(ev) and not isinstance(ev, type):
        d = dataclasses.asdict(ev)
    elif isinstance(ev, dict):
        d = dict(ev)
    else:
        d = {"phase": "info", "message": str(ev)}
    d.setdefault("phase", "info")
    d["samples"] = [str(s) for s in d.get("samples") or []]
    return d


def _plain(value: Any) -> Any:
    """Results as JSON-able values: dataclasses to dicts, paths to strings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


class JobManager:
    """Runs jobs one after another on one worker thread; every method is thread-safe.

    ``train_fn`` is the training function (default: :func:`studio.trainers.loop.train`);
    tests pass a fake one. ``generate_fn(params, base, emit, cancel) -> dict`` likewise.
    """

    def __init__(self, train_fn: TrainFn | None = None, generate_fn: Callable[..., Any] | None = None,
                 keep_finished: int = KEEP_FINISHED) -> None:
        self._train_fn = train_fn
        self._generate_fn = generate_fn
        self._keep = keep_finished
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._jobs: dict[str, _Job] = {}
        self._queue: collections.deque[str] = collections.deque()
        self._ids = itertools.count(1)
        self._worker: threading.Thread | None = None
        self._closed = False
        self._pipes: dict[str, Any] = {}  # base spec -> loaded pipeline (touched by the worker only)

    # ---- submitting ----------------------------------------------------------------------------
    def submit(self, kind: str, fn: JobFn, *, label: str = "", params: dict[str, Any] | None = None) -> str:
        """Queue ``fn(emit, cancel)``; returns the job id. The job runs after those before it."""
        with self._lock:
            if self._closed:
                raise StudioError("the job manager is shut down; restart the studio")
            job_id = f"{kind}-{next(self._ids):04d}-{os.urandom(2).hex()}"
            self._jobs[job_id] = _Job(id=job_id, kind=kind, label=label or kind, fn=fn, params=_plain(params or {}))
            self._queue.append(job_id)
            self._ensure_worker()
            self._changed.notify_all()
        log.info("queued %s (%s)", job_id, label or kind)
        return job_id

    def submit_train(self, cfg: Any) -> str:
        """Queue a training run of ``cfg`` (a TrainConfig, or a dict of its fields)."""
        from studio.trainers.config import TrainConfig

        if isinstance(cfg, dict):
            cfg = TrainConfig.from_dict(cfg, source="train job")
        else:
            cfg.validate()
        train_fn = self._train_fn
        if train_fn is None:
            from studio.trainers.loop import train as train_fn

        def run(emit: Callable[[Any], None], cancel: threading.Event) -> Any:
            return train_fn(cfg, on_event=emit, cancel=cancel)

        label = cfg.name or Path(cfg.out or cfg.images).name or cfg.kind
        return self.submit("train", run, label=label, params=dataclasses.asdict(cfg))

    def submit_generate(self, params: Any, base: str = "micro", out_dir: str | os.PathLike | None = None) -> str:
        """Queue a generation (a GenerationParams or a dict of its fields) on ``base``.

        Images go to ``out_dir`` (default: STUDIO_HOME/outputs/<date>/); the result holds their
        paths and their infotext.
        """
        from studio.generation import GenerationParams

        if isinstance(params, dict):
            try:
                params = GenerationParams(**params)
            except TypeError as exc:
                raise StudioError(f"generate job: {exc}") from exc
        params.validate()
        out = Path(out_dir) if out_dir else studio_home() / "outputs" / datetime.date.today().isoformat()
        gen_fn = self._generate_fn or self._generate

        def run(emit: Callable[[Any], None], cancel: threading.Event) -> Any:
            return gen_fn(params, base=base, out_dir=out, emit=emit, cancel=cancel)

        return self.submit("generate", run, label=params.prompt[:60] or "generate",
                           params={**dataclasses.asdict(params), "base": base})

    # ---- reading -------------------------------------------------------------------------------
    def status(self, job_id: str) -> dict[str, Any]:
        """A job as a plain dict: id, kind, state, progress, loss, ETA, messages, samples, result, error."""
        with self._lock:
            job = self._get(job_id)
            return self._describe(job)

    def jobs(self) -> list[dict[str, Any]]:
        """Every job this manager remembers, in submission order."""
        with self._lock:
            return [self._describe(j) for j in self._jobs.values()]

    def active(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Queued and running jobs (of ``kind``), oldest first."""
        with self._lock:
            return [self._describe(j) for j in self._jobs.values()
                    if j.state in ("queued", "running") and (kind is None or j.kind == kind)]

    def events(self, job_id: str, since: int = 0) -> list[dict[str, Any]]:
        """The job's events with ``seq > since`` (the history, capped at MAX_EVENTS per job)."""
        with self._lock:
            return [dict(e) for e in self._get(job_id).events if e["seq"] > since]

    def wait(self, job_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Block until the job has finished (or ``timeout`` seconds passed); returns its status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._get(job_id).state not in FINISHED:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._changed.wait(left)
            return self._describe(self._get(job_id))

    # ---- control -------------------------------------------------------------------------------
    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a job: a queued one never starts, a running one stops at its next check."""
        with self._lock:
            job = self._get(job_id)
            if job.state == "queued":
                self._queue.remove(job_id)
                self._finish(job, "cancelled", error="cancelled before it started")
            elif job.state == "running":
                job.cancel.set()
                job.messages.append("cancelling...")
            return self._describe(job)

    def shutdown(self, wait: float | None = 5.0) -> None:
        """Cancel everything and stop the worker (the process is leaving)."""
        with self._lock:
            self._closed = True
            for job_id in list(self._queue):
                self.cancel(job_id)
            for job in self._jobs.values():
                if job.state == "running":
                    job.cancel.set()
            self._changed.notify_all()
            worker = self._worker
        if worker is not None and wait:
            worker.join(wait)

    # ---- internals -----------------------------------------------------------------------------
    def _get(self, job_id: str) -> _Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise StudioError(f"job {job_id!r}: no such job (finished jobs are forgotten when the studio restarts)")
        return job

    def _describe(self, job: _Job) -> dict[str, Any]:
        position = self._queue.index(job.id) if job.state == "queued" else None
        elapsed = None
        if job.started is not None:
            elapsed = (job.finished or time.time()) - job.started
        return {
            "id": job.id, "kind": job.kind, "label": job.label, "state": job.state, "phase": job.phase,
            "position": position, "step": job.step, "total": job.total,
            "progress": (job.step / job.total) if job.total else (1.0 if job.state == "done" else 0.0),
            "loss": job.loss, "lr": job.lr, "eta_s": job.eta_s, "elapsed_s": elapsed,
            "created": job.created, "started": job.started, "finished": job.finished,
            "messages": list(job.messages), "samples": list(job.samples), "last_seq": job.seq,
            "params": job.params, "result": job.result, "error": job.error,
        }

    def _ensure_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._work, name="studio-jobs", daemon=True)
            self._worker.start()

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._changed.wait()
                if not self._queue:
                    return
                job = self._jobs[self._queue.popleft()]
                job.state, job.started = "running", time.time()
                self._changed.notify_all()
            self._run(job)

    def _run(self, job: _Job) -> None:
        def emit(ev: Any) -> None:
            self._record(job, _event_dict(ev))

        try:
            result = job.fn(emit, job.cancel)
        except StudioError as exc:  # trainers.loop.Cancelled and ours carry exit code 130
            self._finish(job, "cancelled" if exc.exit_code == 130 else "failed", error=str(exc))
        except Exception as exc:  # noqa: BLE001 - a job's crash must not kill the worker
            log.error("job %s crashed:\n%s", job.id, traceback.format_exc())
            first = (str(exc).splitlines() or [""])[0][:300]
            self._finish(job, "failed", error=f"{type(exc).__name__}: {first} (a bug: the log has the traceback)")
        else:
            self._finish(job, "done", result=_plain(result))

    def _record(self, job: _Job, ev: dict[str, Any]) -> None:
        with self._lock:
            job.seq += 1
            ev["seq"] = job.seq
            ev["time"] = time.time()
            job.events.append(ev)
            job.phase = ev.get("phase") or job.phase
            if ev.get("total"):
                job.total = int(ev["total"])
            if ev.get("step") or ev.get("phase") == "train":
                job.step = int(ev.get("step") or 0)
            for key in ("loss", "lr", "eta_s"):
                if ev.get(key) is not None:
                    setattr(job, key, float(ev[key]))
            if ev.get("message"):
                job.messages.append(str(ev["message"]))
            for s in ev.get("samples") or []:
                if s not in job.samples:
                    job.samples.append(s)
            self._changed.notify_all()

    def _finish(self, job: _Job, state: str, *, result: Any = None, error: str | None = None) -> None:
        with self._lock:
            job.state, job.finished = state, time.time()
            job.result, job.error = result, error
            if state == "done":
                job.eta_s = 0.0
            if error:
                job.messages.append(error)
            self._forget_old()
            self._changed.notify_all()
        log.info("job %s %s%s", job.id, state, f": {error}" if error else "")

    def _forget_old(self) -> None:
        done = [j for j in self._jobs.values() if j.state in FINISHED]
        for j in done[: max(0, len(done) - self._keep)]:
            del self._jobs[j.id]

    def _generate(self, params: Any, *, base: str, out_dir: Path, emit: Callable[[Any], None],
                  cancel: threading.Event) -> dict[str, Any]:
        """Load ``base`` (kept loaded for the next job) and generate; runs on the worker thread."""
        from studio.generation import generate, model_defaults, save_images
        from studio.loading import load_pipeline

        pipe = self._pipes.get(base)
        if pipe is None:
            emit({"phase": "prepare", "message": f"loading {base}"})
            self._pipes.clear()  # one model in memory at a time
            pipe = self._pipes[base] = load_pipeline(base)
        steps = params.steps or model_defaults(pipe)["steps"]
        total = steps * -(-params.num // params.batch_size)  # callbacks come once per step per batch
        done = [0]

        def on_step(p: Any, i: int, t: Any, kwargs: dict) -> dict:
            if cancel.is_set():
                raise Cancelled("generation cancelled")
            done[0] += 1
            emit({"phase": "generate", "step": done[0], "total": total})
            return kwargs

        images = generate(pipe, params, callback=on_step)
        paths = save_images(images, out_dir)
        emit({"phase": "done", "step": total, "total": total, "message": f"wrote {len(paths)} image(s) to {out_dir}",
              "samples": [str(p) for p in paths]})
        return {"images": [str(p) for p in paths], "parameters": [im.info.get("parameters", "") for im in images]}


_default: JobManager | None = None
_default_lock = threading.Lock()


def default_manager() -> JobManager:
    """The process-wide manager (created on first use)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = JobManager()
        return _default


# ---- adapters on disk (until the library issue lands) --------------------------------------------
def adapters_dir() -> Path:
    """Where UI training jobs write their adapters: STUDIO_HOME/adapters/<name>/."""
    return studio_home() / "adapters"


def list_adapters(query: str = "") -> list[dict[str, Any]]:
    """Adapters under STUDIO_HOME/adapters/*/ with their metadata and sample images.

    The one place the UI reads adapters from: the adapter library replaces its body later.
    ``query`` filters by name or trigger word (case-insensitive substring).
    """
    from studio.adapters import read_metadata
    from studio.adapters.core import LORA_FILE, META_PREFIX, STUDIO_FILE

    root = adapters_dir()
    out = []
    q = query.strip().lower()
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        if not ((folder / LORA_FILE).is_file() or (folder / STUDIO_FILE).is_file()):
            continue
        try:
            raw = read_metadata(folder)
        except StudioError as exc:
            log.warning("%s", exc)
            continue
        meta = {k[len(META_PREFIX):]: v for k, v in raw.items() if k.startswith(META_PREFIX)}
        meta.pop("train_config", None)
        meta = {k: v for k, v in meta.items() if not k.startswith("peft_config.")}
        entry = {
            "name": folder.name, "path": str(folder), "method": meta.get("method", "lora"),
            "kind": meta.get("kind", ""), "trigger": meta.get("trigger", ""), "base": meta.get("base", ""),
            "metadata": meta,
            "samples": [str(p) for p in sorted((folder / "samples").glob("*.png"))],
        }
        if q and q not in entry["name"].lower() and q not in entry["trigger"].lower():
            continue
        out.append(entry)
    return out


def unique_adapter_dir(name: str) -> Path:
    """STUDIO_HOME/adapters/<name>, or <name>-2, -3, ... where that folder exists."""
    name = safe_name(name) or "adapter"
    root = adapters_dir()
    candidate = root / name
    n = 2
    while candidate.exists():
        candidate = root / f"{name}-{n}"
        n += 1
    return candidate


# ---- uploads -------------------------------------------------------------------------------------
def safe_name(name: str, max_len: int = 80) -> str:
    """A file name without folders, control characters or shell-hostile characters."""
    base = unicodedata.normalize("NFKC", os.path.basename(str(name).replace("\\", "/")))
    base = re.sub(r"[^\w.\-]+", "_", base, flags=re.ASCII).strip("._")
    return base[:max_len]


@dataclasses.dataclass
class StagedUploads:
    folder: Path
    images: list[Path]
    rejected: list[tuple[str, str]]  # (file name, reason)

    def warnings(self) -> list[str]:
        return [f"{name}: {reason}" for name, reason in self.rejected]


def stage_uploads(files: Iterable[str | os.PathLike], dest: str | os.PathLike) -> StagedUploads:
    """Copy uploaded images (and NAME.txt captions beside them) into ``dest``, validated.

    An image is whatever PIL can open and verify, whatever its extension says; it is saved
    under a sanitised name with the suffix of its real format. At most MAX_UPLOAD_FILES images
    of MAX_UPLOAD_BYTES each; the rest are rejected with a reason. Raises StudioError when no
    usable image is left.
    """
    from PIL import Image, UnidentifiedImageError

    files = [Path(f) for f in files or []]
    dest = Path(dest)
    rejected: list[tuple[str, str]] = []
    images: list[Path] = []
    captions: dict[str, Path] = {}
    used: set[str] = set()
    staged = dest.with_name(dest.name + f".tmp{os.getpid()}")
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    try:
        for f in files:
            shown = f.name
            try:
                size = f.stat().st_size
            except OSError:
                rejected.append((shown, "could not be read"))
                continue
            if size > MAX_UPLOAD_BYTES:
                rejected.append((shown, f"{size / 2**20:.1f} MB is over the {MAX_UPLOAD_BYTES / 2**20:g} MB limit"))
                continue
            if f.suffix.lower() == ".txt":
                captions[safe_name(f.stem)] = f
                continue
            try:
                with Image.open(f) as im:
                    fmt = im.format
                    im.verify()
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
                why = "not an image" if isinstance(exc, UnidentifiedImageError) else "a damaged image"
                rejected.append((shown, f"{why}; upload PNG, JPEG or WebP files"))
                continue
            if fmt not in IMAGE_SUFFIX:
                rejected.append((shown, f"{fmt} images are not supported; upload PNG, JPEG or WebP files"))
                continue
            if len(images) >= MAX_UPLOAD_FILES:
                rejected.append((shown, f"more than {MAX_UPLOAD_FILES} images; the rest were left out"))
                continue
            stem = safe_name(f.stem) or "image"
            name = stem
            n = 2
            while name.lower() in used:
                name = f"{stem}-{n}"
                n += 1
            used.add(name.lower())
            target = staged / (name + IMAGE_SUFFIX[fmt])
            shutil.copyfile(f, target)
            images.append(target)
        stems = {p.stem: p for p in images}
        for stem, f in captions.items():
            if stem not in stems:
                rejected.append((f.name, "a caption without an image of the same name"))
                continue
            try:
                text = f.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                rejected.append((f.name, "not a UTF-8 text file"))
                continue
            (staged / f"{stem}.txt").write_text(text.strip() + "\n", encoding="utf-8")
        if not images:
            reasons = "; ".join(f"{n}: {r}" for n, r in rejected[:5])
            raise StudioError("no usable image was uploaded" + (f" ({reasons})" if reasons else
                                                                "; add PNG, JPEG or WebP files"))
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, dest)  # the folder appears whole or not at all
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return StagedUploads(folder=dest, images=[dest / p.name for p in images], rejected=rejected)


def format_eta(seconds: float | None) -> str:
    """12s, 3m 05s, 1h 02m."""
    if seconds is None:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"
