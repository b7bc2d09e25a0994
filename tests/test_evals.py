"""The evaluation bench: JSON contracts via the CLI, determinism, adapter handling, metric logic.

Contract tests run on a tiny untrained model and an untrained judge built once per session
(their numbers mean nothing, their shapes and reproducibility do). The metric logic is tested
with a stand-in "model" that renders exactly what its prompt names, read by the committed
judge; those tests skip while assets/judge is absent.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from studio.cli import main
from studio.errors import StudioError
from studio.evals import suites
from studio.micro.judge import default_judge_dir, load_judge, to_tensor
from studio.micro.world import (
    ATTRIBUTES, BACKGROUNDS, COLORS, HELDOUT_SHAPES, HELDOUT_TEXTURES, SEEN_SHAPES, SEEN_TEXTURES, random_scene,
    Scene, render, render_batch, scenes,
)

GEN = ["--steps", "2", "--batch-size", "16", "--device", "cpu"]
FAST = suites.GenSettings(steps=2, batch_size=16)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: these models are tiny, and two threads on two busy cores wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smoke(tmp_path_factory) -> SimpleNamespace:
    """The micro model's tiny architecture (untrained) and an untrained judge, saved as folders.

    Built directly from the pre-training recipe's builders: a real tiny pre-training run costs a
    minute on two busy cores and its few steps would not make the numbers mean more.
    """
    from studio.micro import configs
    from studio.micro.judge import Judge, save_judge
    from studio.micro.pretrain import PretrainConfig, _build_models, save_micro
    from studio.micro.tokenizer import write_tokenizer

    root = tmp_path_factory.mktemp("smoke")
    tok = write_tokenizer(root / "tokenizer", configs.vocabulary())
    vae, unet, text_encoder = _build_models(PretrainConfig(out=root, tiny=True), len(tok), tok)
    save_micro(root / "micro", vae, text_encoder, tok, unet, {})
    torch.manual_seed(0)
    judge = Judge()
    # an untrained judge's features barely vary (std ~1e-5); BatchNorm statistics taken on a few
    # renders give them unit scale, so feature distances (diversity, judge-FID) are measurable
    for m in judge.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average
    with torch.no_grad():
        judge.train()(to_tensor(render_batch(list(scenes(0, 64)))))
    save_judge(judge.eval(), root / "judge")
    return SimpleNamespace(root=root, model=str(root / "micro"), judge=str(root / "judge"))


@pytest.fixture(scope="session")
def smoke_pipe(smoke):
    from studio.loading import load_pipeline

    return load_pipeline(smoke.model, device="cpu")


@pytest.fixture(scope="session")
def smoke_judge(smoke):
    return load_judge(smoke.judge)


@pytest.fixture(scope="session")
def real_judge():
    if not (default_judge_dir() / "judge.safetensors").is_file():
        pytest.skip("assets/judge is absent (run `studio micro pretrain`): judge-based thresholds skipped")
    return load_judge()


def _write_lora(model_dir: str, out: Path, *, scale: float, metadata: dict[str, str] | None = None) -> Path:
    """A LoRA on the smoke UNet's attention projections, saved the diffusers way.

    ``scale`` 0 keeps PEFT's init (lora_B = 0: the adapter changes nothing); otherwise lora_B
    is drawn from a seeded normal times ``scale``.
    """
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", local_files_only=True)
    torch.manual_seed(1)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights=True))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(save_directory=str(out), unet_lora_layers=layers,
                                              safe_serialization=True)
    file = out / suites.LORA_FILE
    if metadata:
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as f:
            meta = dict(f.metadata() or {})
        save_file(load_file(str(file)), str(file), metadata={**meta, **metadata})
    return out


@pytest.fixture(scope="session")
def loras(smoke, tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("loras")
    return SimpleNamespace(
        zero=_write_lora(smoke.model, root / "zero", scale=0.0),
        random=_write_lora(smoke.model, root / "random", scale=1.0),
        style=_write_lora(smoke.model, root / "style", scale=0.0,
                          metadata={"studio.trigger": "zwx", "studio.train_shapes": "circle",
                                    "studio.train_colors": '["red"]'}),
    )


def _json(capsys, *argv: str) -> dict:
    code = main(list(argv))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out.strip().splitlines()[-1])


def _fails(capsys, *argv: str) -> str:
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    return err


def _in_unit(x) -> bool:
    return isinstance(x, float) and 0.0 <= x <= 1.0


# ----------------------------------------------------------------------------- a stand-in model and judge

_DEFAULTS = {"shape": "circle", "color": "blue", "texture": "solid", "background": "white"}


def _key(image: torch.Tensor) -> bytes:
    """An image's identity: its uint8 pixels ((3,64,64) float in [0,1] as the suites hand it to a judge)."""
    return (image * 255).round().to(torch.uint8).numpy().tobytes()


