"""Integer kernels against their pure-torch references (studio.kernels)."""

from __future__ import annotations

import logging

import pytest
import torch

from studio import kernels
from studio.kernels import IntWeight, cpu, reference

needs_onednn = pytest.mark.skipif(not cpu.onednn_available(), reason="this torch build has no oneDNN quantized ops")


def _weight(shape: tuple[int, ...], *, symmetric: bool, bits: int = 8, seed: int = 0) -> IntWeight:
    g = torch.Generator().manual_seed(seed)
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
    data = torch.randint(lo, hi + 1, shape, generator=g, dtype=torch.int32).to(torch.int8)
    scale = torch.rand(shape[0], generator=g) * 0.02 + 1e-3
    zero = torch.zeros(shape[0], dtype=torch.int32) if symmetric else torch.randint(-20, 21, (shape[0],), generator=g,
                                                                                    dtype=torch.int32)
    return IntWeight(data, scale, zero)


def _codes(shape: tuple[int, ...], bits: int = 8, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.int32).to(torch.uint8)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    # integer sums are exact in every backend; what is left is float32 scaling (relative 1e-6)
    tol = 1e-5 * float(b.abs().max()) + 1e-6
    assert a.shape == b.shape
    assert float((a - b).abs().max()) <= tol


def test_quantize_act_fast_path_gives_the_reference_codes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, 5, 5, generator=g) * 3
    s = torch.tensor(0.037)
    # values on rounding ties and beyond the clip range on both sides
    x.view(-1)[:6] = torch.tensor([0.5, 1.5, -0.5, 100.0, -100.0, 2.5]) * s
    for bits, zero in ((8, 128), (8, 3), (4, 7), (4, 0)):
        ref = reference.quantize_act(x, s, zero, bits)
        assert ref.dtype == torch.uint8 and int(ref.max()) <= (1 << bits) - 1
        assert torch.equal(cpu.quantize_act(x, s, zero, bits), ref)
        assert torch.equal(kernels.quantize_act(x, s, zero, bits), ref)


def test_codes_with_channel_sums_in_one_pass():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 6, 5, 5, generator=g)
    s = torch.tensor(0.02)
    ref = reference.quantize_act(x, s, 120, 8)
    for dim, cl in ((1, True), (1, False), (-1, False)):
        q, sums = cpu.quantize_act_sums(x, s, 120, 8, channels_last=cl, sums_dim=dim)
        assert torch.equal(q, ref) and q.is_contiguous(memory_format=torch.channels_last) == cl
        assert torch.equal(sums, (ref.double() - 120).sum(dim, keepdim=True).float())
        q2, sums2 = kernels.quantize_act_sums(x, s, 120, 8, channels_last=cl, sums_dim=dim)
        assert torch.equal(q2, ref) and torch.equal(sums2, sums)
    w = _weight((7, 6, 3, 3), symmetric=False)
    q, sums = cpu.quantize_act_sums(x, s, 120, 8, channels_last=True, sums_dim=1)
    if cpu.onednn_available():  # the correction from the given sums equals the one from the bytes
        _close(cpu.onednn_qconv2d(q, 0.02, 120, w, None, (2, 2), (1, 1), (1, 1), 1, None, sums),
               reference.qconv2d(q, 0.02, 120, w, None, (2, 2), (1, 1), (1, 1), 1))


