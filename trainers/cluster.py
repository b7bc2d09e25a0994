"""`studio batch --cluster`: each training job a Ray task; the driver keeps the library.

Ray does the scheduling, placement, retries and the dashboard; this module only turns job
files into tasks and results back into library entries:

- :func:`connect` reaches ``auto``, ``ray://host:port``, ``host:port`` or starts ``local[:N]``
  in-process; an unreachable address is one :class:`StudioError` within ``connect_timeout``.
- :func:`_job_task` runs on a worker: it trains into the job's folder (``out``), never touches
  the library, and posts its progress events to a :class:`_Hub` actor. A retried attempt
  (Ray's ``max_retries`` after a worker died) resumes from the folder's last checkpoint.
- :func:`run_cluster_batch` is the driver: it submits the tasks, draws one progress line per
  running job, reports jobs no node can ever hold as unschedulable after a timeout, cancels
  cleanly on Ctrl-C (checkpoints kept for ``--resume``), and registers finished adapters.

Nothing here imports torch or Ray at module level: workers import this module first, and
``studio --help`` must not pay for Ray.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import sys
import time
import tomllib
from pathlib import Path
from typing import Any, TextIO

from studio.errors import MissingDependencyError, StudioError

log = logging.getLogger(__name__)

CHECKPOINT_STEP = Path("checkpoints") / "step.json"  # the loop's marker of a complete checkpoint
LORA_FILE = "pytorch_lora_weights.safetensors"  # studio.adapters.core.LORA_FILE, without importing torch
POLL_S = 0.5  # how often the driver looks at tasks and progress
TRAIN_EVENT_EVERY_S = 0.5  # a worker sends at most this many train events a second (the last step always)
CANCEL_GRACE_S = 60.0  # after Ctrl-C, how long running jobs get to write their checkpoint


def require_ray() -> Any:
    """Import Ray, or raise a clear error saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise MissingDependencyError(
            "--cluster needs Ray, which is not installed: pip install 'diffusion-studio[cluster]' "
            "(or pip install ray); without --cluster, `studio batch` runs the jobs one after another") from exc
    return ray


# ---- addresses ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ClusterAddress:
    """A parsed ``--cluster`` value: ``kind`` is local, auto, client (ray://) or gcs (host:port)."""

    kind: str
    host: str = ""
    port: int = 0
    workers: int | None = None  # local: number of CPU slots (worker processes running at once)

    @property
    def text(self) -> str:
        if self.kind == "local":
            return f"local:{self.workers}" if self.workers else "local"
        if self.kind == "auto":
            return "auto"
        return f"{'ray://' if self.kind == 'client' else ''}{self.host}:{self.port}"


def parse_address(spec: str) -> ClusterAddress:
    """``auto``, ``local``, ``local:N``, ``ray://host:port`` or ``host:port`` (a head's GCS port)."""
    s = spec.strip()
    if s == "auto":
        return ClusterAddress("auto")
    if s == "local" or s.startswith("local:"):
        n = s.partition(":")[2]
        if n and (not n.isdigit() or int(n) < 1):
            raise StudioError(f"--cluster {spec}: local:N needs a whole number of workers >= 1, e.g. local:2")
        return ClusterAddress("local", workers=int(n) if n else None)
    kind = "client" if s.startswith("ray://") else "gcs"
    host, sep, port = s.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise StudioError(f"--cluster {spec}: expected auto, local[:N], ray://HOST:PORT or HOST:PORT")
    return ClusterAddress(kind, host=host.strip("[]"), port=int(port))


def _check_reachable(addr: ClusterAddress, timeout: float) -> None:
    """A plain TCP connect first: Ray's own connect retries for a minute or more on a dead address."""
    try:
        with socket.create_connection((addr.host, addr.port), timeout=timeout):
            pass
    except OSError as exc:
        why = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        hint = "the head's client port, 10001 by default" if addr.kind == "client" else "the head's GCS port, 6379"
        raise StudioError(f"--cluster {addr.text}: cannot reach a Ray cluster there ({why} after at most "
                          f"{timeout:g}s); check the address ({hint}) or start one with `ray start --head`") from exc


