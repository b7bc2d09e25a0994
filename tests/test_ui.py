"""The Gradio app without a browser: its shape, the panel registry, the form and view helpers.

The browser tests (tests/test_ui_browser.py) drive the same app in Chromium.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from studio import service, ui
from studio.errors import StudioError


def _form(**kw):
    values = dict(source="sample", sample_set="subject-heart-red", uploads=None, kind="subject", name="",
                  token="hrt", class_word="", method="lora", steps=12, rank=None, lr=0, base="micro")
    values.update(kw)
    return values


def test_train_form_to_config():
    sets = ui.sample_sets()
    assert {"subject-heart-red", "style-zigzag"} <= set(sets)
    c, warns = ui.train_config(**_form(), advanced={"seed": 3, "batch": 0, "sample_prompts": "a hrt shape\n\n  x \n"})
    assert c.images.endswith("assets/samples/subject-heart-red") and c.steps == 12 and c.rank is None
    assert c.lr is None and c.seed == 3 and c.batch is None and warns == []
    assert c.sample_prompts == ["a hrt shape", "x"]  # one per line, blanks dropped
    # the run works in STUDIO_HOME/runs; the library gets a copy when it finishes
    assert Path(c.out) == service.runs_dir() / "subject-heart-red" and c.name == "subject-heart-red"
    assert c.register and c.method == "lora"
    Path(c.out).mkdir(parents=True)
    again, _ = ui.train_config(**_form(method="loha", name="my heart"))
    assert again.name == "my_heart" and again.method == "loha"
    assert ui.train_config(**_form())[0].name == "subject-heart-red-2"
    with pytest.raises(StudioError, match="sample set"):
        ui.train_config(**_form(sample_set="../../etc"))
    with pytest.raises(StudioError, match="no images uploaded"):
        ui.train_config(**_form(source="upload", uploads=[]))
    with pytest.raises(StudioError, match="--method"):
        ui.train_config(**_form(method="nope"))


def test_train_form_advanced_recipe_fields():
    """The recipe's knobs from the Advanced panel: empty means the recipe's default, 0 is a real value."""
    c, _ = ui.train_config(**_form(), advanced={
        "prior_weight": "0", "caption_dropout": " 0 ", "train_trigger": "off", "prior_target": "noise",
        "subject_word": "  heart ", "class_prompt": "", "trigger_lr": "", "snr_gamma": "0", "scheduler": "cosine",
        "prior_uncond": "0.2", "tag_dropout": "0.5", "ema": "0.99"})
    assert c.ema == 0.99
    assert (c.prior_weight, c.caption_dropout, c.train_trigger, c.prior_target) == (0, 0, False, "noise")
    assert (c.subject_word, c.class_prompt, c.trigger_lr, c.snr_gamma, c.scheduler) == ("heart", None, None, 0, "cosine")
    assert (c.prior_uncond, c.tag_dropout) == (0.2, 0.5)
    d, _ = ui.train_config(**_form(), advanced={"train_trigger": "recipe default", "prior_target": "recipe default",
                                                "caption_dropout": "", "prior_weight": "  "})
    assert (d.train_trigger, d.prior_target, d.caption_dropout, d.prior_weight, d.ema) == (None, "base", None, None, None)
    with pytest.raises(StudioError, match="--ema"):
        ui.train_config(**_form(), advanced={"ema": "1.5"})
    with pytest.raises(StudioError, match="--caption-dropout"):
        ui.train_config(**_form(), advanced={"caption_dropout": "2"})
    with pytest.raises(StudioError, match="prior weight: 'lots' is not a number"):
        ui.train_config(**_form(), advanced={"prior_weight": "lots"})


def test_train_form_tlora_options():
    """TLoRA's options reach the config with --method tlora and are dropped for other methods."""
    adv = {"transform_rank": 2, "residual": "tr", "residual_rank": 8}
    c, _ = ui.train_config(**_form(method="tlora"), advanced=adv)
    assert (c.method, c.transform_rank, c.residual, c.residual_rank) == ("tlora", 2, "tr", 8)
    assert c.adapter_options() == {"transform_rank": 2, "residual": "tr", "residual_rank": 8}
    d, _ = ui.train_config(**_form(method="tlora"), advanced={"transform_rank": 0, "residual": "recipe default",
                                                              "residual_rank": None})
    assert (d.transform_rank, d.residual, d.residual_rank) == (None, None, None)
    e, _ = ui.train_config(**_form(method="lora"), advanced=adv)  # a LoRA job would refuse them
    assert (e.transform_rank, e.residual, e.residual_rank) == (None, None, None)


