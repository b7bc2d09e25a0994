"""Adapter mixing: the spec grammar, the numeric invariants of fused and hooked mixes, the clock, the CLI faces.

Invariants (issue 5): weight 0 == base; fused == unfused; unfusing restores the base weights;
a window of 0-1 == no window; the order of adapters does not matter; prompt tags == flags; a
base of another family is refused. Adapters are built on tiny pipelines (studio.testing) with
the studio's own add_adapter/save_adapter, one of each method, and one hand-written LoRA on the
down/upsampler convolutions that diffusers' set_adapters cannot weight per block.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from studio.adapters import AdapterSettings, add_adapter, load_adapter, save_adapter, set_active
from studio.errors import StudioError
from studio.mixing import (
    AdapterSpec, Mixer, block_address, listen, parse_prompt, parse_spec, parse_sweep, unlisten,
)
from studio.testing import tiny_pipeline

PROMPTS = ["a red circle", "a blue star"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one thread (two threads on two busy cores made this file 8x slower: 585 s vs 73 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _randomized(pipe, method: str, settings: AdapterSettings, seed: int) -> None:
    params = add_adapter(pipe, method, settings, "a")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.15)


def _sampler_lora(pipe, folder: Path, seed: int) -> Path:
    """A LoRA on the down/upsampler convolutions only, in diffusers' layout (no config: alpha = rank)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, m in pipe.unet.named_modules():
        if "samplers" in name and isinstance(m, torch.nn.Conv2d):
            tensors[f"unet.{name}.lora_A.weight"] = torch.randn(2, m.in_channels, *m.kernel_size, generator=g) * 0.1
            tensors[f"unet.{name}.lora_B.weight"] = torch.randn(m.out_channels, 2, 1, 1, generator=g) * 0.1
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "pytorch_lora_weights.safetensors"))
    return folder


@pytest.fixture(scope="module")
def ads(tmp_path_factory) -> SimpleNamespace:
    """Adapter folders for the tiny sd1 pipeline: four LoRAs (two with text-encoder parts), LoHa, LoKr, DoRA."""
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    plan = {
        "l1": ("lora", AdapterSettings(rank=4, targets="attention")),
        "l2": ("lora", AdapterSettings(rank=2, targets="attention+resnet", text_encoder=True)),
        "l3": ("lora", AdapterSettings(rank=4, targets="all", alpha=2.0)),
        "loha": ("loha", AdapterSettings(rank=2, targets="attention+resnet")),
        "lokr": ("lokr", AdapterSettings(rank=2, targets="attention")),
        "dora": ("dora", AdapterSettings(rank=2, targets="attention", text_encoder=True)),
    }
    for seed, (name, (method, settings)) in enumerate(plan.items()):
        pipe = tiny_pipeline("sd1")
        _randomized(pipe, method, settings, seed + 1)
        save_adapter(pipe, root / name, "a", metadata={"base_family": "sd1"})
        out[name] = root / name
    out["samplers"] = _sampler_lora(tiny_pipeline("sd1"), root / "samplers", 9)
    return SimpleNamespace(**out)


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("sd1")


@pytest.fixture(scope="module")
def sd1_dir(tmp_path_factory) -> Path:
    from studio.testing import save_tiny

    return save_tiny("sd1", tmp_path_factory.mktemp("tiny") / "sd1")