class OracleJudge(torch.nn.Module):
    """A judge that is never wrong about the images it was shown being rendered.

    Classification looks the image up among the scenes registered with :meth:`remember`
    (an unknown image is an error); features are 8x8-pooled pixels (192 numbers), so feature
    distances follow position and content like a real judge's do.
    """

    def __init__(self) -> None:
        super().__init__()
        self.scenes: dict[bytes, Scene] = {}

    def remember(self, scene: Scene) -> torch.Tensor:
        image = to_tensor([render(scene)])[0]
        self.scenes[_key(image)] = scene
        return image

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(x, 8).flatten(1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = {a: torch.zeros(len(x), len(v)) for a, v in ATTRIBUTES.items()}
        for i, image in enumerate(x):
            for attr, index in self.scenes[_key(image)].labels().items():
                logits[attr][i, index] = 1.0
        return logits


class RenderPipe:
    """A stand-in model that renders exactly what a prompt names (unnamed: _DEFAULTS), jittered by the seed.

    ``effect(prompt, attrs, seed) -> (attrs, seed)`` plays a loaded adapter; load/unload switch
    it on and off. Every image is registered with ``oracle``.
    """

    def __init__(self, oracle: OracleJudge, effect=None) -> None:
        self.oracle = oracle
        self.effect = effect
        self.loaded: str | None = None
        self.prompts: list[str] = []

    def __call__(self, prompts, num_inference_steps, guidance_scale, generator, output_type):
        images = []
        for prompt, gen in zip(prompts, generator):
            words = set(re.findall(r"[a-z]+", prompt))
            attrs = {a: next((v for v in values if v in words), _DEFAULTS[a]) for a, values in ATTRIBUTES.items()}
            seed = gen.initial_seed()
            if self.loaded and self.effect:
                attrs, seed = self.effect(prompt, attrs, seed)
            pools = {"shapes": [attrs["shape"]], "colors": [attrs["color"]], "textures": [attrs["texture"]],
                     "backgrounds": [attrs["background"]]}
            images.append(self.oracle.remember(random_scene(random.Random(seed), **pools)))
        self.prompts += list(prompts)
        return SimpleNamespace(images=torch.stack(images))

    def load_lora_weights(self, path, **kwargs) -> None:
        self.loaded = str(path)

    def unload_lora_weights(self) -> None:
        self.loaded = None


@pytest.fixture(autouse=True)
def _render_pipe_loads_its_own_adapters(monkeypatch):
    """The suites load adapters with the studio's loader; a RenderPipe only plays one."""
    apply, remove = suites._apply_adapter, suites._remove_adapter
    monkeypatch.setattr(suites, "_apply_adapter", lambda pipe, path: pipe.load_lora_weights(path)
                        if isinstance(pipe, RenderPipe) else apply(pipe, path))
    monkeypatch.setattr(suites, "_remove_adapter", lambda pipe: pipe.unload_lora_weights()
                        if isinstance(pipe, RenderPipe) else remove(pipe))


def _subject_effect(prompt, attrs, seed):
    """A good subject adapter: 'sks' means a red heart (red unless another colour is asked)."""
    if "sks" in prompt.split():
        attrs = dict(attrs, shape="heart")
        if not any(c in prompt.split() for c in COLORS):
            attrs["color"] = "red"
    return attrs, seed


def _collapsed_effect(prompt, attrs, seed):
    """A subject adapter that renders one fixed image per prompt, whatever the seed."""
    attrs, _ = _subject_effect(prompt, attrs, seed)
    return attrs, 0


def _destructive_effect(prompt, attrs, seed):
    """A subject adapter that turns everything into its subject, trigger or not."""
    return dict(attrs, shape="heart"), seed


def _style_effect(prompt, attrs, seed, leak: bool = False):
    """'in sks style' means checkered; with ``leak`` every odd seed shows the training content instead."""
    if "sks style" in prompt:
        attrs = dict(attrs, texture="checkered")
        if leak and seed % 2:
            attrs = dict(attrs, shape="circle", color="red")
    return attrs, seed


@pytest.fixture
def dummy_adapter(tmp_path) -> Path:
    """A safetensors file for the stand-in pipe (which only records that it was loaded)."""
    from safetensors.torch import save_file

    path = tmp_path / "adapter.safetensors"
    save_file({"lora.down.weight": torch.zeros(1)}, str(path),
              metadata={"studio.train_shapes": "circle", "studio.train_colors": "red"})
    return path


# ----------------------------------------------------------------------------- JSON contracts (CLI)


def test_judge_suite_json_and_determinism(smoke, capsys):
    first = _json(capsys, "eval", "judge", "--json", "--judge", smoke.judge, "--n", "48")
    assert set(first) == {"suite", "accuracy", "n"} and first["suite"] == "judge" and first["n"] == 48
    assert set(first["accuracy"]) == {"shape", "color", "background", "texture"}
    assert all(_in_unit(v) for v in first["accuracy"].values())
    assert _json(capsys, "eval", "judge", "--json", "--judge", smoke.judge, "--n", "48") == first


def test_judge_accuracy_of_committed_judge(real_judge):
    res = suites.judge_suite(real_judge, n=600)
    assert res["n"] == 600
    for attr, acc in res["accuracy"].items():
        assert acc >= 0.9, f"judge {attr} accuracy {acc:.3f} on fresh renders"


def test_base_suite_json_table_and_determinism(smoke, capsys):
    argv = ["eval", "base", "--base", smoke.model, "--judge", smoke.judge, "--n", "12", "--heldout-n", "4", *GEN]
    first = _json(capsys, *argv, "--json")
    assert set(first) == {"suite", "n", "accuracy", "heldout_present"} and first["suite"] == "base"
    assert first["n"] == 12
    assert set(first["accuracy"]) == {"shape", "color", "background", "texture", "joint"}
    assert all(_in_unit(v) and round(v * 12) == pytest.approx(v * 12) for v in first["accuracy"].values())
    assert _in_unit(first["heldout_present"])
    assert first["accuracy"]["joint"] <= min(v for k, v in first["accuracy"].items() if k != "joint")
    assert _json(capsys, *argv, "--json") == first
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert table.startswith("base suite") and "accuracy.joint" in table and "{" not in table


def test_subject_suite_json_zero_lora_has_no_drift(smoke, loras, capsys):
    argv = ["eval", "subject", "--base", smoke.model, "--judge", smoke.judge, "--adapter", str(loras.zero),
            "--subject", "heart", "--n", "34", "--drift-n", "8", *GEN, "--json"]
    res = _json(capsys, *argv)
    assert set(res) == {"suite", "n", "subject_fidelity", "prompt_fidelity", "diversity", "base_drift",
                        "drift_by_attribute", "by_prompt"}
    assert res["suite"] == "subject" and res["n"] == 34
    # the breakdown: every prompt once, its counts adding up, its means averaging to the totals
    per = res["by_prompt"]
    assert sum(r["n"] for r in per.values()) == 34 and len(per) == len(suites.subject_prompts("sks", "shape"))
    assert abs(sum(r["subject"] * r["n"] for r in per.values()) / 34 - res["subject_fidelity"]) < 1e-3
    assert set(res["drift_by_attribute"]) == {"shape", "color", "background", "texture", "joint"}
    assert res["drift_by_attribute"]["joint"] == 0.0
    assert all(_in_unit(res[k]) for k in ("subject_fidelity", "prompt_fidelity"))
    assert isinstance(res["diversity"], float) and res["diversity"] > 0
    assert res["base_drift"] == 0.0
    assert _json(capsys, *argv) == res


def test_zero_lora_is_identity_and_random_lora_changes_images(smoke_pipe, smoke_judge, loras):
    items = suites.seen_items(8)
    base = suites.generate(smoke_pipe, items, FAST)
    with suites.adapter_applied(smoke_pipe, loras.zero):
        assert torch.equal(suites.generate(smoke_pipe, items, FAST), base)
    with suites.adapter_applied(smoke_pipe, loras.random / suites.LORA_FILE):  # a file works as well as a folder
        changed = suites.generate(smoke_pipe, items, FAST)
    assert (changed - base).abs().mean() > 1e-3
    assert torch.equal(suites.generate(smoke_pipe, items, FAST), base)  # unloading restores the base model
    kw = dict(subject="heart", n=34, drift_n=8, settings=FAST)
    zero = suites.subject_suite(smoke_pipe, smoke_judge, loras.zero, **kw)
    rand = suites.subject_suite(smoke_pipe, smoke_judge, loras.random, **kw)
    assert zero["diversity"] != rand["diversity"]


def test_style_suite_json_leakage_from_metadata_or_null(smoke, loras, capsys, caplog):
    argv = ["eval", "style", "--base", smoke.model, "--judge", smoke.judge, "--texture", "checkered", "--n", "12",
            "--drift-n", "4", *GEN, "--json"]
    res = _json(capsys, *argv, "--adapter", str(loras.style))
    assert set(res) == {"suite", "n", "style_fidelity", "content_fidelity", "leakage", "base_drift",
                        "drift_by_attribute", "by_asked", "texture_seen"}
    assert res["suite"] == "style" and res["n"] == 12
    # the breakdown per asked shape/colour/background: counts add up, means average back to the totals
    assert set(res["by_asked"]) == {"shape", "color", "background"} and sum(res["texture_seen"].values()) == 12
    for groups in res["by_asked"].values():
        assert sum(g["n"] for g in groups.values()) == 12
        assert abs(sum(g["style"] * g["n"] for g in groups.values()) / 12 - res["style_fidelity"]) < 1e-3
    assert all(_in_unit(res[k]) for k in ("style_fidelity", "content_fidelity", "leakage"))
    assert res["base_drift"] == 0.0  # the style LoRA here has lora_B = 0
    with caplog.at_level(logging.WARNING, logger="studio.evals.suites"):
        res = _json(capsys, *argv, "--adapter", str(loras.zero))
    assert res["leakage"] is None
    assert any("leakage not measured" in r.getMessage() for r in caplog.records)


def test_quant_suite_json(smoke, smoke_pipe, tmp_path, capsys):
    argv = ["eval", "quant", "--base", smoke.model, "--judge", smoke.judge, "--n", "8", *GEN, "--json"]
    same = _json(capsys, *argv, "--reference", smoke.model)
    assert set(same) == {"suite", "accuracy", "accuracy_drop", "judge_fid"} and same["suite"] == "quant"
    assert set(same["accuracy"]) == {"shape", "color", "background", "texture", "joint"}
    assert same["accuracy_drop"] == 0.0 and same["judge_fid"] < 1e-6
    # a reference with perturbed UNet weights: different images, a positive distance
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        backup = {k: v.clone() for k, v in smoke_pipe.unet.state_dict().items()}
        for p in smoke_pipe.unet.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2 * p.std().nan_to_num(0.02))
        smoke_pipe.save_pretrained(tmp_path / "other", safe_serialization=True)
        smoke_pipe.unet.load_state_dict(backup)
    other = _json(capsys, *argv, "--reference", str(tmp_path / "other"))
    assert other["accuracy"] == same["accuracy"]  # --base is the same model
    assert other["judge_fid"] > 1e-3


