"""The service layer (job queue, cancellation, re-attach, failures, uploads) and the Gradio app's shape."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

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


@pytest.fixture
def trainer():
    return FakeTrainer()


@pytest.fixture
def manager(trainer):
    m = service.JobManager(train_fn=trainer)
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
    assert sa["result"] == {"out": "/tmp/first", "steps": 3, "final_loss": 0.5}
    assert sa["error"] is None and sa["messages"][-1] == "wrote first"
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
    assert [e["phase"] for e in hist] == ["prepare", "train", "train", "sample", "train", "done"]
    assert [e["seq"] for e in hist] == list(range(1, 7)) and st["last_seq"] == 6
    assert [e["step"] for e in hist if e["phase"] == "train"] == [1, 2, 3]
    assert hist[1]["loss"] == 1.0 and hist[1]["eta_s"] == 2.0
    assert [e["seq"] for e in manager.events(a, since=4)] == [5, 6]
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


def test_bad_config_is_refused_at_submit(manager, trainer):
    with pytest.raises(StudioError, match="--steps"):
        manager.submit_train({**cfg("x"), "steps": -1})
    with pytest.raises(StudioError, match="unknown key"):
        manager.submit_train({**cfg("x"), "stepz": 3})
    assert manager.jobs() == []


def test_generate_job_on_a_tiny_model(tmp_path):
    from studio.generation import GenerationParams
    from studio.testing import save_tiny

    folder = save_tiny("sd1", tmp_path / "sd1")
    m = service.JobManager()
    try:
        a = m.submit_generate(GenerationParams(prompt="a red circle", steps=2, seed=3, num=2),
                              base=str(folder), out_dir=tmp_path / "out")
        st = m.wait(a, 120)
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
    with pytest.raises(StudioError, match="--steps"):
        service.JobManager().submit_generate({"prompt": "x", "steps": 0})


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


def test_list_adapters(tmp_path):
    assert service.list_adapters() == []
    _fake_adapter(service.adapters_dir() / "subject-heart", "hrt", "subject")
    _fake_adapter(service.adapters_dir() / "style-zig", "zgz", "style", samples=0)
    (service.adapters_dir() / "half-written").mkdir()
    found = service.list_adapters()
    assert [e["name"] for e in found] == ["style-zig", "subject-heart"]
    heart = found[1]
    assert (heart["trigger"], heart["kind"], heart["method"]) == ("hrt", "subject", "lora")
    assert heart["metadata"]["rank"] == "4" and "train_config" not in heart["metadata"]
    assert len(heart["samples"]) == 2 and found[0]["samples"] == []
    assert [e["name"] for e in service.list_adapters("ZGZ")] == ["style-zig"]
    assert [e["name"] for e in service.list_adapters("heart")] == ["subject-heart"]
    assert service.unique_adapter_dir("subject-heart").name == "subject-heart-2"
    assert service.unique_adapter_dir("../x y").name == "x_y"


# ---- the Gradio app ---------------------------------------------------------------------------------
def test_train_form_to_config():
    from studio import ui

    sets = ui.sample_sets()
    assert {"subject-heart-red", "style-zigzag"} <= set(sets)
    c, warns = ui.train_config(source="sample", sample_set="subject-heart-red", uploads=None, kind="subject",
                               name="", token="hrt", class_word="", steps=12, rank=None, lr=0, base="micro",
                               advanced={"seed": 3, "batch": 0, "method": "lora"})
    assert c.images.endswith("assets/samples/subject-heart-red") and c.steps == 12 and c.rank is None
    assert c.lr is None and c.seed == 3 and c.batch is None and warns == []
    assert Path(c.out) == service.adapters_dir() / "subject-heart-red" and c.name == "subject-heart-red"
    with pytest.raises(StudioError, match="sample set"):
        ui.train_config(source="sample", sample_set="../../etc", uploads=None, kind="subject", name="",
                        token="sks", class_word="", steps=None, rank=None, lr=None, base="micro")
    with pytest.raises(StudioError, match="no images uploaded"):
        ui.train_config(source="upload", sample_set="", uploads=[], kind="style", name="", token="sks",
                        class_word="", steps=None, rank=None, lr=None, base="micro")


def test_build_app_has_the_three_tabs(trainer):
    from studio import ui

    m = service.JobManager(train_fn=trainer)
    demo = ui.build_app("micro", manager=m)
    config = demo.get_config_file()
    tabs = [c["props"].get("label") for c in config["components"] if c.get("type") == "tabitem"]
    assert tabs == ["Train", "Library", "Generate"]
    labels = {c["props"].get("label") for c in config["components"]}
    assert {"Trigger word", "Class word (subjects)", "Steps", "Rank", "Learning rate", "Prompt",
            "Negative prompt", "Search"} <= labels
    assert any(c.get("type") == "accordion" and c["props"].get("label") == "Advanced" for c in config["components"])
    # gallery clicks get their gr.SelectData: gradio finds it by a type hint it must be able to resolve
    import gradio as gr
    from gradio.utils import get_type_hints

    selects = [f.fn for f in demo.fns.values()
               if f.fn is not None and "evt" in f.fn.__code__.co_varnames[: f.fn.__code__.co_argcount]]
    assert len(selects) == 2 and all(get_type_hints(fn).get("evt") is gr.SelectData for fn in selects)
    m.shutdown()


def test_job_views():
    from studio import ui

    assert ui.job_markdown(None) == "No job yet."
    st = {"label": "heart", "state": "running", "step": 5, "total": 20, "loss": 0.12345, "eta_s": 75.0,
          "elapsed_s": 10.0, "messages": [], "progress": 0.25, "error": None, "result": None, "phase": "train"}
    assert ui.job_markdown(st) == "**Running** `heart` · step 5/20 · loss 0.1235 · ETA 1m 15s"
    assert 'width:25.0%' in ui.progress_html(st)
    queued = {**st, "state": "queued", "position": 1}
    assert "1 job ahead" in ui.job_markdown(queued)
    failed = {**st, "state": "failed", "error": "--images x: no such folder"}
    assert "--images x: no such folder" in ui.job_markdown(failed)
    assert service.format_eta(3725) == "1h 02m" and service.format_eta(None) == "?"
