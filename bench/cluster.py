"""The same 4 training jobs run by `studio batch` one after another, then on `--cluster local:2`.

    python bench/cluster.py [--base micro] [--images assets/samples/subject-heart-red] [--steps 40]
                            [--jobs 4] [--workers 2]

Both sides are whole `studio batch` commands in fresh processes, timed from start to exit, on
the same job files (prior preservation off, so no class images are generated inside the timing;
each job its own seed and output folder). The sequential side lets torch use every core inside
one job (intra-op threads); on Ray each job gets one CPU (Ray sets OMP_NUM_THREADS to the task's
num_cpus), at the sequential side's priority (RAY_worker_niceness=0). Prints both wall times and their ratio, then the per-job overhead of going through
Ray, from the driver's summary.json: Ray's start, the wait for a worker, and a task's run time
beyond its training (the worker process importing torch and the studio on its first job).
Run it on an otherwise idle machine; the load average is printed beside the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_jobs(folder: Path, n: int, base: str, images: str, steps: int) -> list[str]:
    paths = []
    for i in range(n):
        p = folder / f"job{i}.toml"
        p.write_text(f'kind = "subject"\nimages = "{Path(images).absolute()}"\nbase = "{base}"\nsteps = {steps}\n'
                     f'prior = false\nseed = {i}\nregister = false\ncheckpoint_every = 0\n'
                     f'out = "{folder / "out-RUN" / f"job{i}"}"\n')
        paths.append(str(p))
    return paths


def run_batch(jobs: list[str], run: str, extra: list[str], logs: Path) -> tuple[float, str]:
    """One `studio batch` command; returns (wall seconds, its output)."""
    for j in jobs:  # each run writes its own output folders
        Path(j).write_text(re.sub(r"out-[A-Za-z0-9]+", f"out-{run}", Path(j).read_text()))
    exe = Path(sys.executable).with_name("studio")
    t0 = time.perf_counter()
    res = subprocess.run([str(exe), "batch", *jobs, "--logs", str(logs), *extra], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        sys.exit(f"{run}: studio batch failed (exit {res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    return wall, res.stdout + res.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="micro")
    ap.add_argument("--images", default="assets/samples/subject-heart-red")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    from studio.machine import describe

    print(describe())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        folder = Path(tmp)
        os.environ["STUDIO_HOME"] = str(folder / "home")
        jobs = write_jobs(folder, args.jobs, args.base, args.images, args.steps)
        load0 = os.getloadavg()
        seq, _ = run_batch(jobs, "seq", [], folder / "logs-seq")
        # Ray runs its workers at niceness 15 by default (to keep its raylet responsive); on a shared
        # machine that alone made them 3x slower than the sequential side, so both sides run at 0
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray_wall, text = run_batch(jobs, "ray", ["--cluster", f"local:{args.workers}"], folder / "logs-ray")
        load1 = os.getloadavg()
        rows = json.loads((folder / "logs-ray" / "summary.json").read_text())
    m = re.search(r"connected in ([\d.]+)s", text)
    ray_start = float(m.group(1)) if m else float("nan")
    pids = sorted({p for r in rows for p in r["pids"]})
    print(f"{args.jobs} jobs of {args.steps} steps on {args.base}, {os.cpu_count()} CPUs, "
          f"load average {load0[0]:.2f} before, {load1[0]:.2f} after")
    print(f"sequential `studio batch`            {seq:7.1f} s")
    print(f"`studio batch --cluster local:{args.workers}`     {ray_wall:7.1f} s   (worker pids {pids})")
    print(f"speed-up                              {seq / ray_wall:7.2f}x")
    print(f"Ray start (in-process local instance) {ray_start:7.1f} s")
    print("per job on Ray:     wait for a worker   run on worker   of which training   overhead")
    for r in rows:
        over = r["run_s"] - r["train_s"]
        print(f"  {Path(r['job']).stem:<18} {r['queued_s']:9.1f} s {r['run_s']:13.1f} s {r['train_s']:15.1f} s "
              f"{over:8.1f} s")
    mean = sum(r["run_s"] - r["train_s"] for r in rows) / len(rows)
    print(f"mean per-job overhead beyond training (task start, imports on a fresh worker): {mean:.1f} s")


if __name__ == "__main__":
    main()
