"""`studio batch --cluster`: addresses, job files, and real local Ray instances.

The tests that start Ray and train are marked slow (a Ray start plus worker imports and a
training take 30 s to minutes on two loaded cores): run them with ``pytest -m slow
tests/test_cluster.py``; docs/CLUSTER.md has their measured times. The unschedulable check
starts Ray but trains nothing (about 10 s) and stays in the default run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import _cfg, images  # noqa: F401 - the tiny subject image set fixture

from studio.cli import main
from studio.errors import StudioError
from studio.trainers.cluster import ClusterAddress, _fits, load_job, parse_address
from studio.trainers.config import TrainConfig

try:
    import ray  # noqa: F401

    HAVE_RAY = True
except ImportError:
    HAVE_RAY = False
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="Ray is not installed: pip install 'diffusion-studio[cluster]'")


def _job(tmp_path: Path, name: str, images_dir, base, *, extra: str = "", cluster: str = "", out=None) -> str:
    path = tmp_path / f"{name}.toml"
    path.write_text(f'kind = "subject"\nimages = "{images_dir}"\nbase = "{base}"\nout = "{out or tmp_path / name}"\n'
                    f'steps = 4\nbatch = 2\nclass_images = 2\nseed = 3\n{extra}'
                    + (f"\n[cluster]\n{cluster}\n" if cluster else ""))
    return str(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _studio(*args: str) -> subprocess.Popen:
    """`studio ARGS` in its own process group, as a shell runs a command (Ctrl-C reaches the group)."""
    exe = Path(sys.executable).with_name("studio")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([str(exe), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)


# ---- no Ray needed --------------------------------------------------------------------------------
@pytest.mark.parametrize("spec,want", [
    ("auto", ClusterAddress("auto")), ("local", ClusterAddress("local")),
    ("local:2", ClusterAddress("local", workers=2)),
    ("ray://head.example:10001", ClusterAddress("client", host="head.example", port=10001)),
    ("10.0.0.5:6379", ClusterAddress("gcs", host="10.0.0.5", port=6379)),
])
def test_addresses(spec, want):
    got = parse_address(spec)
    assert got == want and got.text == spec


@pytest.mark.parametrize("spec", ["local:0", "local:two", "ray://nohost", "head", "ray://:10001"])
def test_bad_addresses_name_the_forms(spec):
    with pytest.raises(StudioError, match="--cluster .*(local:N|ray://HOST:PORT)"):
        parse_address(spec)


def test_missing_ray_is_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    job = _job(tmp_path, "a", tmp_path, "micro")
    assert main(["batch", "--cluster", "local:2", job]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "diffusion-studio[cluster]" in err[0]


def test_job_file_cluster_table(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imgs").mkdir()
    path = _job(tmp_path, "a", "imgs", "micro", out="rel-out", cluster="num_gpus = 0.5\nmax_retries = 1")
    assert TrainConfig.from_toml(path).steps == 4  # `studio train` ignores the [cluster] table
    job = load_job(path, 0, 1, {"num_cpus": 2, "num_gpus": 0, "max_retries": 3}, resume=False)
    assert job.resources == {"CPU": 2.0, "GPU": 0.5} and job.max_retries == 1
    assert job.asked() == "num_cpus=2, num_gpus=0.5"
    # workers do not share the driver's folder: every path they get is absolute
    assert job.cfg.out == str(tmp_path / "rel-out") and job.cfg.images == str(tmp_path / "imgs")
    bad = _job(tmp_path, "b", "imgs", "micro", cluster="gpus = 1")
    with pytest.raises(StudioError, match=r"\[cluster\] takes only num_cpus, num_gpus, max_retries"):
        load_job(bad, 0, 1, {}, resume=False)


def test_fits_looks_at_single_nodes():
    nodes = [{"CPU": 8.0}, {"CPU": 2.0, "GPU": 1.0}]
    assert _fits({"CPU": 1.0, "GPU": 1.0}, nodes)
    assert not _fits({"CPU": 4.0, "GPU": 1.0}, nodes)  # 10 CPUs and a GPU in all, but on no one node
    assert not _fits({"CPU": 1.0, "GPU": 2.0}, nodes)


def test_a_slow_local_start_is_tried_twice_then_one_clear_error(monkeypatch):
    from studio.trainers import cluster

    class FakeRay:
        def __init__(self, fails: int) -> None:
            self.fails, self.calls = fails, 0

        def init(self, **kw) -> None:
            self.calls += 1
            if self.calls <= self.fails:
                raise Exception("The current node timed out during startup.")

    monkeypatch.setattr(cluster, "_end_orphans", lambda: None)
    once = FakeRay(1)
    cluster._start_local(once, 2, {})
    assert once.calls == 2
    with pytest.raises(StudioError, match=r"local:2: Ray did not start .*timed out.*ray start --head"):
        cluster._start_local(FakeRay(2), 2, {})


@needs_ray
def test_unreachable_address_exits_2_within_seconds(tmp_path, capsys):
    job = _job(tmp_path, "a", tmp_path, "micro")
    for addr in (f"ray://127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"):
        t0 = time.monotonic()
        assert main(["batch", "--cluster", addr, "--connect-timeout", "2", job]) == 2
        assert time.monotonic() - t0 < 10
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "cannot reach a Ray cluster" in err[0] and addr in err[0]


# ---- a real local Ray instance ---------------------------------------------------------------------
@needs_ray
def test_unschedulable_job_is_reported_with_what_it_asked(tmp_path, capsys):
    job = _job(tmp_path, "gpu", tmp_path, "micro", cluster="num_gpus = 1")  # never runs: no model needed
    rc = main(["batch", "--cluster", "local:1", "--unschedulable-timeout", "0", "--logs", str(tmp_path / "logs"), job])
    out = capsys.readouterr().out
    assert rc == 1
    assert "unschedulable: asked for num_cpus=1, num_gpus=1" in out and "GPU 0" in out
    assert not (tmp_path / "gpu").exists()


@needs_ray
@pytest.mark.slow
def test_batch_on_local_ray(images, tiny_dirs, tmp_path):  # noqa: F811
    """The acceptance batch: 3 good jobs, a bad images folder, an unwritable job folder, on local:2."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    jobs = [_job(tmp_path, f"good{i}", images, tiny_dirs["sd1"], extra=f'name = "good{i}"\n') for i in range(3)]
    jobs.insert(1, _job(tmp_path, "bad", tmp_path / "missing", tiny_dirs["sd1"]))
    jobs.append(_job(tmp_path, "unwritable", images, tiny_dirs["sd1"], out=blocker / "sub"))
    proc = _studio("batch", "--cluster", "local:2", "--logs", str(tmp_path / "logs"), *jobs)
    text, _ = proc.communicate(timeout=900)
    assert proc.returncode == 1, text[-3000:]
    from studio.library import Library

    assert sorted(Library().names()) == ["good0", "good1", "good2"], text[-3000:]
    assert re.search(r"bad\.toml\s+FAILED .*missing", text) and re.search(r"unwritable\.toml\s+FAILED .*--out", text)
    assert "3 ok, 2 failed (on Ray)" in text
    pids = {int(p) for p in re.findall(r"started on Ray worker pid (\d+)", text)}
    assert len(pids) >= 2 and proc.pid not in pids, "both Ray workers ran jobs, neither is the driver"
    assert len(list((tmp_path / "logs").glob("*.log"))) == 5
    rows = [r for r in json.loads((tmp_path / "logs" / "summary.json").read_text()) if r["start_s"] is not None]
    # Ray's slots hold: never more than 2 jobs at once (a task blocked in ray.get would lend its CPU);
    # the driver sees an end up to a poll (0.5 s) after the start it made room for
    assert max(sum(r["start_s"] <= s["start_s"] < r["end_s"] - 1.0 for r in rows) for s in rows) <= 2


