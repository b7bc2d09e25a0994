"""DECOR (issue 8): the projector's invariants, the pipeline path against the math by hand, the CLI faces.

Invariants: P is an orthogonal projector (P P = P, P = P^T); alpha 0 is the identity exactly;
at alpha 1 the projected rows are orthogonal to the unwanted basis and the other rows are
untouched; the hooked pipeline's prompt embeddings (and images) equal the function applied by
hand to the encoder outputs; SDXL projects each encoder's part in its own space.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from studio.errors import StudioError
from studio.testing import tiny_pipeline
from studio.text.decor import (
    DecorConfig, decompose, orthonormal_basis, project, projector, row_mask, split_phrases, unwanted_share,
)
from studio.text.pipeline import apply_decor, decor_applied, encode, project_embeddings, remove_decor

PROMPT = "a red circle on a white background"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def sd1():
    return tiny_pipeline("sd1")


@pytest.fixture(scope="module")
def sdxl():
    return tiny_pipeline("sdxl")


# ----------------------------------------------------------------------------- the math


def _vectors(k: int = 3, d: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(k, d, generator=torch.Generator().manual_seed(seed))


def test_projector_is_an_orthogonal_projector():
    basis, s = orthonormal_basis(_vectors())
    p = projector(basis)
    assert basis.shape == (3, 16) and s.shape == (3,)
    assert torch.allclose(p @ p, p, atol=1e-12)
    assert torch.allclose(p, p.T, atol=1e-12)
    assert abs(float(torch.trace(p)) - 3) < 1e-10
    # it reproduces the vectors it was built from: they lie in the span
    v = _vectors().double()
    assert torch.allclose(v @ p, v, atol=1e-10)


def test_basis_drops_dependent_vectors_and_caps_rank():
    v = _vectors(2)
    three = torch.cat([v, (v[0] + 2 * v[1]).unsqueeze(0)])
    assert orthonormal_basis(three)[0].shape[0] == 2
    assert orthonormal_basis(three, rank=1)[0].shape[0] == 1
    assert orthonormal_basis(torch.zeros(2, 5))[0].shape[0] == 0


def test_alpha_zero_is_the_identity_exactly():
    x = torch.randn(2, 7, 16)
    basis = orthonormal_basis(_vectors())[0]
    rows = torch.rand(2, 7) > 0.5
    assert project(x, basis, 0.0, rows) is x
    assert project(x, basis, 0.0) is x
    assert project(x, basis[:0], 1.0) is x  # an empty basis removes nothing


def test_projected_rows_are_orthogonal_and_others_untouched():
    x = torch.randn(2, 7, 16)
    basis = orthonormal_basis(_vectors())[0]
    rows = torch.tensor([[0, 1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    y = project(x, basis, 1.0, rows)
    assert (y[rows].double() @ basis.T).abs().max() < 1e-5
    assert torch.equal(y[~rows], x[~rows])


def test_partial_alpha_is_x_times_i_minus_alpha_p():
    x = torch.randn(7, 16, dtype=torch.float64)
    basis = orthonormal_basis(_vectors())[0]
    want = x @ (torch.eye(16, dtype=torch.float64) - 0.3 * projector(basis))
    assert torch.allclose(project(x, basis, 0.3), want, atol=1e-12)
    # fp16 embeddings are projected in fp32 and come back in fp16
    h = project(x.half(), basis, 0.3)
    assert h.dtype == torch.float16 and torch.allclose(h.double(), want, atol=2e-2)


def test_row_mask():
    bos, eos = 100, 101
    ids = torch.tensor([[bos, 5, 6, eos, eos, eos], [bos, 5, eos, 0, 0, 0], [bos, 5, 6, 7, 8, 9]])
    words = row_mask(ids, bos, eos, "words")
    assert words.tolist() == [[0, 1, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0], [0, 1, 1, 1, 1, 1]]
    assert row_mask(ids, bos, eos, "words+end").tolist() == [[0, 1, 1, 1, 1, 1]] * 3
    assert row_mask(ids, bos, eos, "all").all()
    with pytest.raises(StudioError, match="--decor-rows"):
        row_mask(ids, bos, eos, "eos")


def test_config_validation():
    assert DecorConfig("circle, red").unwanted == ("circle", "red")
    assert DecorConfig(("a red circle", " ")).unwanted == ("a red circle",)
    assert split_phrases(" red ,, blue ") == ("red", "blue")
    assert DecorConfig("red", alpha=0.5).text == "red"
    for kwargs, match in [({"unwanted": " , "}, "--decor"), ({"unwanted": "red", "alpha": 1.5}, "--decor-alpha"),
                          ({"unwanted": "red", "rows": "eos"}, "--decor-rows"),
                          ({"unwanted": "red", "rank": 0}, "--decor-rank")]:
        with pytest.raises(StudioError, match=match):
            DecorConfig(**kwargs)


def test_decompose_reconstructs_and_shares():
    v = _vectors(4, 8)
    c = decompose(v, list("abcd"))
    assert torch.allclose(c.loadings @ c.basis, v.double(), atol=1e-10)
    assert abs(float(c.energy.sum()) - 1) < 1e-12
    assert c.top_tokens(0, 2)[0][0] in "abcd"
    basis = orthonormal_basis(v[:1])[0]
    share = unwanted_share(v, basis)
    assert abs(float(share[0]) - 1) < 1e-10 and bool((share <= 1 + 1e-12).all())


# ----------------------------------------------------------------------------- the pipeline path


def _by_hand_sd(pipe, config: DecorConfig, prompt: str) -> torch.Tensor:
    """The encoder outputs of ``prompt`` projected by hand: text encoder -> word rows -> SVD -> X (I - aP)."""
    tok, te = pipe.tokenizer, pipe.text_encoder

    def run(texts):
        ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        with torch.no_grad():
            return ids, te(ids)[0]

    ids, u = run(list(config.unwanted))
    # word tokens: after BOS, before the first EOS
    words = torch.stack([(torch.arange(ids.shape[1]) > 0) & (torch.arange(ids.shape[1]) < int((r == tok.eos_token_id)
                                                                                              .int().argmax()))
                         for r in ids])
    basis = orthonormal_basis(u[words])[0]
    pids, x = run([prompt])
    n_words = len(tok(prompt, add_special_tokens=False).input_ids)
    p = projector(basis).float()
    y = x.clone()
    y[0, 1:1 + n_words] = x[0, 1:1 + n_words] @ (torch.eye(p.shape[0]) - config.alpha * p)
    return y


def test_pipeline_path_equals_the_function_by_hand(sd1):
    config = DecorConfig("circle, red", alpha=0.8)
    want = _by_hand_sd(sd1, config, PROMPT)
    with torch.no_grad(), decor_applied(sd1, config):
        embeds, negative = sd1.encode_prompt(PROMPT, "cpu", 2, True, "blurry")
    base, base_neg = type(sd1).encode_prompt(sd1, PROMPT, "cpu", 2, True, "blurry")
    assert torch.allclose(embeds[0], want[0], atol=1e-5) and torch.allclose(embeds[1], want[0], atol=1e-5)
    assert torch.equal(negative, base_neg)  # the negative prompt is never projected
    assert not torch.allclose(embeds, base, atol=1e-3)
    assert "encode_prompt" not in vars(sd1)  # the hook left with the context


def test_pipeline_images_equal_projected_embeddings_by_hand(sd1):
    config = DecorConfig("circle, red", alpha=1.0, rows="words+end")
    kw = dict(num_inference_steps=2, guidance_scale=2.0, output_type="pt")
    with torch.no_grad():
        with decor_applied(sd1, config):
            hooked = sd1(PROMPT, generator=torch.Generator().manual_seed(1), **kw).images
        x, _ = encode(sd1, [PROMPT])
        embeds, _ = project_embeddings(sd1, config, [PROMPT], x)
        neg, _ = encode(sd1, [""])
        by_hand = sd1(prompt_embeds=embeds, negative_prompt_embeds=neg, generator=torch.Generator().manual_seed(1),
                      **kw).images
        plain = sd1(PROMPT, generator=torch.Generator().manual_seed(1), **kw).images
    assert torch.allclose(hooked, by_hand, atol=1e-6)
    assert (hooked - plain).abs().max() > 1e-4


def test_generate_records_decor_and_alpha_zero_is_the_base(sd1):
    from studio.generation import GenerationParams, generate

    kw = {"prompt": PROMPT, "steps": 2, "seed": 3, "guidance": 2.0}
    base = generate(sd1, GenerationParams(**kw))
    zero = generate(sd1, GenerationParams(**kw, decor="circle, red", decor_alpha=0.0))
    full = generate(sd1, GenerationParams(**kw, decor="circle, red", decor_alpha=1.0, decor_rows="words+end"))
    a, b, c = (np.asarray(x[0]).astype(int) for x in (base, zero, full))
    assert np.abs(a - b).max() == 0 and np.abs(a - c).max() > 0
    info = full[0].info["parameters"]
    assert 'DECOR: "circle, red", DECOR alpha: 1, DECOR rows: words+end' in info
    assert "DECOR" not in base[0].info["parameters"]
    with pytest.raises(StudioError, match="--decor-alpha"):
        GenerationParams(**kw, decor="red", decor_alpha=2.0).validate()


def test_decor_composes_with_a_text_encoder_adapter(sd1, tmp_path):
    """Under a mix, the basis and the prompt both come from the adapted encoder: still orthogonal at alpha 1."""
    from studio.adapters import AdapterSettings, add_adapter, save_adapter
    from studio.mixing import Mixer

    donor = tiny_pipeline("sd1")
    params = add_adapter(donor, "lora", AdapterSettings(rank=2, targets="attention", text_encoder=True), "a")
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) * 0.3)
    save_adapter(donor, tmp_path / "te", "a", metadata={"base_family": "sd1"})
    config = DecorConfig("red", alpha=1.0)
    with torch.no_grad():
        plain = _by_hand_sd(sd1, config, PROMPT)
        with Mixer(sd1, [str(tmp_path / "te")]):
            want = _by_hand_sd(sd1, config, PROMPT)
            with decor_applied(sd1, config):
                got = sd1.encode_prompt(PROMPT, "cpu", 1, False)[0]
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(want, plain, atol=1e-4)  # the adapter did change the encoder


def test_sdxl_projects_each_encoder_in_its_own_space(sdxl):
    config = DecorConfig("circle, red", alpha=1.0, pooled=True)
    with torch.no_grad():
        x, pooled = encode(sdxl, [PROMPT])
        u, u_pooled = encode(sdxl, ["circle", "red"])
        with decor_applied(sdxl, config):
            embeds, _, got_pooled, _ = sdxl.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1,
                                                          do_classifier_free_guidance=True)
    widths = [sdxl.text_encoder.config.hidden_size, sdxl.text_encoder_2.config.hidden_size]
    assert embeds.shape[-1] == sum(widths)
    n_words = len(sdxl.tokenizer(PROMPT, add_special_tokens=False).input_ids)
    start = 0
    for w in widths:
        basis = orthonormal_basis(u[:, 1, start:start + w])[0]  # "circle" and "red" are one token each
        part, orig = embeds[0, :, start:start + w], x[0, :, start:start + w]
        assert (part[1:1 + n_words].double() @ basis.T).abs().max() < 1e-4
        assert torch.equal(part[1 + n_words:], orig[1 + n_words:]) and torch.equal(part[0], orig[0])
        start += w
    pooled_basis = orthonormal_basis(u_pooled)[0]
    assert (got_pooled.double() @ pooled_basis.T).abs().max() < 1e-4
    # without the option the pooled embedding is left alone
    with torch.no_grad(), decor_applied(sdxl, DecorConfig("circle, red")):
        assert torch.equal(sdxl.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)[2], pooled)


def test_hook_front_door(sd1):
    hook = apply_decor(sd1, DecorConfig("red"))
    try:
        with pytest.raises(StudioError, match="already applied"):
            apply_decor(sd1, DecorConfig("blue"))
    finally:
        remove_decor(sd1)
    assert "encode_prompt" not in vars(sd1) and hook.pipe is sd1
    remove_decor(sd1)  # nothing applied: nothing happens
    with pytest.raises(StudioError, match="no CLIP prompt embeddings"):
        apply_decor(tiny_pipeline("ldm"), DecorConfig("red"))


# ----------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def sd1_dir(tmp_path_factory):
    from studio.testing import save_tiny

    return save_tiny("sd1", tmp_path_factory.mktemp("tiny") / "sd1")


def test_cli_analyze_and_generate(sd1_dir, tmp_path, capsys):
    from PIL import Image

    from studio.cli import main

    plot = tmp_path / "a.png"
    assert main(["decor", "analyze", "--base", str(sd1_dir), "--prompt", PROMPT, "--decor", "circle, red",
                 "--plot", str(plot), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    enc = out["encoders"][0]
    assert enc["tokens"] == ["a", "red", "circle", "on", "a", "white", "background"]
    assert len(enc["singular_values"]) == 7 and enc["singular_values"] == sorted(enc["singular_values"], reverse=True)
    # "red" in the prompt is not "red" alone (a causal encoder reads "a" first), but mostly in its span
    assert enc["unwanted_rank"] == 2 and enc["unwanted_share"][1] > 0.8
    with Image.open(plot) as im:
        assert im.format == "PNG" and im.width > 100

    assert main(["decor", "analyze", "--base", str(sd1_dir), "--prompt", PROMPT, "--plot", str(plot)]) == 0
    table = capsys.readouterr().out
    assert "text_encoder: 7 tokens" in table and "sigma" in table

    args = ["generate", "--base", str(sd1_dir), "--prompt", PROMPT, "--steps", "2", "--seed", "1",
            "--out", str(tmp_path / "g")]
    assert main(args + ["--decor", "circle, red", "--decor-alpha", "0.5"]) == 0
    png = capsys.readouterr().out.strip().splitlines()[-1]
    with Image.open(png) as im:
        assert 'DECOR: "circle, red", DECOR alpha: 0.5' in im.info["parameters"]
    assert main(args + ["--decor", "red", "--decor-alpha", "1.5"]) == 2
    assert "--decor-alpha 1.5" in capsys.readouterr().err


# ----------------------------------------------------------------------------- training


def test_training_prompts_are_projected(sd1):
    from studio.trainers.config import TrainConfig
    from studio.trainers.loop import TextCache

    cfg = TrainConfig(kind="style", images="x", decor="circle, red", decor_alpha=0.8)
    cfg.validate()
    assert cfg.decor_config() == DecorConfig("circle, red", alpha=0.8)
    assert TrainConfig(images="x").decor_config() is None
    with pytest.raises(StudioError, match="--decor-alpha"):
        TrainConfig(images="x", decor="red", decor_alpha=-0.1).validate()
    prompts = [PROMPT + " in zwx style", "a blue square in zwx style"]
    with torch.no_grad():
        got = TextCache(sd1, train_text=False, decor=cfg.decor_config()).embed(prompts)
        plain = TextCache(sd1, train_text=False).embed(prompts)
        assert torch.allclose(got[0], _by_hand_sd(sd1, cfg.decor_config(), prompts[0])[0], atol=1e-5)
        assert torch.allclose(got[1], _by_hand_sd(sd1, cfg.decor_config(), prompts[1])[0], atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-4)


def test_centred_projection_keeps_the_reference_mean(sd1):
    c = torch.randn(16)
    x = torch.randn(5, 16)
    basis = orthonormal_basis(_vectors() - c)[0]
    y = project(x, basis, 1.0, center=c)
    assert ((y - c).double() @ basis.T).abs().max() < 1e-5
    assert torch.equal(project(x, basis, 0.0, center=c), x)
    assert torch.allclose(project(c.unsqueeze(0), basis, 1.0, center=c), c.unsqueeze(0), atol=1e-6)
    # on a pipeline: the word rows, less the reference mean, are orthogonal to the centred basis
    from studio.text.pipeline import unwanted_bases

    config = DecorConfig("circle, red", center=True)
    bases = unwanted_bases(sd1, config)
    with torch.no_grad(), decor_applied(sd1, config):
        got = sd1.encode_prompt(PROMPT, "cpu", 1, False)[0]
    n_words = len(sd1.tokenizer(PROMPT, add_special_tokens=False).input_ids)
    rows = got[0, 1:1 + n_words] - bases.centers[0]
    assert (rows.double() @ bases.per_segment[0].T).abs().max() < 1e-4
