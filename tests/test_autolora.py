"""AutoLoRA: the weight encoder's invariants, retrieval determinism, save/load, gated fusion."""

from __future__ import annotations

import random

import pytest
import torch

from studio.autolora import functional as AF
from studio.autolora.encoder import (EncoderConfig, WeightEncoder, adapter_factors, load_encoder, save_encoder,
                                     slots_of, stack)
from studio.errors import StudioError


@pytest.fixture(scope="module")
def micro(one_thread):
    from studio.loading import load_pipeline

    return load_pipeline("micro")


def _random_adapter(slots, seed: int, rank: int = 4, keep: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for s in slots:
        if not s.type.startswith("unet.attn"):
            continue
        if torch.rand((), generator=g) >= keep:
            continue
        out[s.key] = (torch.randn(rank, s.d_in, generator=g) * 0.1, torch.randn(s.d_out, rank, generator=g) * 0.1)
    return out


def _write(path, factors, order):
    """A diffusers-layout LoRA file with its keys written in ``order`` (a list of layer keys)."""
    from safetensors.torch import save_file

    tensors = {}
    for key in order:
        down, up = factors[key]
        tensors[f"{key}.lora_A.weight"] = down
        tensors[f"{key}.lora_B.weight"] = up
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def _perturbed(slots, seed: int, scale: float = 0.05, config: EncoderConfig = EncoderConfig()) -> WeightEncoder:
    """An encoder whose weights are moved off the fixed init by seeded noise (so two seeds encode differently)."""
    enc = WeightEncoder(slots, 64, config)
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed * 1000 + p.numel())) * scale)
    return enc


def test_key_order_does_not_change_the_vector(micro, tmp_path):
    slots = slots_of(micro)
    enc = WeightEncoder(slots, 64)
    fac = _random_adapter(slots, 1)
    keys = list(fac)
    shuffled = keys[:]
    random.Random(0).shuffle(shuffled)
    a = enc.encode([{k: fac[k] for k in keys}])
    b = enc.encode([{k: fac[k] for k in shuffled}])
    assert torch.equal(a, b)
    # and through files whose keys come in other orders
    fa = adapter_factors(micro, _write(tmp_path / "a.safetensors", fac, keys))
    fb = adapter_factors(micro, _write(tmp_path / "b.safetensors", fac, list(reversed(keys))))
    assert torch.equal(enc.encode([fa]), enc.encode([fb]))
    # the file route reads the same factors as the dict (so the vector is the adapter's, not an artefact)
    assert torch.allclose(enc.encode([fa]), a, atol=1e-6)


def test_other_ranks_and_missing_layers_are_padded_exactly(micro):
    slots = slots_of(micro)
    enc = WeightEncoder(slots, 64)
    small = _random_adapter(slots, 2, rank=2, keep=0.5)
    big = _random_adapter(slots, 3, rank=8)
    alone = enc.encode([small])
    together = enc.encode([small, big])
    assert torch.allclose(alone[0], together[0], atol=1e-5)
    assert not torch.allclose(together[0], together[1], atol=1e-3)  # different adapters, different vectors
    # a rank-r adapter and the same delta as a rank-2r pair with half scale each encode alike
    doubled = {k: (torch.cat([d, d]), torch.cat([u, u], 1) * 0.5) for k, (d, u) in small.items()}
    assert torch.allclose(enc.encode([doubled]), alone, atol=1e-5)


def test_non_lora_delta_becomes_an_exact_low_rank_form():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(32, 3, generator=g) @ torch.randn(3, 48, generator=g)
    down, up = AF.effective_lowrank(delta, 8)
    assert down.shape == (3, 48) and up.shape == (32, 3)
    assert torch.allclose(up @ down, delta, atol=1e-4)
    again = AF.effective_lowrank(delta, 8)
    assert torch.equal(again[0], down) and torch.equal(again[1], up)


