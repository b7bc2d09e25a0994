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
from types import SimpleNamespace
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
# adapter files imported into the library: SDXL LoRAs reach a few hundred MB
MAX_ADAPTER_BYTES = 1024 * 1024 * 1024
MAX_ADAPTER_FILES = 20
IMAGE_SUFFIX = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "BMP": ".bmp", "GIF": ".gif", "TIFF": ".tiff"}

TrainFn = Callable[..., Any]  # train(cfg, on_event=..., cancel=...) -> TrainResult-like
RegisterFn = Callable[[Any, Any], Any]  # register(cfg, result) -> library record (or None)
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
    tests pass a fake one. ``generate_fn(params, base=, out_dir=, sweep=, emit=, cancel=) -> dict``
    and ``register_fn(cfg, result) -> record`` (default: :func:`register_training`) likewise.
    """

    def __init__(self, train_fn: TrainFn | None = None, generate_fn: Callable[..., Any] | None = None,
                 register_fn: RegisterFn | None = None, keep_finished: int = KEEP_FINISHED) -> None:
        self._train_fn = train_fn
        self._generate_fn = generate_fn
        self._register_fn = register_fn or register_training
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
            job_id = self._new_id(kind)
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

        register = self._register_fn

        def run(emit: Callable[[Any], None], cancel: threading.Event) -> Any:
            result = _plain(train_fn(cfg, on_event=emit, cancel=cancel))
            if cfg.register:
                # as `studio train` does: the adapter is on disk either way, so a library problem
                # is a message on the finished job, not a failed training
                try:
                    record = register(cfg, SimpleNamespace(**result) if isinstance(result, dict) else result)
                except StudioError as exc:
                    emit({"phase": "done", "message": f"not added to the library: {exc}"})
                else:
                    if record is not None:
                        result["library_name"] = record.name
                        emit({"phase": "done", "message": f"added to the library as {record.name}"})
            return result

        label = cfg.name or Path(cfg.out or cfg.images).name or cfg.kind
        return self.submit("train", run, label=label, params=dataclasses.asdict(cfg))

    def submit_generate(self, params: Any, base: str = "micro", out_dir: str | os.PathLike | None = None,
                        sweep: str | None = None) -> str:
        """Queue a generation (a GenerationParams or a dict of its fields) on ``base``.

        ``params.adapters`` (spec strings) and ``<lora:...>`` tags in the prompt mix adapters in.
        ``sweep`` (``NAME=W1,W2,...``) makes a weight-sweep grid instead: one column per weight.
        Images go to ``out_dir`` (default: STUDIO_HOME/outputs/<date>/); the result holds their
        paths and infotext (and ``grid``, the grid's path, for a sweep).
        """
        from studio.generation import GenerationParams

        if isinstance(params, dict):
            try:
                params = GenerationParams(**params)
            except TypeError as exc:
                raise StudioError(f"generate job: {exc}") from exc
        params.validate()
        if sweep is not None:
            from studio.mixing import parse_sweep

            parse_sweep(sweep)  # a bad sweep fails here, not on the worker
        out = Path(out_dir) if out_dir else outputs_dir() / datetime.date.today().isoformat()
        gen_fn = self._generate_fn or self._generate

        def run(emit: Callable[[Any], None], cancel: threading.Event) -> Any:
            return gen_fn(params, base=base, out_dir=out, sweep=sweep, emit=emit, cancel=cancel)

        label = params.prompt[:60] or "generate"
        return self.submit("generate", run, label=f"sweep {sweep}: {label}" if sweep else label,
                           params={**_plain(params), "base": base, "sweep": sweep})

    # ---- jobs that run elsewhere (Ray tasks of `studio batch --cluster`) -------------------------
    def track(self, kind: str, label: str = "", params: dict[str, Any] | None = None) -> str:
        """List a job that runs outside this manager: its runner feeds it with :meth:`record` and
        ends it with :meth:`end`; it is read and cancelled like a local one but never queued here."""
        with self._lock:
            job_id = self._new_id(kind)
            self._jobs[job_id] = _Job(id=job_id, kind=kind, label=label or kind, fn=lambda emit, cancel: None,
                                      params=_plain(params or {}), state="running", started=time.time())
            self._changed.notify_all()
        return job_id

    def record(self, job_id: str, ev: Any) -> None:
        """A progress event (an Event, a dict or a message) of a tracked job."""
        with self._lock:
            self._record(self._get(job_id), _event_dict(ev))

    def end(self, job_id: str, state: str, *, result: Any = None, error: str | None = None) -> None:
        """Finish a tracked job: ``state`` is done, failed or cancelled."""
        if state not in FINISHED:
            raise ValueError(f"state {state!r}: one of {', '.join(FINISHED)}")
        with self._lock:
            self._finish(self._get(job_id), state, result=_plain(result), error=error)

    def cancel_requested(self, job_id: str) -> bool:
        """Whether :meth:`cancel` was called on the job (a tracked job's runner polls this)."""
        with self._lock:
            return self._get(job_id).cancel.is_set()

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
    def _new_id(self, kind: str) -> str:
        return f"{kind}-{next(self._ids):04d}-{os.urandom(2).hex()}"

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

    def _generate(self, params: Any, *, base: str, out_dir: Path, sweep: str | None, emit: Callable[[Any], None],
                  cancel: threading.Event) -> dict[str, Any]:
        """Load ``base`` (kept loaded for the next job) and generate; runs on the worker thread."""
        from studio.generation import generate, generate_sweep, model_defaults, save_grid, save_images
        from studio.loading import load_pipeline

        pipe = self._pipes.get(base)
        if pipe is None:
            emit({"phase": "prepare", "message": f"loading {base}"})
            self._pipes.clear()  # one model in memory at a time
            pipe = self._pipes[base] = load_pipeline(base)
        steps = params.steps or model_defaults(pipe)["steps"]
        images_n = len(params.seeds) if params.seeds else params.num
        passes = -(-images_n // params.batch_size)  # callbacks come once per step per batch
        columns = 1
        if sweep is not None:
            from studio.mixing import parse_sweep

            columns = len(parse_sweep(sweep).values)
        total = steps * passes * columns
        done = [0]

        def on_step(p: Any, i: int, t: Any, kwargs: dict) -> dict:
            if cancel.is_set():
                raise Cancelled("generation cancelled")
            done[0] += 1
            emit({"phase": "generate", "step": done[0], "total": total})
            return kwargs

        params = dataclasses.replace(params, steps=steps)
        if sweep is None:
            images = generate(pipe, params, callback=on_step)
            paths = save_images(images, out_dir)
            grid_path = None
        else:
            rows, grid = generate_sweep(pipe, params, sweep, callback=on_step)
            images = [im for row in rows for im in row]
            paths = save_images(images, out_dir)
            grid_path = save_grid(grid, out_dir / f"{paths[0].stem}-grid.png")
        emit({"phase": "done", "step": total, "total": total,
              "message": f"wrote {len(paths) + (grid_path is not None)} image(s) to {out_dir}",
              "samples": [str(p) for p in ([grid_path] if grid_path else []) + paths]})
        result: dict[str, Any] = {"images": [str(p) for p in paths],
                                  "parameters": [im.info.get("parameters", "") for im in images]}
        if grid_path is not None:
            result["grid"] = str(grid_path)
            result["grid_parameters"] = grid.info.get("parameters", "")
        return result


_default: JobManager | None = None
_default_lock = threading.Lock()


def default_manager() -> JobManager:
    """The process-wide manager (created on first use)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = JobManager()
        return _default


# ---- folders ------------------------------------------------------------------------------------
def runs_dir() -> Path:
    """Where UI training jobs work: STUDIO_HOME/runs/<name>/ (checkpoints, samples, the adapter)."""
    return studio_home() / "runs"


def outputs_dir() -> Path:
    """Where generated images go: STUDIO_HOME/outputs/<date>/."""
    return studio_home() / "outputs"


def uploads_dir() -> Path:
    """Where uploaded training images are staged: STUDIO_HOME/uploads/<name>-<time>/."""
    return studio_home() / "uploads"


def unique_run_dir(name: str) -> Path:
    """STUDIO_HOME/runs/<name>, or <name>-2, -3, ... where that folder exists."""
    name = safe_name(name) or "adapter"
    candidate = runs_dir() / name
    n = 2
    while candidate.exists():
        candidate = runs_dir() / f"{name}-{n}"
        n += 1
    return candidate


# ---- batches of job files (the Jobs tab) --------------------------------------------------------------
def job_files(text: str) -> tuple[list[Path], list[str]]:
    """Job files named one per line (or comma-separated), globs allowed; returns (files, problems)."""
    import glob

    files: list[Path] = []
    problems: list[str] = []
    for item in (w.strip() for w in re.split(r"[\n,]", text or "")):
        if not item:
            continue
        matches = sorted(glob.glob(os.path.expanduser(item))) if any(c in item for c in "*?[") else [item]
        if not matches:
            problems.append(f"{item}: no file matches")
        for m in matches:
            p = Path(os.path.expanduser(m))
            if not p.is_file():
                problems.append(f"{p}: no such job file")
            elif p not in files:
                files.append(p)
    return files, problems


def start_batch(manager: JobManager, files: Iterable[str | os.PathLike], cluster: str = "",
                logs: str | os.PathLike | None = None, resume: bool = False, **options: Any) -> list[str]:
    """Start a batch of job files as `studio batch` does; returns the ids of the job-view rows.

    Without ``cluster`` each job joins this manager's queue (a job file that does not parse is
    listed as a failed job). With ``cluster`` (auto, local[:N], ray://HOST:PORT) one row drives the
    batch on Ray from a background thread, and each Ray job gets its own row as it is submitted
    (studio.trainers.cluster); cancelling the driver's row cancels the batch, checkpoints kept.
    ``resume``: jobs continue from their last checkpoints. ``options``: further BatchOptions
    fields (num_cpus, num_gpus, max_retries, unschedulable_timeout...).
    """
    from studio.trainers.config import TrainConfig

    paths = [str(f) for f in files]
    if not paths:
        raise StudioError("no job files: name one or more TOML job files (see `studio batch --help`)")
    if not cluster:
        ids = []
        for path in paths:
            try:
                cfg = TrainConfig.from_toml(path)
                cfg.resume = cfg.resume or resume
                ids.append(manager.submit_train(cfg))
            except StudioError as exc:
                row = manager.track("train", label=Path(path).stem, params={"job": path})
                manager.end(row, "failed", error=str(exc))
                ids.append(row)
        return ids
    from studio.trainers.cluster import BatchOptions, parse_address, require_ray, run_cluster_batch

    parse_address(cluster)  # a malformed address or a missing Ray fails here, at once, not in the thread
    require_ray()
    folder = Path(logs) if logs else runs_dir() / f"batch-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    driver = manager.track("batch", label=f"batch of {len(paths)} on Ray {cluster}",
                           params={"jobs": paths, "cluster": cluster, "logs": str(folder)})
    opts = BatchOptions(cluster=cluster, logs=folder, manager=manager, view=driver, resume=resume, **options)

    def drive() -> None:
        import io

        out = io.StringIO()
        try:
            rc = run_cluster_batch(paths, opts, stream=_RecordStream(manager, driver), out=out)
        except StudioError as exc:
            manager.end(driver, "failed", error=str(exc))
            return
        except Exception as exc:  # the thread's end is the only place left to say it
            log.exception("cluster batch failed")
            manager.end(driver, "failed", error=f"{type(exc).__name__}: {exc}")
            return
        manager.record(driver, out.getvalue().strip())
        state = {0: "done", 130: "cancelled"}.get(rc, "failed")
        manager.end(driver, state, result={"logs": str(folder), "exit_status": rc},
                    error=None if rc == 0 else ("cancelled; the jobs' last checkpoints are kept (start the batch again "
                                                 "with resume)" if rc == 130 else f"some jobs failed: see {folder}"))

    threading.Thread(target=drive, name="studio-batch", daemon=True).start()
    return [driver]


class _RecordStream:
    """A text stream whose complete lines become messages of a job-view row."""

    def __init__(self, manager: JobManager, job_id: str) -> None:
        self.manager, self.job_id, self._buf = manager, job_id, ""

    def write(self, text: str) -> int:
        self._buf += text.replace("\r", "\n")
        *lines, self._buf = self._buf.split("\n")
        for line in lines:
            if line.strip():
                self.manager.record(self.job_id, line.strip())
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


# ---- the adapter library ----------------------------------------------------------------------------
def register_training(cfg: Any, result: Any) -> Any:
    """Add a finished training run (``result.out``) to the library, as `studio train` does.

    A taken name becomes NAME-2, NAME-3, ...; returns the library record.
    """
    from studio.library import Library, derive_name

    wanted = derive_name(cfg.name or Path(result.out).name)
    record = Library().add(result.out, name=wanted, description=cfg.description, unique=True)
    log.info("added %s to the library as %s", result.out, record.name)
    return record


def list_adapters(query: str = "") -> list[dict[str, Any]]:
    """The library's adapters as plain dicts, filtered by name, trigger or description.

    Each is :meth:`AdapterRecord.to_dict` plus ``trigger`` (the trigger words joined) and
    ``samples`` reduced to the files that exist.
    """
    from studio.library import Library

    out = []
    for record in Library().find(query):
        entry = record.to_dict()
        entry["trigger"] = ", ".join(record.triggers)
        entry["samples"] = [str(p) for p in record.samples if p.is_file()]
        out.append(entry)
    return out


def find_adapters(prompt: str, k: int = 2) -> dict[str, Any]:
    """AutoLoRA's search for the Generate tab: the top-``k`` adapters for ``prompt`` by their weights.

    Returns ``{"hits": [{name, score, match, target}], "source", "threshold", "note", "gates"}``: ``target``
    is what a mix row takes (the library name, or the file of a zoo adapter when the library has
    none the encoder reads), ``match`` whether the score clears the encoder's threshold (below it
    the adapter is listed but not suggested; ``note`` says why nothing matches when the prompt has no
    word the encoder knows), ``gates`` whether a gate file exists for a gated mix.
    """
    from studio.autolora.gates import DEFAULT_GATES
    from studio.autolora.retrieval import is_match, retrieve

    hits, source, pipe = retrieve(prompt, int(k))
    return {
        "hits": [{"name": h.name, "score": round(h.score, 4), "match": is_match(pipe, h),
                  "target": h.name if source.startswith("library") else h.path} for h in hits],
        "source": source, "threshold": round(float(pipe.studio_match_threshold), 4),
        "note": pipe.studio_match_note or "", "gates": DEFAULT_GATES.is_file(),
    }


def import_adapters(files: Iterable[str | os.PathLike]) -> tuple[list[str], list[tuple[str, str]]]:
    """Add uploaded adapter files (.safetensors) to the library: (added names, [(file, reason)]).

    At most MAX_ADAPTER_FILES files of MAX_ADAPTER_BYTES each; a taken name becomes NAME-2.
    The library reads the file's header to tell what it is; anything else is refused with a reason.
    """
    from studio.library import Library, derive_name

    lib = Library()
    added: list[str] = []
    rejected: list[tuple[str, str]] = []
    for i, f in enumerate(Path(f) for f in files or []):
        shown = safe_name(f.name) or "file"
        if i >= MAX_ADAPTER_FILES:
            rejected.append((shown, f"more than {MAX_ADAPTER_FILES} files at once; the rest were left out"))
            continue
        if f.suffix.lower() != ".safetensors":
            rejected.append((shown, "not a .safetensors file; the library takes .safetensors adapters only"))
            continue
        problem = _size_problem(f, MAX_ADAPTER_BYTES)
        if problem:
            rejected.append((shown, problem))
            continue
        try:
            record = lib.add(f, name=derive_name(Path(shown).stem), unique=True)
        except StudioError as exc:
            # the library names the upload's temporary path: say the file's own name instead
            rejected.append((shown, str(exc).replace(f"{f}: ", "").replace(str(f), shown)))
            continue
        added.append(record.name)
    return added, rejected


# ---- uploads -------------------------------------------------------------------------------------
def _size_problem(f: Path, limit: int) -> str | None:
    """Why an uploaded file cannot be taken for its size (None when it can)."""
    try:
        size = f.stat().st_size
    except OSError:
        return "could not be read"
    if size > limit:
        return f"{size / 2**20:.1f} MB is over the {limit / 2**20:g} MB limit"
    return None


def safe_name(name: str, max_len: int = 80) -> str:
    """A file name without folders, control characters or shell-hostile characters."""
    base = unicodedata.normalize("NFKC", os.path.basename(str(name).replace("\\", "/")))
    base = re.sub(r"[^\w.\-]+", "_", base, flags=re.ASCII).strip("._")
    return base[:max_len]


@dataclasses.dataclass
class _Rejections:
    rejected: list[tuple[str, str]]  # (file name, reason)

    def warnings(self) -> list[str]:
        """One line per rejected file."""
        return [f"{name}: {reason}" for name, reason in self.rejected]


@dataclasses.dataclass
class UploadCheck(_Rejections):
    """What :func:`check_uploads` found: images to keep (source, name), captions, rejections."""

    images: list[tuple[Path, str]]  # (uploaded file, sanitised file name with its real format's suffix)
    captions: dict[str, Path]  # sanitised stem -> uploaded NAME.txt

    def summary(self, limit: int = 8) -> str:
        """A short report for the page: how many images are usable, and why the others are not."""
        text = f"{len(self.images)} image{'s' if len(self.images) != 1 else ''} ready"
        if self.captions:
            text += f", {len(self.captions)} caption{'s' if len(self.captions) != 1 else ''}"
        if self.rejected:
            lines = self.warnings()
            more = len(lines) - limit
            text += f"; {len(self.rejected)} file{'s' if len(self.rejected) != 1 else ''} refused:\n" + \
                "\n".join(f"- {line}" for line in lines[:limit]) + (f"\n- ... and {more} more" if more > 0 else "")
        return text


@dataclasses.dataclass
class StagedUploads(_Rejections):
    """Training images copied into ``folder`` by :func:`stage_uploads`."""

    folder: Path
    images: list[Path]


def check_uploads(files: Iterable[str | os.PathLike]) -> UploadCheck:
    """Validate uploaded training images (and NAME.txt captions) without copying anything.

    An image is whatever PIL can open and verify, whatever its extension says; it keeps a
    sanitised name with the suffix of its real format. At most MAX_UPLOAD_FILES images of
    MAX_UPLOAD_BYTES each; the rest are rejected with a reason.
    """
    from PIL import Image, UnidentifiedImageError

    rejected: list[tuple[str, str]] = []
    images: list[tuple[Path, str]] = []
    captions: dict[str, Path] = {}
    used: set[str] = set()
    for f in (Path(f) for f in files or []):
        shown = f.name
        problem = _size_problem(f, MAX_UPLOAD_BYTES)
        if problem:
            rejected.append((shown, problem))
            continue
        if f.suffix.lower() == ".txt":
            captions[safe_name(f.stem)] = f
            continue
        if len(images) >= MAX_UPLOAD_FILES:
            rejected.append((shown, f"more than {MAX_UPLOAD_FILES} images; the rest were left out"))
            continue
        try:
            with Image.open(f) as im:
                fmt = im.format
                im.verify()
        except Image.DecompressionBombError:
            rejected.append((shown, f"too many pixels (over {Image.MAX_IMAGE_PIXELS} px); upload smaller images"))
            continue
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            why = "not an image" if isinstance(exc, UnidentifiedImageError) else "a damaged image"
            rejected.append((shown, f"{why}; upload PNG, JPEG or WebP files"))
            continue
        if fmt not in IMAGE_SUFFIX:
            rejected.append((shown, f"{fmt} images are not supported; upload PNG, JPEG or WebP files"))
            continue
        stem = safe_name(f.stem) or "image"
        name = stem
        n = 2
        while name.lower() in used:
            name = f"{stem}-{n}"
            n += 1
        used.add(name.lower())
        images.append((f, name + IMAGE_SUFFIX[fmt]))
    stems = {Path(name).stem for _, name in images}
    for stem, f in list(captions.items()):
        if stem not in stems:
            rejected.append((f.name, "a caption without an image of the same name"))
            del captions[stem]
    return UploadCheck(images=images, captions=captions, rejected=rejected)


def stage_uploads(files: Iterable[str | os.PathLike], dest: str | os.PathLike) -> StagedUploads:
    """Copy the uploads that pass :func:`check_uploads` into ``dest``, atomically.

    Raises StudioError when no usable image is left; ``dest`` then does not exist.
    """
    check = check_uploads(files)
    rejected = list(check.rejected)
    if not check.images:
        reasons = "; ".join(f"{n}: {r}" for n, r in rejected[:5])
        raise StudioError("no usable image was uploaded" + (f" ({reasons})" if reasons else
                                                            "; add PNG, JPEG or WebP files"))
    dest = Path(dest)
    staged = dest.with_name(dest.name + f".tmp{os.getpid()}")
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    try:
        for src, name in check.images:
            shutil.copyfile(src, staged / name)
        for stem, f in check.captions.items():
            try:
                text = f.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                rejected.append((f.name, "not a UTF-8 text file"))
                continue
            (staged / f"{stem}.txt").write_text(text.strip() + "\n", encoding="utf-8")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staged, dest)  # the folder appears whole or not at all
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return StagedUploads(folder=dest, images=[dest / name for _, name in check.images], rejected=rejected)


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