def test_quant_reference_made_once_gives_the_suites_numbers(smoke, smoke_pipe):
    judge, settings = load_judge(smoke.judge), suites.GenSettings(steps=2, batch_size=16)
    with torch.no_grad():
        backup = {k: v.clone() for k, v in smoke_pipe.unet.state_dict().items()}
        ref = suites.quant_reference(smoke_pipe, judge, n=8, settings=settings)
        for p in smoke_pipe.unet.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(4)) * 0.2 * p.std().nan_to_num(0.02))
    try:
        kept = suites.quant_suite(smoke_pipe, ref, judge, n=8, settings=settings)
        assert kept["judge_fid"] > 1e-3
        with pytest.raises(StudioError, match="same"):  # a reference of other settings is refused
            suites.quant_suite(smoke_pipe, ref, judge, n=6, settings=settings)
    finally:
        smoke_pipe.unet.load_state_dict(backup)
    fresh = suites.quant_suite(smoke_pipe, smoke_pipe, judge, n=8, settings=settings)
    assert fresh["accuracy_drop"] == 0.0 and fresh["judge_fid"] < 1e-6
    assert kept["accuracy_drop"] == pytest.approx(ref.accuracy["joint"] - kept["accuracy"]["joint"])


# ----------------------------------------------------------------------------- bad input