def test_tokens_match_their_dense_definitions():
    g = torch.Generator().manual_seed(1)
    down, up = torch.randn(3, 4, 20, generator=g), torch.randn(3, 12, 4, generator=g)
    x, y = torch.randn(2, 20, generator=g), torch.randn(2, 12, generator=g)
    dw = up @ down  # (3, 12, 20): only the test builds the dense delta
    assert torch.allclose(AF.probe_tokens(x, down, up), torch.einsum("pi,noi->npo", x, dw), atol=1e-4)
    assert torch.allclose(AF.gram_tokens(y, down, up), torch.einsum("po,nok,nqk->npq", y, dw, dw), atol=1e-3)
    # the gram tokens see dW only: another factorization of the same delta gives the same tokens
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g))
    assert torch.allclose(AF.gram_tokens(y, q.t() @ down, up @ q), AF.gram_tokens(y, down, up), atol=1e-3)


@pytest.mark.parametrize("tokens", ["probe", "gram", "both"])
def test_every_token_kind_encodes_and_is_order_free(micro, tokens):
    slots = slots_of(micro)
    enc = WeightEncoder(slots, 64, EncoderConfig(tokens=tokens))
    fac = _random_adapter(slots, 7)
    rev = dict(reversed(list(fac.items())))
    a, b = enc.encode([fac]), enc.encode([rev])
    assert torch.equal(a, b) and torch.isfinite(a).all()


def test_adapter_without_known_layers_is_refused(micro):
    enc = WeightEncoder(slots_of(micro), 64)
    with pytest.raises(StudioError, match="none of its 1 layers"):
        enc.encode([{"unet.not.a.layer": (torch.zeros(2, 4), torch.zeros(4, 2))}], names=["odd"])


def test_save_load_exact(micro, tmp_path):
    slots = slots_of(micro)
    enc = _perturbed(slots, 0, 0.01, EncoderConfig(probes=2))
    path = save_encoder(enc, tmp_path / "enc.safetensors", base_hash="abc")
    back, header = load_encoder(path)
    assert header["base_hash"] == "abc" and back.config == enc.config and back.slots == enc.slots
    sa, sb = enc.state_dict(), back.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    fac = [_random_adapter(slots, 4), _random_adapter(slots, 5, rank=2)]
    assert torch.equal(enc.encode(fac), back.encode(fac))


def test_ensemble_is_the_mean_of_unit_vectors_and_saves_exactly(micro, tmp_path):
    from studio.autolora.encoder import EncoderEnsemble
    from studio.autolora.retrieval import TrainSettings, fit_encoder

    slots = slots_of(micro)
    members = [_perturbed(slots, 1), _perturbed(slots, 2)]
    ens = EncoderEnsemble(members)
    fac = [_random_adapter(slots, 4), _random_adapter(slots, 5, rank=2)]
    by_hand = sum(torch.nn.functional.normalize(m.encode(fac), dim=1) for m in members) / 2
    torch.testing.assert_close(ens.encode(fac), by_hand)
    rev = [dict(reversed(list(f.items()))) for f in fac]
    assert torch.equal(ens.encode(fac), ens.encode(rev))
    back, _ = load_encoder(save_encoder(ens, tmp_path / "ens.safetensors"))
    assert isinstance(back, EncoderEnsemble) and len(back.members) == 2
    assert torch.equal(back.encode(fac), ens.encode(fac))
    with pytest.raises(StudioError, match="different"):
        EncoderEnsemble([WeightEncoder(slots, 64), WeightEncoder(slots, 64, EncoderConfig(probes=2))])
    with pytest.raises(StudioError, match="--members"):
        TrainSettings(members=0)
    # fit_encoder: members from consecutive seeds, each as train_encoder makes it alone
    caps = [["a red heart"], ["a blue star"], ["a checkered square"]]
    ens2, report = fit_encoder(micro, fac + [_random_adapter(slots, 6)], caps, settings=TrainSettings(steps=3, members=2))
    alone, _ = fit_encoder(micro, fac + [_random_adapter(slots, 6)], caps,
                           settings=TrainSettings(steps=3, seed=1, members=1))
    assert report["members"] == 2 and report["seeds"] == [0, 1]
    sa, sb = ens2.members[1].state_dict(), alone.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_training_and_retrieval_are_deterministic(micro):
    from studio.autolora.retrieval import TrainSettings, rank, train_encoder

    slots = slots_of(micro)
    fac = [_random_adapter(slots, 10 + i) for i in range(4)]
    caps = [["a red heart"], ["a blue star"], ["a checkered square"], ["a zigzag circle"]]
    runs = []
    for _ in range(2):
        enc, report = train_encoder(micro, fac, caps, settings=TrainSettings(steps=30))
        vec = enc.encode(fac)
        runs.append((vec, rank(micro, "a red heart", ["a", "b", "c", "d"], vec, ["", "", "", ""], 4, enc)))
    assert torch.equal(runs[0][0], runs[1][0])
    assert [h.to_dict() for h in runs[0][1]] == [h.to_dict() for h in runs[1][1]]
    assert report["final_loss"] < 1.0  # four separable pairs: the contrastive loss (log 4 = 1.39 at chance) falls
    assert runs[0][1][0].name == "a"  # the adapter trained on that caption ranks first


