"""The test matrix over every registered adapter method (PEFT's TEST_CASES pattern)."""

from __future__ import annotations

import pytest
import torch

from studio.adapters import (
    AdapterSettings, add_adapter, load_adapter, merge, methods, read_metadata, save_adapter, set_active,
    set_enabled, unmerge,
)
from studio.errors import StudioError
from studio.testing import tiny_pipeline

METHODS = sorted(methods())


def _randomize(params, seed: int) -> None:
    # fresh adapters are identities (LoRA's B = 0): give them weights that change the output
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


def _unet_out(pipe) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ids = pipe.tokenizer(["a red circle", "a blue star"], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        cond = pipe.text_encoder(ids)[0]
        return pipe.unet(x, torch.tensor([10, 500]), cond).sample


@pytest.fixture()
def pipe():
    return tiny_pipeline("sd1")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("text_encoder", [False, True])
def test_matrix(method, text_encoder, pipe, tmp_path):
    base = _unet_out(pipe)
    settings = AdapterSettings(rank=4, targets="attention+resnet", text_encoder=text_encoder)
    params = add_adapter(pipe, method, settings, "a")
    assert params and all(p.requires_grad for p in params)
    assert not any(p.requires_grad for n, p in pipe.unet.named_parameters() if ".a." not in n and not n.endswith(".a"))
    # a fresh adapter is the identity
    torch.testing.assert_close(_unet_out(pipe), base, atol=1e-6, rtol=0)
    _randomize(params, 1)
    adapted = _unet_out(pipe)
    assert (adapted - base).abs().max() > 1e-3, "a non-identity adapter must change the output"

    set_enabled(pipe, False)
    torch.testing.assert_close(_unet_out(pipe), base, atol=1e-6, rtol=0)
    set_enabled(pipe, True)

    merge(pipe, ["a"])
    torch.testing.assert_close(_unet_out(pipe), adapted, atol=1e-4, rtol=1e-4)
    unmerge(pipe)
    torch.testing.assert_close(_unet_out(pipe), adapted, atol=1e-5, rtol=1e-5)

    path = save_adapter(pipe, tmp_path / "ad", "a", metadata={"trigger": "sks", "kind": "subject"})
    meta = read_metadata(path)
    assert meta["studio.method"] == method and meta["studio.trigger"] == "sks"
    fresh = tiny_pipeline("sd1")
    load_adapter(fresh, tmp_path / "ad", "a")
    torch.testing.assert_close(_unet_out(fresh), adapted, atol=0, rtol=0)  # save -> load is exact

    # two adapters at once: both deltas apply, and the result differs from either alone
    params_b = add_adapter(pipe, method, settings, "b")
    _randomize(params_b, 2)
    set_active(pipe, ["b"])
    only_b = _unet_out(pipe)
    set_active(pipe, ["a", "b"])
    both = _unet_out(pipe)
    assert (both - adapted).abs().max() > 1e-3 and (both - only_b).abs().max() > 1e-3
    merge(pipe, ["a", "b"])
    torch.testing.assert_close(_unet_out(pipe), both, atol=1e-4, rtol=1e-4)
    unmerge(pipe)


def test_lora_file_loads_in_vanilla_diffusers(pipe, tmp_path):
    params = add_adapter(pipe, "lora", AdapterSettings(rank=4, text_encoder=True), "default")
    _randomize(params, 3)
    want = _unet_out(pipe)
    save_adapter(pipe, tmp_path / "ad", "default")
    fresh = tiny_pipeline("sd1")
    fresh.load_lora_weights(str(tmp_path / "ad"))  # plain diffusers, no studio code
    torch.testing.assert_close(_unet_out(fresh), want, atol=1e-5, rtol=1e-5)


def test_bad_settings(pipe):
    with pytest.raises(StudioError, match="--rank 999"):
        add_adapter(pipe, "lora", AdapterSettings(rank=999), "x")
    with pytest.raises(StudioError, match="--method"):
        add_adapter(pipe, "nope", AdapterSettings(), "x")
    with pytest.raises(StudioError, match="--rank"):
        AdapterSettings(rank=0)
    with pytest.raises(StudioError, match="--targets"):
        AdapterSettings(targets="everything")


def _te_out(pipe, prompts=("a red circle", "a sks circle")) -> torch.Tensor:
    ids = pipe.tokenizer(list(prompts), padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def test_trigger_embedding_touches_only_prompts_with_the_trigger(pipe, tmp_path):
    from studio.adapters import add_trigger_embedding, remove_adapter
    from studio.adapters.trigger import apply_to_vanilla

    base = _te_out(pipe)
    add_adapter(pipe, "lora", AdapterSettings(rank=2), "default")
    rows = add_trigger_embedding(pipe, "sks", "default")
    assert _te_out(pipe).equal(base)  # starts at the base rows
    with torch.no_grad():
        rows[0].add_(torch.randn(rows[0].shape) * 0.5)
    learned = _te_out(pipe)
    assert learned[0].equal(base[0])  # no trigger: untouched
    assert not torch.allclose(learned[1], base[1])
    set_enabled(pipe, False)
    assert _te_out(pipe).equal(base)
    set_enabled(pipe, True)
    save_adapter(pipe, tmp_path / "ad", "default")
    remove_adapter(pipe, "default")
    assert _te_out(pipe).equal(base)  # the base rows were never written

    load_adapter(pipe, tmp_path / "ad", "again")
    torch.testing.assert_close(_te_out(pipe), learned, atol=0, rtol=0)
    fresh = tiny_pipeline("sd1")  # vanilla diffusers + one call for the rows gives the same
    fresh.load_lora_weights(str(tmp_path / "ad"))
    apply_to_vanilla(fresh, str(tmp_path / "ad" / "pytorch_lora_weights.safetensors"))
    torch.testing.assert_close(_te_out(fresh), learned, atol=1e-6, rtol=1e-6)


def test_switching_adapters_off_and_on_keeps_requires_grad(pipe):
    """PEFT's switch flips requires_grad; the studio's keeps each parameter's own (a frozen part stays frozen)."""
    from studio.adapters import remove_adapter

    params = add_adapter(pipe, "lora", AdapterSettings(rank=2), "default")
    frozen = params[: len(params) // 2]
    for p in frozen:
        p.requires_grad_(False)
    before = [p.requires_grad for p in params]
    set_enabled(pipe, False)
    set_enabled(pipe, True)
    assert [p.requires_grad for p in params] == before and True in before and False in before
    remove_adapter(pipe, "default")


def test_trigger_embedding_can_start_from_another_word(pipe):
    """--init-word: the trigger starts where the base reads that word (textual inversion's initializer)."""
    from studio.adapters import add_trigger_embedding, remove_adapter

    add_adapter(pipe, "lora", AdapterSettings(rank=2), "default")
    add_trigger_embedding(pipe, "sks", "default", init_word="square")
    got = _te_out(pipe, ("a sks circle",))
    remove_adapter(pipe, "default")
    torch.testing.assert_close(got, _te_out(pipe, ("a square circle",)), atol=1e-6, rtol=0)
    assert not torch.allclose(got, _te_out(pipe, ("a sks circle",)))


def test_mixing_applies_the_trigger_embedding_by_weight(pipe, tmp_path):
    from studio.adapters import add_trigger_embedding
    from studio.mixing import mixed

    base = _te_out(pipe)
    _randomize(add_adapter(pipe, "lora", AdapterSettings(rank=2), "default"), 4)
    with torch.no_grad():
        add_trigger_embedding(pipe, "sks", "default")[0].add_(0.5)
    learned = _te_out(pipe)
    save_adapter(pipe, tmp_path / "ad", "default")
    fresh = tiny_pipeline("sd1")
    with mixed(fresh, [str(tmp_path / "ad")]):
        torch.testing.assert_close(_te_out(fresh), learned)
    assert _te_out(fresh).equal(base)
    with mixed(fresh, [f"{tmp_path / 'ad'}:0"]):
        assert _te_out(fresh).equal(base)


def test_written_files_follow_the_umask_not_safetensors_0600(tmp_path):
    """safetensors creates 0600 files; adapters and checkpoints are shared like other files."""
    import os

    from studio.fileio import write_safetensors

    old = os.umask(0o022)
    try:
        path = write_safetensors(tmp_path / "sub" / "a.safetensors", {"w": torch.zeros(2)}, {"k": "v"})
    finally:
        os.umask(old)
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    assert [p.name for p in path.parent.iterdir()] == ["a.safetensors"]  # no temp file left