def _unet_out(pipe, t: int = 500) -> torch.Tensor:
    """One denoiser call on fixed noise and prompts (text encoder included)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        cond = pipe.text_encoder(ids)[0]
        return pipe.unet(x, torch.tensor([t, t]), cond).sample


def _weights(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.detach().clone() for c in ("unet", "text_encoder")
            for k, v in getattr(pipe, c).state_dict().items()}


def _assert_base_restored(pipe, before: dict[str, torch.Tensor]) -> None:
    after = _weights(pipe)
    assert after.keys() == before.keys()
    worst = max((after[k] - before[k]).abs().max().item() for k in before)
    assert worst <= 1e-6, f"unfusing left the weights {worst} away from the base"
    assert getattr(pipe, "_studio_mix", None) is None
    assert not getattr(getattr(pipe.unet, "_diffusers_hook", None), "hooks", {}), "the clock hook was left behind"
    assert not any(m._forward_hooks for m in pipe.unet.modules()), "a layer hook was left behind"


# ----------------------------------------------------------------------------- the spec


@pytest.mark.parametrize("text, want", [
    ("heart", AdapterSpec("heart")),
    ("heart:0.9", AdapterSpec("heart", 0.9)),
    ("checkered:0.7@0.4-1", AdapterSpec("checkered", 0.7, 0.4, 1.0)),
    ("style@.5-1", AdapterSpec("style", 1.0, 0.5, 1.0)),
    ("heart:-0.5:unet", AdapterSpec("heart", -0.5, scope="unet")),
    ("heart:1:te", AdapterSpec("heart", 1.0, scope="te")),
    ("heart:0.8@0-0.5:unet:mid=0:up.1=0.5:down.0.res=2", AdapterSpec("heart", 0.8, 0.0, 0.5, "unet",
                                                                    {"mid": 0, "up.1": 0.5, "down.0.res": 2})),
    ("/data/loras@v2/my:file:0.5", AdapterSpec("/data/loras@v2/my:file", 0.5)),
    ("C:\\loras\\x.safetensors:0.3", AdapterSpec("C:\\loras\\x.safetensors", 0.3)),
])
def test_parse_spec(text, want):
    got = parse_spec(text)
    assert got == want
    assert parse_spec(str(got)) == got  # the canonical text reads back the same


@pytest.mark.parametrize("text, match", [
    ("heart:0.5@0.6-0.2", "START < END"),
    ("heart:1@0-1.5", "START < END"),
    ("heart:0.5:0.8", "two weights"),
    ("heart:1:sideways=0", "unknown block"),
    ("heart:1@0.5-1:te", "window applies to the denoiser"),
    (":0.5", "no adapter name"),
    ("heart:1e999", "finite"),
])
def test_parse_spec_errors(text, match):
    with pytest.raises(StudioError, match=match):
        parse_spec(text)


def test_parse_prompt_and_sweep():
    clean, specs = parse_prompt("a red heart, <lora:heart:0.8>, on black <lyco:style:0.5@0.5-1>")
    assert clean == "a red heart, on black"
    assert specs == [AdapterSpec("heart", 0.8), AdapterSpec("style", 0.5, 0.5, 1.0)]
    assert parse_prompt("<lora:heart> a heart") == ("a heart", [AdapterSpec("heart")])
    assert parse_prompt("no tags, <b>html</b>") == ("no tags, <b>html</b>", [])
    sweep = parse_sweep("heart:0.3@0.2-1:unet=0,0.5,1")
    assert sweep.values == (0.0, 0.5, 1.0)
    assert [s.weight for s in sweep.specs()] == [0.0, 0.5, 1.0]
    assert all(s.start == 0.2 and s.scope == "unet" for s in sweep.specs())
    with pytest.raises(StudioError, match="--sweep"):
        parse_sweep("heart=a,b")


def test_block_address():
    assert block_address("down_blocks.1.resnets.0.conv1") == ("down", "1", "res")
    assert block_address("up_blocks.0.upsamplers.0.conv") == ("up", "0", "sampler")
    assert block_address("mid_block.attentions.0.transformer_blocks.0.attn1.to_q") == ("mid", "attn")
    assert block_address("conv_in") == ("io",)
    spec = AdapterSpec("x", blocks={"down": 0.5, "down.1": 2.0, "down.1.res": 3.0})
    assert spec.block_weight(("down", "1", "res")) == 3.0  # the longest key wins
    assert spec.block_weight(("down", "1", "attn")) == 2.0
    assert spec.block_weight(("down", "0", "sampler")) == 0.5
    assert spec.block_weight(("mid", "attn")) == 1.0


# ----------------------------------------------------------------------------- numeric invariants


def test_weight_zero_is_base(pipe, ads):
    base, before = _unet_out(pipe), _weights(pipe)
    for fuse in (None, False):
        with Mixer(pipe, [f"{ads.l1}:0", f"{ads.l2}:0@0.2-1"], fuse=fuse):
            assert torch.equal(_unet_out(pipe), base)
    _assert_base_restored(pipe, before)


def test_fused_equals_unfused_and_unfusing_restores_the_base(pipe, ads):
    base, before = _unet_out(pipe), _weights(pipe)
    mix = [f"{ads.l1}:0.9", f"{ads.l2}:0.6", f"{ads.l3}:-0.4:mid=0.5:up.1.res=2", f"{ads.samplers}:1.5:down=0.5"]
    with Mixer(pipe, mix) as m:
        assert m.fused
        fused = _unet_out(pipe)
    _assert_base_restored(pipe, before)
    with Mixer(pipe, mix, fuse=False) as m:
        assert not m.fused
        hooked = _unet_out(pipe)
    _assert_base_restored(pipe, before)
    assert (fused - base).abs().max() > 1e-2, "a mix of non-identity adapters must change the output"
    torch.testing.assert_close(hooked, fused, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["l2", "loha", "lokr", "dora"])
def test_each_method_matches_peft(pipe, ads, name):
    """One adapter of each method at weight 1, fused or hooked, gives what PEFT gives with it loaded."""
    ref = tiny_pipeline("sd1")
    load_adapter(ref, getattr(ads, name), name)
    want = _unet_out(ref)
    for fuse in (None, False):
        with Mixer(pipe, [str(getattr(ads, name))], fuse=fuse):
            torch.testing.assert_close(_unet_out(pipe), want, atol=1e-4, rtol=0)


def test_methods_mix_together(pipe, ads):
    """LoRA + LoHa + LoKr sum as PEFT sums them; with DoRA too, fused == hooked (DoRA: its own delta, see docs)."""
    names = ["l1", "loha", "lokr"]
    ref = tiny_pipeline("sd1")
    for n in names:
        load_adapter(ref, getattr(ads, n), n)
    set_active(ref, names)
    want = _unet_out(ref)
    with Mixer(pipe, [str(getattr(ads, n)) for n in names], fuse=False):
        torch.testing.assert_close(_unet_out(pipe), want, atol=1e-4, rtol=0)
    mix = [f"{ads.l1}:0.5", f"{ads.loha}:0.7", f"{ads.lokr}:1.2", f"{ads.dora}:0.8@0-1"]
    with Mixer(pipe, mix):
        fused = _unet_out(pipe)
    with Mixer(pipe, mix, fuse=False):
        torch.testing.assert_close(_unet_out(pipe), fused, atol=1e-4, rtol=0)


def test_weights_scale_like_peft(pipe, ads):
    """Weight w of a LoRA is PEFT's adapter scale w (what diffusers' set_adapters sets)."""
    with Mixer(pipe, [f"{ads.l1}:0.7", f"{ads.l3}:-1.3"], fuse=False):
        got = _unet_out(pipe)
    ref = tiny_pipeline("sd1")
    ref.load_lora_weights(str(ads.l1), adapter_name="a1")
    ref.load_lora_weights(str(ads.l3), adapter_name="a3")
    ref.set_adapters(["a1", "a3"], adapter_weights=[0.7, -1.3])
    torch.testing.assert_close(got, _unet_out(ref), atol=1e-4, rtol=0)


def test_full_window_is_no_window_and_order_does_not_matter(pipe, ads):
    plain = [f"{ads.l1}:0.8", f"{ads.loha}:0.5", f"{ads.l2}:1.2:unet"]
    with Mixer(pipe, plain):
        want = _unet_out(pipe)
    with Mixer(pipe, list(reversed(plain))):
        assert torch.equal(_unet_out(pipe), want)  # canonical order: bitwise the same
    windowed = [s + "@0-1" if ":unet" not in s else s.replace(":unet", "@0-1:unet") for s in plain]
    for fuse in (None, False):
        with Mixer(pipe, windowed, fuse=fuse) as m:
            assert m.fused == (fuse is None)
            torch.testing.assert_close(_unet_out(pipe), want, atol=1e-4, rtol=0)
        with Mixer(pipe, list(reversed(windowed)), fuse=fuse):
            torch.testing.assert_close(_unet_out(pipe), want, atol=1e-4, rtol=0)


def test_block_weights_reach_resnets_and_samplers(pipe, ads):
    base = _unet_out(pipe)
    all_off = "down=0:mid=0:up=0:io=0"
    for fuse in (None, False):
        with Mixer(pipe, [f"{ads.l3}:1:unet:{all_off}", f"{ads.samplers}:1:{all_off}"], fuse=fuse):
            assert torch.equal(_unet_out(pipe), base)
    with Mixer(pipe, [f"{ads.samplers}:1"]):
        samplers = _unet_out(pipe)
    assert (samplers - base).abs().max() > 1e-3
    with Mixer(pipe, [f"{ads.samplers}:1:down.0.sampler=0:up.0.sampler=0"]):
        assert torch.equal(_unet_out(pipe), base)
    with pytest.raises(StudioError, match="no such block"):
        Mixer(pipe, [f"{ads.l1}:1:down.7=0"]).apply()


def test_scopes(pipe, ads):
    before = _weights(pipe)
    with Mixer(pipe, [f"{ads.l2}:1:te"]):
        now = _weights(pipe)
        assert all(torch.equal(now[k], before[k]) for k in now if k.startswith("unet."))
        assert any(not torch.equal(now[k], before[k]) for k in now if k.startswith("text_encoder."))
    with Mixer(pipe, [f"{ads.l2}:1:unet"]):
        now = _weights(pipe)
        assert all(torch.equal(now[k], before[k]) for k in now if k.startswith("text_encoder."))
        assert any(not torch.equal(now[k], before[k]) for k in now if k.startswith("unet."))
    _assert_base_restored(pipe, before)


# ----------------------------------------------------------------------------- time


def test_clock_reads_the_scheduler_timestep_not_a_call_counter(pipe):
    seen: list[float] = []
    calls = []
    counter = pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    c = listen(pipe, seen.append)
    try:
        for _ in range(2):  # the second run starts at 0 again
            pipe(PROMPTS[:1], num_inference_steps=4, guidance_scale=3.0, output_type="pt",
                 generator=torch.Generator().manual_seed(0))
        assert seen == [0.25, 0.5, 0.75, 0.0, 0.25, 0.5, 0.75]
        t1 = float(pipe.scheduler.timesteps[1])
        c.tick(t1)
        c.tick(t1)  # a second pass at the same step (guidance, refiners) does not advance time
        assert c.fraction == 0.25
        c.tick(999.0)  # a timestep outside the schedule: 1 - t/T
        assert abs(c.fraction - 0.001) < 1e-9
    finally:
        unlisten(pipe, seen.append)
        counter.remove()
    assert len(calls) == 8 and not pipe.unet._diffusers_hook.hooks


def test_window_switches_adapters_by_step(pipe, ads):
    pipe.scheduler.set_timesteps(4)
    ts = [int(t) for t in pipe.scheduler.timesteps]
    base = {t: _unet_out(pipe, t) for t in ts}
    with Mixer(pipe, [f"{ads.l1}:1"]):
        full = {t: _unet_out(pipe, t) for t in ts}
    with Mixer(pipe, [f"{ads.l1}:1@0.5-1", f"{ads.l3}:0.5@0-0.5"]) as m:
        assert not m.fused
        late = {t: _unet_out(pipe, t) for t in ts}
    with Mixer(pipe, [f"{ads.l3}:0.5"]):
        early_ref = {t: _unet_out(pipe, t) for t in ts}
    for i, t in enumerate(ts):
        want = early_ref[t] if i < 2 else full[t]  # fractions 0, .25 | .5, .75
        torch.testing.assert_close(late[t], want, atol=1e-4, rtol=0)
        assert (late[t] - base[t]).abs().max() > 1e-3
    # a static adapter in a dynamic mix is fused under the hooks: the same as hooking everything
    hybrid = [f"{ads.l1}:1@0.5-1", f"{ads.l3}:0.5", f"{ads.loha}:0.8"]
    with Mixer(pipe, hybrid) as m:
        assert m._fused_layers and m._hooked_layers
        got = {t: _unet_out(pipe, t) for t in ts}
    with Mixer(pipe, hybrid, fuse=False):
        for t in ts:
            torch.testing.assert_close(got[t], _unet_out(pipe, t), atol=1e-4, rtol=0)


def test_schedule_gives_per_step_multipliers(pipe, ads):
    pipe.scheduler.set_timesteps(4)
    ts = [int(t) for t in pipe.scheduler.timesteps]
    with Mixer(pipe, [f"{ads.l1}:1"]):
        full = _unet_out(pipe, ts[0])
    with Mixer(pipe, [f"{ads.l1}:2"], schedule=lambda f: [0.5 if f < 0.5 else 0.0]) as m:
        assert not m.fused
        torch.testing.assert_close(_unet_out(pipe, ts[0]), full, atol=1e-4, rtol=0)
        assert torch.equal(_unet_out(pipe, ts[3]), _unet_out(tiny_pipeline("sd1"), ts[3]))


# ----------------------------------------------------------------------------- errors


def test_bad_mixes_are_refused(pipe, ads, tmp_path):
    with pytest.raises(StudioError, match="no such file|no adapter of that name"):
        Mixer(pipe, ["nosuchadapter:1"])
    with pytest.raises(StudioError, match="cannot be fused"):
        Mixer(pipe, [f"{ads.l1}:1@0.5-1"], fuse=True)
    sd2 = tiny_pipeline("sd2")
    with pytest.raises(StudioError, match="sd1|another model"):
        Mixer(sd2, [f"{ads.l1}:1"]).apply()
    assert getattr(sd2, "_studio_mix", None) is None
    with Mixer(pipe, [f"{ads.l1}:1"]), pytest.raises(StudioError, match="already carries a mix"):
        Mixer(pipe, [f"{ads.l2}:1"]).apply()


def test_family_of_the_base_is_checked(pipe, ads):
    from studio.loading import ModelSource

    pipe.studio_source = ModelSource(spec="fake-xl", kind="folder", path="/nonexistent", family="sdxl")
    try:
        with pytest.raises(StudioError, match="sd1"):
            Mixer(pipe, [f"{ads.l1}:1"])
    finally:
        del pipe.studio_source


def test_kohya_copy_mixes_like_the_original(pipe, ads, tmp_path):
    from studio.formats.kohya import to_kohya

    kohya = to_kohya(ads.l2, tmp_path / "l2_kohya.safetensors")
    with Mixer(pipe, [f"{ads.l2}:0.7"]):
        want = _unet_out(pipe)
    with Mixer(pipe, [f"{kohya}:0.7"]):
        torch.testing.assert_close(_unet_out(pipe), want, atol=1e-5, rtol=0)


def test_older_diffusers_layout_mixes_like_the_original(pipe, ads, tmp_path):
    """``lora.down``/``lora.up`` names (what convert_state_dict_to_diffusers writes) go through diffusers' converters."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    holder = tiny_pipeline("sd1")
    load_adapter(holder, ads.l1, "l1")
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(holder.unet, adapter_name="l1"))
    assert any(".lora.down." in k for k in layers)
    StableDiffusionPipeline.save_lora_weights(save_directory=str(tmp_path / "old"), unet_lora_layers=layers,
                                              safe_serialization=True)
    with Mixer(pipe, [f"{ads.l1}:0.7"]):
        want = _unet_out(pipe)
    with Mixer(pipe, [f"{tmp_path / 'old'}:0.7"]):
        torch.testing.assert_close(_unet_out(pipe), want, atol=1e-5, rtol=0)