def connect(spec: str, connect_timeout: float = 5.0) -> bool:
    """Connect the driver to the Ray cluster ``spec`` (or start a local one).

    Returns True when this call connected (so the caller should ``ray.shutdown()`` at the end),
    False when Ray was already initialised in this process (a test, a notebook) and is reused.
    """
    ray = require_ray()
    addr = parse_address(spec)
    if ray.is_initialized():
        return False
    kw: dict[str, Any] = dict(log_to_driver=False, logging_level=logging.ERROR, namespace="studio")
    if addr.kind == "local":
        _start_local(ray, addr.workers or os.cpu_count() or 1, kw)
        return True
    if addr.kind in ("client", "gcs"):
        _check_reachable(addr, connect_timeout)
    try:
        ray.init(address=addr.text, **kw)
    except (ConnectionError, RuntimeError, TimeoutError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise StudioError(f"--cluster {addr.text}: could not connect to Ray ({first}); start a cluster with "
                          f"`ray start --head`, or use --cluster local:N for one on this machine") from exc
    return True


def _start_local(ray: Any, workers: int, kw: dict[str, Any]) -> None:
    """Start an in-process Ray instance; the workers inherit this process's environment
    (STUDIO_HOME, HF_HUB_OFFLINE, ...). Ray gives its raylet a fixed 30 s to register, which a
    heavily loaded machine can miss: one more try, then a clear error.

    Workers run at this process's priority: Ray's default niceness 15 made a batch 3.6x slower than
    the same jobs run by `studio batch` next to other busy processes (docs/CLUSTER.md)."""
    os.environ.setdefault("RAY_worker_niceness", "0")  # read by the raylet that ray.init starts
    for attempt in (1, 2):
        try:
            ray.init(num_cpus=workers, include_dashboard=False, **kw)
            return
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception for a slow start
            _end_orphans()
            if attempt == 2:
                raise StudioError(f"--cluster local:{workers}: Ray did not start ({exc}); the machine may be too "
                                  f"busy: try again, or start Ray once with `ray start --head --num-cpus "
                                  f"{workers}` and use --cluster auto") from exc
            log.warning("Ray did not start in time (%s); trying once more", exc)


def _end_orphans() -> None:
    """Stop the Ray processes a failed ``ray.init`` started from this process (they outlive it)."""
    try:
        import psutil
    except ImportError:
        return
    for child in psutil.Process().children(recursive=True):
        try:
            if "ray" in " ".join(child.cmdline()):
                child.kill()
        except psutil.Error:
            pass


# ---- jobs ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class ClusterJob:
    """One job of a cluster batch as the driver sees it."""

    index: int
    path: str
    label: str
    cfg: Any = None  # TrainConfig; None when the job file itself is bad
    resources: dict[str, float] = dataclasses.field(default_factory=dict)
    max_retries: int = 3
    ref: Any = None
    state: str = "pending"  # pending | running | done | failed | cancelled | unschedulable
    submitted: float = 0.0
    started: float | None = None
    finished: float | None = None
    attempts: int = 0
    worker: str = ""  # pid@node of the latest attempt
    pids: list[int] = dataclasses.field(default_factory=list)
    step: int = 0
    total: int = 0
    loss: float | None = None
    eta_s: float | None = None
    resumed_from: int = 0
    phase: str = ""  # the latest "prepare" message (loading, caching, class images n/N)
    result: dict[str, Any] | None = None
    error: str = ""
    note: str = ""
    view: str | None = None  # its id in a service.JobManager (the UI's job view), when one watches
    cancel_sent: bool = False  # the job view asked this one job to stop
    settled: bool = False  # registered (when done) and reported to the job view

    def mirror(self, manager: Any, ev: dict[str, Any] | None = None) -> None:
        """Tell the job view about an event, or (without one) that the job has ended."""
        if manager is None or self.view is None:
            return
        if ev is not None:
            manager.record(self.view, ev)
        elif self.state not in ("pending", "running"):
            state = {"done": "done", "cancelled": "cancelled"}.get(self.state, "failed")
            manager.end(self.view, state, result=self.result if self.state == "done" else None,
                        error=self.error or None)

    def asked(self) -> str:
        return ", ".join(f"{k.lower().replace('cpu', 'num_cpus').replace('gpu', 'num_gpus')}={v:g}"
                         for k, v in self.resources.items())


CLUSTER_KEYS = ("num_cpus", "num_gpus", "max_retries")


def load_job(path: str, index: int, total: int, defaults: dict[str, Any], resume: bool) -> ClusterJob:
    """A job file (TrainConfig fields, plus an optional ``[cluster]`` table of num_cpus, num_gpus,
    max_retries) with paths made absolute, since workers do not share the driver's folder."""
    from studio.trainers.config import TrainConfig
    from studio.trainers.loop import default_name

    job = ClusterJob(index=index, path=path, label=f"[{index + 1}/{total} {Path(path).stem}]")
    try:
        table = tomllib.loads(Path(path).read_text()).get("cluster", {})
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        table = {}  # from_toml below says what is wrong with the file
    cfg = TrainConfig.from_toml(path)
    if not isinstance(table, dict) or set(table) - set(CLUSTER_KEYS):
        raise StudioError(f"{path}: [cluster] takes only {', '.join(CLUSTER_KEYS)}")
    opts = {**defaults, **{k: v for k, v in table.items() if v is not None}}
    for key in CLUSTER_KEYS:
        v = opts.get(key)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0):
            raise StudioError(f"{path}: [cluster] {key} = {v!r}: must be a number >= 0")
    job.resources = {"CPU": float(opts.get("num_cpus") or 1)}
    if opts.get("num_gpus"):
        job.resources["GPU"] = float(opts["num_gpus"])
    job.max_retries = int(opts.get("max_retries", 3))
    cfg.out = str(Path(cfg.out or Path("out") / default_name(cfg)).absolute())
    cfg.images = str(Path(cfg.images).absolute())
    if Path(cfg.base).exists():
        cfg.base = str(Path(cfg.base).absolute())
    cfg.resume = cfg.resume or resume
    job.cfg = cfg
    return job