def _wait_for(path: Path, pattern: str, proc: subprocess.Popen, timeout: float = 600) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, path.read_text()) if path.is_file() else None
        if m:
            return m
        assert proc.poll() is None, f"the batch ended early: {proc.stdout.read()[-3000:]}"
        time.sleep(0.1)
    raise AssertionError(f"no {pattern!r} in {path} after {timeout}s")


@needs_ray
@pytest.mark.slow
def test_killed_worker_is_retried_and_resumes_to_the_same_adapter(images, tiny_dirs, tmp_path):  # noqa: F811
    from studio.trainers.loop import train

    ref = train(_cfg(images, tiny_dirs["sd1"], tmp_path / "ref", steps=40))
    job = _job(tmp_path, "run", images, tiny_dirs["sd1"], extra="checkpoint_every = 3\nregister = false\n")
    Path(job).write_text(Path(job).read_text().replace("steps = 4", "steps = 40"))  # the reference's config
    log_file = tmp_path / "logs" / "01-run.log"
    proc = _studio("batch", "--cluster", "local:1", "--logs", str(tmp_path / "logs"), job)
    pid = int(_wait_for(log_file, r"started on Ray worker pid (\d+)", proc).group(1))
    step_file = tmp_path / "run" / "checkpoints" / "step.json"
    deadline = time.monotonic() + 600
    while not (step_file.is_file() and json.loads(step_file.read_text())["step"] >= 6):
        assert time.monotonic() < deadline and proc.poll() is None, "no checkpoint at step 6"
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    text, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, text[-3000:]
    log_text = log_file.read_text()
    assert "(attempt 2)" in log_text
    resumed = int(re.search(r"resumed at step (\d+)", log_text).group(1))
    assert 6 <= resumed < 40
    a, b = load_file(str(ref.adapter_file)), load_file(str(tmp_path / "run" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


@needs_ray
@pytest.mark.slow
def test_ctrl_c_cancels_keeps_checkpoints_and_resume_continues(images, tiny_dirs, tmp_path):  # noqa: F811
    job = _job(tmp_path, "long", images, tiny_dirs["sd1"], extra="checkpoint_every = 0\nregister = false\n")
    Path(job).write_text(Path(job).read_text().replace("steps = 4", "steps = 400"))
    log_file = tmp_path / "logs" / "01-long.log"
    proc = _studio("batch", "--cluster", "local:1", "--logs", str(tmp_path / "logs"), job)
    _wait_for(log_file, r"\] [1-9]\d*/400", proc)  # training has begun
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, text[-3000:]
    assert "--resume" in text
    step = json.loads((tmp_path / "long" / "checkpoints" / "step.json").read_text())["step"]
    assert 0 < step < 400 and not (tmp_path / "long" / "pytorch_lora_weights.safetensors").exists()
    again = _studio("batch", "--cluster", "local:1", "--resume", "--logs", str(tmp_path / "logs2"), job)
    text, _ = again.communicate(timeout=900)
    assert again.returncode == 0, text[-3000:]
    assert f"resumed at step {step}" in (tmp_path / "logs2" / "01-long.log").read_text()
    assert (tmp_path / "long" / "pytorch_lora_weights.safetensors").is_file()


@needs_ray
@pytest.mark.slow
def test_job_view_shows_cluster_jobs_like_local_ones(images, tiny_dirs, tmp_path):  # noqa: F811
    """The UI's Jobs tab path (service.start_batch): the driver's row, and each Ray job listed with its step,
    loss and end, as a local job is."""
    from studio.service import JobManager, start_batch

    manager = JobManager()
    good = _job(tmp_path, "good", images, tiny_dirs["sd1"], extra="register = false\n")
    bad = _job(tmp_path, "bad", tmp_path / "missing", tiny_dirs["sd1"])
    (driver,) = start_batch(manager, [good, bad], "local:1", logs=tmp_path / "logs")
    end = manager.wait(driver, timeout=600)
    assert end["state"] == "failed" and "some jobs failed" in end["error"], end
    assert any("Ray cluster local:1" in m for m in end["messages"])  # the driver's progress lines
    _, done, failed = manager.jobs()
    assert done["state"] == "done" and (done["step"], done["total"]) == (4, 4) and done["loss"] is not None
    assert any("started on Ray worker pid" in m for m in done["messages"])
    assert done["result"]["adapter_file"].endswith("pytorch_lora_weights.safetensors")
    assert failed["state"] == "failed" and "missing" in failed["error"]
    assert (tmp_path / "logs" / "summary.json").is_file()
    from studio.ui_jobs import where

    assert where(end) == where(done) == where(failed) == "Ray local:1"  # the Jobs tab's "where" column


@needs_ray
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: two jobs share it with num_gpus = 0.5")
def test_two_jobs_share_a_gpu(images, tiny_dirs, tmp_path):  # noqa: F811
    jobs = [_job(tmp_path, f"g{i}", images, tiny_dirs["sd1"], extra="register = false\n", cluster="num_gpus = 0.5")
            for i in range(2)]
    for j in jobs:
        Path(j).write_text(Path(j).read_text().replace("steps = 4", "steps = 200"))
    rc = main(["batch", "--cluster", "local:2", "--logs", str(tmp_path / "logs"), *jobs])
    assert rc == 0
    rows = json.loads((tmp_path / "logs" / "summary.json").read_text())
    assert len({r["pids"][0] for r in rows}) == 2
    (a0, a1), (b0, b1) = [(r["start_s"], r["end_s"]) for r in rows]
    assert a0 < b1 and b0 < a1, "the two jobs ran at the same time on the one GPU"