def test_library_names_resolve(pipe, ads, tmp_path):
    library = pytest.importorskip("studio.library")
    lib = library.Library()
    lib.add(ads.l1, name="tinyheart")
    with Mixer(pipe, [f"{ads.l1}:0.6"]):
        want = _unet_out(pipe)
    with Mixer(pipe, ["tinyheart:0.6"]) as m:
        torch.testing.assert_close(_unet_out(pipe), want, atol=0, rtol=0)
        fields = m.infotext_fields()
    assert fields["Adapters"] == "tinyheart:0.6" and fields["Lora hashes"].startswith("tinyheart: ")


# ----------------------------------------------------------------------------- generate(), the CLI, the grid


def test_prompt_tags_equal_flags_and_the_png_records_the_mix(pipe, ads):
    from studio.generation import GenerationParams, generate

    kw = {"steps": 2, "seed": 3, "guidance": 2.0}
    flags = generate(pipe, GenerationParams(prompt="a red circle", adapters=[f"{ads.l1}:0.8", f"{ads.l3}:0.5@0.5-1"],
                                            **kw))
    tags = generate(pipe, GenerationParams(prompt=f"a red circle <lora:{ads.l1}:0.8> <lora:{ads.l3}:0.5@0.5-1>", **kw))
    base = generate(pipe, GenerationParams(prompt="a red circle", **kw))
    a, b, c = (np.asarray(x[0]).astype(int) for x in (flags, tags, base))
    assert np.abs(a - b).max() == 0 and np.abs(a - c).max() > 0
    info = flags[0].info["parameters"]
    assert info == tags[0].info["parameters"]
    assert info.startswith("a red circle\n")
    assert 'Lora hashes: "l1: ' in info and f"{ads.l3}:0.5@0.5-1" in info and "Adapter hashes" in info