def finished_earlier(out: str | os.PathLike) -> bool:
    """An output folder that holds a finished adapter and no checkpoint to continue."""
    return (Path(out) / LORA_FILE).is_file() and not (Path(out) / CHECKPOINT_STEP).is_file()


# ---- the worker side ----------------------------------------------------------------------------
class _Hub:
    """The driver's mailbox (a Ray actor): workers post events, the driver drains them.

    Workers only ever post (fire and forget): a task that waits in ``ray.get``/``ray.wait`` lends
    its CPU slot to another task (Ray's guard against deadlock), so more jobs would run than the
    cluster has slots."""

    def __init__(self) -> None:
        self.events: list[tuple[int, dict[str, Any]]] = []

    def report(self, index: int, event: dict[str, Any]) -> None:
        self.events.append((index, event))

    def drain(self) -> list[tuple[int, dict[str, Any]]]:
        out, self.events = self.events, []
        return out


RETRY_MARK = ".studio-batch"  # in a job folder while a batch runs it: "<token>"; a retried task finds it


def _job_task(index: int, cfg_json: str, hub: Any, token: str) -> dict[str, Any]:
    """Train one job on a worker; returns a plain result dict (errors included, so Ray retries only
    when the worker itself died, never a job that failed on its own input).

    ``ray.cancel(ref)`` (not forced) reaches a running task as SIGINT in its main thread; it sets
    the loop's cancel flag, so the job writes a checkpoint and stops instead of dying mid-step."""
    import signal
    import threading

    import ray

    hub.report.remote(index, {"phase": "started", "pid": os.getpid(), "node": ray.util.get_node_ip_address()})
    cancel = threading.Event()
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, lambda *_: cancel.set()) if main else None
    try:
        return _run_job(index, cfg_json, hub, token, cancel)
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)