def test_recall_does_not_reward_ties():
    scores = torch.zeros(4, 4)
    assert AF.recall_at(scores, torch.arange(4), 1) == 0.0
    assert AF.recall_at(torch.eye(4), torch.arange(4), 1) == 1.0
    ranked = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.1, 0.9, 0.3, 0.4]])  # row 0's truth ranks last, row 1's first
    assert AF.recall_at(ranked, torch.tensor([0, 1]), 3) == 0.5
    assert AF.recall_at(ranked, torch.tensor([0, 1]), 4) == 1.0


def test_info_nce_leaves_a_concepts_replicas_out_of_its_negatives():
    g = torch.Generator().manual_seed(0)
    a, t = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    distinct = torch.arange(5)
    assert torch.equal(AF.info_nce(a, t, 2.0, distinct), AF.info_nce(a, t, 2.0))  # nothing shared: plain InfoNCE
    groups = torch.tensor([0, 0, 1, 2, 2])  # rows 0-1 and 3-4 are replicas of one concept each
    norm = torch.nn.functional.normalize
    logits = torch.tensor(2.0).exp() * norm(a, dim=-1) @ norm(t, dim=-1).t()
    by_hand = []
    for lg in (logits, logits.t()):
        for i in range(5):
            keep = [j for j in range(5) if j == i or groups[j] != groups[i]]
            by_hand.append(torch.logsumexp(lg[i, keep], 0) - lg[i, i])
    assert torch.allclose(AF.info_nce(a, t, 2.0, groups), torch.stack(by_hand).sum() / 10, atol=1e-6)


# ----------------------------------------------------------------------------- gated fusion


def _lora_files(pipe, folder, n, rank=4):
    from studio.adapters import AdapterSettings, add_adapter, remove_adapter, save_adapter

    out = []
    for i in range(n):
        params = add_adapter(pipe, "lora", AdapterSettings(rank=rank + i, targets="attention"), f"g{i}")
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        out.append(save_adapter(pipe, folder / f"g{i}", f"g{i}", metadata={"base_family": "sd1"}))
        remove_adapter(pipe, f"g{i}")
    return out


def _unet_out(pipe):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 8, 64, generator=g)
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([500, 500]), encoder_hidden_states=ctx).sample