def test_cli_sweep_grid(sd1_dir, ads, tmp_path, capsys):
    from PIL import Image

    from studio.cli import main

    grid = tmp_path / "grid.png"
    argv = ["generate", "--base", str(sd1_dir), "--prompt", "a red circle", "--steps", "2",
            "--sweep", f"{ads.l1}=0,1", "--seeds", "1,2", "--grid", str(grid), "--out", str(tmp_path / "o")]
    assert main(argv) == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == 5 and printed[-1] == str(grid)
    g = Image.open(grid)
    assert "Sweep:" in g.info["parameters"]
    assert g.width > 2 * 32 and g.height > 2 * 32
    images = [Image.open(p) for p in printed[:4]]
    assert "Adapters" in images[1].info["parameters"]
    assert main(["generate", "--base", str(sd1_dir), "--prompt", "a red circle", "--steps", "2", "--seed", "1",
                 "--out", str(tmp_path / "b")]) == 0
    alone = Image.open(capsys.readouterr().out.split()[0])
    diff = np.abs(np.asarray(alone).astype(int) - np.asarray(images[0]).astype(int)).max()
    assert diff <= 1  # weight 0 in the grid is the base image (batch of 2 vs 1: rounding only)


@pytest.mark.parametrize("args, match", [
    (["--adapter", "x:0.5@0.9-0.1"], "START < END"),
    (["--sweep", "x"], "--sweep"),
    (["--grid", "g.png"], "--sweep"),
    (["--seeds", "1,a"], "--seeds"),
    (["--seeds", "1", "--seed", "2"], "--seeds"),
])
def test_cli_bad_mix_flags(sd1_dir, tmp_path, capsys, args, match):
    from studio.cli import main

    code = main(["generate", "--base", str(sd1_dir), "--prompt", "x", "--out", str(tmp_path), *args])
    err = capsys.readouterr().err
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- on micro