def _run_job(index: int, cfg_json: str, hub: Any, token: str, cancel: Any) -> dict[str, Any]:
    base = {"pid": os.getpid()}
    try:
        from studio.trainers.config import TrainConfig
        from studio.trainers.loop import Cancelled, train

        cfg = TrainConfig.from_dict(json.loads(cfg_json), source=f"job {index + 1}")
        mark = Path(cfg.out) / RETRY_MARK
        if mark.is_file() and mark.read_text() == token:  # Ray retried it after its worker died
            cfg.resume = True
        if cfg.resume and finished_earlier(cfg.out):
            return {**base, "ok": True, "skipped": True, "out": cfg.out, "adapter_file": str(Path(cfg.out) / LORA_FILE)}
    except Exception as exc:  # noqa: BLE001 - reported as this job's error
        return {**base, "ok": False, "error": f"{type(exc).__name__}: {exc}" if not isinstance(exc, StudioError)
                else str(exc)}

    last = [0.0]
    resumed = [0]
    marked = [False]

    def forward(ev: Any) -> None:
        d = dataclasses.asdict(ev)
        if d["phase"] == "prepare" and d["step"] and d["message"].startswith("resumed"):
            resumed[0] = d["step"]
        if d["phase"] == "train" and not marked[0]:  # the folder exists now, and no checkpoint yet
            mark.write_text(token)
            marked[0] = True
        now = time.monotonic()
        if d["phase"] == "train" and d["step"] != d["total"] and now - last[0] < TRAIN_EVENT_EVERY_S:
            return
        last[0] = now
        hub.report.remote(index, d)  # fire and forget: progress must never slow the training

    try:
        res = train(cfg, on_event=forward, cancel=cancel)
    except Cancelled as exc:
        return {**base, "ok": False, "cancelled": True, "error": str(exc), "resumed_from": resumed[0]}
    except StudioError as exc:
        return {**base, "ok": False, "error": str(exc), "resumed_from": resumed[0]}
    except Exception as exc:  # noqa: BLE001 - a bug, but still only this job's
        log.exception("job %d crashed", index + 1)
        return {**base, "ok": False, "error": f"{type(exc).__name__}: {exc} (a bug: see the Ray worker log)",
                "resumed_from": resumed[0]}
    finally:  # not reached when the worker is killed: then the mark stays for Ray's retry
        with contextlib.suppress(OSError):  # an unwritable or missing folder has none
            mark.unlink()
    return {**base, "ok": True, "out": str(res.out), "adapter_file": str(res.adapter_file), "steps": res.steps,
            "seconds": res.seconds, "final_loss": res.final_loss, "resumed_from": resumed[0]}


# ---- the driver ---------------------------------------------------------------------------------
def _fmt_line(job: ClusterJob) -> str:
    if job.state == "pending":
        return f"{job.label} waiting for {job.asked()}"
    if not job.total and job.phase:
        return f"{job.label} pid {job.worker}: {job.phase}"
    frac = job.step / job.total if job.total else 0.0
    bar = "#" * int(frac * 20)
    eta = f"{job.eta_s:4.0f}s" if job.eta_s is not None else "   ?"
    loss = f"{job.loss:.4f}" if job.loss is not None else "  ?   "
    retry = f" attempt {job.attempts}" if job.attempts > 1 else ""
    return f"{job.label} pid {job.worker}{retry} [{bar:<20}] {job.step}/{job.total or '?'} loss {loss} ETA {eta}"