def test_train_form_with_uploads(tmp_path):
    from PIL import Image

    good = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(good)
    bad = tmp_path / "b.png"
    bad.write_text("text")
    c, warns = ui.train_config(**_form(source="upload", uploads=[str(good), str(bad)], name="up"))
    assert Path(c.images).parent == service.uploads_dir()
    assert sorted(p.name for p in Path(c.images).iterdir()) == ["a.png"]
    assert warns == ["b.png: not an image; upload PNG, JPEG or WebP files"]
    with pytest.raises(StudioError, match="no usable image.*b.png: not an image"):
        ui.train_config(**_form(source="upload", uploads=[str(bad)]))


def test_form_defaults():
    # the learning rate the CLI's recipe trains with (micro doubles LoRA's, keeps TLoRA's own)
    assert ui.form_defaults("micro", "subject", "lora") == {"steps": 1000, "rank": 16, "lr": 2e-3}
    assert ui.form_defaults("micro", "subject", "tlora")["lr"] == 1e-3
    assert ui.form_defaults("micro", "style", "tlora")["lr"] == 2e-3
    assert ui.form_defaults("./sd15", "style", "loha") == {"steps": 1000, "rank": 8, "lr": 2e-3}


def test_build_app_has_its_tabs():
    m = service.JobManager(train_fn=lambda *a, **k: None)
    demo = ui.build_app("micro", manager=m)
    config = demo.get_config_file()
    tabs = [c["props"].get("label") for c in config["components"] if c.get("type") == "tabitem"]
    assert tabs == ["Train", "Library", "Generate", "Jobs"]
    labels = {c["props"].get("label") for c in config["components"]}
    assert {"Trigger word", "Class word (subjects)", "Method", "Steps", "Rank", "Learning rate", "Prompt",
            "Negative prompt", "Search", "Weight", "New name", "DECOR: unwanted words",
            "DECOR strength (alpha)", "Adapters to find", "Gated fusion"} <= labels
    assert any(c.get("type") == "accordion" and c["props"].get("label") == "Advanced" for c in config["components"])
    # gallery clicks get their gr.SelectData: gradio finds it by a type hint it must be able to resolve
    import gradio as gr
    from gradio.utils import get_type_hints

    selects = [f.fn for f in demo.fns.values()
               if f.fn is not None and "evt" in f.fn.__code__.co_varnames[: f.fn.__code__.co_argcount]]
    assert len(selects) == 3 and all(get_type_hints(fn).get("evt") is gr.SelectData for fn in selects)
    m.shutdown()


def test_a_panel_slots_in_by_its_order(monkeypatch):
    """A later method's tab is one @panel function: it lands where its order says, and can reach the others."""
    import gradio as gr

    monkeypatch.setattr(ui, "PANELS", dict(ui.PANELS))
    seen = {}

    @ui.panel("quantize", "Quantize", order=25)
    def _quantize(ctx: ui.UIContext) -> None:
        gr.Markdown("quantize here")
        ctx.after_build(lambda: seen.update(add=ctx.shared.get("generate.add_adapter")))

    demo = ui.build_app("micro", manager=service.JobManager())
    tabs = [c["props"].get("label") for c in demo.get_config_file()["components"] if c.get("type") == "tabitem"]
    assert tabs == ["Train", "Library", "Quantize", "Generate", "Jobs"]
    assert seen["add"] is not None  # wiring runs once the Generate panel exists
    only = ui.build_app("micro", manager=service.JobManager(), panels=["generate"])
    assert [c["props"].get("label") for c in only.get_config_file()["components"]
            if c.get("type") == "tabitem"] == ["Generate"]


