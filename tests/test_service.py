"""The service layer: job queue, cancellation, re-attach, failures, library registration, uploads."""

from __future__ import annotations

import dataclasses
import re
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from studio import service
from studio.errors import StudioError
from studio.trainers.config import TrainConfig
from studio.trainers.loop import Cancelled, Event

TIMEOUT = 20


@dataclasses.dataclass
class FakeResult:
    out: Path
    steps: int
    final_loss: float


class FakeTrainer:
    """A train(cfg, on_event, cancel) stand-in: emits real Events; may wait on a gate or fail."""

    def __init__(self, steps: int = 3) -> None:
        self.steps = steps
        self.order: list[str] = []
        self.gates: dict[str, threading.Event] = {}
        self.started: dict[str, threading.Event] = {}
        self.fail: dict[str, Exception] = {}

    def gate(self, name: str) -> threading.Event:
        self.started[name] = threading.Event()
        self.gates[name] = threading.Event()
        return self.gates[name]

    def __call__(self, cfg: TrainConfig, on_event=None, cancel=None) -> FakeResult:
        self.order.append(cfg.name)
        on_event(Event("prepare", message=f"loading {cfg.base}"))
        if cfg.name in self.started:
            self.started[cfg.name].set()
        if cfg.name in self.fail:
            raise self.fail[cfg.name]
        gate = self.gates.get(cfg.name)
        for step in range(1, self.steps + 1):
            while gate is not None and not gate.wait(0.01):
                if cancel.is_set():
                    raise Cancelled(f"training cancelled at step {step - 1}/{self.steps}; resume with --resume")
            on_event(Event("train", step=step, total=self.steps, loss=1.0 / step, lr=1e-3,
                           eta_s=float(self.steps - step)))
            if step == 2:
                on_event(Event("sample", step=step, total=self.steps, samples=[f"/tmp/{cfg.name}/s{step}.png"]))
        on_event(Event("done", step=self.steps, total=self.steps, loss=0.5, message=f"wrote {cfg.name}"))
        return FakeResult(out=Path("/tmp") / cfg.name, steps=self.steps, final_loss=0.5)


def cfg(name: str) -> dict:
    return {"kind": "subject", "images": "/nonexistent/images", "name": name, "out": f"/tmp/{name}"}


