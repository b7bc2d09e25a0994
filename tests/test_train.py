"""The training loop on tiny models: outputs, exact resume after SIGKILL, batch jobs, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from studio.cli import main
from studio.errors import StudioError
from studio.trainers.config import TrainConfig
from studio.trainers.loop import train


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from studio.micro.cli import render_set

    folder = tmp_path_factory.mktemp("imgs") / "subject-heart"
    render_set(folder, 4, 1, shape="heart", color="red", texture="solid")
    for p in folder.glob("*.png"):  # the tiny models work at 32 px
        Image.open(p).resize((32, 32)).save(p)
    return folder


def _cfg(images, base, out, **kw) -> TrainConfig:
    args = dict(kind="subject", images=str(images), base=str(base), out=str(out), steps=6, batch=2, class_images=2,
                checkpoint_every=0, register=False, seed=3)
    args.update(kw)
    return TrainConfig.from_dict(args)


def test_subject_training_writes_a_diffusers_loadable_adapter(images, tiny_dirs, tmp_path):
    events = []
    res = train(_cfg(images, tiny_dirs["sd1"], tmp_path / "a"), on_event=events.append)
    assert res.adapter_file.name == "pytorch_lora_weights.safetensors" and res.steps == 6
    steps = [e.step for e in events if e.phase == "train"]
    assert steps == list(range(1, 7))
    assert all(e.eta_s is not None and e.loss is not None for e in events if e.phase == "train")
    assert events[-1].phase == "done" and events[-1].samples
    tensors = load_file(str(res.adapter_file))
    # the UNet's LoRA plus the learned trigger embedding (subjects learn it by default)
    assert tensors and all(k.startswith(("unet.", "lora_trigger_embedding.")) for k in tensors)
    assert "lora_trigger_embedding.text_encoder" in tensors
    assert any(v.abs().max() > 0 for k, v in tensors.items() if "lora_B" in k), "training must move the adapter"
    from studio.adapters import read_metadata

    meta = read_metadata(res.out)
    assert meta["studio.kind"] == "subject" and meta["studio.trigger"] == "sks" and meta["studio.method"] == "lora"
    assert json.loads(meta["studio.train_config"])["steps"] == 6
    assert not (res.out / "checkpoints").exists()


def test_same_seed_same_adapter_and_refuses_to_overwrite(images, tiny_dirs, tmp_path):
    a = train(_cfg(images, tiny_dirs["sd1"], tmp_path / "a", steps=3))
    b = train(_cfg(images, tiny_dirs["sd1"], tmp_path / "b", steps=3))
    ta, tb = load_file(str(a.adapter_file)), load_file(str(b.adapter_file))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    with pytest.raises(StudioError, match="--resume"):
        train(_cfg(images, tiny_dirs["sd1"], tmp_path / "a", steps=3))


def test_style_training_with_captions(tiny_dirs, tmp_path):
    from studio.micro.cli import render_set

    folder = tmp_path / "style-zigzag"
    render_set(folder, 3, 2, texture="zigzag", caption="content")
    for p in folder.glob("*.png"):
        Image.open(p).resize((32, 32)).save(p)
    res = train(TrainConfig.from_dict(dict(kind="style", images=str(folder), base=str(tiny_dirs["sd1"]),
                                           out=str(tmp_path / "s"), steps=2, batch=2, register=False,
                                           caption="captions", text_encoder=True)))
    keys = load_file(str(res.adapter_file))
    assert any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("unet.") for k in keys)


def _studio(*args: str, **kw) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("studio")
    return subprocess.Popen([str(exe), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_sigkill_and_resume_gives_the_same_adapter(images, tiny_dirs, tmp_path):
    common = ["train", "--kind", "subject", "--images", str(images), "--base", str(tiny_dirs["sd1"]), "--steps", "40",
              "--batch", "2", "--class-images", "2", "--seed", "5", "--no-register"]
    ref = _studio(*common, "--out", str(tmp_path / "ref"), "--checkpoint-every", "0")
    assert ref.wait(timeout=600) == 0, ref.stderr.read()
    proc = _studio(*common, "--out", str(tmp_path / "run"), "--checkpoint-every", "3")
    step_file = tmp_path / "run" / "checkpoints" / "step.json"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if step_file.is_file() and json.loads(step_file.read_text())["step"] >= 6:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = json.loads(step_file.read_text())["step"]
    assert 6 <= killed_at < 40
    assert not (tmp_path / "run" / "pytorch_lora_weights.safetensors").exists()
    resumed = _studio(*common, "--out", str(tmp_path / "run"), "--checkpoint-every", "3", "--resume")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    a = load_file(str(tmp_path / "ref" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "run" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_sigterm_stops_with_a_checkpoint_and_resume_finishes(images, tiny_dirs, tmp_path):
    """SIGTERM (a scheduler's stop): a checkpoint at the next step, exit 143, and --resume ends the run."""
    common = ["train", "--kind", "subject", "--images", str(images), "--base", str(tiny_dirs["sd1"]), "--steps", "150",
              "--batch", "2", "--class-images", "2", "--seed", "5", "--no-register", "--checkpoint-every", "0",
              "--out", str(tmp_path / "run")]
    proc = _studio(*common)
    deadline = time.time() + 600
    seen = ""
    while time.time() < deadline and proc.poll() is None:
        seen += proc.stderr.read(1) or ""
        if "] 1/150 " in seen:  # the first training step is done (non-tty: a line at step 1, then every 10 s)
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, seen + err
    assert "resume with --resume" in err
    step = json.loads((tmp_path / "run" / "checkpoints" / "step.json").read_text())["step"]
    assert 1 <= step < 150
    assert not (tmp_path / "run" / "pytorch_lora_weights.safetensors").exists()
    resumed = _studio(*common, "--resume")
    assert resumed.wait(timeout=900) == 0, resumed.stderr.read()
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()


def test_batch_runs_every_job_and_reports_the_bad_one(images, tiny_dirs, tmp_path, capsys):
    jobs = []
    for i, imgs in enumerate([images, tmp_path / "missing", images]):
        job = tmp_path / f"job{i}.toml"
        job.write_text(f'kind = "subject"\nimages = "{imgs}"\nbase = "{tiny_dirs["sd1"]}"\nout = "{tmp_path / f"o{i}"}"\n'
                       f'steps = 2\nbatch = 2\nclass_images = 2\nregister = false\n')
        jobs.append(str(job))
    rc = main(["batch", *jobs, "--logs", str(tmp_path / "logs")])
    out = capsys.readouterr().out
    assert rc == 1
    assert "2 ok, 1 failed" in out and "FAILED" in out
    assert (tmp_path / "o0" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "o2" / "pytorch_lora_weights.safetensors").is_file()
    assert len(list((tmp_path / "logs").glob("*.log"))) == 3


def test_toml_unknown_key_lists_valid_ones(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text('kind = "subject"\nimages = "x"\nstepz = 3\n')
    with pytest.raises(StudioError, match="unknown key.*stepz.*valid keys:.*steps"):
        TrainConfig.from_toml(job)


def test_every_job_field_is_a_flag_and_flags_map_onto_fields():
    """`studio train --help` is the reference of the job fields: a TOML-only field would be a hidden setting."""
    import argparse
    import dataclasses

    from studio.trainers.cli import _add_job_flags, config_from_args

    p = argparse.ArgumentParser()
    p.add_argument("job", nargs="?")
    _add_job_flags(p)
    dests = {a.dest for a in p._actions}
    assert [f.name for f in dataclasses.fields(TrainConfig) if f.name not in dests] == []
    args = p.parse_args(["--images", "x", "--kind", "style", "--scheduler", "cosine", "--warmup", "10", "--flip", "0",
                         "--sample-prompt", "a b", "--sample-prompt", "c d", "--text-encoder-lr", "1e-4"])
    cfg = config_from_args(args)
    assert (cfg.scheduler, cfg.warmup, cfg.flip, cfg.sample_prompts, cfg.text_encoder_lr) == (
        "cosine", 10, 0.0, ["a b", "c d"], 1e-4)


@pytest.mark.parametrize("field,value,match", [
    ("steps", 0, "--steps"), ("rank", -1, "--rank"), ("kind", "portrait", "--kind"), ("lr", 5, "--lr"),
    ("batch", 0, "--batch"), ("token", "two words", "--token"), ("prior_weight", -1, "--prior-weight"),
    ("caption_dropout", 1.5, "--caption-dropout"), ("prior_uncond", -0.1, "--prior-uncond"), ("tag_dropout", 2, "--tag-dropout"), ("subject_word", "two words", "--subject-word"),
])
def test_bad_fields(field, value, match, tmp_path):
    with pytest.raises(StudioError, match=match):
        TrainConfig.from_dict({"kind": "subject", "images": str(tmp_path), field: value})


def test_bad_images_and_output(images, tiny_dirs, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(StudioError, match="no images"):
        train(_cfg(empty, tiny_dirs["sd1"], tmp_path / "o1"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StudioError, match="--out"):
        train(_cfg(images, tiny_dirs["sd1"], blocker))
    with pytest.raises(StudioError, match="--rank"):
        train(_cfg(images, tiny_dirs["sd1"], tmp_path / "o2", rank=4096))
    assert not (tmp_path / "o2" / "pytorch_lora_weights.safetensors").exists()


@pytest.mark.parametrize("bad, message", [(dict(rank=4096), "--rank 4096"),
                                          (dict(blocks="up_blocks.9"), "up_blocks.9")])
def test_bad_adapter_settings_are_said_before_the_caches(images, tiny_dirs, tmp_path, bad, message):
    """A rank or block that cannot fit stops the run right after the load, not after caching and class images."""
    events = []
    with pytest.raises(StudioError, match=message):
        train(_cfg(images, tiny_dirs["sd1"], tmp_path / "o", **bad), on_event=events.append)
    said = " ".join(e.message or "" for e in events)
    assert "loading" in said and "caching" not in said and "class images" not in said, said
    assert not (tmp_path / "o" / "pytorch_lora_weights.safetensors").exists()


def test_cli_train_exit_2_on_bad_input(tmp_path, capsys):
    assert main(["train", "--kind", "subject", "--images", str(tmp_path / "nope"), "--base", "micro",
                 "--out", str(tmp_path / "o")]) == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.skipif(os.cpu_count() is None, reason="needs a CPU count")
def test_two_processes_really_are_two(images, tiny_dirs, tmp_path):
    """torchrun --nproc_per_node 2 on the CPU: accelerate sees world size 2, gloo all-reduces gradients."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STUDIO_ASSERT_WORLD_SIZE": "2"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           "-m", "studio.cli", "train", "--kind", "subject", "--images", str(images), "--base", str(tiny_dirs["sd1"]),
           "--steps", "3", "--batch", "1", "--class-images", "2", "--out", str(tmp_path / "dp"), "--no-register",
           "--device", "cpu"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "world size 2" in res.stderr
    assert "effective batch 2 = 1 per process x 1 accumulation x 2 process(es)" in res.stderr
    assert (tmp_path / "dp" / "pytorch_lora_weights.safetensors").is_file()


# ----------------------------------------------------------------------------- subject captions, output preservation


def test_subject_word_is_found_in_micro_captions_only_when_unambiguous():
    from studio.trainers.recipes import subject_word_from_captions

    assert subject_word_from_captions(["a solid red heart on a gray background", "red heart, white background"]) == "heart"
    assert subject_word_from_captions(["a red heart", "a star and a heart"]) == "heart"
    assert subject_word_from_captions(["a red heart", "a red star"]) == ""  # no shared shape word
    assert subject_word_from_captions(["a red heart", None]) == ""  # an image without a caption
    assert subject_word_from_captions(["a heart and a star", "a star heart"]) == ""  # two shared: ambiguous


class _Data(list):
    @property
    def items(self):
        return list(self)


def test_subject_captions_put_the_trigger_in_the_subject_word_place(caplog):
    from types import SimpleNamespace

    from studio.trainers.recipes import SubjectRecipe

    data = _Data(SimpleNamespace(caption=c, path=Path(f"{i}.png"))
                 for i, c in enumerate(["a red Rex on the beach", "Rex, studio light", "a dog in snow", None]))
    plan = SimpleNamespace(class_word="dog", micro=False)
    cfg = TrainConfig.from_dict(dict(images="x", subject_word="rex"))
    prompts = SubjectRecipe().instance_prompts(cfg, plan, data)
    plain = "a sks dog"
    assert prompts[:2] == [("a red sks dog on the beach", plain), ("sks dog, studio light", plain)]
    assert prompts[2:] == [plain, plain]  # captions that do not name the subject train on the plain prompt
    assert "do not name the subject 'rex'" in caplog.text and "2.png" in caplog.text
    # without a subject word (and not micro) the captions are not used: classic DreamBooth
    assert SubjectRecipe().instance_prompts(TrainConfig.from_dict(dict(images="x")), plan, data) == [plain] * 4
    assert SubjectRecipe().instance_prompts(TrainConfig.from_dict(dict(images="x", subject_word="rex",
                                                                       caption="trigger")), plan, data) == [plain] * 4
    with pytest.raises(StudioError, match="--subject-word"):
        SubjectRecipe().instance_prompts(TrainConfig.from_dict(dict(images="x", caption="captions")), plan, data)


def test_caption_dropout_picks_the_plain_prompt_at_its_rate():
    from studio.trainers.loop import _pick

    g = torch.Generator().manual_seed(0)
    picks = [_pick(("caption", "plain"), 0.3, g) for _ in range(2000)]
    assert abs(picks.count("plain") / 2000 - 0.3) < 0.04
    state = g.get_state()
    assert _pick("only", 0.3, g) == "only" and torch.equal(g.get_state(), state)  # no draw without a choice
    assert {_pick(("c", "p"), 0.0, g) for _ in range(50)} == {"c"} and {_pick(("c", "p"), 1.0, g) for _ in range(50)} == {"p"}


def test_tag_dropout_leaves_out_tags_but_never_the_triggers():
    from collections import Counter

    from studio.trainers.loop import _pick

    g = torch.Generator().manual_seed(0)
    cap = ("solid red sks shape, white background, photo", "a sks shape")
    picks = Counter(_pick(cap, 0.0, g, 0.5, "sks") for _ in range(4000))
    assert set(picks) == {"solid red sks shape, white background, photo", "solid red sks shape, white background",
                          "solid red sks shape, photo", "solid red sks shape"}
    assert all(abs(n / 4000 - 0.25) < 0.03 for n in picks.values())  # two independent tags at 0.5
    assert _pick(("no tags here", "p"), 0.0, g, 0.5, "sks") == "no tags here"  # one tag: nothing to leave out
    assert _pick(cap, 0.0, g, 0.0, "sks") == cap[0]
    g2 = torch.Generator().manual_seed(1)
    _pick(cap, 0.0, g2)
    after_one = g2.get_state()
    g3 = torch.Generator().manual_seed(1)
    _pick(cap, 0.0, g3, 0.0, "sks")
    assert torch.equal(g3.get_state(), after_one)  # tag dropout 0 draws nothing more
    assert _pick(("a, b", "plain"), 0.0, torch.Generator().manual_seed(0), 1.0, "sks") == "plain"  # all gone: plain


@pytest.mark.parametrize("uncond", [0.0, 1.0])
def test_prior_uncond_trains_class_images_on_the_empty_prompt(images, tiny_dirs, tmp_path, monkeypatch, uncond):
    """--prior-uncond: the class half's prompts become "" (the prompt guidance subtracts) at that rate."""
    from studio.trainers import loop

    seen: list[list[str]] = []
    real = loop.TextCache.embed_pooled
    monkeypatch.setattr(loop.TextCache, "embed_pooled",
                        lambda self, prompts: seen.append(list(prompts)) or real(self, prompts))
    train(_cfg(images, tiny_dirs["sd1"], tmp_path / "a", steps=3, prior_uncond=uncond, class_prompt="a shape",
               sample_prompts=["a sks shape"]))
    # per step: the instance prompts, then the class prompts (batch 2 each)
    class_batches = [b for b in seen if len(b) == 2 and all(p in ("a shape", "") for p in b)]
    assert len(class_batches) == 3
    assert {p for b in class_batches for p in b} == ({""} if uncond else {"a shape"})


def test_adapters_off_is_the_base_model_and_keeps_the_adapter_trainable(tiny_dirs):
    from studio import adapters, load_pipeline
    from studio.trainers.loop import _adapters_off

    pipe = load_pipeline(str(tiny_dirs["sd1"]))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    emb = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = pipe.unet(x, 10, emb).sample
    params = adapters.add_adapter(pipe, "lora", adapters.AdapterSettings(rank=2, targets="all"), "default")
    with torch.no_grad():
        for p in params:
            p.add_(0.1)
        adapted = pipe.unet(x, 10, emb).sample
        with _adapters_off(pipe):
            off = pipe.unet(x, 10, emb).sample
        again = pipe.unet(x, 10, emb).sample
    assert (adapted - base).abs().max() > 1e-4
    torch.testing.assert_close(off, base)
    torch.testing.assert_close(again, adapted)
    assert all(p.requires_grad for p in params)


def test_prior_target_is_checked(tmp_path):
    with pytest.raises(StudioError, match="--prior-target zero: choose base or noise"):
        TrainConfig.from_dict(dict(images="x", prior_target="zero"))


def _plan(kind: str, source: str = "micro", **fields):
    """The recipe's plan for a job on a base of this source kind (no model loaded)."""
    from types import SimpleNamespace

    import studio.generation as gen
    from studio.trainers.recipes import get_recipe

    pipe = SimpleNamespace(studio_source=SimpleNamespace(kind=source, family="sd1", spec=source))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gen, "native_size", lambda p: (64, 64))
        mp.setattr(gen, "vae_factor", lambda p: 4)
        mp.setattr(gen, "model_defaults", lambda p: {"steps": 20, "guidance": 2.5})
        return get_recipe(kind).plan(TrainConfig.from_dict(dict(kind=kind, images="x", **fields)), pipe)


def test_micro_subject_defaults_and_overrides():
    plan = _plan("subject")
    assert (plan.lr, plan.trigger_lr, plan.prior_weight, plan.caption_dropout) == (2e-3, 1e-3, 4.0, 0.25)
    assert (plan.prior_uncond, plan.tag_dropout, plan.ema) == (0.2, 0.5, 0.99)
    plan = _plan("subject", lr=1e-4, trigger_lr=2e-3, prior_weight=0.5, caption_dropout=0.1, prior_uncond=0,
                 tag_dropout=0, ema=0)
    assert (plan.lr, plan.trigger_lr, plan.prior_weight, plan.caption_dropout) == (1e-4, 2e-3, 0.5, 0.1)
    assert (plan.prior_uncond, plan.tag_dropout, plan.ema) == (0, 0, 0)
    plan = _plan("subject", source="folder")  # real-size bases: measured here only on micro, so off
    assert (plan.lr, plan.prior_weight, plan.micro, plan.caption_dropout, plan.prior_uncond) == (1e-3, 1.0, False, 0.5, 0)
    assert (plan.ema, _plan("style").ema, _plan("subject", source="folder", ema=0.9).ema) == (0, 0, 0.9)


def test_subjects_are_not_mirrored_by_default_styles_are():
    """kohya's and diffusers' default: no flips for a subject (a mirrored crescent is another shape)."""
    assert (_plan("subject").flip, _plan("subject", source="folder").flip) == (0.0, 0.0)
    assert (_plan("style").flip, _plan("subject", flip=0.5).flip, _plan("style", flip=0).flip) == (0.5, 0.5, 0)


def test_micro_style_defaults_train_the_trigger_with_output_preservation():
    plan = _plan("style")
    assert (plan.prior, plan.train_trigger, plan.prior_weight, plan.caption_dropout) == (True, True, 3.0, 0.0)
    plan = _plan("style", prior=False, train_trigger=False)
    assert (plan.prior, plan.train_trigger) == (False, False)
    plan = _plan("style", source="folder")
    assert (plan.prior, plan.train_trigger, plan.prior_weight) == (False, False, 1.0)


def test_blocks_limit_the_adapted_layers(images, tiny_dirs, tmp_path):
    """--blocks: only layers under the named prefixes get an adapter; a prefix that matches none is named."""
    res = train(_cfg(images, tiny_dirs["sd1"], tmp_path / "a", steps=2, blocks="up_blocks", prior=False))
    keys = [k for k in load_file(res.adapter_file) if "lora" in k and "trigger" not in k]
    assert keys and all(".up_blocks." in k for k in keys), keys[:3]
    res2 = train(_cfg(images, tiny_dirs["sd1"], tmp_path / "b", steps=2, blocks=["down_blocks.0", "mid_block"],
                      prior=False))  # a TOML list works too
    keys2 = [k for k in load_file(res2.adapter_file) if "lora" in k and "trigger" not in k]
    assert keys2 and all(".down_blocks.0." in k or ".mid_block." in k for k in keys2)
    assert any(".mid_block." in k for k in keys2) and any(".down_blocks.0." in k for k in keys2)
    with pytest.raises(StudioError, match="--blocks up_block.7: no adapted layer.*up_blocks"):
        train(_cfg(images, tiny_dirs["sd1"], tmp_path / "c", steps=2, blocks="up_block.7", prior=False))


@pytest.mark.parametrize("value", ["0.5", "0:2", "0.6:0.2", "a:b"])
def test_timestep_range_is_checked(value, tmp_path):
    with pytest.raises(StudioError, match="--timestep-range"):
        TrainConfig.from_dict({"kind": "style", "images": str(tmp_path), "timestep_range": value})


def test_timestep_range_noises_training_images_only_within_it(images, tiny_dirs, tmp_path, monkeypatch):
    """--timestep-range 0:0.3: the instance half draws t < 300 of 1000; the class half keeps the whole schedule."""
    from diffusers import DDPMScheduler

    drawn: list[torch.Tensor] = []
    real = DDPMScheduler.add_noise
    monkeypatch.setattr(DDPMScheduler, "add_noise", lambda self, x, n, t: drawn.append(t.clone()) or real(self, x, n, t))
    train(_cfg(images, tiny_dirs["sd1"], tmp_path / "a", steps=12, timestep_range="0:0.3", class_prompt="a shape"))
    inst = torch.cat([t[:2] for t in drawn])
    cls = torch.cat([t[2:] for t in drawn])
    assert len(drawn) == 12 and int(inst.max()) < 300
    assert int(cls.max()) >= 300  # 24 uniform draws over 1000 all below 300 would be a 3e-13 event


def test_trigger_norm_caps_the_learned_row(images, tiny_dirs, tmp_path):
    """--trigger-norm X: the saved trigger row's norm is at most X times the vocabulary's mean norm."""
    from studio.loading import load_pipeline

    table = load_pipeline(str(tiny_dirs["sd1"]), dtype="fp32").text_encoder.get_input_embeddings().weight
    mean = float(table.detach().norm(dim=-1).mean())
    norms = {}
    for x in (0.0, 0.5):
        res = train(_cfg(images, tiny_dirs["sd1"], tmp_path / f"n{x}", steps=4, trigger_lr=0.5, trigger_norm=x,
                         prior=False))
        rows = [v for k, v in load_file(res.adapter_file).items() if "trigger" in k]
        norms[x] = float(rows[0].norm(dim=-1).max())
    assert norms[0.5] <= 0.5 * mean * (1 + 1e-5) < norms[0.0]


@pytest.mark.parametrize("rate", [0.0, 1.0])
def test_empty_prompt_trains_images_on_the_empty_prompt(images, tiny_dirs, tmp_path, monkeypatch, rate):
    """--empty-prompt P: a training image's prompt is "" at that rate (the class half is untouched)."""
    from studio.trainers import loop

    seen: list[list[str]] = []
    real = loop.TextCache.embed_pooled
    monkeypatch.setattr(loop.TextCache, "embed_pooled",
                        lambda self, prompts: seen.append(list(prompts)) or real(self, prompts))
    train(_cfg(images, tiny_dirs["sd1"], tmp_path / "a", steps=3, empty_prompt=rate, class_prompt="a shape",
               sample_prompts=["a sks shape"]))
    instance = [b for b in seen if len(b) == 2 and not all(p == "a shape" for p in b)]
    classes = [b for b in seen if b == ["a shape", "a shape"]]
    assert len(classes) == 3 and len(instance) == 3
    assert all(p == "" for b in instance for p in b) if rate else all("sks" in p for b in instance for p in b)


def test_recipe_learning_rates():
    """The recipe's lr without --lr: micro doubles a method's own, except where a method keeps its own."""
    from studio.adapters import get_method
    from studio.trainers.recipes import recipe_lr

    assert recipe_lr(get_method("lora"), "subject", micro=True) == pytest.approx(2e-3)
    assert recipe_lr(get_method("tlora"), "subject", micro=True) == pytest.approx(1e-3)  # docs/tlora.md
    assert recipe_lr(get_method("tlora"), "style", micro=True) == pytest.approx(2e-3)
    assert recipe_lr(get_method("lora"), "subject", micro=False) == pytest.approx(1e-3)


def test_weight_average_follows_its_schedule():
    from studio.trainers.ema import WeightAverage

    p = torch.nn.Parameter(torch.zeros(3))
    avg = WeightAverage([p], 0.5)
    expected = p.detach().clone()
    for t, value in enumerate([1.0, 2.0, 4.0, 8.0, 16.0], start=1):
        p.data.fill_(value)
        avg.update()
        d = 0.0 if t == 1 else min(0.5, t / (9 + t))  # (1 + (t-1)) / (10 + (t-1))
        expected = d * expected + (1 - d) * p.detach()
        torch.testing.assert_close(avg.shadow[0], expected)
    assert avg.decay_at(1) == 0.0 and avg.decay_at(2) == 2 / 11 and avg.decay_at(1000) == 0.5
    state = avg.state_dict()
    other = WeightAverage([torch.nn.Parameter(torch.zeros(3))], 0.5)
    other.load_state_dict(state)
    assert other.updates == 5 and torch.equal(other.shadow[0], avg.shadow[0])
    with pytest.raises(StudioError, match="does not match"):
        WeightAverage([torch.nn.Parameter(torch.zeros(4))], 0.5).load_state_dict(state)
    avg.copy_to()
    assert torch.equal(p.detach(), avg.shadow[0])
    with pytest.raises(StudioError, match="--ema"):
        _cfg("x", "micro", "o", ema=1.0)


def test_ema_saves_the_average_and_resumes_exactly(images, tiny_dirs, tmp_path):
    import threading

    from studio.trainers.loop import Cancelled

    base = tiny_dirs["sd1"]
    plain = load_file(str(train(_cfg(images, base, tmp_path / "plain", steps=8, prior=False, samples=False)).adapter_file))
    ref = load_file(str(train(_cfg(images, base, tmp_path / "ref", steps=8, prior=False, samples=False, ema=0.9)).adapter_file))
    # a decay of ~0 averages nothing: the last step's weights, as without --ema
    last = load_file(str(train(_cfg(images, base, tmp_path / "last", steps=8, prior=False, samples=False, ema=1e-12)).adapter_file))
    assert ref.keys() == plain.keys() == last.keys()
    for k in plain:
        torch.testing.assert_close(last[k], plain[k], atol=1e-6, rtol=1e-5)
    assert any(not torch.allclose(ref[k], plain[k], atol=1e-6) for k in plain if "lora_B" in k)
    stop = threading.Event()
    with pytest.raises(Cancelled):
        train(_cfg(images, base, tmp_path / "run", steps=8, prior=False, samples=False, ema=0.9),
              on_event=lambda e: stop.set() if e.phase == "train" and e.step == 4 else None, cancel=stop)
    assert json.loads((tmp_path / "run" / "checkpoints" / "step.json").read_text())["step"] == 4
    stop2 = threading.Event()  # a run started without the average cannot resume into one with it
    with pytest.raises(Cancelled):
        train(_cfg(images, base, tmp_path / "run2", steps=8, prior=False, samples=False),
              on_event=lambda e: stop2.set() if e.phase == "train" and e.step == 2 else None, cancel=stop2)
    with pytest.raises(StudioError, match="with --ema 0"):
        train(_cfg(images, base, tmp_path / "run2", steps=8, prior=False, samples=False, ema=0.9, resume=True))
    resumed = load_file(str(train(_cfg(images, base, tmp_path / "run", steps=8, prior=False, samples=False, ema=0.9, resume=True)).adapter_file))
    for k in ref:
        torch.testing.assert_close(resumed[k], ref[k], atol=1e-6, rtol=1e-5)
