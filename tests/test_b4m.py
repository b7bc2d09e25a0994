"""Break-for-Make: the split's math, the make step, the three-stage trainer, exports and bad input.

(The adapter-core matrix in tests/test_adapters.py covers b4m as a registered method.)
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from studio.adapters import AdapterSettings, add_adapter
from studio.adapters import b4m
from studio.adapters.b4m import functional as bf
from studio.errors import StudioError
from studio.testing import tiny_pipeline

SUBJECT = "assets/samples/subject-heart-red"
STYLE = "assets/samples/style-checkered"
ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- math


@pytest.mark.parametrize("split", [bf.Split(64, 64, 1, 8), bf.Split(40, 64, 1, 6), bf.Split(32, 16, 9, 4),
                                   bf.Split(33, 17, 1, 5)])
def test_frozen_halves_are_seeded_orthonormal_and_ac_is_exactly_zero(split):
    a, c = bf.frozen_halves(3, "down.0.attn1.to_q", split)
    assert a.shape == (split.h_out, split.rank) and c.shape == (split.rank, split.h_in * split.taps)
    assert torch.equal(a @ c, torch.zeros(split.h_out, split.h_in * split.taps))  # exact, not approximate
    assert torch.equal(a[:, split.k:], torch.zeros_like(a[:, split.k:]))
    assert torch.equal(c[: split.k], torch.zeros_like(c[: split.k]))
    eye_a, eye_c = torch.eye(split.k), torch.eye(split.rank - split.k)
    torch.testing.assert_close(a[:, : split.k].T @ a[:, : split.k], eye_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(c[split.k:] @ c[split.k:].T, eye_c, atol=1e-5, rtol=0)
    a2, c2 = bf.frozen_halves(3, "down.0.attn1.to_q", split)
    assert torch.equal(a, a2) and torch.equal(c, c2)  # separate runs share them
    a3, _ = bf.frozen_halves(3, "down.0.attn1.to_k", split)
    a4, _ = bf.frozen_halves(4, "down.0.attn1.to_q", split)
    assert not torch.equal(a, a3) and not torch.equal(a, a4)  # one basis per layer and seed


def test_split_too_narrow_for_the_rank():
    with pytest.raises(StudioError, match="too narrow for --rank 32"):
        bf.frozen_halves(0, "x", bf.Split(16, 16, 1, 32))
    with pytest.raises(StudioError, match="at least 2"):
        bf.frozen_halves(0, "x", bf.Split(16, 16, 1, 1))


def _pair(s: bf.Split, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    a, c = bf.frozen_halves(0, "layer", s)
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(s.d_out - s.h_out, s.rank, generator=g)
    d = torch.randn(s.rank, s.d_in - s.h_in, generator=g)
    return bf.join_up(a, b), bf.join_down(c, d)


def test_make_is_exactly_a_and_b_style_with_c_and_d_content():
    s = bf.Split(24, 40, 1, 6)
    content, style = _pair(s, 1), _pair(s, 2)
    up, down = bf.make(content, style, s.h_out, s.h_in)
    a, c = bf.frozen_halves(0, "layer", s)
    assert torch.equal(up, torch.cat([a, style[0][s.h_out:]])) and torch.equal(down, torch.cat([c, content[1][:, s.h_in:]], 1))
    blocks = bf.blocks(up, down, s.h_out, s.h_in)
    assert torch.equal(blocks["AC"], torch.zeros_like(blocks["AC"]))
    torch.testing.assert_close(torch.cat([torch.cat([blocks["AC"], blocks["AD"]], 1), torch.cat([blocks["BC"], blocks["BD"]], 1)]),
                               bf.delta_weight(up, down, 1.0))
    other = (content[0].clone(), content[1].clone())
    other[0][0, 0] += 1e-6  # one bit of a frozen half moved: not halves of one space
    with pytest.raises(StudioError, match="frozen halves"):
        bf.make(other, style, s.h_out, s.h_in)
    with pytest.raises(StudioError, match="another rank"):
        bf.make(_pair(bf.Split(24, 40, 1, 4), 1), style, s.h_out, s.h_in)


def _adapted_pipe(std: float):
    """A tiny SD 1 pipeline with a rank-4 b4m adapter "a" whose learnable halves are random (std)."""
    pipe = tiny_pipeline("sd1")
    add_adapter(pipe, "b4m", AdapterSettings(rank=4, targets="attention"), "a")
    for p in b4m.learnable(pipe.unet, "a", "up") + b4m.learnable(pipe.unet, "a", "down"):
        torch.nn.init.normal_(p, std=std)
    return pipe


def test_gradient_routing_keeps_the_halves_apart():
    """Rows outside a half's mask do not reach it; rows inside give the same gradient as alone."""
    pipe = _adapted_pipe(std=0.1)
    unet = pipe.unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 16, 16, generator=g)
    ids = pipe.tokenizer(["a red circle", "a blue star", "a sks shape", "a dotted square"], padding="max_length",
                         max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        cond = pipe.text_encoder(ids)[0]
    t = torch.tensor([10, 300, 600, 900])

    def grads(rows, xs, cs, ts, w):
        for p in unet.parameters():
            p.grad = None
        with b4m.route_gradients(unet, "a", rows):
            (unet(xs, ts, cs).sample.pow(2).mean(dim=(1, 2, 3)) * w).sum().backward()
        return ([p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in b4m.learnable(unet, "a", "down")],
                [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in b4m.learnable(unet, "a", "up")])

    w = torch.ones(4)
    routed_down, routed_up = grads({"down": torch.tensor([1, 1, 0, 0]).bool(), "up": torch.tensor([0, 0, 1, 1]).bool()},
                                   x, cond, t, w)
    alone_down, _ = grads({}, x[:2], cond[:2], t[:2], w[:2])
    _, alone_up = grads({}, x[2:], cond[2:], t[2:], w[2:])
    for r, al in zip(routed_down + routed_up, alone_down + alone_up):
        torch.testing.assert_close(r, al, atol=1e-6, rtol=1e-4)
    assert any(r.abs().sum() > 0 for r in routed_down) and any(r.abs().sum() > 0 for r in routed_up)


def test_partner_dropout_rows_see_the_half_as_zero():
    """A row with the up half off gives what the adapter gives with B = 0; the other rows are untouched."""
    pipe = _adapted_pipe(std=0.3)
    unet = pipe.unet
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([200, 700])
    cond = torch.randn(2, 77, pipe.text_encoder.config.hidden_size, generator=g)
    off = torch.tensor([True, False])
    with torch.no_grad():
        full = unet(x, t, cond).sample
        with b4m.route_gradients(unet, "a", {}, {"up": off}):
            dropped = unet(x, t, cond).sample
        saved = [p.detach().clone() for p in b4m.learnable(unet, "a", "up")]
        for p in b4m.learnable(unet, "a", "up"):
            p.zero_()
        no_b = unet(x, t, cond).sample
        for p, v in zip(b4m.learnable(unet, "a", "up"), saved):
            p.copy_(v)
    torch.testing.assert_close(dropped[0], no_b[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(dropped[1], full[1], atol=1e-6, rtol=0)
    assert not torch.allclose(no_b[0], full[0])


def test_frozen_halves_are_buffers_that_adamw_cannot_move():
    pipe = tiny_pipeline("sd1")
    params = add_adapter(pipe, "b4m", AdapterSettings(rank=4, targets="attention+resnet"), "a")
    before = b4m.frozen_state(pipe.unet, "a")
    assert before and not any(p is m.frozen for _, m in b4m.split_modules(pipe.unet, "a") for p in params)
    opt = torch.optim.AdamW(params, lr=0.1, weight_decay=0.5)
    for _ in range(3):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    after = b4m.frozen_state(pipe.unet, "a")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_disjoint_halves_have_no_cross_term_after_training():
    """By default D uses only the rank components A reads and B only those C feeds: B D == 0 exactly,
    also after AdamW steps with dense gradients (the masked entries never move), and in the saved file."""
    pipe = tiny_pipeline("sd1")
    params = add_adapter(pipe, "b4m", AdapterSettings(rank=4, targets="attention+resnet"), "a")
    opt = torch.optim.AdamW(params, lr=0.1, weight_decay=0.5)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    layers = list(b4m.plp_layers(pipe.unet, "a"))
    assert layers
    for name, layer in layers:
        s = b4m.layer_split(layer, "a")
        up, down = layer.lora_B["a"].weight, layer.lora_A["a"].weight
        bl = bf.blocks(up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1), s.h_out, s.h_in * s.taps)
        assert torch.equal(bl["BD"], torch.zeros_like(bl["BD"])), name
        assert bl["AD"].abs().sum() > 0 and bl["BC"].abs().sum() > 0, name  # the live parts did learn
    sd = pipe.unet.state_dict()
    name, layer = layers[0]
    s = b4m.layer_split(layer, "a")
    down = sd[f"{name}.lora_A.a.weight"]
    assert torch.equal(down[s.k:, s.h_in:], torch.zeros_like(down[s.k:, s.h_in:]))
    # the other layout (the reference's full learnable halves) is an option, and does have a cross term
    pipe2 = tiny_pipeline("sd1")
    add_adapter(pipe2, "b4m", AdapterSettings(rank=4, targets="attention", options={"disjoint": "false"}), "b")
    for p in b4m.learnable(pipe2.unet, "b", "up") + b4m.learnable(pipe2.unet, "b", "down"):
        torch.nn.init.normal_(p, std=0.1)
    name, layer = next(iter(b4m.plp_layers(pipe2.unet, "b")))
    s = b4m.layer_split(layer, "b")
    assert bf.blocks(layer.lora_B["b"].weight, layer.lora_A["b"].weight, s.h_out, s.h_in)["BD"].abs().sum() > 0
    with pytest.raises(StudioError, match="disjoint"):
        add_adapter(tiny_pipeline("sd1"), "b4m", AdapterSettings(rank=4, targets="attention", options={"disjoint": "x"}), "c")


# ----------------------------------------------------------------------------- the trainer


def _train(out: Path, *extra: str) -> int:
    from studio.cli import main

    return main(["train", "--method", "b4m", "--content", str(ROOT / SUBJECT), "--style", str(ROOT / STYLE),
                 "--base", "micro", "--out", str(out), "--no-prior", "--steps-content", "3", "--steps-style", "3",
                 "--aux-sets", "1", "--no-register", *extra])


def _halves(folder: Path, split_of: dict) -> dict[str, tuple[torch.Tensor, ...]]:
    t = load_file(str(folder / "pytorch_lora_weights.safetensors"))
    out = {}
    for name, (h_out, h_in) in split_of.items():
        up, down = t[f"unet.{name}.lora_B.weight"], t[f"unet.{name}.lora_A.weight"]
        out[name] = (up[:h_out], up[h_out:], down[:, :h_in], down[:, h_in:])
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny b4m runs on micro: without a joint fine-tune (the make step alone) and with one."""
    root = tmp_path_factory.mktemp("b4m")
    import os

    old = os.environ.get("STUDIO_HOME")
    os.environ["STUDIO_HOME"] = str(root / "home")
    try:
        assert _train(root / "make0", "--steps-make", "0") == 0
        assert _train(root / "make2", "--steps-make", "2") == 0
    finally:
        if old is None:
            os.environ.pop("STUDIO_HOME", None)
        else:
            os.environ["STUDIO_HOME"] = old
    from studio.loading import load_pipeline

    pipe = load_pipeline("micro")
    add_adapter(pipe, "b4m", AdapterSettings(rank=16, targets="all", options={"basis_seed": 0}), "ref")
    split_of = {name: (b4m.layer_split(layer, "ref").h_out, b4m.layer_split(layer, "ref").h_in)
                for name, layer in b4m.plp_layers(pipe.unet, "ref")}
    frozen = {name: (layer.lora_B["ref"].frozen, layer.lora_A["ref"].frozen) for name, layer in b4m.plp_layers(pipe.unet, "ref")}
    return root, split_of, frozen


def test_frozen_halves_bit_identical_in_every_stage(runs):
    root, split_of, frozen = runs
    for folder in ("make0/content", "make0/style", "make0", "make2/content", "make2/style", "make2"):
        got = _halves(root / folder, split_of)
        assert got.keys() == frozen.keys()
        for name, (a, _, c, _) in got.items():
            assert torch.equal(a, frozen[name][0].reshape(a.shape)), (folder, name)
            assert torch.equal(c, frozen[name][1].reshape(c.shape)), (folder, name)


def test_trainer_make_step_is_exact_and_the_stages_learned(runs):
    root, split_of, _ = runs
    content, style, made = (_halves(root / f, split_of) for f in ("make0/content", "make0/style", "make0"))
    for name in split_of:
        assert torch.equal(made[name][1], style[name][1]) and torch.equal(made[name][3], content[name][3])
    assert any(content[n][3].abs().sum() > 0 for n in split_of)  # D learned in the content stage
    assert any(style[n][1].abs().sum() > 0 for n in split_of)  # B learned in the style stage
    assert any(content[n][1].abs().sum() > 0 for n in split_of)  # B learned from the auxiliary styles
    tuned = _halves(root / "make2", split_of)
    assert any(not torch.equal(tuned[n][3], made[n][3]) for n in split_of)  # the joint fine-tune moved them
    for halves in (content, style, made, tuned):  # disjoint rank components: no cross term B D in any file
        for n, (_, b, _, d) in halves.items():
            b2, d2 = b.reshape(b.shape[0], -1), d.reshape(d.shape[0], -1)
            assert torch.equal(b2 @ d2, torch.zeros(b2.shape[0], d2.shape[1])), n


def _trigger_rows(folder: Path) -> dict[str, torch.Tensor]:
    import json

    from safetensors import safe_open

    with safe_open(str(folder / "pytorch_lora_weights.safetensors"), "pt") as fh:
        info = json.loads(fh.metadata()["studio.trigger_tokens"])["text_encoder"]
        rows = fh.get_tensor("lora_trigger_embedding.text_encoder")
    return dict(zip(info["tokens"], rows))


def test_trainer_trigger_rows_are_the_stages_own(runs):
    """Each stage file carries only its user's word (the auxiliary sets' words learned too, and are dropped);
    the make step takes the subject row from the content stage and the style row from the style stage."""
    root = runs[0]
    content, style, made = (_trigger_rows(root / f) for f in ("make0/content", "make0/style", "make0"))
    assert list(content) == ["sks</w>"] and list(style) == ["zwx</w>"]
    assert list(made) == ["sks</w>", "zwx</w>"]
    assert torch.equal(made["sks</w>"], content["sks</w>"]) and torch.equal(made["zwx</w>"], style["zwx</w>"])


def test_headers_name_roles_for_the_compose_suite(runs):
    from studio.adapters import read_metadata

    root = runs[0]
    meta = read_metadata(root / "make2")
    assert meta["studio.kind"] == "combined" and meta["studio.subject_trigger"] == "sks"
    assert meta["studio.style_trigger"] == "zwx" and "checkered" not in meta["studio.style_train_shapes"]
    assert read_metadata(root / "make2" / "content")["studio.kind"] == "content"
    assert read_metadata(root / "make2" / "style")["studio.trigger"] == "zwx"


def _unet_out(pipe) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ids = pipe.tokenizer(["a sks shape on a teal background in zwx style", "a red circle"], padding="max_length",
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        cond = pipe.text_encoder(ids)[0]
        return pipe.unet(x, torch.tensor([100, 700]), cond).sample


def test_exported_lora_reproduces_the_studio(runs, tmp_path):
    """The combined adapter through the kohya and diffusers exports, loaded by vanilla diffusers."""
    from studio.adapters import load_adapter
    from studio.adapters.trigger import apply_to_vanilla
    from studio.formats import to_diffusers, to_kohya
    from studio.loading import load_pipeline

    root = runs[0]
    ours = load_pipeline("micro")
    load_adapter(ours, root / "make2", "b4m")
    want = _unet_out(ours)
    base = _unet_out(load_pipeline("micro"))
    assert (want - base).abs().max() > 1e-4  # the adapter does something
    kohya = to_kohya(root / "make2", tmp_path / "k.safetensors")
    diff_file = to_diffusers(kohya, tmp_path / "d")
    for path in (diff_file.parent, kohya):
        pipe = load_pipeline("micro")
        pipe.load_lora_weights(str(path))
        apply_to_vanilla(pipe, str(root / "make2" / "pytorch_lora_weights.safetensors"))  # kohya files have no trigger rows
        assert (_unet_out(pipe) - want).abs().max() <= 1e-4, path


# ----------------------------------------------------------------------------- bad input


def _fails(capsys, out: Path, *args: str, content: str = SUBJECT, style: str = STYLE) -> str:
    from studio.cli import main

    code = main(["train", "--method", "b4m", "--content", str(ROOT / content) if content else "", "--style",
                 str(ROOT / style) if style else "", "--base", "micro", "--out", str(out), "--no-prior",
                 "--steps-content", "1", "--steps-style", "1", "--no-register", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert not out.exists(), "nothing half-written"
    return err


def test_bad_input(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    assert "same folder" in _fails(capsys, tmp_path / "o1", style=SUBJECT)
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(ROOT / SUBJECT / "000-heart-red-solid-gray.png", one)
    assert "a set of 1 image" in _fails(capsys, tmp_path / "o2", content=str(one))
    err = _fails(capsys, tmp_path / "o3", content=STYLE, style=SUBJECT)
    assert "looks like a style set" in err and "swap" in err
    err = _fails(capsys, tmp_path / "o4", style="assets/samples/subject-star-blue")
    assert "looks like a subject" in err
    assert "style-token" in _fails(capsys, tmp_path / "o5", "--style-token", "sks")
    assert "--style" in _fails(capsys, tmp_path / "o6", style="")
    assert "must contain" in _fails(capsys, tmp_path / "o7", "--content-prompt", "a heart")


def test_resume_with_another_rank_or_base_is_refused(runs, tmp_path, capsys, monkeypatch):
    from studio.cli import main
    from studio.trainers.b4m import _stage_file_checks

    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    root = runs[0]
    copy = tmp_path / "again"
    shutil.copytree(root / "make2", copy)
    (copy / "pytorch_lora_weights.safetensors").unlink()  # the make stage "crashed"
    code = main(["train", "--method", "b4m", "--content", str(ROOT / SUBJECT), "--style", str(ROOT / STYLE),
                 "--base", "micro", "--out", str(copy), "--no-prior", "--resume", "--rank", "8", "--no-register"])
    err = capsys.readouterr().err
    assert code == 2 and "--rank 16" in err and "--rank 8" in err
    assert (copy / "content" / "pytorch_lora_weights.safetensors").exists()  # a refused resume deletes nothing
    with pytest.raises(StudioError, match="not on this base"):
        _stage_file_checks(copy / "content", 16, "sdxl", "0" * 16, "content")


def test_service_job_reports_each_stage_and_fills_the_library(tmp_path, monkeypatch):
    """The same job through the service layer: per-stage progress, library entries for all three adapters."""
    from studio import service
    from studio.library import Library

    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    m = service.JobManager()
    job = m.submit_train({"method": "b4m", "content": str(ROOT / SUBJECT), "style": str(ROOT / STYLE), "base": "micro",
                          "out": str(tmp_path / "svc"), "name": "hc", "prior": False, "steps_content": 2,
                          "steps_style": 2, "steps_make": 1, "aux_sets": 1})
    status = m.wait(job, timeout=900)
    m.shutdown()
    assert status["state"] == "done", status
    messages = [e.get("message", "") for e in m.events(job)]
    for stage in ("content", "style", "make"):
        assert any(msg.startswith(f"stage {stage}") for msg in messages), stage
    steps = [e for e in m.events(job) if e.get("phase") == "train"]
    assert [e["step"] for e in steps] == list(range(1, 6)) and all(e["total"] == 5 for e in steps)
    kinds = {r.name: r.kind for r in Library().list()}
    assert kinds.get("hc") == "combined" and kinds.get("hc-content") == "content" and kinds.get("hc-style") == "style"