def test_bad_input_is_one_clear_error(smoke, loras, tmp_path, capsys):
    common = ["--base", smoke.model, "--judge", smoke.judge, *GEN]
    err = _fails(capsys, "eval", "subject", *common, "--adapter", str(tmp_path / "nope"), "--subject", "heart")
    assert "nope" in err and "no such file" in err
    err = _fails(capsys, "eval", "subject", *common, "--adapter", str(loras.zero), "--subject", "blob")
    assert "--subject blob" in err and "circle" in err and "heart" in err
    err = _fails(capsys, "eval", "subject", *common, "--adapter", str(loras.zero), "--subject", "heart",
                 "--color", "mauve")
    assert "mauve" in err and "red" in err
    err = _fails(capsys, "eval", "style", *common, "--adapter", str(loras.zero), "--texture", "plaid")
    assert "plaid" in err and "checkered" in err and "zigzag" in err
    # a safetensors file that is no LoRA (the judge's weights): refused, nothing left injected
    err = _fails(capsys, "eval", "subject", *common, "--adapter", str(Path(smoke.judge) / "judge.safetensors"),
                 "--subject", "heart", "--n", "2", "--drift-n", "0")
    assert "judge.safetensors" in err and "cannot be loaded" in err
    err = _fails(capsys, "eval", "style", *common, "--adapter", str(loras.zero), "--texture", "striped",
                 "--train-images", str(tmp_path / "missing"), "--n", "2", "--drift-n", "0")
    assert "missing" in err
    assert "must be" in _fails(capsys, "eval", "base", *common, "--n", "0")
    with pytest.raises(StudioError, match="at least 2"):
        suites.quant_suite(None, None, None, n=1)


