"""`studio train` (one job from flags or a TOML file) and `studio batch` (several jobs in a row)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from studio.errors import StudioError

log = logging.getLogger(__name__)


class ProgressBar:
    """Draws training events on stderr: a live bar on a terminal, periodic lines otherwise."""

    def __init__(self, stream=None, label: str = "") -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.label = label
        self.last_line = 0.0

    def __call__(self, ev: Any) -> None:
        if ev.phase == "train":
            frac = ev.step / max(1, ev.total)
            bar = "#" * int(frac * 30)
            eta = f"{ev.eta_s:5.0f}s" if ev.eta_s is not None else "  ?"
            line = (f"{self.label}[{bar:<30}] {ev.step}/{ev.total} loss {ev.loss:.4f} lr {ev.lr:.2e} ETA {eta}")
            now = time.time()
            if self.tty:
                self.stream.write("\r" + line)
                if ev.step == ev.total:
                    self.stream.write("\n")
            elif ev.step == ev.total or now - self.last_line > 10 or ev.step == 1:
                self.stream.write(line + "\n")
                self.last_line = now
        elif ev.phase in ("prepare", "checkpoint"):
            if ev.message and ev.phase == "prepare":
                self.stream.write(f"{self.label}{ev.message}\n")
        elif ev.phase == "sample":
            self.stream.write(("\n" if self.tty else "") + f"{self.label}samples: {', '.join(ev.samples)}\n")
        elif ev.phase == "done":
            self.stream.write(f"{self.label}{ev.message}\n")
        self.stream.flush()


def _add_job_flags(p: argparse.ArgumentParser) -> None:
    from studio.trainers.config import TrainConfig

    helps = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(TrainConfig)}
    p.add_argument("--kind", choices=["subject", "style"], help=helps["kind"])
    p.add_argument("--images", metavar="DIR", help=helps["images"])
    p.add_argument("--base", metavar="SPEC", help=helps["base"])
    p.add_argument("--out", metavar="DIR", help=helps["out"])
    p.add_argument("--name", help=helps["name"])
    p.add_argument("--token", help=helps["token"])
    p.add_argument("--class-word", dest="class_word", help=helps["class_word"])
    p.add_argument("--method", help=helps["method"])
    p.add_argument("--rank", type=int, help=helps["rank"])
    p.add_argument("--transform-rank", dest="transform_rank", type=int, help=helps["transform_rank"])
    p.add_argument("--residual", choices=["tr", "lora"], help=helps["residual"])
    p.add_argument("--residual-rank", dest="residual_rank", type=int, help=helps["residual_rank"])
    p.add_argument("--alpha", type=float, help=helps["alpha"])
    p.add_argument("--targets", choices=["attention", "attention+resnet", "all"], help=helps["targets"])
    p.add_argument("--blocks", metavar="PREFIXES", help=helps["blocks"])
    p.add_argument("--text-encoder", dest="text_encoder", action="store_true", default=None, help=helps["text_encoder"])
    p.add_argument("--text-encoder-lr", dest="text_encoder_lr", type=float, help=helps["text_encoder_lr"])
    p.add_argument("--train-trigger", dest="train_trigger", action=argparse.BooleanOptionalAction, default=None,
                   help=helps["train_trigger"])
    p.add_argument("--trigger-lr", dest="trigger_lr", type=float, help=helps["trigger_lr"])
    p.add_argument("--trigger-norm", dest="trigger_norm", type=float, metavar="X", help=helps["trigger_norm"])
    p.add_argument("--init-word", dest="init_word", metavar="WORD", help=helps["init_word"])
    p.add_argument("--steps", type=int, help=helps["steps"])
    p.add_argument("--lr", type=float, help=helps["lr"])
    p.add_argument("--scheduler", choices=["constant", "cosine", "linear"], help=helps["scheduler"])
    p.add_argument("--ema", type=float, metavar="DECAY", help=helps["ema"])
    p.add_argument("--warmup", type=int, metavar="STEPS", help=helps["warmup"])
    p.add_argument("--batch", type=int, help=helps["batch"])
    p.add_argument("--grad-accum", dest="grad_accum", type=int, help=helps["grad_accum"])
    p.add_argument("--resolution", type=int, help=helps["resolution"])
    p.add_argument("--buckets", action="store_true", default=None, help=helps["buckets"])
    p.add_argument("--prior", dest="prior", action=argparse.BooleanOptionalAction, default=None,
                   help=helps["prior"])
    p.add_argument("--class-images", dest="class_images", type=int, help=helps["class_images"])
    p.add_argument("--class-prompt", dest="class_prompt", help=helps["class_prompt"])
    p.add_argument("--prior-weight", dest="prior_weight", type=float, help=helps["prior_weight"])
    p.add_argument("--prior-target", dest="prior_target", choices=["base", "noise"], help=helps["prior_target"])
    p.add_argument("--prior-uncond", dest="prior_uncond", type=float, metavar="P", help=helps["prior_uncond"])
    p.add_argument("--timestep-range", dest="timestep_range", metavar="LO:HI", help=helps["timestep_range"])
    p.add_argument("--snr-gamma", dest="snr_gamma", type=float, help=helps["snr_gamma"])
    p.add_argument("--caption", choices=["auto", "captions", "trigger"], help=helps["caption"])
    p.add_argument("--decor", help=helps["decor"])
    p.add_argument("--decor-alpha", dest="decor_alpha", type=float, help=helps["decor_alpha"])
    p.add_argument("--subject-word", dest="subject_word", help=helps["subject_word"])
    p.add_argument("--caption-dropout", dest="caption_dropout", type=float, help=helps["caption_dropout"])
    p.add_argument("--empty-prompt", dest="empty_prompt", type=float, metavar="P", help=helps["empty_prompt"])
    p.add_argument("--tag-dropout", dest="tag_dropout", type=float, metavar="P", help=helps["tag_dropout"])
    p.add_argument("--optimizer", choices=["auto", "adamw", "adamw8bit"], help=helps["optimizer"])
    p.add_argument("--mixed-precision", dest="mixed_precision", choices=["no", "fp16", "bf16"],
                   help=helps["mixed_precision"])
    p.add_argument("--gradient-checkpointing", dest="gradient_checkpointing", action="store_true", default=None,
                   help=helps["gradient_checkpointing"])
    p.add_argument("--sample-every", dest="sample_every", type=int, help=helps["sample_every"])
    p.add_argument("--samples", dest="samples", action=argparse.BooleanOptionalAction, default=None,
                   help=helps["samples"])
    p.add_argument("--sample-prompt", dest="sample_prompts", action="append", metavar="PROMPT",
                   help=helps["sample_prompts"] + "; repeat the flag for several")
    p.add_argument("--description", help=helps["description"])
    p.add_argument("--checkpoint-every", dest="checkpoint_every", type=int, help=helps["checkpoint_every"])
    p.add_argument("--resume", action="store_true", default=None, help=helps["resume"])
    p.add_argument("--seed", type=int, help=helps["seed"])
    p.add_argument("--flip", type=float, metavar="P", help=helps["flip"])
    p.add_argument("--device", help=helps["device"])
    g = p.add_argument_group("Break-for-Make (--method b4m): a content and a style adapter that compose (docs/b4m.md)")
    g.add_argument("--content", metavar="DIR", help=helps["content"])
    g.add_argument("--style", metavar="DIR", help=helps["style"])
    g.add_argument("--content-prompt", dest="content_prompt", help=helps["content_prompt"])
    g.add_argument("--style-prompt", dest="style_prompt", help=helps["style_prompt"])
    g.add_argument("--style-token", dest="style_token", help=helps["style_token"])
    g.add_argument("--steps-content", dest="steps_content", type=int, help=helps["steps_content"])
    g.add_argument("--steps-style", dest="steps_style", type=int, help=helps["steps_style"])
    g.add_argument("--steps-make", dest="steps_make", type=int, help=helps["steps_make"])
    g.add_argument("--aux-sets", dest="aux_sets", type=int, help=helps["aux_sets"])
    p.add_argument("--no-register", dest="register", action="store_false", default=None,
                   help="do not add the result to the adapter library")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a subject or style adapter",
                       description="Train an adapter from a folder of images: `studio train --kind subject --images DIR` "
                                   "or `studio train JOB.toml` (same field names as the flags; flags override the file).")
    p.add_argument("job", nargs="?", metavar="JOB.toml", help="a job file instead of (or under) the flags")
    _add_job_flags(p)
    p.set_defaults(func=run_train)

    b = sub.add_parser("batch", help="run several training jobs one after another",
                       description="Run job TOML files in order, one log per job, a summary table at the end. "
                                   "A failing job is reported and the others still run; exit status 1 if any failed.")
    b.add_argument("jobs", nargs="+", metavar="JOB.toml")
    b.add_argument("--logs", default=None, metavar="DIR", help="folder of per-job logs (default: out/batch-logs)")
    b.add_argument("--resume", action="store_true",
                   help="continue each job from its last checkpoint; jobs that finished earlier are skipped")
    c = b.add_argument_group("on a Ray cluster (pip install 'diffusion-studio[cluster]'; see docs/CLUSTER.md)")
    c.add_argument("--cluster", metavar="ADDRESS",
                   help="run the jobs as Ray tasks: auto, ray://HOST:PORT, HOST:PORT, or local[:N] (a Ray instance "
                        "started here with N workers)")
    c.add_argument("--num-cpus", dest="num_cpus", type=float, default=None,
                   help="CPUs per job (default 1; a job file's [cluster] table overrides it)")
    c.add_argument("--num-gpus", dest="num_gpus", type=float, default=None,
                   help="GPUs per job, fractions allowed (default: 1 when the cluster has GPUs, else 0)")
    c.add_argument("--max-retries", dest="max_retries", type=int, default=3,
                   help="times Ray reruns a job whose worker died; it resumes from its last checkpoint (default 3)")
    c.add_argument("--unschedulable-timeout", dest="unschedulable_timeout", type=float, default=60.0, metavar="S",
                   help="a job asking for resources no node has is reported after S seconds (default 60)")
    c.add_argument("--connect-timeout", dest="connect_timeout", type=float, default=5.0, metavar="S",
                   help="give up on an unreachable cluster address after S seconds (default 5)")
    b.set_defaults(func=run_batch)


def config_from_args(args: argparse.Namespace):
    from studio.trainers.config import TrainConfig

    base: dict[str, Any] = {}
    if args.job:
        base = dataclasses.asdict(TrainConfig.from_toml(args.job))
    for f in dataclasses.fields(TrainConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            base[f.name] = v
    if not base.get("images") and base.get("method") != "b4m":
        raise StudioError("--images is required (a folder of training images), or give a JOB.toml")
    return TrainConfig.from_dict(base, source=args.job or "--")


def run_train(args: argparse.Namespace) -> int:
    from studio.trainers.loop import Cancelled, train

    cfg = config_from_args(args)
    cancel = threading.Event()
    with _sigterm_cancels(cancel):
        try:
            result = train(cfg, on_event=ProgressBar(), cancel=cancel)
        except Cancelled as exc:
            if not cancel.is_set():
                raise
            print(f"studio: {exc}", file=sys.stderr)
            return 128 + signal.SIGTERM
    _register(cfg, result)
    print(result.out)
    return 0


@contextlib.contextmanager
def _sigterm_cancels(cancel: threading.Event) -> Iterator[None]:
    """SIGTERM (a scheduler's or `kill`'s polite stop) ends the run at its next step with a checkpoint,
    so `--resume` continues it; a second SIGTERM stops at once (a run that fails before its first
    checkpoint removes its output folder)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread (the UI runs training in a worker)
        return

    def on_term(signum: int, frame: Any) -> None:
        if cancel.is_set():
            raise SystemExit(128 + signal.SIGTERM)
        log.warning("SIGTERM: stopping at the next step with a checkpoint (resume with --resume; "
                    "a second SIGTERM stops at once)")
        cancel.set()

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _register(cfg, result) -> None:
    """Add a training result to the adapter library; a taken name becomes NAME-2, and a library
    problem is a warning: the trained adapter is on disk either way, the training did not fail."""
    if not cfg.register:
        return
    from studio.library import Library, derive_name

    wanted = derive_name(cfg.name or Path(result.out).name)  # a --name with spaces still registers
    if cfg.name and wanted != cfg.name:
        log.info("library names are letters, digits, '.', '_' and '-': --name %r is kept as %s", cfg.name, wanted)
    try:
        entry = Library().add(result.out, name=wanted, description=cfg.description, replace=False, unique=True)
    except StudioError as exc:
        log.warning("not added to the adapter library: %s; add it later with `studio library add %s`", exc,
                    result.out)
        return
    if entry.name.lower() != wanted.lower():
        log.warning("the library already has an adapter named %s; added this one as %s", wanted, entry.name)
    log.info("added to the library as %s", entry.name)
    from studio.autolora.retrieval import embed_on_add

    embed_on_add([entry.name])  # AutoLoRA's retrieval vector (docs/autolora.md)