class _Display:
    """One progress line per running job: redrawn in place on a terminal, every 10 s per job otherwise."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.drawn = 0
        self.last: dict[int, tuple[float, str]] = {}

    def note(self, text: str) -> None:
        self._clear()
        self.stream.write(text + "\n")
        self.stream.flush()

    def _clear(self) -> None:
        if self.tty and self.drawn:
            self.stream.write(f"\x1b[{self.drawn}F\x1b[J")
            self.drawn = 0

    def draw(self, jobs: list[ClusterJob]) -> None:
        running = [j for j in jobs if j.state == "running"]
        if self.tty:
            self._clear()
            for j in running:
                self.stream.write(_fmt_line(j) + "\n")
            self.drawn = len(running)
        else:
            now = time.monotonic()
            for j in running:  # a line when something changed, at most every 10 s a job (and the last step)
                line = _fmt_line(j)
                when, before = self.last.get(j.index, (-1e9, ""))
                if line != before and (now - when >= 10 or (j.total and j.step == j.total)):
                    self.stream.write(line + "\n")
                    self.last[j.index] = (now, line)
        self.stream.flush()


class _JobLog:
    """The per-job log file the driver writes from the job's events (workers never write it)."""

    def __init__(self, path: Path) -> None:
        from studio.trainers.cli import ProgressBar

        self.fh = open(path, "w")  # noqa: SIM115 - closed in close()
        self.bar = ProgressBar(stream=self.fh)

    def line(self, text: str) -> None:
        self.fh.write(f"{time.strftime('%H:%M:%S')} {text}\n")
        self.fh.flush()

    def event(self, ev: dict[str, Any]) -> None:
        from studio.trainers.loop import Event

        fields = {f.name for f in dataclasses.fields(Event)}
        self.bar(Event(**{k: v for k, v in ev.items() if k in fields}))

    def close(self) -> None:
        self.fh.close()


def _node_totals(ray: Any) -> list[dict[str, float]]:
    return [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]


def _fits(resources: dict[str, float], nodes: list[dict[str, float]]) -> bool:
    return any(all(node.get(k, 0.0) >= v for k, v in resources.items()) for node in nodes)


def _biggest(nodes: list[dict[str, float]]) -> str:
    if not nodes:
        return "no alive node"
    best = max(nodes, key=lambda n: (n.get("GPU", 0.0), n.get("CPU", 0.0)))
    return f"the largest node has CPU {best.get('CPU', 0):g}, GPU {best.get('GPU', 0):g}"


@dataclasses.dataclass
class BatchOptions:
    """The driver's settings (the `studio batch --cluster` flags)."""

    cluster: str
    logs: Path
    resume: bool = False
    num_cpus: float | None = None
    num_gpus: float | None = None  # None: 1 when the cluster has GPUs, else 0
    max_retries: int = 3
    unschedulable_timeout: float = 60.0
    connect_timeout: float = 5.0
    register: Any = None  # register(cfg, result) -> None; default: trainers.cli._register
    manager: Any = None  # a service.JobManager whose job view lists the jobs (the UI's)
    view: str | None = None  # the manager's row of the whole batch: cancelling it cancels the batch