def test_open_gates_reduce_to_the_plain_sum(micro, tmp_path):
    from studio.autolora.gates import GatedFusion, GateSet
    from studio.mixing import Mixer

    files = _lora_files(micro, tmp_path, 3)
    base = _unet_out(micro)
    with Mixer(micro, [str(f) for f in files], fuse=False):
        plain = _unet_out(micro)
    gates = GateSet.for_pipeline(micro)
    with torch.no_grad():
        for gate in gates.gates.values():
            gate.b.fill_(60.0)  # sigmoid(60) == 1 in float32: g = 1; w_out stays 1
    with GatedFusion(micro, files, gates) as fusion:
        gated = _unet_out(micro)
    assert fusion.mean_gates() == pytest.approx([1.0, 1.0, 1.0])
    assert not torch.allclose(plain, base, atol=1e-3)  # the adapters do something
    assert torch.allclose(gated, plain, atol=1e-5, rtol=1e-4)
    assert torch.equal(_unet_out(micro), base)  # removed: the base model exactly
    # a closed gate (g = 0) is the base model
    with torch.no_grad():
        for gate in gates.gates.values():
            gate.b.fill_(-60.0)
    with GatedFusion(micro, files, gates):
        closed = _unet_out(micro)
    assert torch.allclose(closed, base, atol=1e-6)


def test_gates_save_load_exact_and_base_check(micro, tmp_path):
    from studio.autolora.gates import GatedFusion, GateSet, load_gates, save_gates
    from studio.generation import model_hash

    files = _lora_files(micro, tmp_path, 2)
    gates = GateSet.for_pipeline(micro)
    with torch.no_grad():
        for i, p in enumerate(gates.parameters()):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    path = save_gates(gates, tmp_path / "gates.safetensors", base_hash=model_hash(micro))
    back = load_gates(path, micro)
    sa, sb = gates.state_dict(), back.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    with GatedFusion(micro, files, gates):
        a = _unet_out(micro)
    with GatedFusion(micro, files, back):
        b = _unet_out(micro)
    assert torch.equal(a, b)
    other = save_gates(gates, tmp_path / "other.safetensors", base_hash="0123456789")
    with pytest.raises(StudioError, match="another base model"):
        load_gates(other, micro)


def test_gated_spec_in_the_mixer(micro, tmp_path):
    from studio.autolora.gates import GatedFusion, GateSet, save_gates
    from studio.generation import model_hash
    from studio.mixing import Mixer, parse_spec

    spec = parse_spec("gated:/some/heart:0.8")
    assert spec.gated and spec.target == "/some/heart" and spec.weight == 0.8 and str(spec) == "gated:/some/heart:0.8"
    assert not parse_spec("heart:0.8").gated
    with pytest.raises(StudioError, match="gated adapter"):
        parse_spec("gated:heart:0.8@0.5-1")
    files = _lora_files(micro, tmp_path, 2)
    gates = GateSet.for_pipeline(micro)
    with torch.no_grad():
        for i, p in enumerate(gates.parameters()):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.5)
    path = save_gates(gates, tmp_path / "gates.safetensors", base_hash=model_hash(micro))
    with GatedFusion(micro, files, gates, [0.8, 1.0]):
        direct = _unet_out(micro)
    with Mixer(micro, [f"gated:{files[0]}:0.8", f"gated:{files[1]}"], gates=path) as mix:
        assert mix.gated is not None and not mix.fused
        mixed = _unet_out(micro)
    assert torch.equal(mixed, direct)


def _timestep_gates(micro, tmp_path):
    """3 random LoRA files, random timestep gates and one UNet input of batch 2."""
    from studio.autolora.gates import GateConfig, GateSet

    files = _lora_files(micro, tmp_path, 3)
    gates = GateSet.for_pipeline(micro, GateConfig(timestep=True))
    with torch.no_grad():
        for i, p in enumerate(gates.parameters()):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.5)
    g = torch.Generator().manual_seed(0)
    return files, gates, torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 8, 64, generator=g)