# ----------------------------------------------------------------------------- prompt sets and seeds


def test_prompt_sets_are_fixed_balanced_and_say_what_they_ask():
    seen = suites.seen_items(200)
    assert len({it.prompt for it in seen}) == 200
    assert suites.seen_items(96) == seen[:96]  # the drift subset is a prefix of the base set
    assert [it.prompt for it in suites.seen_items(200, seed=7)] == [it.prompt for it in seen]
    assert [it.seed for it in suites.seen_items(200, seed=7)] != [it.seed for it in seen]
    counts = Counter(it.asked["shape"] for it in seen)
    assert set(counts) == set(SEEN_SHAPES) and max(counts.values()) - min(counts.values()) <= 1
    assert {it.asked["color"] for it in seen} == set(COLORS)
    assert {it.asked["background"] for it in seen} == set(BACKGROUNDS)
    assert {it.asked["texture"] for it in seen} == set(SEEN_TEXTURES)
    for it in seen:
        assert set(it.asked.values()) <= set(it.prompt.split())
    held = suites.heldout_items(56)
    assert {v for it in held for a, v in it.asked.items() if a == "shape"} == set(HELDOUT_SHAPES)
    assert {v for it in held for a, v in it.asked.items() if a == "texture"} == set(HELDOUT_TEXTURES)
    assert all(next(iter(it.asked.values())) in it.prompt.split() for it in held)
    subj = suites.subject_items("sks", "shape", color="red")
    assert len(subj) == suites.PER_PROMPT * 16 and all(it.prompt.startswith("a ") for it in subj)
    assert "a sks shape on a teal background" in {it.prompt for it in subj}
    assert not any(it.asked.get("color") == "red" for it in subj)
    style = suites.style_items("zwx", "zigzag", n=96)
    assert all(it.prompt.endswith(" in zwx style") and it.asked["texture"] == "zigzag" for it in style)


def test_generation_is_seeded_per_image(smoke_pipe):
    items = suites.seen_items(6)
    a = suites.generate(smoke_pipe, items, FAST)
    assert a.shape == (6, 3, 64, 64) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(suites.generate(smoke_pipe, items, FAST), a)
    # one generator per image: an image does not depend on the batch it was drawn in
    small = suites.generate(smoke_pipe, items, suites.GenSettings(steps=2, batch_size=4))
    assert torch.allclose(small, a, atol=1e-4)
    other = suites.generate(smoke_pipe, suites.seen_items(6, seed=1), FAST)
    assert (other - a).abs().mean() > 1e-3


# ----------------------------------------------------------------------------- metric logic, exactly


