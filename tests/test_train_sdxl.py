"""SDXL on the studio trainer (tiny SDXL layout): added conditions fed, file loads in vanilla diffusers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from studio.testing import tiny_pipeline
from studio.trainers.config import TrainConfig
from studio.trainers.data import ImageItem
from studio.trainers.loop import train


@pytest.fixture(scope="module")
def wide_images(tmp_path_factory) -> Path:
    """Four 48x32 pictures: trained at 32 px they are centre-cropped 8 px from the left."""
    from studio.micro.cli import render_set

    folder = tmp_path_factory.mktemp("imgs") / "subject-heart"
    render_set(folder, 4, 1, shape="heart", color="red", texture="solid")
    for p in folder.glob("*.png"):
        Image.open(p).resize((48, 32)).save(p)
    return folder


@pytest.fixture(scope="module")
def trained(wide_images, tmp_path_factory):
    """A 4-step SDXL subject run (trigger embedding and class prior on), with the denoiser's inputs recorded."""
    from diffusers import UNet2DConditionModel

    calls: list[dict] = []
    real = UNet2DConditionModel.forward

    def spy(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
        if self.training:
            calls.append({"emb": encoder_hidden_states.detach().clone(),
                          **{k: v.detach().clone() for k, v in (kwargs.get("added_cond_kwargs") or {}).items()}})
        return real(self, sample, timestep, encoder_hidden_states, *args, **kwargs)

    root = tmp_path_factory.mktemp("sdxl-run")
    base = root / "base"
    tiny_pipeline("sdxl").save_pretrained(base, safe_serialization=True)
    cfg = TrainConfig.from_dict(dict(kind="subject", images=str(wide_images), base=str(base), out=str(root / "out"),
                                     steps=4, batch=2, rank=4, class_images=2, checkpoint_every=0, register=False,
                                     seed=3, samples=False))
    mp = pytest.MonkeyPatch()
    mp.setattr(UNet2DConditionModel, "forward", spy)
    try:
        res = train(cfg)
    finally:
        mp.undo()
    return res, calls


def test_sdxl_training_feeds_pooled_embeddings_and_time_ids(trained):
    res, calls = trained
    full = [c for c in calls if c["emb"].shape[0] == 4]  # the other calls: the base's prediction of the class rows
    assert res.steps == 4 and len(full) == 4
    first = full[0]
    # 2 instance + 2 class rows; the pooled projection of text_encoder_2 (width 16); 6 ids per row
    assert first["emb"].shape == (4, 77, 32) and first["text_embeds"].shape == (4, 16)
    ids = first["time_ids"]
    # instance images: original 32x48 (h, w), centre crop 8 px from the left (mirrored: 48 - 32 - 8 = 8),
    # trained at 32x32; class images: generated at the model's 32 px, uncropped
    assert ids[:2].tolist() == [[32, 48, 0, 8, 32, 32]] * 2
    assert ids[2:].tolist() == [[32, 32, 0, 0, 32, 32]] * 2
    # the class prompt's embeddings are the pipeline's own (class rows carry no trigger)
    pipe = tiny_pipeline("sdxl")
    emb, _, pooled, _ = pipe.encode_prompt("a object", device="cpu", num_images_per_prompt=1,
                                           do_classifier_free_guidance=False)
    torch.testing.assert_close(first["emb"][2], emb[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(first["text_embeds"][2], pooled[0], atol=1e-5, rtol=1e-5)


def _image(pipe, prompt: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=2, generator=g, output_type="pt", height=32, width=32).images


def test_sdxl_lora_loads_in_vanilla_diffusers_like_the_studio(trained):
    from studio.adapters import load_adapter
    from studio.adapters.trigger import apply_to_vanilla

    res, _ = trained
    tensors = load_file(str(res.adapter_file))
    assert any(k.startswith("unet.") and "lora_B" in k and v.abs().max() > 0 for k, v in tensors.items())
    assert {"lora_trigger_embedding.text_encoder", "lora_trigger_embedding.text_encoder_2"} <= set(tensors)

    studio_pipe = tiny_pipeline("sdxl")
    base = {p: _image(studio_pipe, p) for p in ("a sks object", "a red circle")}
    load_adapter(studio_pipe, res.out)
    vanilla = tiny_pipeline("sdxl")
    vanilla.load_lora_weights(str(res.out))  # plain diffusers: the UNet LoRA
    # without the trigger word the LoRA alone decides, and vanilla diffusers alone gives the studio's image
    plain = _image(studio_pipe, "a red circle")
    assert (plain - base["a red circle"]).abs().max() > 1e-4, "training must change the image"
    torch.testing.assert_close(_image(vanilla, "a red circle"), plain, atol=1e-5, rtol=1e-5)
    # with the trigger: vanilla plus the learned rows (one call) gives the same as the studio
    apply_to_vanilla(vanilla, str(res.adapter_file))
    torch.testing.assert_close(_image(vanilla, "a sks object"), _image(studio_pipe, "a sks object"),
                               atol=1e-5, rtol=1e-5)


def test_sdxl_time_ids_of_a_mirrored_crop():
    item = ImageItem(path=Path("x.png"), image=Image.new("RGB", (32, 32)), caption=None, original_size=(64, 40),
                     crop_xy=(5, 0))
    # resized 51x32 (64 * 0.8 = 51.2), crop 5 px from the left; mirrored: 51 - 32 - 5 = 14
    assert item.sdxl_time_ids() == (40, 64, 0, 5, 32, 32)
    assert item.sdxl_time_ids(flip=True) == (40, 64, 0, 14, 32, 32)


def test_b4m_still_refuses_sdxl(wide_images, tmp_path):
    from studio.errors import StudioError

    import shutil

    base = tmp_path / "base"
    tiny_pipeline("sdxl").save_pretrained(base, safe_serialization=True)
    style = shutil.copytree(wide_images, tmp_path / "style")
    cfg = TrainConfig.from_dict(dict(method="b4m", kind="subject", content=str(wide_images), style=str(style),
                                     images=str(wide_images), base=str(base), out=str(tmp_path / "o"),
                                     register=False))
    with pytest.raises(StudioError, match="Break-for-Make does not train on SDXL"):
        train(cfg)


def test_prior_at_a_resolution_other_than_native_generates_class_images_at_it(wide_images, tmp_path):
    """SDXL trains at 512 on CPU (native 1024): its class images must be 512 too, or the batch cannot stack."""
    import os

    base = tmp_path / "base"
    tiny_pipeline("sdxl").save_pretrained(base, safe_serialization=True)  # native 32 px
    cfg = TrainConfig.from_dict(dict(kind="subject", images=str(wide_images), base=str(base), out=str(tmp_path / "o"),
                                     steps=1, batch=1, rank=4, class_images=1, resolution=64, checkpoint_every=0,
                                     register=False, seed=3, samples=False))
    assert train(cfg).steps == 1
    cached = list((Path(os.environ["STUDIO_HOME"]) / "cache" / "class-images").glob("*/*.png"))
    assert [Image.open(p).size for p in cached] == [(64, 64)]