def test_generation_path_equals_the_training_path(micro, tmp_path):
    """Generation (no autograd) and gate training (autograd) give the same output and recorded gates."""
    from studio.autolora.gates import GatedFusion

    files, gates, x, ctx = _timestep_gates(micro, tmp_path)
    outs, means = [], []
    for grad in (False, True):
        with GatedFusion(micro, files, gates, [0.8, 1.0, 0.5]) as fusion, torch.set_grad_enabled(grad):
            outs.append(micro.unet(x, torch.tensor([300, 300]), encoder_hidden_states=ctx).sample.detach())
            means.append(fusion.mean_gates())
    assert torch.allclose(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    assert means[0] == pytest.approx(means[1], abs=1e-6)
    assert not torch.allclose(outs[0], _unet_out(micro), atol=1e-3)  # the gates did something


def test_layer_gate_matches_the_reference_formula():
    import torch.nn.functional as F

    from studio.autolora.gates import LayerGate

    g = torch.Generator().manual_seed(3)
    gate = LayerGate(16)
    with torch.no_grad():
        for p in gate.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    y0, ys = torch.randn(2, 5, 16, generator=g), torch.randn(3, 2, 5, 16, generator=g)
    out, gv = gate(y0, ys)
    k = ys.shape[0]
    ref_g = AF.gate_values(F.layer_norm(y0, (16,)), F.layer_norm(ys, (16,)),
                           *(p.expand(k, 16) for p in (gate.w_base, gate.w_lora, gate.w_cross, gate.b)))
    assert torch.allclose(gv, ref_g, atol=1e-6)
    assert torch.allclose(out, AF.gated_sum(y0, ys, ref_g, gate.w_out.expand(k)), atol=1e-5)


def test_gate_training_noises_with_the_training_schedule(micro):
    """Gate training noises latents by DDPM over the base's training betas, not with the sampler's table."""
    from studio.trainers.loop import training_noise_scheduler

    cfg = micro.scheduler.config
    betas = torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, cfg.num_train_timesteps,
                           dtype=torch.float64) ** 2  # scaled_linear, micro's schedule
    acp = torch.cumprod(1.0 - betas, 0)
    g = torch.Generator().manual_seed(0)
    x, n = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([10, 300, 600, 990])
    want = acp[t].sqrt().view(-1, 1, 1, 1) * x + (1 - acp[t]).sqrt().view(-1, 1, 1, 1) * n
    got = training_noise_scheduler(micro).add_noise(x, n, t)
    assert torch.allclose(got.double(), want, atol=1e-4)


def test_gates_read_each_samples_timestep_and_skip_inactive_adapters(micro, tmp_path):
    """A batch at two timesteps equals each sample alone (per-sample fractions, no clock override);
    an active subset of stacked adapters equals a fusion of only those."""
    from studio.autolora.gates import GatedFusion

    files, gates, x, ctx = _timestep_gates(micro, tmp_path)
    t = torch.tensor([100, 800])
    frac = 1.0 - t.float() / 1000
    fusion = GatedFusion(micro, files, gates, clock=False).apply()
    try:
        with torch.no_grad():
            fusion.fraction = frac
            both = micro.unet(x, t, encoder_hidden_states=ctx).sample
            alone = []
            for k in range(2):
                fusion.fraction = float(frac[k])
                alone.append(micro.unet(x[k:k + 1], t[k:k + 1], encoder_hidden_states=ctx[k:k + 1]).sample)
            fusion.fraction = float(frac[0])  # one fraction for both: not what each sample asked
            shared = micro.unet(x, t, encoder_hidden_states=ctx).sample
            fusion.fraction, fusion.active = frac, torch.tensor([0, 2])
            subset = micro.unet(x, t, encoder_hidden_states=ctx).sample
    finally:
        fusion.remove()
    assert torch.allclose(both, torch.cat(alone), atol=1e-5)
    assert not torch.allclose(shared[1], both[1], atol=1e-4)  # the timestep input does something
    with GatedFusion(micro, [files[0], files[2]], gates, clock=False) as pair, torch.no_grad():
        pair.fraction = frac
        direct = micro.unet(x, t, encoder_hidden_states=ctx).sample
    assert torch.allclose(subset, direct, atol=1e-6)