def test_panel_modules_not_built_yet_are_skipped(tmp_path, monkeypatch):
    ui.load_panel_modules(["studio.not_a_panel_module_yet"])
    # a panel module that exists but lacks a dependency is a real error, not a tab to skip
    (tmp_path / "broken_panel_mod.py").write_text("import not_installed_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="not_installed_dependency_xyz"):
        ui.load_panel_modules(["broken_panel_mod"])


def test_job_views():
    assert ui.job_markdown(None) == "No job yet."
    st = {"label": "heart", "state": "running", "step": 5, "total": 20, "loss": 0.12345, "eta_s": 75.0,
          "elapsed_s": 10.0, "messages": [], "progress": 0.25, "error": None, "result": None, "phase": "train"}
    assert ui.job_markdown(st) == "**Running** `heart` · step 5/20 · loss 0.1235 · ETA 1m 15s"
    bar = ui.progress_html(st)
    assert 'width:25.0%' in bar and 'data-state="running"' in bar and 'aria-valuenow="25"' in bar
    assert 'data-state="idle"' in ui.progress_html(None)
    queued = {**st, "state": "queued", "position": 1}
    assert "1 job ahead" in ui.job_markdown(queued)
    failed = {**st, "state": "failed", "error": "--images x: no such folder"}
    assert "--images x: no such folder" in ui.job_markdown(failed)
    done = {**st, "state": "done", "step": 20, "progress": 1.0,
            "result": {"out": "/r/heart", "library_name": "heart-2"}}
    assert ui.job_markdown(done).endswith("Added to the library as `heart-2`: see the Library tab.")
    assert service.format_eta(3725) == "1h 02m" and service.format_eta(None) == "?"


def test_busy_note():
    import threading

    gate = threading.Event()

    def slow(cfg, on_event=None, cancel=None):
        on_event({"phase": "train", "step": 2, "total": 9})
        gate.wait(10)
        return {"out": cfg.out}

    m = service.JobManager(train_fn=slow, register_fn=lambda cfg, result: None)
    try:
        assert ui.busy_note(m, "train") == ""
        m.submit_train({"kind": "subject", "images": "/x", "name": "a", "out": "/tmp/a"})
        m.submit_train({"kind": "subject", "images": "/x", "name": "b", "out": "/tmp/b"})
        for _ in range(200):
            if m.active("train")[0]["step"] == 2:
                break
            threading.Event().wait(0.02)
        assert ui.busy_note(m, "train") == ("The studio is busy: `a` (step 2/9), 1 more queued. "
                                            "A job you start now waits its turn.")
    finally:
        gate.set()
        m.shutdown()


def test_mix_specs_and_sweep():
    slots = ["heart", 1.0, 0.0, 1.0, "", 1.0, 0.0, 1.0, " zig ", 0.5, 0.4, 1.0, "", 1, 0, 1]
    assert ui.mix_specs(slots) == ["heart:1", "zig:0.5@0.4-1"]
    assert ui.sweep_text(slots, None, "0, 0.5,1") == "heart:1=0,0.5,1"
    assert ui.sweep_text(slots, "zig", "0,1") == "zig:0.5@0.4-1=0,1"
    with pytest.raises(StudioError, match="window"):
        ui.mix_specs(["heart", 1.0, 0.6, 0.2])
    # a row's name may carry a scope and block weights; weight and window stay the row's
    assert ui.mix_specs(["heart:unet:up.1=0.5", 1.25, 0.0, 1.0, "zig", 1.0, 0.0, 1.0]) == \
        ["heart:1.25:unet:up.1=0.5", "zig:1"]
    with pytest.raises(StudioError, match="slider"):
        ui.mix_specs(["heart:0.5", 1.0, 0.0, 1.0])
    with pytest.raises(StudioError, match="add an adapter"):
        ui.sweep_text(["", 1, 0, 1], None, "0,1")
    with pytest.raises(StudioError, match="comma-separated"):
        ui.sweep_text(slots, None, "0, a lot")


def test_generation_params_with_decor():
    slots = ["heart", 1.0, 0.0, 1.0]
    p = ui.generation_params("a red circle", "", -1, 2, 8, 2.5, "", slots, " circle, red ", 0.6)
    assert (p.seed, p.adapters, p.decor, p.decor_alpha) == (None, ["heart:1"], "circle, red", 0.6)
    assert p.decor_config().unwanted == ("circle", "red")
    assert ui.generation_params("a red circle", "", 7, 1, 8, 2.5, "32x32", [], "", 1.0).decor_config() is None
    with pytest.raises(StudioError, match="--decor-alpha"):
        ui.generation_params("a red circle", "", 7, 1, 8, 2.5, "", [], "red", 1.5)


def test_image_caption():
    info = ('a hrt shape\nSteps: 8, Sampler: DPM++ 2M, CFG scale: 2.5, Seed: 7, Size: 64x64, '
            'Lora hashes: "heart: ff77", Adapters: "heart:1, zig:0.5@0.4-1", Version: diffusion-studio 0.1.0')
    assert ui.image_caption(info) == "seed 7 · heart:1, zig:0.5@0.4-1"
    assert ui.image_caption("a circle\nSteps: 8, Seed: 3, Size: 64x64") == "seed 3"
    assert ui.image_caption("odd text") == "odd text"


def test_sampling_defaults():
    assert ui.sampling_defaults("micro") == {"steps": 20, "guidance": 2.5}
    assert ui.sampling_defaults("./sd15") == {"steps": 30, "guidance": 7.5}


def test_parse_auth():
    assert ui.parse_auth(None) is None
    assert ui.parse_auth("alice:se:cret") == ("alice", "se:cret")
    with pytest.raises(StudioError, match="USER:PASS"):
        ui.parse_auth("alice")


def test_served_folders_leave_the_rest_of_home_private():
    from studio.home import studio_home

    folders = ui.served_folders()
    home = studio_home()
    assert home not in folders and service.uploads_dir() not in folders
    assert {service.runs_dir(), service.outputs_dir(), home / "adapters", ui.SAMPLES_DIR} <= set(folders)
    assert all(f == ui.SAMPLES_DIR or home in f.parents for f in folders)