def test_reference_matches_float_math():
    w = _weight((6, 10), symmetric=False)
    xq = _codes((3, 10))
    bias = torch.randn(6)
    y = reference.qlinear(xq, 0.05, 100, w, bias)
    x = (xq.double() - 100) * 0.05
    wd = (w.data.double() - w.zero.double()[:, None]) * w.scale.double()[:, None]
    assert torch.allclose(y.double(), x @ wd.T + bias.double(), atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape", [(7, 64), (2, 5, 64)])
def test_onednn_qlinear_matches_reference(symmetric, shape):
    w = _weight((48, 64), symmetric=symmetric)
    xq = _codes(shape)
    bias = torch.randn(48)
    for x_zero in (0, 77, 255):
        _close(cpu.onednn_qlinear(xq, 0.03, x_zero, w, bias), reference.qlinear(xq, 0.03, x_zero, w, bias))
    _close(cpu.onednn_qlinear(xq, 0.03, 5, w, None), reference.qlinear(xq, 0.03, 5, w, None))


@pytest.mark.parametrize("symmetric", [True, False])
def test_intmm_qlinear_matches_reference(symmetric):
    w = _weight((40, 72), symmetric=symmetric)
    xq = _codes((33, 72))
    bias = torch.randn(40)
    for x_zero in (0, 128, 201):
        _close(cpu.intmm_qlinear(xq, 0.02, x_zero, w, bias), reference.qlinear(xq, 0.02, x_zero, w, bias))


@needs_onednn
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("conv", [
    dict(k=3, stride=(1, 1), padding=(1, 1), groups=1),
    dict(k=3, stride=(2, 2), padding=(1, 1), groups=1),
    dict(k=1, stride=(1, 1), padding=(0, 0), groups=1),
    dict(k=3, stride=(1, 1), padding=(1, 1), groups=2),
])
def test_onednn_qconv2d_matches_reference(symmetric, conv):
    k, groups = conv["k"], conv["groups"]
    w = _weight((16, 12 // groups, k, k), symmetric=symmetric)
    xq = _codes((2, 12, 7, 7))
    bias = torch.randn(16)
    for x_zero in (0, 90):  # padding must read as a real zero whatever the zero point
        ref = reference.qconv2d(xq, 0.04, x_zero, w, bias, conv["stride"], conv["padding"], (1, 1), groups)
        if groups > 1 and not symmetric:  # not covered by oneDNN: the dispatcher answers with the reference
            with pytest.raises(NotImplementedError):
                cpu.onednn_qconv2d(xq, 0.04, x_zero, w, bias, conv["stride"], conv["padding"], (1, 1), groups)
            _close(kernels.qconv2d(xq, 0.04, x_zero, w, bias, conv["stride"], conv["padding"], (1, 1), groups), ref)
            assert "onednn" in kernels.backend_for("conv", "cpu")  # not demoted for it
            continue
        y = cpu.onednn_qconv2d(xq, 0.04, x_zero, w, bias, conv["stride"], conv["padding"], (1, 1), groups)
        _close(y, ref)
        y = cpu.onednn_qconv2d(xq, 0.04, x_zero, w, bias, conv["stride"], conv["padding"], (1, 1), groups,
                               torch.contiguous_format)
        assert y.is_contiguous()
        _close(y, ref)


def test_int4_codes_pack_two_per_byte_and_unpack():
    codes = _codes((5, 7), bits=4)
    packed = kernels.pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == (35 + 1) // 2
    assert int(packed[0]) == int(codes.view(-1)[0]) | (int(codes.view(-1)[1]) << 4)  # low nibble first
    assert torch.equal(kernels.unpack_int4(packed, 35).view(5, 7), codes)
    with pytest.raises(ValueError):
        kernels.pack_int4(torch.tensor([16], dtype=torch.uint8))


def test_forced_backend_and_demotion(monkeypatch, caplog):
    w = _weight((8, 16), symmetric=False)
    xq = _codes((4, 16))
    ref = reference.qlinear(xq, 0.1, 3, w, None)
    monkeypatch.setenv("STUDIO_KERNELS", "reference")
    assert kernels.chosen("linear") == "reference"
    _close(kernels.qlinear(xq, 0.1, 3, w), ref)
    monkeypatch.setenv("STUDIO_KERNELS", "intmm")

    def broken(*a, **k):
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(cpu, "intmm_qlinear", broken)
    monkeypatch.setattr(kernels, "_demoted", set())
    with caplog.at_level(logging.WARNING):
        _close(kernels.qlinear(xq, 0.1, 3, w), ref)  # answered by the next backend
    assert "linear/intmm failed" in caplog.text
    assert "intmm" not in kernels.backend_for("linear", "cpu")


def test_unknown_forced_backend_is_a_user_error(monkeypatch):
    from studio.errors import StudioError

    monkeypatch.setenv("STUDIO_KERNELS", "fastest")
    with pytest.raises(StudioError, match="STUDIO_KERNELS"):
        kernels.backend_for("linear", "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (Triton kernels)")
@pytest.mark.parametrize("symmetric", [True, False])
def test_triton_kernels_match_reference(symmetric):
    from studio.kernels import triton_int8

    w = _weight((48, 64), symmetric=symmetric).to("cuda")
    xq = _codes((37, 64)).cuda()
    bias = torch.randn(48, device="cuda")
    ref = reference.qlinear(xq.cpu(), 0.03, 77, w.to("cpu"), bias.cpu())
    _close(triton_int8.qlinear(xq, 0.03, 77, w, bias).cpu(), ref)
    wc = _weight((16, 12, 3, 3), symmetric=symmetric).to("cuda")
    xc = _codes((2, 12, 7, 7)).cuda()
    refc = reference.qconv2d(xc.cpu(), 0.04, 90, wc.to("cpu"), None, (2, 2), (1, 1), (1, 1), 1)
    _close(triton_int8.qconv2d(xc, 0.04, 90, wc, None, (2, 2), (1, 1), (1, 1), 1).cpu(), refc)


@pytest.mark.parametrize("kind, intmm", [("amx", True), ("avx512-bf16", False), ("avx2", False), ("other", False)])
def test_backends_follow_the_machine(monkeypatch, kind, intmm):
    # torch._int_mm is ~4x faster than fp32 with AMX/VNNI-class units and ~60x slower on AVX2 (MACHINES.md):
    # it is offered only on AMX; oneDNN's ops stay first wherever this torch has them
    monkeypatch.delenv("STUDIO_KERNELS", raising=False)
    monkeypatch.setattr("studio.machine.cpu_kind", lambda: kind)
    order = kernels.available("cpu")
    assert ("intmm" in order) == intmm and order[-1] == "reference"
    assert ("onednn" in order) == cpu.onednn_available()
    if cpu.onednn_available():
        assert order[0] == "onednn" and kernels.chosen("conv") == "onednn"
    assert "intmm" not in kernels.backend_for("conv", "cpu")


def _flips(a: torch.Tensor, b: torch.Tensor) -> tuple[int, float]:
    """(largest code difference, share of codes that differ): float rounding of a fused op may move a value
    that sits on a rounding boundary to the next code, nothing more."""
    d = (a.int() - b.int()).abs()
    return int(d.max()), float((d > 0).float().mean())


@pytest.mark.parametrize("add, sums", [(False, False), (True, True)])
def test_fused_norm_act_quant_matches_reference(add, sums):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 32, 6, 6, generator=g) * 2
    t = torch.randn(3, 32, 1, 1, generator=g) if add else None
    w, b = torch.randn(32, generator=g), torch.randn(32, generator=g)
    s = torch.tensor(0.02)
    ref = reference.norm_act_quant(x, 8, w, b, 1e-5, s, 100, 8, t)
    for fn in (cpu.norm_act_quant, kernels.norm_act_quant):
        for inp in (x, x.contiguous(memory_format=torch.channels_last)):  # either layout in, NHWC codes out
            q, sm = fn(inp, 8, w, b, 1e-5, s, 100, 8, add=t, sums=sums)
            assert q.dtype == torch.uint8 and q.is_contiguous(memory_format=torch.channels_last)
            big, share = _flips(q, ref)
            assert big <= 1 and share < 1e-3
            if sums:
                assert torch.equal(sm, (q.double() - 100).sum(1, keepdim=True).float())
            else:
                assert sm is None


@pytest.mark.parametrize("sums", [False, True])
def test_fused_geglu_quant_matches_reference(sums):
    g = torch.Generator().manual_seed(6)
    h = torch.randn(2, 10, 48, generator=g) * 2
    s = torch.tensor(0.03)
    ref = reference.geglu_quant(h, s, 120, 8)
    assert ref.shape == (2, 10, 24)
    for fn in (cpu.geglu_quant, kernels.geglu_quant):
        q, sm = fn(h, s, 120, 8, sums=sums)
        big, share = _flips(q, ref)
        assert big <= 1 and share < 1e-3
        assert (sm is not None) == sums
        if sums:
            assert torch.equal(sm, (q.double() - 120).sum(-1, keepdim=True).float())


def test_channels_last_group_norm_matches_torch_and_keeps_the_layout():
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(2, 32, 5, 7, generator=g) * 3 + 1).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(32, generator=g), torch.randn(32, generator=g)
    ref = torch.nn.functional.group_norm(x.contiguous(), 8, w, b, 1e-5)
    y = cpu.group_norm(x, 8, w, b, 1e-5)
    assert cpu.is_channels_last(y) and float((y - ref).abs().max()) < 1e-4
    assert cpu.group_norm(x.contiguous(), 8, None, None, 1e-5).is_contiguous()  # NCHW: torch's own
    assert float((cpu.group_norm(x, 8, None, None, 1e-5) -
                  torch.nn.functional.group_norm(x.contiguous(), 8)).abs().max()) < 1e-4


def test_multi_scale_and_attention_output_quantization_match_reference():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 9, 16, generator=g) * 2
    scales, zeros = [torch.tensor(0.02), torch.tensor(0.05), torch.tensor(0.011)], [128, 90, 3]
    refs = [reference.quantize_act(x, s, z, 8) for s, z in zip(scales, zeros)]
    for fn in (cpu.multi_quant, kernels.multi_quant):
        for q, ref in zip(fn(x, scales, zeros, 8), refs, strict=True):
            assert torch.equal(q, ref)
    o = torch.randn(2, 4, 9, 8, generator=g)  # (batch, heads, tokens, head dim)
    ref = reference.heads_quant(o, scales[0], 120, 8)
    assert ref.shape == (2, 9, 32) and torch.equal(ref[:, :, 8:16], reference.quantize_act(o[:, 1], scales[0], 120, 8))
    for fn in (cpu.heads_quant, kernels.heads_quant):
        q = fn(o, scales[0], 120, 8)
        assert q.is_contiguous() and torch.equal(q, ref)