@pytest.fixture(scope="module")
def micro():
    from studio import load_pipeline

    try:
        return load_pipeline("micro")
    except StudioError as exc:
        pytest.skip(f"micro model not available: {exc}")


def test_micro_mix_and_switch(micro, tmp_path_factory):
    """On micro: weight 0 is the base image, fused == hooked pixels, and switching leaves the base intact."""
    from studio.generation import GenerationParams, generate

    root = tmp_path_factory.mktemp("micro-adapters")
    folders = []
    for i in range(2):
        from studio.loading import load_pipeline

        scratch = load_pipeline("micro")
        _randomized(scratch, "lora", AdapterSettings(rank=4, targets="attention+resnet"), 20 + i)
        folders.append(save_adapter(scratch, root / f"m{i}", "a",
                                    metadata={"base_family": micro.studio_source.family}).parent)
    before = _weights(micro)
    kw = {"prompt": "a red heart on a black background", "steps": 4, "seed": 7}
    base = generate(micro, GenerationParams(**kw))[0]
    zero = generate(micro, GenerationParams(adapters=[f"{folders[0]}:0"], **kw))[0]
    one = generate(micro, GenerationParams(adapters=[f"{folders[0]}:1", f"{folders[1]}:0.5"], **kw))[0]
    with Mixer(micro, [f"{folders[0]}:1", f"{folders[1]}:0.5"], fuse=False):
        hooked = generate(micro, GenerationParams(**kw))[0]
    px = [np.asarray(im).astype(int) for im in (base, zero, one, hooked)]
    assert np.abs(px[1] - px[0]).max() <= 1
    assert np.abs(px[2] - px[0]).max() > 1
    assert np.abs(px[3] - px[2]).max() <= 1
    _assert_base_restored(micro, before)


def test_spec_is_hashable_and_frozen():
    spec = AdapterSpec("x", blocks={"mid": 0})
    assert {spec: 1}[AdapterSpec("x", blocks=(("mid", 0.0),))] == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.weight = 2  # type: ignore[misc]