def test_gate_training_lowers_the_validation_loss(micro):
    """A short seeded run on four zoo adapters: the fixed validation draws' denoising loss goes down."""
    from studio.autolora.gates import DEFAULT_GATES, GateTrainSettings, train_gates
    from studio.autolora.zoo import load_zoo

    zoo = DEFAULT_GATES.parent / "zoo"  # the committed zoo
    entries = [e for e in load_zoo(zoo)["adapters"] if not e["heldout"]][:4]
    gates, report = train_gates(micro, entries, settings=GateTrainSettings(steps=40, eval_every=40, val_pairs=4,
                                                                            images=4))
    assert [s for s, _ in report["val_curve"]] == [0, 40]
    assert report["val_end"] < report["val_start"]
    assert any(float(g.b.detach().sub(3.0).abs().max()) > 0 for g in gates.gates.values())


def test_generation_records_each_gated_adapters_mean_gate(micro, tmp_path, monkeypatch):
    import re

    from studio.autolora import gates as gates_mod
    from studio.generation import GenerationParams, generate, model_hash

    files = _lora_files(micro, tmp_path, 2)
    path = gates_mod.save_gates(gates_mod.GateSet.for_pipeline(micro), tmp_path / "gates.safetensors",
                                base_hash=model_hash(micro))
    monkeypatch.setattr(gates_mod, "DEFAULT_GATES", path)
    p = GenerationParams(prompt="a red circle", seed=3, num=1, steps=2,
                         adapters=[f"gated:{files[0]}", f"{files[1]}:0.5"])
    info = generate(micro, p)[0].info["parameters"]
    m = re.search(r'Gates: "g0: ([0-9.]+)"', info)
    assert m is not None, info
    assert 0.0 < float(m.group(1)) < 1.0  # a real sigmoid's mean, not a placeholder
    assert info.index("Gates:") < info.index("Version:")
    plain = generate(micro, GenerationParams(prompt="a red circle", seed=3, num=1, steps=2,
                                             adapters=[f"{files[1]}:0.5"]))[0].info["parameters"]
    assert "Gates:" not in plain


def test_library_vectors_of_another_encoder_are_recomputed(micro, tmp_path, monkeypatch):
    """A vector stored by one encoder file is stale for another (an updated bundled encoder): recomputed."""
    from studio.autolora.retrieval import DEFAULT_ZOO, embed_library
    from studio.library import Library

    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    lib = Library()
    for name in ("combo-checkered-arrow", "combo-checkered-arrow-r1"):
        lib.add(DEFAULT_ZOO / name, name=name)
    slots = slots_of(micro)
    files = [save_encoder(_perturbed(slots, seed), tmp_path / f"enc{seed}.safetensors", extra={"base": "micro"})
             for seed in (1, 2)]
    assert embed_library(encoder=files[0])[0] == 2
    assert embed_library(encoder=files[0])[0] == 0  # up to date: nothing to do
    v1, src1 = lib.embedding_with_source("combo-checkered-arrow")
    assert embed_library(encoder=files[1])[0] == 2  # another encoder: both recomputed without --force
    v2, src2 = lib.embedding_with_source("combo-checkered-arrow")
    assert src1 and src2 and src1 != src2 and not torch.allclose(torch.from_numpy(v1), torch.from_numpy(v2))
    back, _ = load_encoder(files[1])
    expect = back.encode([adapter_factors(micro, DEFAULT_ZOO / "combo-checkered-arrow" / "pytorch_lora_weights.safetensors",
                                          back.config.lowrank)])[0]
    torch.testing.assert_close(torch.from_numpy(v2), expect)
    lib.set_embedding("combo-checkered-arrow", v2)  # a vector of unknown source (older versions wrote these)
    assert lib.embedding_with_source("combo-checkered-arrow")[1] == ""
    assert embed_library(encoder=files[1])[0] == 1