def run_cluster_batch(paths: list[str], opts: BatchOptions, stream: TextIO | None = None,
                      out: TextIO | None = None) -> int:
    """Run job files as Ray tasks; progress on ``stream`` (stderr), the summary table on ``out``.

    Returns the exit status: 0 all ok, 1 some job failed, 130 cancelled by Ctrl-C.
    """
    stream = stream or sys.stderr
    out = out or sys.stdout
    ray = require_ray()
    t_connect = time.monotonic()
    owned = connect(opts.cluster, opts.connect_timeout)
    display = _Display(stream)
    nodes = _node_totals(ray)
    display.note(f"Ray cluster {opts.cluster}: {len(nodes)} node(s), {sum(n.get('CPU', 0) for n in nodes):g} CPU, "
                 f"{sum(n.get('GPU', 0) for n in nodes):g} GPU (connected in {time.monotonic() - t_connect:.1f}s)")
    opts.logs.mkdir(parents=True, exist_ok=True)
    defaults = {"num_cpus": opts.num_cpus or 1, "max_retries": opts.max_retries,
                "num_gpus": opts.num_gpus if opts.num_gpus is not None
                else (1 if any(n.get("GPU", 0) for n in nodes) else 0)}
    jobs: list[ClusterJob] = []
    logs: dict[int, _JobLog] = {}
    try:
        hub = ray.remote(num_cpus=0, max_restarts=0)(_Hub).remote()
        task = ray.remote(_job_task)
        token = f"{os.getpid()}-{time.time_ns()}"  # this batch run: a retried task finds it in its folder
        for i, path in enumerate(paths):
            logs[i] = _JobLog(opts.logs / f"{i + 1:02d}-{Path(path).stem}.log")
            try:
                job = load_job(path, i, len(paths), defaults, opts.resume)
            except StudioError as exc:
                job = ClusterJob(index=i, path=path, label=f"[{i + 1}/{len(paths)} {Path(path).stem}]",
                                 state="failed", error=str(exc), finished=time.monotonic())
                display.note(f"{job.label} FAILED: {exc}")
                logs[i].line(f"FAILED: {exc}")
            if opts.manager is not None:
                job.view = opts.manager.track("train", label=f"{Path(path).stem} (Ray {opts.cluster})",
                                              params={**(dataclasses.asdict(job.cfg) if job.cfg else {"job": path}),
                                                      "cluster": opts.cluster})
            jobs.append(job)
        for job in jobs:
            if job.state != "pending":
                continue
            job.submitted = time.monotonic()
            job.ref = task.options(num_cpus=job.resources["CPU"], num_gpus=job.resources.get("GPU", 0),
                                   max_retries=job.max_retries, retry_exceptions=False,
                                   name=f"studio-train {Path(job.path).stem}").remote(job.index, job.cfg.to_json(), hub,
                                                                                      token)
            logs[job.index].line(f"submitted to Ray ({job.asked()}, max_retries {job.max_retries}); out {job.cfg.out}")
        status = _drive(ray, jobs, hub, logs, display, opts)
    finally:
        for lg in logs.values():
            lg.close()
        if owned:
            ray.shutdown()
    _summary(jobs, out)
    _write_summary_json(jobs, opts.logs / "summary.json")
    if status == 130:
        stream.write("cancelled: the jobs' last checkpoints are kept; run the same batch again with --resume\n")
    return status


def _default_register(cfg: Any, result: dict[str, Any]) -> None:
    from types import SimpleNamespace

    from studio.trainers.cli import _register

    _register(cfg, SimpleNamespace(out=Path(result["out"])))