def test_base_suite_reads_a_perfect_model_as_perfect():
    oracle = OracleJudge()
    res = suites.base_suite(RenderPipe(oracle), oracle, n=48, heldout_n=12, settings=FAST)
    assert res["accuracy"] == {a: 1.0 for a in ("shape", "color", "background", "texture", "joint")}
    assert res["heldout_present"] == 1.0
    # a model that draws every shape as a circle: only the circle prompts are right
    circles = RenderPipe(oracle, lambda p, a, s: (dict(a, shape="circle"), s))
    circles.loaded = "always"
    res = suites.base_suite(circles, oracle, n=48, heldout_n=12, settings=FAST)
    expected = np.mean([it.asked["shape"] == "circle" for it in suites.seen_items(48)])
    assert res["accuracy"]["shape"] == res["accuracy"]["joint"] == pytest.approx(expected)
    assert res["accuracy"]["color"] == 1.0 and res["heldout_present"] == 0.5  # held-out textures still drawn


def test_subject_metrics_tell_good_collapsed_and_destructive_adapters_apart(dummy_adapter):
    oracle = OracleJudge()
    kw = dict(subject="heart", color="red", n=3 * 16, drift_n=24, settings=FAST)
    good = suites.subject_suite(RenderPipe(oracle, _subject_effect), oracle, dummy_adapter, **kw)
    assert good["n"] == 48 and good["subject_fidelity"] == 1.0 and good["prompt_fidelity"] == 1.0, good
    assert 0.7 <= good["diversity"] <= 1.4 and good["base_drift"] == 0.0, good
    collapsed = suites.subject_suite(RenderPipe(oracle, _collapsed_effect), oracle, dummy_adapter, **kw)
    assert collapsed["diversity"] == 0.0 and collapsed["subject_fidelity"] == 1.0, collapsed
    destructive = suites.subject_suite(RenderPipe(oracle, _destructive_effect), oracle, dummy_adapter, **kw)
    assert destructive["base_drift"] == 1.0, destructive  # no base prompt asks for a heart
    # the wrong subject: a good heart adapter judged as a star adapter
    wrong = suites.subject_suite(RenderPipe(oracle, _subject_effect), oracle, dummy_adapter,
                                 **dict(kw, subject="star"))
    assert wrong["subject_fidelity"] == 0.0 and wrong["prompt_fidelity"] == 1.0
    # a colour given: images whose prompt asks no colour must show it
    blue = suites.subject_suite(RenderPipe(oracle, _subject_effect), oracle, dummy_adapter, **dict(kw, color="blue"))
    asks_color = np.mean([("color" in it.asked) for it in suites.subject_items("sks", "shape", color="blue", n=48)])
    assert blue["subject_fidelity"] == pytest.approx(asks_color)


def test_style_metrics_and_leakage(dummy_adapter, tmp_path):
    oracle = OracleJudge()
    kw = dict(texture="checkered", n=48, drift_n=0, settings=FAST)
    clean = suites.style_suite(RenderPipe(oracle, _style_effect), oracle, dummy_adapter, **kw)
    by_asked, seen = clean.pop("by_asked"), clean.pop("texture_seen")
    assert clean == {"suite": "style", "n": 48, "style_fidelity": 1.0, "content_fidelity": 1.0, "leakage": 0.0,
                     "base_drift": None, "drift_by_attribute": {}}  # no drift set (drift_n=0): nothing per attribute
    assert seen == {"checkered": 48}
    assert all(g["style"] == 1.0 and g["content"] == 1.0 for groups in by_asked.values() for g in groups.values())
    leaky = suites.style_suite(RenderPipe(oracle, lambda p, a, s: _style_effect(p, a, s, leak=True)), oracle,
                               dummy_adapter, **kw)
    assert 0.4 <= leaky["leakage"] <= 0.6 and leaky["content_fidelity"] <= 0.6, leaky
    assert leaky["style_fidelity"] == 1.0
    # the same training content found in the captions the studio's trainer records
    from safetensors.torch import save_file

    captioned = tmp_path / "captioned.safetensors"
    captions = ["a red circle on a white background"] * 3 + ["a blue square on a black background"]
    save_file({"lora.down.weight": torch.zeros(1)}, str(captioned), metadata={"studio.captions": json.dumps(captions)})
    again = suites.style_suite(RenderPipe(oracle, lambda p, a, s: _style_effect(p, a, s, leak=True)), oracle,
                               captioned, **kw)
    assert again == leaky
    wrong = suites.style_suite(RenderPipe(oracle, _style_effect), oracle, dummy_adapter, **dict(kw, texture="zigzag"))
    assert wrong["style_fidelity"] == 0.0
    # the training content read off a folder of images without captions (2 of 8 are not red circles)
    folder = tmp_path / "train"
    folder.mkdir()
    rng = random.Random(0)
    for i in range(8):
        shape, color = ("circle", "red") if i < 6 else ("square", "blue")
        scene = random_scene(rng, shapes=[shape], colors=[color], textures=["checkered"])
        oracle.remember(scene)
        render(scene).save(folder / f"{i}.png")
    assert suites.training_concepts(folder, oracle) == (["circle"], ["red"])


