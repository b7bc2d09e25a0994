"""TLoRA: the tensor-ring math against dense references, the layer's invariants, files, SVD export, mixing.

The adapter-core invariants (identity when fresh, disabled == base, merged == unmerged, save ->
load exact, two adapters at once) run for TLoRA in tests/test_adapters.py's matrix.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from studio.adapters import AdapterSettings, add_adapter, merge, no_decay_groups, save_adapter, unmerge
from studio.adapters.tlora import TLoraConfig, TLoraLayer
from studio.adapters.tlora import functional as tf
from studio.errors import StudioError
from studio.testing import tiny_pipeline


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("factors", [(2, 3), (2, 3, 4), (4, 4), (3, 2, 2, 2)])
@pytest.mark.parametrize("rank", [1, 2, 3, 4])
def test_identity_init_is_exact(factors, rank):
    t = tf.tr_matrix(tf.identity_cores(factors, rank, _gen()))
    n = 1
    for f in factors:
        n *= f
    assert torch.equal(t, torch.eye(n))
    x = torch.randn(5, n, generator=_gen(1))
    assert torch.equal(tf.tr_apply(tf.identity_cores(factors, rank, _gen()), x), x)


def test_contraction_matches_the_dense_reference_and_the_flattening_order():
    g = _gen(2)
    cores = [torch.randn(i, j, 3, 3, generator=g, dtype=torch.float64) for i, j in [(2, 3), (3, 2), (2, 4)]]
    ref = tf.dense_reference(cores)  # entry by entry from the definition, row-major multi-indices
    assert ref.shape == (12, 24)
    torch.testing.assert_close(tf.tr_matrix(cores), ref)
    x = torch.randn(4, 3, 24, generator=g, dtype=torch.float64)
    torch.testing.assert_close(tf.tr_apply(cores, x), x @ ref.T)
    # one entry by hand: T[i, j] with i = (1, 2, 0) -> 1*3*2 + 2*2 + 0 = 10, j = (2, 1, 3) -> 2*8 + 1*4 + 3 = 23
    m = cores[0][1, 2] @ cores[1][2, 1] @ cores[2][0, 3]
    torch.testing.assert_close(tf.tr_matrix(cores)[10, 23], torch.trace(m))
    # the residual ring: outputs first, then inputs, same order
    rc = [torch.randn(n, 2, 2, generator=g, dtype=torch.float64) for n in (2, 3, 4)]
    flat = tf.residual_matrix(rc, 6)
    torch.testing.assert_close(flat[1 * 3 + 2, 3], torch.trace(rc[0][1] @ rc[1][2] @ rc[2][3]))


def test_residual_is_zero_at_init():
    assert torch.equal(tf.tr_tensor(tf.residual_cores([2, 3, 4], 3, _gen())), torch.zeros(24))


@pytest.mark.parametrize("n,want", [(320, (5, 8, 8)), (128, (4, 4, 8)), (64, (4, 4, 4)), (4, (2, 2)),
                                    (1, None), (7, None), (2 * 37, None)])
def test_factorisation(n, want):
    assert tf.factorize(n) == want


def _layers():
    torch.manual_seed(0)
    return [nn.Linear(24, 12), nn.Conv2d(12, 8, 3, padding=1), nn.Conv2d(8, 12, 1)]


def _x(layer):
    g = _gen(3)
    return torch.randn(2, 5, 24, generator=g) if isinstance(layer, nn.Linear) else torch.randn(2, layer.in_channels, 6, 6, generator=g)


def test_auto_order_picks_the_cheaper_product():
    """auto: W0 T costs out * in^2 * taps, T on the activations positions * in^2."""
    from studio.adapters.tlora.model import layer_factors

    cfg = TLoraConfig(target_modules=["x"], transform_rank=2, residual="lora", residual_rank=2)
    conv = nn.Conv2d(16, 16, 3, padding=1)  # out * taps = 144
    layer = TLoraLayer(conv, "a", *layer_factors(conv, cfg), cfg)
    assert layer.pick_order(torch.zeros(2, 16, 8, 8)) == "dense"  # 128 positions
    assert layer.pick_order(torch.zeros(3, 16, 8, 8)) == "weight"  # 192
    lin = nn.Linear(16, 8)
    layer = TLoraLayer(lin, "a", *layer_factors(lin, cfg), cfg)
    assert layer.pick_order(torch.zeros(7, 16)) == "dense" and layer.pick_order(torch.zeros(2, 4, 16)) == "weight"
    layer.order = "cores"
    assert layer.pick_order(torch.zeros(7, 16)) == "cores"  # a fixed order is kept


@pytest.mark.parametrize("residual", ["tr", "lora"])
@pytest.mark.parametrize("which", [0, 1, 2])
def test_layer_orders_agree_and_merge(which, residual):
    base = _layers()[which]
    x = _x(base)
    want0 = base(x)
    cfg = TLoraConfig(target_modules=["x"], transform_rank=3, residual=residual, residual_rank=2)
    from studio.adapters.tlora.model import layer_factors

    fin, fout = layer_factors(base, cfg)
    layer = TLoraLayer(base, "a", fin, fout, cfg)
    assert torch.equal(layer(x), want0)  # identity at init, bit for bit
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=_gen(4)) * 0.1)
    outs = {}
    for order in ("weight", "dense", "cores", "auto"):
        layer.order = order
        outs[order] = layer(x)
    torch.testing.assert_close(outs["dense"], outs["weight"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs["auto"], outs["weight"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs["cores"], outs["weight"], atol=1e-5, rtol=1e-5)
    # the explicit formula W0 T + s Delta
    w0 = base.weight.detach().clone()
    w = tf.transformed_weight(w0, tf.tr_matrix(list(layer.tlora_T["a"]))) + layer.residual_matrix("a").reshape(w0.shape)
    ref = nn.functional.linear(x, w, base.bias) if which == 0 else base._conv_forward(x, w, base.bias)
    torch.testing.assert_close(outs["weight"], ref, atol=1e-5, rtol=1e-5)
    layer.merge(safe_merge=True)
    torch.testing.assert_close(layer(x), outs["weight"], atol=1e-5, rtol=1e-5)
    layer.unmerge()
    assert torch.equal(base.weight, w0)  # unmerge gives W0 back exactly


def test_mixing_weight_scales_the_whole_update():
    base = _layers()[0]
    x = _x(base)
    cfg = TLoraConfig(target_modules=["x"], transform_rank=2)
    layer = TLoraLayer(base, "a", [2, 3, 4], [3, 4], cfg)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=_gen(5)) * 0.1)
    full = layer(x)
    layer.set_scale("a", 0.5)
    with torch.no_grad():
        want = base(x) + 0.5 * (full - base(x))
    torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)


def test_weight_decay_leaves_the_transform_alone():
    pipe = tiny_pipeline("sd1")
    params = add_adapter(pipe, "tlora", AdapterSettings(rank=4), "a")
    cores = [p for p in params if getattr(p, "no_weight_decay", False)]
    assert cores and len(cores) < len(params)
    before = [c.detach().clone() for c in cores]
    opt = torch.optim.AdamW(no_decay_groups([{"params": params, "lr": 0.1}]), weight_decay=0.5)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    assert all(torch.equal(c, b) for c, b in zip(cores, before))
    plain = torch.optim.AdamW([{"params": cores, "lr": 0.1}], weight_decay=0.5)
    plain.step()  # what a plain AdamW would do: shrink T towards zero
    assert not torch.equal(cores[0], before[0])


def test_bad_widths_are_skipped_with_a_warning_naming_the_layer(caplog):
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.good = nn.Linear(16, 16)
            self.prime = nn.Linear(13, 16)
            self.one = nn.Linear(1, 16)

        def forward(self, x):
            return self.good(x)

    from peft import inject_adapter_in_model

    model = Odd()
    cfg = TLoraConfig(target_modules=["good", "prime", "one"])
    with caplog.at_level(logging.WARNING):
        inject_adapter_in_model(cfg, model, adapter_name="a")
    assert isinstance(model.good, TLoraLayer)
    assert isinstance(model.prime, nn.Linear) and isinstance(model.one, nn.Linear)
    text = caplog.text
    assert "prime" in text and "input width 13" in text and "one" in text
    assert sorted(cfg.skipped) == ["one", "prime"]
    with pytest.raises(StudioError, match="none of the"):
        inject_adapter_in_model(TLoraConfig(target_modules=["prime"]), Odd(), adapter_name="a")


def test_larger_than_lora_warns_with_both_counts(caplog):
    pipe = tiny_pipeline("sd1")
    with caplog.at_level(logging.WARNING):
        add_adapter(pipe, "tlora", AdapterSettings(rank=1, options={"transform_rank": 8}), "a")
    assert "more than a rank-1 LoRA" in caplog.text


def test_bad_options():
    with pytest.raises(StudioError, match="--residual"):
        TLoraConfig(residual="cp")
    with pytest.raises(StudioError, match="--transform-rank"):
        TLoraConfig(transform_rank=0)
    with pytest.raises(StudioError, match="unknown option"):
        add_adapter(tiny_pipeline("sd1"), "tlora", AdapterSettings(options={"ring": 2}), "a")
    from studio.trainers.config import TrainConfig

    with pytest.raises(StudioError, match="--transform-rank 2 applies to --method tlora only|--transform-rank"):
        TrainConfig(images="x", transform_rank=2).validate()
    TrainConfig(images="x", method="tlora", transform_rank=2, residual="lora").validate()


def _unet_out(pipe) -> torch.Tensor:
    g = _gen(0)
    x = torch.randn(1, 4, 16, 16, generator=g)
    ids = pipe.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([10]), pipe.text_encoder(ids)[0]).sample


def _trained(pipe, residual="tr", seed=6):
    params = add_adapter(pipe, "tlora", AdapterSettings(rank=4, targets="attention+resnet",
                                                         options={"residual": residual}), "default")
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=_gen(seed)) * 0.05)
    return params


def test_file_holds_the_cores_and_the_factorisation(tmp_path):
    import json

    from studio.adapters import read_metadata

    pipe = tiny_pipeline("sd1")
    params = _trained(pipe)
    path = save_adapter(pipe, tmp_path / "t", "default")
    assert path.name == "studio_adapter.safetensors"
    meta = read_metadata(path)
    cfg = json.loads(meta["studio.peft_config.unet"])
    assert cfg["peft_type"] == "TLORA" and cfg["factors"]
    from safetensors.torch import load_file

    stored = load_file(str(path))
    assert sum(v.numel() for v in stored.values()) == sum(p.numel() for p in params)
    assert any(".tlora_T.0" in k for k in stored) and any(".tlora_R.0" in k for k in stored)


@pytest.mark.parametrize("to", ["diffusers", "kohya"])
def test_svd_export_reports_the_error_it_makes(to, tmp_path, capsys):
    from studio.adapters.tlora.export import export_lora, svd_factors
    from studio.formats.kohya import read_lora

    pipe = tiny_pipeline("sd1")
    _trained(pipe)
    src = save_adapter(pipe, tmp_path / "t", "default", metadata={"base": "x"})
    want = _unet_out(pipe)
    # the export loads its base by name: give it this very pipeline
    import studio.loading

    orig = studio.loading.load_pipeline
    studio.loading.load_pipeline = lambda spec, **kw: tiny_pipeline("sd1")
    try:
        full_path, full_err = export_lora(src, tmp_path / f"full-{to}", to=to, rank=10_000)
        low_path, low_err = export_lora(src, tmp_path / f"low-{to}", to=to, rank=2)
        from studio.cli import main

        assert main(["convert", "--to", to, str(src), str(tmp_path / f"cli-{to}"), "--rank", "2"]) == 0
        printed = capsys.readouterr().out
        assert f"relative error {low_err[0].rel_error:.4f}" in printed and "layers: mean relative error" in printed
    finally:
        studio.loading.load_pipeline = orig
    assert max(e.rel_error for e in full_err) < 1e-5
    assert max(e.rel_error for e in low_err) > 1e-3
    # the reported error equals a direct check of the written factors against the update
    from studio.adapters.core import tuner_layers

    with torch.no_grad():
        deltas = {f"unet.{n}": layer.get_delta_weight("default") for n, layer in tuner_layers(pipe.unet)}
    lora = read_lora(low_path, unet_config=dict(pipe.unet.config))
    checked = 0
    for m in lora.modules:
        key = f"{m.component}.{m.module}"
        d = deltas.get(key)
        if d is None:
            continue
        up, down = m.tensors["lora_up.weight"].flatten(1).double(), m.tensors["lora_down.weight"].flatten(1).double()
        approx = m.scale * up @ down
        direct = float(torch.linalg.norm(d.flatten(1).double() - approx) / torch.linalg.norm(d.double()))
        reported = next(e.rel_error for e in low_err if e.layer == key)
        assert abs(direct - reported) < 1e-4, key
        checked += 1
    assert checked == len(deltas)
    down, up, err = svd_factors(torch.eye(4), 2)
    assert abs(err - 2 ** 0.5 / 2) < 1e-6
    if to == "diffusers":  # the full-rank export is the adapter, in vanilla diffusers
        fresh = tiny_pipeline("sd1")
        fresh.load_lora_weights(str(full_path))
        torch.testing.assert_close(_unet_out(fresh), want, atol=1e-4, rtol=1e-4)


def test_mixes_with_a_lora(tmp_path):
    from studio.mixing import mixed

    pipe = tiny_pipeline("sd1")
    base = _unet_out(pipe)
    _trained(pipe)
    save_adapter(pipe, tmp_path / "t", "default")
    t_only = _unet_out(pipe)
    other = tiny_pipeline("sd1")
    params = add_adapter(other, "lora", AdapterSettings(rank=2), "default")
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=_gen(7)) * 0.1)
    save_adapter(other, tmp_path / "l", "default")
    l_only = _unet_out(other)
    fresh = tiny_pipeline("sd1")
    with mixed(fresh, [str(tmp_path / "t"), str(tmp_path / "l")]):
        both = _unet_out(fresh)
    # updates add: base + (T - base) + (L - base), up to the models' non-linearity; compare to each alone
    assert (both - t_only).abs().max() > 1e-4 and (both - l_only).abs().max() > 1e-4
    with mixed(fresh, [str(tmp_path / "t")]):
        torch.testing.assert_close(_unet_out(fresh), t_only, atol=1e-4, rtol=1e-4)
    with mixed(fresh, [f"{tmp_path / 't'}:0"]):
        torch.testing.assert_close(_unet_out(fresh), base, atol=1e-6, rtol=0)
    torch.testing.assert_close(_unet_out(fresh), base, atol=0, rtol=0)
    merge(pipe)
    unmerge(pipe)


def test_mixer_fuses_a_tlora_with_a_learned_trigger(tmp_path):
    # the mixer reads non-LoRA files through a skeleton without a text encoder: the trigger rows
    # must not be installed there (they were: "this base model lacks text_encoder")
    from studio.adapters import add_trigger_embedding
    from studio.mixing import mixed

    pipe = tiny_pipeline("sd1")
    _trained(pipe)
    with torch.no_grad():
        add_trigger_embedding(pipe, "sks", "default")[0].add_(0.5)
    want = _unet_out(pipe)
    ids = pipe.tokenizer(["a sks circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        te_want = pipe.text_encoder(ids)[0]
    save_adapter(pipe, tmp_path / "t", "default")
    fresh = tiny_pipeline("sd1")
    with mixed(fresh, [str(tmp_path / "t")]):
        torch.testing.assert_close(_unet_out(fresh), want, atol=1e-4, rtol=1e-4)
        with torch.no_grad():
            torch.testing.assert_close(fresh.text_encoder(ids)[0], te_want, atol=1e-5, rtol=1e-5)


def _loss_and_grads(pipe, params, batched: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    pipe.unet._tlora_builder.enabled = batched
    g = _gen(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    cond = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=g)
    for p in params:
        p.grad = None
    loss = pipe.unet(x, torch.tensor([10, 500]), cond).sample.pow(2).mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in params]


@pytest.mark.parametrize("residual", ["lora", "tr"])
def test_batched_build_gives_the_per_layer_values_and_gradients(residual):
    from studio.adapters.core import tuner_layers

    pipe = tiny_pipeline("sd1")
    params = _trained(pipe, residual=residual)
    builder = pipe.unet._tlora_builder
    with torch.no_grad():
        _unet_out(pipe)  # a first call: every layer learns its order, then the weight order is batched too
    for layer in (layer for _, layer in tuner_layers(pipe.unet)):
        assert layer._batched is None  # dropped when the forward ends
    ref_loss, ref_grads = _loss_and_grads(pipe, params, batched=False)
    before = builder.built
    loss, grads = _loss_and_grads(pipe, params, batched=True)
    assert builder.built == before + 1
    orders = {layer.last_order for _, layer in tuner_layers(pipe.unet)}
    assert orders == {"weight", "dense"}  # both paths ran from the batched build
    assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-7)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_batched_build_stands_aside_when_it_must():
    pipe = tiny_pipeline("sd1")
    params = _trained(pipe)
    builder = pipe.unet._tlora_builder
    n = builder.built
    from studio.adapters import set_enabled

    set_enabled(pipe, False)  # disabled adapters: nothing to build
    with torch.no_grad():
        off = _unet_out(pipe)
    set_enabled(pipe, True)
    assert builder.built == n
    pipe.unet.enable_gradient_checkpointing()  # a recomputation must run the forward's own ops
    pipe.unet.train()
    loss, _ = _loss_and_grads(pipe, params, batched=True)
    assert builder.built == n and torch.isfinite(loss)
    pipe.unet.disable_gradient_checkpointing()
    merge(pipe)  # merged: the base layer runs
    with torch.no_grad():
        merged = _unet_out(pipe)
    assert builder.built == n
    unmerge(pipe)
    with torch.no_grad():
        assert torch.allclose(_unet_out(pipe), merged, atol=1e-5) and builder.built == n + 1
    assert not torch.allclose(merged, off)