def _drive(ray: Any, jobs: list[ClusterJob], hub: Any, logs: dict[int, Any], display: _Display,
           opts: BatchOptions) -> int:
    """Wait for the tasks, streaming progress, until all are finished; 130 after Ctrl-C."""
    cancelling_since: float | None = None
    nodes = _node_totals(ray)
    nodes_at = time.monotonic()
    while True:
        try:
            live = [j for j in jobs if j.ref is not None and j.state in ("pending", "running")]
            if not live:
                break
            ready, _ = ray.wait([j.ref for j in live], num_returns=len(live), timeout=POLL_S)
            _apply_events(ray.get(hub.drain.remote()), jobs, logs, display, opts.manager)
            for job in live:
                if job.ref in ready:
                    _finish(ray, job, logs[job.index], display)
                elif opts.manager is not None and job.view and not job.cancel_sent \
                        and opts.manager.cancel_requested(job.view):
                    job.cancel_sent = True  # the job view's Cancel: this job only, checkpoint first
                    ray.cancel(job.ref, force=False)
            now = time.monotonic()
            if now - nodes_at > 5:  # nodes join and leave (autoscaling): look again now and then
                nodes, nodes_at = _node_totals(ray), now
            for job in live:
                if job.state == "pending" and not _fits(job.resources, nodes) \
                        and now - job.submitted >= opts.unschedulable_timeout:
                    ray.cancel(job.ref, force=False)
                    job.state, job.finished = "unschedulable", now
                    job.error = (f"unschedulable: asked for {job.asked()}, which no node of the cluster has "
                                 f"({_biggest(nodes)}); waited {opts.unschedulable_timeout:g}s "
                                 f"(--unschedulable-timeout)")
                    display.note(f"{job.label} {job.error}")
                    logs[job.index].line(job.error)
            if cancelling_since is not None and now - cancelling_since > CANCEL_GRACE_S:
                raise KeyboardInterrupt
            if cancelling_since is None and opts.manager is not None and opts.view \
                    and opts.manager.cancel_requested(opts.view):
                raise KeyboardInterrupt  # the job view cancelled the whole batch: as Ctrl-C, checkpoints first
            _settle(jobs, opts)
            display.draw(jobs)
        except KeyboardInterrupt:
            if cancelling_since is not None:  # a second Ctrl-C, or the grace ran out: stop them now
                for job in jobs:
                    if job.state in ("pending", "running"):
                        ray.cancel(job.ref, force=True)
                        job.state, job.finished = "cancelled", time.monotonic()
                        job.error = job.error or f"stopped at step {job.step}"
                        logs[job.index].line("force-cancelled")
                break
            cancelling_since = time.monotonic()
            display.note("Ctrl-C: cancelling; running jobs write a checkpoint first (Ctrl-C again to stop at once)")
            for job in jobs:
                if job.state in ("pending", "running"):
                    ray.cancel(job.ref, force=False)  # a running job checkpoints first (see _job_task)
                if job.state == "pending":
                    job.state, job.finished, job.error = "cancelled", time.monotonic(), "cancelled before it started"
                    logs[job.index].line(job.error)
    _settle(jobs, opts)
    display.draw([])
    return 130 if cancelling_since is not None else (1 if any(j.state != "done" for j in jobs) else 0)


def _settle(jobs: list[ClusterJob], opts: BatchOptions) -> None:
    """Jobs that just ended: the driver registers a finished adapter at once (the library's one
    writer), and the job view hears the end."""
    for job in jobs:
        if job.settled or job.state in ("pending", "running"):
            continue
        job.settled = True
        if job.state == "done" and job.result and not job.result.get("skipped"):
            (opts.register or _default_register)(job.cfg, job.result)
        job.mirror(opts.manager)


def _apply_events(batch: list[tuple[int, dict[str, Any]]], jobs: list[ClusterJob], logs: dict[int, Any],
                  display: _Display, manager: Any = None) -> None:
    for index, ev in batch:
        job = jobs[index]
        if ev["phase"] != "started":
            job.mirror(manager, ev)
        if ev["phase"] == "started":
            if job.state in ("pending", "running"):
                job.state = "running"
            job.started = job.started or time.monotonic()
            job.attempts += 1
            job.worker = f"{ev['pid']}@{ev['node']}"
            job.pids.append(ev["pid"])
            text = f"started on Ray worker pid {ev['pid']} at {ev['node']} (attempt {job.attempts})"
            if job.attempts > 1:
                text += ": Ray retried the job after its worker died; it resumes from its last checkpoint"
            logs[index].line(text)
            display.note(f"{job.label} {text}")
            job.mirror(manager, {"phase": "prepare", "message": text})
            continue
        logs[index].event(ev)
        if ev.get("total"):
            job.total = int(ev["total"])
        if ev["phase"] == "train":
            job.step, job.loss, job.eta_s = int(ev["step"]), ev.get("loss"), ev.get("eta_s")
        elif ev["phase"] == "prepare" and ev.get("step") and str(ev.get("message", "")).startswith("resumed"):
            job.step = job.resumed_from = int(ev["step"])
            display.note(f"{job.label} {ev['message']} (from its checkpoint)")
        elif ev["phase"] == "prepare" and ev.get("message"):
            job.phase = str(ev["message"])