def test_training_concepts_from_captions_and_metadata_trigger(dummy_adapter, tmp_path):
    from studio.micro.cli import render_set

    oracle = OracleJudge()  # captions name shape and colour: no image is judged (the oracle knows none)
    render_set(tmp_path / "train", 9, 0, shape="square,circle", color="red", texture="striped", caption="content")
    shapes, colors = suites.training_concepts(tmp_path / "train", oracle)
    assert shapes == ["circle", "square"] and colors == ["red"]
    from safetensors.torch import save_file

    meta_adapter = tmp_path / "meta.safetensors"
    save_file({"lora.down.weight": torch.zeros(1)}, str(meta_adapter),
              metadata={"studio.trigger": "ohwx", "studio.class_word": "toy"})
    pipe = RenderPipe(oracle)
    suites.subject_suite(pipe, oracle, meta_adapter, subject="star", n=17, drift_n=2, settings=FAST)
    subject_prompts = pipe.prompts[2:19]
    assert all("ohwx toy" in p for p in subject_prompts) and not any("ohwx" in p for p in pipe.prompts[:2])
    pipe = RenderPipe(oracle)
    suites.subject_suite(pipe, oracle, dummy_adapter, subject="star", n=17, drift_n=0, settings=FAST,
                         token="zwx", class_word="thing")
    assert all("zwx thing" in p for p in pipe.prompts)
    with pytest.raises(StudioError, match="unknown shape 'blob'"):
        bad = tmp_path / "bad.safetensors"
        save_file({"x": torch.zeros(1)}, str(bad), metadata={"studio.train_shapes": "circle,blob"})
        suites.style_suite(RenderPipe(oracle), oracle, bad, texture="striped", n=2, drift_n=0, settings=FAST)
    assert np.isclose(suites.leakage_rate({"shape": np.array(["circle", "square"]), "color": np.array(["red", "red"])},
                                          [suites.Item("", 0, {"shape": "square", "color": "blue"})] * 2,
                                          ["circle"], ["red"]), 0.75)


def test_by_asked_groups_scores_per_asked_value():
    items = [suites.Item("", 0, {"shape": s, "color": c}) for s, c in
             [("circle", "red"), ("circle", "blue"), ("square", "red"), ("square", "red")]]
    out = suites.by_asked(items, ("shape", "color", "texture"), style=[True, False, True, True])
    assert out["shape"] == {"circle": {"style": 0.5, "n": 2}, "square": {"style": 1.0, "n": 2}}
    assert out["color"]["red"] == {"style": 1.0, "n": 3} and out["color"]["blue"]["style"] == 0.0
    assert out["texture"] == {}  # not asked: no groups


def test_table_shows_the_per_prompt_breakdown_as_its_own_table():
    from studio.evals.cli import format_table

    res = {"suite": "subject", "n": 4, "subject_fidelity": 0.5, "base_drift": None,
           "drift_by_attribute": {"color": 0.25, "joint": 0.25},
           "by_prompt": {"a sks shape": {"subject": 1.0, "prompt": 0.5, "n": 2},
                         "a blue sks shape": {"subject": 0.0, "prompt": 1.0, "n": 2}}}
    table = format_table(res)
    assert "drift_by_attribute.color" in table and "base_drift" in table and "n/a" in table
    assert "by_prompt" not in table and "{" not in table
    lines = table.splitlines()
    head = next(i for i, line in enumerate(lines) if "per prompt" in line)
    assert lines[head].split()[-2:] == ["subject", "prompt"]
    assert lines[head + 2].split()[-2:] == ["0.00", "1.00"] and "a blue sks shape" in lines[head + 2]