class FakeRegister:
    """A register(cfg, result) stand-in: records what it was given, or raises."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Path]] = []
        self.error: Exception | None = None

    def __call__(self, cfg: TrainConfig, result) -> SimpleNamespace:
        if self.error is not None:
            raise self.error
        self.calls.append((cfg.name, Path(result.out)))
        return SimpleNamespace(name=cfg.name)


@pytest.fixture
def trainer():
    return FakeTrainer()


@pytest.fixture
def register():
    return FakeRegister()


@pytest.fixture
def manager(trainer, register):
    m = service.JobManager(train_fn=trainer, register_fn=register)
    yield m
    m.shutdown(wait=5)


def test_jobs_run_one_at_a_time_in_submission_order(manager, trainer):
    gate = trainer.gate("first")
    a = manager.submit_train(cfg("first"))
    b = manager.submit_train(TrainConfig.from_dict(cfg("second")))
    assert trainer.started["first"].wait(TIMEOUT)
    # the first is running (blocked on its gate); the second waits its turn, not beside it
    assert manager.status(a)["state"] == "running"
    second = manager.status(b)
    assert second["state"] == "queued" and second["position"] == 0 and second["step"] == 0
    assert [j["id"] for j in manager.jobs()] == [a, b]
    assert [j["id"] for j in manager.active("train")] == [a, b]
    gate.set()
    sa, sb = manager.wait(a, TIMEOUT), manager.wait(b, TIMEOUT)
    assert trainer.order == ["first", "second"]
    assert sa["state"] == sb["state"] == "done"
    assert sa["finished"] <= sb["started"]
    assert (sa["step"], sa["total"], sa["progress"]) == (3, 3, 1.0)
    # the finished run went into the library, as `studio train` registers it
    assert sa["result"] == {"out": "/tmp/first", "steps": 3, "final_loss": 0.5, "library_name": "first"}
    assert sa["error"] is None and sa["messages"][-2:] == ["wrote first", "added to the library as first"]
    assert sa["params"]["name"] == "first" and sa["kind"] == "train"


def test_cancel_running_and_queued(manager, trainer):
    trainer.gate("running")
    a = manager.submit_train(cfg("running"))
    b = manager.submit_train(cfg("waiting"))
    assert trainer.started["running"].wait(TIMEOUT)
    # a queued job is dropped at once and never starts
    assert manager.cancel(b)["state"] == "cancelled"
    # a running one stops at its next check, through the trainer's own Cancelled
    manager.cancel(a)
    st = manager.wait(a, TIMEOUT)
    assert st["state"] == "cancelled"
    assert "cancelled at step 0/3" in st["error"]
    assert manager.status(b)["state"] == "cancelled" and manager.status(b)["started"] is None
    assert trainer.order == ["running"]
    # the worker is still alive for the next job
    c = manager.submit_train(cfg("after"))
    assert manager.wait(c, TIMEOUT)["state"] == "done"
    assert manager.cancel(c)["state"] == "done"  # cancelling a finished job changes nothing


def test_reattach_reads_progress_and_history(manager, trainer):
    a = manager.submit_train(cfg("hist"))
    manager.wait(a, TIMEOUT)
    # a reloaded page knows only the id: status and the event history give it everything back
    st = manager.status(a)
    assert st["samples"] == ["/tmp/hist/s2.png"]
    assert st["loss"] == 0.5 and st["eta_s"] == 0.0
    hist = manager.events(a)
    assert [e["phase"] for e in hist] == ["prepare", "train", "train", "sample", "train", "done", "done"]
    assert [e["seq"] for e in hist] == list(range(1, 8)) and st["last_seq"] == 7
    assert [e["step"] for e in hist if e["phase"] == "train"] == [1, 2, 3]
    assert hist[1]["loss"] == 1.0 and hist[1]["eta_s"] == 2.0
    assert [e["seq"] for e in manager.events(a, since=4)] == [5, 6, 7]
    with pytest.raises(StudioError, match="no such job"):
        manager.status("train-9999-dead")


def test_reattach_while_running(manager, trainer):
    gate = trainer.gate("live")
    a = manager.submit_train(cfg("live"))
    assert trainer.started["live"].wait(TIMEOUT)
    st = manager.status(a)
    assert st["state"] == "running" and st["phase"] == "prepare" and st["messages"] == ["loading micro"]
    gate.set()
    manager.wait(a, TIMEOUT)


def test_failure_is_reported_and_the_queue_goes_on(manager, trainer):
    trainer.fail["bad"] = StudioError("--images /nonexistent/images: no such folder")
    trainer.fail["bug"] = ZeroDivisionError("division by zero")
    a = manager.submit_train(cfg("bad"))
    b = manager.submit_train(cfg("bug"))
    c = manager.submit_train(cfg("good"))
    sa, sb, sc = (manager.wait(j, TIMEOUT) for j in (a, b, c))
    assert sa["state"] == "failed" and sa["error"] == "--images /nonexistent/images: no such folder"
    assert sa["messages"] == ["loading micro", sa["error"]]
    assert sb["state"] == "failed" and sb["error"].startswith("ZeroDivisionError: division by zero")
    assert sc["state"] == "done"


def test_a_library_problem_does_not_fail_the_training(manager, trainer, register):
    register.error = StudioError("library at /x: the database is locked")
    a = manager.submit_train(cfg("kept"))
    st = manager.wait(a, TIMEOUT)
    assert st["state"] == "done" and "library_name" not in st["result"]
    assert st["messages"][-1] == "not added to the library: library at /x: the database is locked"
    register.error = None
    b = manager.submit_train({**cfg("private"), "register": False})
    assert manager.wait(b, TIMEOUT)["state"] == "done"
    assert register.calls == []  # register=False is honoured


def test_register_training_adds_the_run_under_a_free_name(tmp_path):
    from studio.library import Library

    run = tmp_path / "runs" / "heart"
    _fake_adapter(run, "hrt", "subject")
    result = SimpleNamespace(out=run)
    first = service.register_training(TrainConfig.from_dict({**cfg("heart"), "description": "red"}), result)
    second = service.register_training(TrainConfig.from_dict(cfg("heart")), result)
    assert (first.name, second.name) == ("heart", "heart-2")
    lib = Library()
    assert lib.get("heart").description == "red" and lib.get("heart").triggers == ["hrt"]
    assert len(lib.get("heart").samples) == 2  # the run's samples come along


def test_bad_config_is_refused_at_submit(manager, trainer):
    with pytest.raises(StudioError, match="--steps"):
        manager.submit_train({**cfg("x"), "steps": -1})
    with pytest.raises(StudioError, match="unknown key"):
        manager.submit_train({**cfg("x"), "stepz": 3})
    assert manager.jobs() == []


def _tiny_lora(folder: Path) -> Path:
    """A random LoRA for the tiny sd1 model (studio layout, family recorded)."""
    import torch

    from studio.adapters import AdapterSettings, add_adapter, save_adapter
    from studio.testing import tiny_pipeline

    pipe = tiny_pipeline("sd1")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in add_adapter(pipe, "lora", AdapterSettings(rank=2), "a"):
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    save_adapter(pipe, folder, "a", metadata={"base_family": "sd1"})
    return folder


def test_generate_jobs_on_a_tiny_model(tmp_path):
    """Plain, with an adapter, and a weight sweep: progress per step, files with their infotext."""
    import numpy as np

    from studio.generation import GenerationParams
    from studio.testing import save_tiny

    folder = save_tiny("sd1", tmp_path / "sd1")
    lora = _tiny_lora(tmp_path / "lora")
    m = service.JobManager()
    try:
        a = m.submit_generate(GenerationParams(prompt="a red circle", steps=2, seed=3, num=2),
                              base=str(folder), out_dir=tmp_path / "out")
        b = m.submit_generate(GenerationParams(prompt="a red circle", steps=2, seed=3, num=1, adapters=[f"{lora}:1"]),
                              base=str(folder), out_dir=tmp_path / "out")
        c = m.submit_generate(GenerationParams(prompt="a red circle", steps=2, seed=3, num=1),
                              base=str(folder), out_dir=tmp_path / "out", sweep=f"{lora}=0,1")
        d = m.submit_generate(GenerationParams(prompt=f"a red circle <lora:{lora}:1>", steps=2, seed=3, num=1),
                              base=str(folder), out_dir=tmp_path / "out")
        st, sb, sc, sd = (m.wait(j, 120) for j in (a, b, c, d))
    finally:
        m.shutdown()
    assert st["state"] == "done", st["error"]
    assert (st["step"], st["total"]) == (2, 2)  # 2 denoising steps x 1 batch of 2 images
    steps = [e["step"] for e in m.events(a) if e["phase"] == "generate"]
    assert steps == [1, 2]
    paths = st["result"]["images"]
    assert len(paths) == 2 and all(Path(p).is_file() for p in paths)
    info = Image.open(paths[1]).info["parameters"]
    assert "Seed: 4" in info and info == st["result"]["parameters"][1]

    assert sb["state"] == "done", sb["error"]
    assert re.search(r'Adapters: "[^"]*lora:1"', sb["result"]["parameters"][0])
    assert sc["state"] == "done", sc["error"]
    assert (sc["step"], sc["total"]) == (4, 4)  # 2 steps x 2 weights: the sweep reports every column's steps
    grid, cells = sc["result"]["grid"], sc["result"]["images"]
    assert len(cells) == 2 and Path(grid).is_file() and 'Sweep: "' in sc["result"]["grid_parameters"]
    pixels = [np.asarray(Image.open(p), dtype=np.int16)
              for p in (paths[0], *cells, sb["result"]["images"][0], sd["result"]["images"][0])]
    base, at0, at1, mixed, tagged = pixels
    assert np.array_equal(at0, base)  # weight 0 is the base model
    assert np.abs(at1 - base).mean() > 1  # the adapter changes the image...
    assert np.array_equal(at1, mixed)  # ...the same way in the sweep as in a plain mix...
    assert np.array_equal(tagged, mixed)  # ...and as the A1111 tag in the prompt
    assert sd["result"]["parameters"][0].startswith("a red circle\n")  # the tag is not in the prompt
    with pytest.raises(StudioError, match="--steps"):
        service.JobManager().submit_generate({"prompt": "x", "steps": 0})
    with pytest.raises(StudioError, match="--sweep"):
        service.JobManager().submit_generate({"prompt": "x"}, sweep="lora")


# ---- uploads and the adapter list -----------------------------------------------------------------
def _png(path: Path, fmt: str = "PNG") -> Path:
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path, format=fmt)
    return path


def test_stage_uploads_validates_by_content(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    good = _png(src / "good one.png")
    jpeg_named_png = _png(src / "really-a-jpeg.png", fmt="JPEG")
    fake = src / "fake.png"
    fake.write_text("not an image")
    sneaky = _png(src / "..%2F..%2Fevil$(rm).png")
    caption = src / "good one.txt"
    caption.write_text("a red square\n")
    orphan = src / "orphan.txt"
    orphan.write_text("no image")
    staged = service.stage_uploads([good, jpeg_named_png, fake, sneaky, caption, orphan], tmp_path / "set")
    names = {p.name for p in staged.folder.iterdir()}
    assert names == {"good_one.png", "good_one.txt", "really-a-jpeg.jpg", staged.images[2].name}
    assert all(c.isalnum() or c in "._-" for c in staged.images[2].name)
    assert [p.parent for p in staged.images] == [staged.folder] * 3
    assert (staged.folder / "good_one.txt").read_text() == "a red square\n"
    reasons = dict(staged.rejected)
    assert "not an image" in reasons["fake.png"] and "without an image" in reasons["orphan.txt"]
    assert not list(tmp_path.glob("set.tmp*"))


def test_safe_name():
    assert service.safe_name("../../etc/passwd") == "passwd"
    assert service.safe_name("C:\\Users\\me\\cat pic (1).PNG") == "cat_pic_1_.PNG"
    assert service.safe_name(".hidden") == "hidden"
    assert service.safe_name("a\x00b;rm -rf") == "a_b_rm_-rf"
    assert service.safe_name("..") == ""


def test_stage_uploads_limits(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    files = [_png(src / f"{i:02d}.png") for i in range(service.MAX_UPLOAD_FILES + 2)]
    staged = service.stage_uploads(files, tmp_path / "many")
    assert len(staged.images) == service.MAX_UPLOAD_FILES
    assert [n for n, _ in staged.rejected] == ["50.png", "51.png"]
    monkeypatch.setattr(service, "MAX_UPLOAD_BYTES", 10)
    with pytest.raises(StudioError, match="no usable image.*over the"):
        service.stage_uploads(files[:1], tmp_path / "big")
    assert not (tmp_path / "big").exists()
    with pytest.raises(StudioError, match="no usable image"):
        service.stage_uploads([], tmp_path / "none")


def _fake_adapter(folder: Path, trigger: str, kind: str, samples: int = 2) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    save_file({"w": np.zeros(2, dtype=np.float32)}, str(folder / "pytorch_lora_weights.safetensors"),
              metadata={"studio.method": "lora", "studio.kind": kind, "studio.trigger": trigger,
                        "studio.rank": "4", "studio.train_config": "{}"})
    (folder / "samples").mkdir()
    for i in range(samples):
        _png(folder / "samples" / f"step000010-{i}.png")


def test_check_uploads_summary(tmp_path):
    files = [_png(tmp_path / f"{i}.png") for i in range(3)]
    fake = tmp_path / "holiday.png"
    fake.write_text("text")
    check = service.check_uploads([*files, fake])
    assert [name for _, name in check.images] == ["0.png", "1.png", "2.png"]
    assert check.summary() == ("3 images ready; 1 file refused:\n"
                               "- holiday.png: not an image; upload PNG, JPEG or WebP files")
    many = service.check_uploads([fake] * 12)
    assert many.summary(limit=2).endswith("- ... and 10 more") and many.summary().startswith("0 images ready")
    assert not list(tmp_path.glob("*.tmp*"))  # checking copies nothing


def _library_adapter(tmp_path: Path, name: str, trigger: str, kind: str, samples: int = 2):
    from studio.library import Library

    _fake_adapter(tmp_path / "made" / name, trigger, kind, samples)
    return Library().add(tmp_path / "made" / name)


def test_list_adapters_reads_the_library(tmp_path):
    assert service.list_adapters() == []
    _library_adapter(tmp_path, "subject-heart", "hrt", "subject")
    _library_adapter(tmp_path, "style-zig", "zgz", "style", samples=0)
    found = service.list_adapters()
    assert [e["name"] for e in found] == ["style-zig", "subject-heart"]
    heart = found[1]
    assert (heart["trigger"], heart["kind"], heart["method"]) == ("hrt", "subject", "lora")
    assert len(heart["samples"]) == 2 and found[0]["samples"] == []
    assert Path(heart["file"]).is_file() and Path(heart["file"]).parent == Path(heart["path"])
    assert [e["name"] for e in service.list_adapters("ZGZ")] == ["style-zig"]
    assert [e["name"] for e in service.list_adapters("heart")] == ["subject-heart"]
    # a sample deleted by hand is left out rather than shown broken
    Path(heart["samples"][0]).unlink()
    assert len(service.list_adapters("heart")[0]["samples"]) == 1


def test_import_adapters_checks_each_file(tmp_path, monkeypatch):
    _fake_adapter(tmp_path / "a", "hrt", "subject")
    good = tmp_path / "up" / "my heart (v2).safetensors"
    good.parent.mkdir()
    good.write_bytes((tmp_path / "a" / "pytorch_lora_weights.safetensors").read_bytes())
    notes = tmp_path / "up" / "notes.txt"
    notes.write_text("hi")
    pickle = tmp_path / "up" / "old.ckpt"
    pickle.write_bytes(b"\x80\x04")
    junk = tmp_path / "up" / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    added, rejected = service.import_adapters([good, notes, pickle, junk, good])
    assert added == ["my_heart_v2", "my_heart_v2-2"]  # sanitised; a taken name gets a number
    reasons = dict(rejected)
    assert "not a .safetensors file" in reasons["notes.txt"] and "not a .safetensors file" in reasons["old.ckpt"]
    assert "not a readable .safetensors file" in reasons["junk.safetensors"]
    assert str(tmp_path) not in reasons["junk.safetensors"]  # the upload's temporary path is not shown
    monkeypatch.setattr(service, "MAX_ADAPTER_BYTES", 10)
    monkeypatch.setattr(service, "MAX_ADAPTER_FILES", 1)
    added, rejected = service.import_adapters([good, good])
    assert added == [] and "over the" in rejected[0][1] and "at once" in rejected[1][1]


def test_unique_run_dir(tmp_path):
    assert service.unique_run_dir("heart") == service.runs_dir() / "heart"
    (service.runs_dir() / "heart").mkdir(parents=True)
    assert service.unique_run_dir("heart").name == "heart-2"
    assert service.unique_run_dir("../x y").name == "x_y"


def test_tracked_jobs_read_like_local_ones(manager, trainer):
    """A job that runs elsewhere (a Ray task) shows progress, cancels and finishes as a local one."""
    local = manager.submit_train(cfg("local"))
    manager.wait(local, TIMEOUT)
    remote = manager.track("train", label="rex (Ray)", params={"job": "rex.toml"})
    assert manager.status(remote)["state"] == "running"
    manager.record(remote, Event("train", step=2, total=4, loss=0.25, lr=1e-3, eta_s=3.0))
    manager.record(remote, {"phase": "prepare", "message": "started on Ray worker pid 7"})
    st = manager.status(remote)
    assert (st["step"], st["total"], st["progress"], st["loss"], st["eta_s"]) == (2, 4, 0.5, 0.25, 3.0)
    assert set(st) == set(manager.status(local)) and "started on Ray worker pid 7" in st["messages"]
    assert not manager.cancel_requested(remote)
    manager.cancel(remote)
    assert manager.cancel_requested(remote)
    manager.end(remote, "cancelled", error="cancelled at step 2")
    assert manager.wait(remote, TIMEOUT)["state"] == "cancelled"
    assert [j["id"] for j in manager.jobs()] == [local, remote] and not manager.active()
    with pytest.raises(ValueError):
        manager.end(remote, "running")