def run_batch(args: argparse.Namespace) -> int:
    from studio.trainers.cluster import finished_earlier
    from studio.trainers.config import TrainConfig
    from studio.trainers.loop import train

    logs = Path(args.logs or "out/batch-logs")
    if getattr(args, "cluster", None):
        from studio.trainers.cluster import BatchOptions, run_cluster_batch

        return run_cluster_batch(args.jobs, BatchOptions(
            cluster=args.cluster, logs=logs, resume=args.resume, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
            max_retries=args.max_retries, unschedulable_timeout=args.unschedulable_timeout,
            connect_timeout=args.connect_timeout))
    logs.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, job in enumerate(args.jobs):
        label = f"[{i + 1}/{len(args.jobs)} {Path(job).stem}] "
        log_path = logs / f"{i + 1:02d}-{Path(job).stem}.log"
        t0 = time.time()
        handler = logging.FileHandler(log_path, mode="w")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logging.getLogger().addHandler(handler)
        try:
            with open(log_path, "a") as fh:
                cfg = TrainConfig.from_toml(job)
                cfg.resume = cfg.resume or getattr(args, "resume", False)
                if cfg.resume and cfg.out and finished_earlier(cfg.out):
                    rows.append((job, "ok", "0s", f"{cfg.out} (finished in an earlier run)"))
                    continue
                bar = ProgressBar(label=label)
                file_bar = ProgressBar(stream=fh)
                result = train(cfg, on_event=lambda e: (bar(e), file_bar(e)))
            _register(cfg, result)
            rows.append((job, "ok", f"{time.time() - t0:.0f}s", str(result.out)))
        except StudioError as exc:
            log.error("%s%s", label, exc)
            rows.append((job, "FAILED", f"{time.time() - t0:.0f}s", str(exc)))
        except Exception as exc:  # noqa: BLE001 - one broken job must not stop the batch
            log.exception("%sunexpected error", label)
            rows.append((job, "FAILED", f"{time.time() - t0:.0f}s", f"{type(exc).__name__}: {exc}"))
        finally:
            logging.getLogger().removeHandler(handler)
            handler.close()
    width = max(len(r[0]) for r in rows)
    print(f"{'job':<{width}}  status  time  result")
    for job, status, secs, res in rows:
        print(f"{job:<{width}}  {status:<6}  {secs:>4}  {res}")
    failed = sum(r[1] != "ok" for r in rows)
    print(f"{len(rows) - failed} ok, {failed} failed")
    return 1 if failed else 0
