"""EfficientDM (studio.quant): quantizer math and gradients, the timestep hook, export -> load, the job."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from studio.errors import StudioError
from studio.quant import functional as QF
from studio.quant.layer import QuantLayer, StepClock

# ----------------------------------------------------------------------------- quantizer math


def _grads(x: torch.Tensor, s: float, z: float, bits: int, g: float = 1.0):
    x = x.clone().requires_grad_(True)
    st = torch.tensor(s, requires_grad=True)
    zt = torch.tensor(z, requires_grad=True)
    y = QF.fake_quant(x, st, zt, bits, g)
    y.sum().backward()
    return y.detach(), x.grad, st.grad, zt.grad


def test_fake_quant_forward_is_the_closed_form():
    x = torch.linspace(-3, 3, 101)
    s, z, bits = 0.05, 37.0, 8
    y, *_ = _grads(x, s, z, bits)
    expected = s * (torch.clamp(torch.round(x / s) + z, 0, 255) - z)
    assert torch.equal(y, expected)
    assert float(QF.fake_quant(torch.zeros(3), torch.tensor(s), torch.tensor(z), bits).abs().max()) == 0.0


@pytest.mark.parametrize("bits", [4, 8])
def test_fake_quant_gradients_match_lsq_closed_forms(bits):
    s, z = 0.1, 3.0
    qmax = (1 << bits) - 1
    # one value inside the grid, one below (clipped to code 0), one above (clipped to qmax)
    inside, below, above = 0.234, -5.0, (qmax - z + 5) * s
    for xv, region in ((inside, "in"), (below, "low"), (above, "high")):
        _, gx, gs, gz = _grads(torch.tensor([xv]), s, z, bits)
        if region == "in":
            assert float(gx) == pytest.approx(1.0)
            assert float(gs) == pytest.approx(round(xv / s) - xv / s, abs=1e-6)
            assert float(gz) == pytest.approx(0.0, abs=1e-7)
        else:
            assert float(gx) == 0.0
            assert float(gs) == pytest.approx(-z if region == "low" else qmax - z, abs=1e-6)
            assert float(gz) == pytest.approx(-s, abs=1e-7)
    # the LSQ gradient scale multiplies the step-size and zero-point gradients only
    g = QF.lsq_grad_scale(1000, bits)
    _, gx, gs, gz = _grads(torch.tensor([below]), s, z, bits, g)
    assert float(gx) == 0.0 and float(gs) == pytest.approx(-z * g) and float(gz) == pytest.approx(-s * g)
    _, gx2, _, _ = _grads(torch.tensor([inside]), s, z, bits, g)
    assert float(gx2) == pytest.approx(1.0)


def test_fused_fake_quant_equals_the_composed_ste_version():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, 3, 3, generator=g) * 2
    s0 = torch.rand(6, 1, 1, 1, generator=g) * 0.1 + 0.02
    z0 = torch.rand(6, 1, 1, 1, generator=g) * 15
    outs = []
    for fn in (QF.fake_quant, QF.fake_quant_ste):
        xs, s, z = (t.clone().requires_grad_(True) for t in (x, s0, z0))
        y = fn(xs, s, z, 4, 0.3)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append((y.detach(), xs.grad, s.grad, z.grad))
    assert torch.equal(outs[0][0], outs[1][0])  # the same forward, bit for bit
    for a, b in zip(outs[0][1:], outs[1][1:]):
        assert torch.allclose(a, b, atol=1e-5)


def test_minmax_keeps_zero_exact_and_covers_the_range():
    w = torch.randn(6, 4, 3, 3) + torch.arange(6).view(6, 1, 1, 1) * 0.3  # channels off-centre
    s, z = QF.minmax_params(w, 4, 0)
    assert s.shape == (6, 1, 1, 1) and torch.equal(z, z.round())
    codes = QF.quantize_codes(w, s, z, 4)
    lo = w.amin(dim=(1, 2, 3), keepdim=True)
    hi = w.amax(dim=(1, 2, 3), keepdim=True)
    assert bool(((codes == 0) == (w == lo)).any()) and int(codes.max()) <= 15
    err = (QF.dequantize(codes, s, z) - w).abs()
    assert bool((err <= s / 2 + 1e-6).all())  # nothing clipped by min/max
    assert torch.all(QF.dequantize(QF.quantize_codes(torch.zeros(6, 1, 1, 1), s, z, 4), s, z) == 0)
    assert torch.all(hi > lo)


def test_lp_search_beats_minmax_on_heavy_tails():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, generator=g)
    x[:5] = torch.tensor([40.0, -35.0, 30.0, 25.0, -28.0])  # a few outliers stretch the min/max range
    s0, z0 = QF.minmax_params(x, 4, None)
    s1, z1 = QF.lp_search(x, 4)
    assert float(s1) < float(s0)
    assert float(QF.lp_error(x, s1, z1, 4)) < 0.5 * float(QF.lp_error(x, s0, z0, 4))


# ----------------------------------------------------------------------------- layers


def test_qalora_conv_layer_shapes_and_merge():
    conv = nn.Conv2d(8, 12, 3, stride=2, padding=1)
    clock = StepClock([900.0, 500.0, 100.0])
    layer = QuantLayer(conv, wbits=4, abits=8, rank=3, clock=clock)
    assert layer.lora_down.shape == (3, 8, 3, 3) and layer.lora_up.shape == (12, 3, 1, 1)
    with torch.no_grad():
        layer.lora_up.normal_()
    x = torch.randn(2, 8, 9, 9)
    # B A as a weight is the composition of the two convs: A (kernel, stride, padding), then B (1x1)
    delta = layer.merged_weight() - conv.weight
    via_convs = nn.functional.conv2d(nn.functional.conv2d(x, layer.lora_down, None, 2, 1), layer.lora_up)
    assert torch.allclose(nn.functional.conv2d(x, delta, None, 2, 1), via_convs, atol=1e-4)
    layer.wq.init_minmax(layer.merged_weight().detach())
    clock.set_step(1)
    with torch.no_grad():
        layer.aq.scale.fill_(0.05)
        layer.aq.zero.fill_(100)
    y = layer(x)
    expected = nn.functional.conv2d(QF.fake_quant(x, torch.tensor(0.05), torch.tensor(100.0), 8),
                                     layer.quant_weight(), conv.bias, 2, 1)
    assert torch.allclose(y, expected, atol=1e-6)
    layer.quant = False
    assert torch.equal(layer(x), conv(x))


def test_step_clock_subsamples_aligned_grids_and_interpolates_others():
    grid = [901.0, 801.0, 701.0, 601.0, 501.0, 401.0, 301.0, 201.0, 101.0, 1.0]
    clock = StepClock(grid)
    assert clock.locate(701.0) == (2, 2, 0.0)
    a, b, w = clock.locate(751.0)  # between steps 1 (801) and 2 (701)
    assert {a, b} == {1, 2} and w == pytest.approx(0.5)
    p = torch.arange(10, dtype=torch.float32) * 10
    clock.set_timestep(751.0)
    assert float(clock.pick(p)) == pytest.approx(15.0)
    assert clock.locate(999.0) == (0, 0, 0.0) and clock.locate(0.0) == (9, 9, 0.0)  # outside: nearest end


# ----------------------------------------------------------------------------- the timestep hook on a pipeline


@pytest.fixture(scope="module")
def tiny_quantized():
    """A tiny SD 1.x pipeline quantized W8A8 (PTQ) on a 10-step DDIM grid, and its FP twin."""
    from studio.quant import QuantConfig, quantize
    from studio.testing import tiny_pipeline

    torch.manual_seed(0)
    pipe = tiny_pipeline("sd1")
    fp = tiny_pipeline("sd1")
    pipe.studio_source = None
    report = quantize(pipe, QuantConfig(method="ptq-mse", wbits=8, abits=8, steps=10, guidance=3.0, calib_samples=2,
                                        batch=2))
    return pipe, fp, report


def _record_steps(pipe):
    state = pipe.unet.studio_quant
    seen = []
    layer = state.layers[state.first]
    h = layer.register_forward_pre_hook(lambda m, a: seen.append((state.clock.lo, state.clock.hi,
                                                                   round(state.clock.w, 4), a[0].shape[0])))
    return seen, h


def test_hook_follows_the_scheduler_under_guidance_and_other_step_counts(tiny_quantized):
    pipe, _, _ = tiny_quantized
    state = pipe.unet.studio_quant
    grid = state.clock.timesteps
    assert grid == [float(t) for t in range(901, 0, -100)]
    assert state.first == "conv_in" and state.last == "conv_out"
    seen, h = _record_steps(pipe)
    try:
        # classifier-free guidance: both halves in one call of the doubled batch, one call per step
        pipe(["a red circle"], num_inference_steps=10, guidance_scale=3.0, output_type="latent")
        assert [(lo, w) for lo, _, w, _ in seen] == [(i, 0.0) for i in range(10)] and seen[0][3] == 2
        # 5 steps: 801, 601, ... lie on the 10-step grid -> every second step's parameters
        seen.clear()
        pipe(["a red circle"], num_inference_steps=5, guidance_scale=3.0, output_type="latent")
        assert [(lo, w) for lo, _, w, _ in seen] == [(i, 0.0) for i in (1, 3, 5, 7, 9)]
        # 4 steps (751, 501, 251, 1): off-grid timesteps interpolate between their neighbours
        seen.clear()
        pipe(["a red circle"], num_inference_steps=4, guidance_scale=3.0, output_type="latent")
        assert [(lo, hi, w) for lo, hi, w, _ in seen] == [(2, 1, 0.5), (4, 4, 0.0), (7, 6, 0.5), (9, 9, 0.0)]
        # guidance as two separate calls per step (another pipeline's way): the same step twice, not two steps
        seen.clear()
        unet = pipe.unet
        x = torch.randn(1, 4, 16, 16)
        e = torch.randn(1, 77, 16)
        for t in (901, 801):
            unet(x, t, e)
            unet(x, t, e)
        assert [lo for lo, *_ in seen] == [0, 0, 1, 1]
    finally:
        h.remove()


def test_per_step_activation_parameters_differ_and_are_used(tiny_quantized):
    pipe, _, _ = tiny_quantized
    state = pipe.unet.studio_quant
    layer = state.layers[state.first]
    scales = layer.aq.scale.detach()
    assert scales.shape == (10,) and float(scales.max() / scales.min()) > 1.05  # temporal: one per step
    state.clock.set_step(3)
    assert float(layer.aq.live()[0]) == float(scales[3])


def test_find_io_layers_reads_the_structure_not_the_names():
    from studio.quant.model import find_io_layers

    class Odd(nn.Module):  # UNet-like call signature, names that mean nothing
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"sample_size": 8, "in_channels": 3})()
            self.zz_tail = nn.Conv2d(6, 3, 1)
            self.aa_emb = nn.Linear(1, 6)
            self.mm_head = nn.Conv2d(3, 6, 3, padding=1)

        def forward(self, sample, timestep):
            emb = self.aa_emb(timestep.float().view(-1, 1))  # runs first, but does not read the sample
            h = self.mm_head(sample) + emb[:, :, None, None]
            return self.zz_tail(torch.relu(h))

    assert find_io_layers(Odd()) == ("mm_head", "zz_tail")


def test_find_io_layers_on_ldm_unet2dmodel():
    from diffusers import UNet2DModel

    from studio.quant.model import find_io_layers

    torch.manual_seed(0)
    unet = UNet2DModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=3, out_channels=3,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D",
                                                                                            "UpBlock2D"),
                       norm_num_groups=8)
    assert find_io_layers(unet) == ("conv_in", "conv_out")


# ----------------------------------------------------------------------------- export -> load


@pytest.mark.parametrize("bits", [(8, 8), (4, 4)])
def test_export_load_matches_the_fake_quant_model(tmp_path, bits):
    from studio.loading import load_pipeline
    from studio.quant import QuantConfig, export_quantized, quantize
    from studio.testing import tiny_pipeline

    torch.manual_seed(0)
    pipe = tiny_pipeline("sd1")
    pipe.studio_source = None
    wb, ab = bits
    quantize(pipe, QuantConfig(method="ptq-minmax", wbits=wb, abits=ab, steps=10, guidance=3.0, calib_samples=2,
                               batch=2))
    out = export_quantized(pipe, tmp_path / "q", config={"wbits": wb})
    marker = json.loads((out / "studio_quant.json").read_text())
    assert marker["wbits"] == wb and len(marker["timesteps"]) == 10
    q = load_pipeline(out)
    assert q.studio_source.kind == "quantized"
    from safetensors import safe_open

    with safe_open(str(out / "unet" / "studio_quant.safetensors"), "pt") as fh:
        keys = set(fh.keys())
        dtypes = {k: fh.get_tensor(k).dtype for k in keys if k.endswith(("qweight", "qweight_packed"))}
    assert not any("lora" in k for k in keys)  # only the integer weight is kept
    assert set(dtypes.values()) == ({torch.int8} if wb == 8 else {torch.uint8, torch.int8})
    # per layer: the same input gives the same output (integer sums exact, float32 scaling)
    fake, real = pipe.unet.studio_quant.layers, q.unet.studio_quant_runtime.layers
    x = torch.randn(2, 4, 16, 16)
    e = torch.randn(2, 77, 16)
    inputs: dict[str, torch.Tensor] = {}
    hs = [m.register_forward_pre_hook(lambda m, a, n=n: inputs.setdefault(n, a[0].detach())) for n, m in fake.items()]
    with torch.no_grad():
        ya = pipe.unet(x, 501, e).sample
        for h in hs:
            h.remove()
        q.unet.studio_quant_runtime.clock.set_timestep(501.0)
        for name, inp in inputs.items():
            a, b = fake[name](inp), real[name](inp)
            assert float((a - b).abs().max()) <= 1e-4 * (1 + float(a.abs().max())), name
        # the whole denoiser: equal up to the rare code that float rounding flips at a boundary
        yb = q.unet(x, 501, e).sample
        pipe.unet.studio_quant.set_quant(False)
        y_fp = pipe.unet(x, 501, e).sample
        pipe.unet.studio_quant.set_quant(True)
    # ... so the integer model is far closer to the fake-quantized one than either is to full precision. One
    # flipped code early in the tiny model's up path moves the output's mean by about a tenth of the
    # quantization error (measured at this seed: 0.11 with symmetric 8-bit weights, where the first flip is
    # up_blocks.1.resnets.0.conv1 on an input that differs by 2e-6; 3e-6 with asymmetric ones); a wrong scale,
    # zero point or layout costs at least the whole quantization error
    assert float((ya - yb).abs().mean()) < 0.25 * float((ya - y_fp).abs().mean())
    # 8-bit weights are symmetric by default (no zero-point correction in the kernels)
    assert all(layer.int_weight().symmetric for layer in real.values() if layer.wbits == 8)
    # the fused block forwards (the default) against diffusers' forwards over the same integer layers
    from studio.quant import fused

    assert fused.fuse(q.unet) > 0
    kinds = {type(m).__name__ for m in q.unet.modules() if getattr(m, "_studio_fused", False)}
    assert {"ResnetBlock2D", "FeedForward", "Attention"} <= kinds, kinds
    with torch.no_grad():
        fused.unfuse(q.unet)
        y_plain = q.unet(x, 501, e).sample
        fused.fuse(q.unet)
        y_fused = q.unet(x, 501, e).sample
    assert float((y_fused - y_plain).abs().mean()) < 0.25 * float((ya - y_fp).abs().mean())  # as above
    assert torch.equal(y_fused, yb) and y_fused.is_contiguous()  # channels-last inside, the sample's layout out


def test_symmetric_weight_quantizer():
    from studio.quant import functional as QF

    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 5, generator=g) + torch.linspace(-1, 2, 6)[:, None]  # channels skewed both ways
    s, z = QF.minmax_params(w, 8, 0, symmetric=True)
    assert torch.equal(z, torch.full_like(z, 128.0))
    codes = QF.quantize_codes(w, s, z, 8)
    assert int(codes.min()) >= 0 and int(codes.max()) <= 255
    # the range is covered (no clipping) and the grid holds 0 exactly
    assert float((QF.dequantize(codes, s, z) - w).abs().max()) <= float(s.max()) / 2 + 1e-7
    assert float(QF.dequantize(QF.quantize_codes(torch.zeros(6, 1), s, z, 8), s, z).abs().max()) == 0.0
    s2, z2 = QF.lp_search(w, 8, channel_dim=0, symmetric=True)
    assert torch.equal(z2, torch.full_like(z2, 128.0)) and bool((s2 <= s + 1e-9).all())


def test_quantize_command_and_user_errors(tmp_path, tiny_dirs, capsys):
    from studio.cli import main
    from studio.loading import load_pipeline

    out = tmp_path / "q"
    rc = main(["quantize", "--base", str(tiny_dirs["sd1"]), "--wbits", "4", "--abits", "8", "--method", "efficientdm",
               "--epochs", "1", "--samples", "2", "--batch", "2", "--calib-samples", "2", "--steps", "4",
               "--out", str(out), "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["distill_steps"] == 4 and report["method"] == "efficientdm"
    pipe = load_pipeline(out)
    img = pipe(["a red circle"], num_inference_steps=4, guidance_scale=2.0, output_type="pt").images
    assert torch.isfinite(img).all()
    # a second run into the same folder, and bad flags: one line, exit 2, nothing written
    assert main(["quantize", "--base", str(tiny_dirs["sd1"]), "--out", str(out)]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["quantize", "--base", "micro", "--wbits", "3", "--out", str(tmp_path / "x")])
    assert main(["quantize", "--base", str(tiny_dirs["sd1"]), "--samples", "0", "--out", str(tmp_path / "y")]) == 2
    assert not (tmp_path / "y").exists()
    with pytest.raises(StudioError, match="already a quantized model"):
        from studio.quant import QuantConfig, run_job

        run_job(str(out), QuantConfig(method="ptq-minmax"), tmp_path / "z")


# ----------------------------------------------------------------------------- training


def test_scale_aware_learning_rates_and_io_layers_without_lora():
    from studio.quant import QuantConfig
    from studio.quant.calibrate import calibrate_weights
    from studio.quant.model import quantize_model
    from studio.testing import tiny_pipeline
    from studio.trainers.efficientdm import param_groups

    unet = tiny_pipeline("sd1").unet
    state = quantize_model(unet, wbits=4, abits=8, rank=2, timesteps=[801.0, 401.0, 1.0])
    calibrate_weights(state, "minmax")
    for name in (state.first, state.last):
        assert state.layers[name].lora_down is None and state.layers[name].wbits == 8
    cfg = QuantConfig(lr=0.05, act_lr=0.01)
    groups = {g["name"]: g for g in param_groups(state, cfg)}
    lora = {k[5:]: g["lr"] for k, g in groups.items() if k.startswith("lora:")}
    assert len(lora) == len(state.layers) - 2
    for name, lr in lora.items():
        assert lr == pytest.approx(0.05 * float(state.layers[name].wq.scale.mean()))
    assert len(set(round(v, 12) for v in lora.values())) > 1  # layers differ in step size, so in lr
    qat = param_groups(state, QuantConfig(method="qat", lr=0.05, act_lr=0.0))
    assert [g["name"] for g in qat] == ["weights"] and len(qat[0]["params"]) == len(state.layers)


def test_distillation_brings_the_student_closer_to_the_teacher():
    import copy

    from studio.quant import QuantConfig
    from studio.quant.calibrate import calibrate_activations, calibrate_weights, record_activations
    from studio.quant.model import quantize_model
    from studio.quant.trajectories import Sampler, run_fp
    from studio.testing import tiny_pipeline
    from studio.trainers.efficientdm import distill

    torch.manual_seed(0)
    pipe = tiny_pipeline("sd1")
    pipe.studio_source = None
    teacher = copy.deepcopy(pipe.unet).requires_grad_(False)
    pipe.unet.requires_grad_(False)
    sampler = Sampler(pipe, steps=4, guidance=3.0)
    state = quantize_model(pipe.unet, wbits=4, abits=4, rank=4, timesteps=sampler.timestep_grid())
    calibrate_weights(state, "minmax")
    prompts = ["a red circle", "a blue square on a green background"]
    calibrate_activations(state, record_activations(state, lambda: run_fp(sampler, prompts, 0, 2)), "lp")

    @torch.no_grad()
    def gap() -> float:  # guided-prediction MSE along held-out FP trajectories
        cond = sampler.encode(["a yellow star", "a green heart"])
        x, total = sampler.noise(2, 4242), 0.0
        sampler.start()
        for t in sampler.timesteps():
            ef, eq = sampler.predict(teacher, x, t, cond), sampler.predict(pipe.unet, x, t, cond)
            total += float(((ef - eq) ** 2).mean())
            x = sampler.advance(ef, t, x)
        return total

    before = gap()
    cfg = QuantConfig(method="efficientdm", wbits=4, abits=4, rank=4, epochs=8, batch=2, lr=0.05)
    summary = distill(sampler, pipe.unet, teacher, state, cfg, prompts)
    assert summary["steps"] == 8 * 4
    assert gap() < 0.8 * before
    assert not any(p.requires_grad for p in pipe.unet.parameters())  # frozen again afterwards


def test_cancelled_job_leaves_nothing(tmp_path, tiny_dirs):
    import threading

    from studio.quant import QuantConfig, run_job
    from studio.trainers.loop import Cancelled

    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        run_job(str(tiny_dirs["sd1"]), QuantConfig(steps=2, calib_samples=1, samples=1, batch=1), tmp_path / "q",
                cancel=cancel)
    assert not (tmp_path / "q").exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("family", ["ldm-uncond", "ldm"])
def test_ldm_unets_quantize_export_and_load(tmp_path, family):
    from studio.loading import load_pipeline
    from studio.quant import QuantConfig, export_quantized, quantize
    from studio.testing import tiny_pipeline

    torch.manual_seed(0)
    pipe = tiny_pipeline(family)
    pipe.studio_source = None
    report = quantize(pipe, QuantConfig(method="efficientdm", wbits=4, abits=8, steps=3, guidance=2.0, epochs=1,
                                        samples=2, batch=2, calib_samples=2))
    assert report["first"] == "conv_in" and report["last"] == "conv_out" and report["distill_steps"] == 3
    out = export_quantized(pipe, tmp_path / "q", config={})
    q = load_pipeline(out)
    assert type(q.unet).__name__ == type(pipe.unet).__name__
    kwargs = {"batch_size": 1} if family == "ldm-uncond" else {"prompt": ["a red circle"], "guidance_scale": 2.0}
    img = q(num_inference_steps=3, output_type="np", **kwargs).images
    assert bool(np.isfinite(np.asarray(img)).all())


def test_quantize_flag_picks_the_weight_zero_point():
    from studio.cli import build_parser
    from studio.commands.quantize import config_from_args

    parse = build_parser().parse_args
    assert config_from_args(parse(["quantize", "--base", "micro", "--out", "x"])).weight_sym8 is True
    cfg = config_from_args(parse(["quantize", "--base", "micro", "--weight-zero-point", "asym", "--out", "x"]))
    assert cfg.weight_sym8 is False
    with pytest.raises(SystemExit):
        parse(["quantize", "--base", "micro", "--weight-zero-point", "middle", "--out", "x"])