def _finish(ray: Any, job: ClusterJob, log_file: Any, display: _Display) -> None:
    from ray.exceptions import RayError, TaskCancelledError

    job.finished = time.monotonic()
    try:
        res = ray.get(job.ref)
    except TaskCancelledError:
        job.state = "cancelled"
        job.error = job.error or (f"cancelled at step {job.step}; its last checkpoint is kept" if job.started
                                  else "cancelled before it started")
        log_file.line(job.error)
        return
    except RayError as exc:  # the worker died more often than max_retries allows, or Ray itself failed
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        job.state, job.error = "failed", f"Ray gave up after {job.attempts} attempt(s): {first}"
        display.note(f"{job.label} FAILED: {job.error}")
        log_file.line(f"FAILED: {job.error}")
        return
    job.result = res
    job.resumed_from = max(job.resumed_from, int(res.get("resumed_from") or 0))
    if res.get("ok"):
        job.state = "done"
        job.note = "finished in an earlier run (not registered again)" if res.get("skipped") else ""
        text = f"done: {res['adapter_file']}" + (f" ({job.note})" if job.note else "")
    else:
        job.state = "cancelled" if res.get("cancelled") else "failed"
        job.error = res.get("error") or "unknown error"
        text = f"{job.state.upper()}: {job.error}"
    display.note(f"{job.label} {text}")
    log_file.line(text)


def _write_summary_json(jobs: list[ClusterJob], path: Path) -> None:
    """The batch's results for scripts (bench/cluster.py reads the timings from it)."""
    rows = []
    t0 = min((j.submitted for j in jobs if j.submitted), default=0.0)
    for j in jobs:
        res = j.result or {}
        rows.append({"start_s": j.started - t0 if j.started else None, "end_s": j.finished - t0 if j.finished else None,
                     "job": j.path, "state": j.state, "error": j.error, "worker": j.worker, "pids": j.pids,
                     "attempts": j.attempts, "resumed_from": j.resumed_from, "adapter": res.get("adapter_file"),
                     "queued_s": (j.started - j.submitted) if j.started and j.submitted else None,
                     "run_s": (j.finished - j.started) if j.finished and j.started else None,
                     "train_s": res.get("seconds")})
    path.write_text(json.dumps(rows, indent=1))


def _summary(jobs: list[ClusterJob], out: TextIO) -> None:
    rows = []
    for j in jobs:
        secs = f"{(j.finished or time.monotonic()) - (j.started or j.finished or time.monotonic()):.0f}s"
        res = (j.result or {}).get("adapter_file", "") if j.state == "done" else j.error
        if j.resumed_from:
            res += f" (resumed from step {j.resumed_from})"
        status = {"done": "ok"}.get(j.state, j.state.upper() if j.state == "failed" else j.state)
        rows.append((j.path, status, secs, j.worker or "-", str(j.attempts or "-"), res + (f" {j.note}" if j.note else "")))
    width = max([len(r[0]) for r in rows] + [3])
    wwidth = max([len(r[3]) for r in rows] + [6])
    out.write(f"{'job':<{width}}  status           time  {'worker':<{wwidth}}  tries  result\n")
    for job, status, secs, worker, tries, res in rows:
        out.write(f"{job:<{width}}  {status:<13}  {secs:>6}  {worker:<{wwidth}}  {tries:>5}  {res}\n")
    failed = sum(j.state != "done" for j in jobs)
    out.write(f"{len(jobs) - failed} ok, {failed} failed (on Ray)\n")
    out.flush()
