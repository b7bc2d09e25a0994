"""Seeded tiny models of every supported family, for tests and for trying the loaders offline.

Each builder returns an ordinary diffusers pipeline whose components are built from small
configs (the pattern of diffusers' own tests), with a CLIP BPE tokenizer written to disk and
loaded back with ``CLIPTokenizer.from_pretrained(folder, local_files_only=True)``.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from studio.micro.configs import vocabulary
from studio.micro.tokenizer import load_tokenizer, write_tokenizer

FAMILIES: tuple[str, ...] = ("sd1", "sd2", "sdxl", "ldm")


@lru_cache(maxsize=None)
def _tokenizer_dir(pad: str) -> Path:
    folder = Path(tempfile.mkdtemp(prefix=f"studio-tok-{'bang' if pad == '!' else 'eos'}-"))
    # one folder per process and pad token: gone when the process ends (tests make hundreds)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    write_tokenizer(folder, vocabulary())
    if pad == "!":
        # SD 2.x pads with "!" rather than <|endoftext|>
        import json

        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        cfg["pad_token"] = "!"
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


def tiny_tokenizer(pad: str = "<|endoftext|>"):
    """A CLIP tokenizer over the micro vocabulary (about a thousand tokens)."""
    return load_tokenizer(_tokenizer_dir(pad))


def _clip_text(hidden: int, layers: int, act: str, tok, projection: int | None = None, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=2, max_position_embeddings=77, hidden_act=act, projection_dim=projection or hidden,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def _vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32,
    )


def tiny_sd1(seed: int = 0):
    """SD 1.x layout: CLIP-L-like text encoder (quick_gelu), epsilon prediction."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=8,
    )
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(
        vae=_vae(seed), text_encoder=_clip_text(16, 2, "quick_gelu", tok, seed=seed), tokenizer=tok, unet=unet,
        scheduler=sched, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def tiny_sd2(seed: int = 0):
    """SD 2.x layout: OpenCLIP-like text encoder (gelu), linear projections, v-prediction."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tok = tiny_tokenizer(pad="!")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8,
    )
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction")
    return StableDiffusionPipeline(
        vae=_vae(seed), text_encoder=_clip_text(24, 2, "gelu", tok, seed=seed), tokenizer=tok, unet=unet,
        scheduler=sched, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def tiny_sdxl(seed: int = 0):
    """SDXL layout: two text encoders (the second with a projection), size/crop added conditions."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tok = tiny_tokenizer()
    tok2 = tiny_tokenizer(pad="!")
    te1 = _clip_text(16, 2, "quick_gelu", tok, seed=seed)
    te2 = _clip_text(16, 2, "gelu", tok2, projection=16, seed=seed + 1)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=8 * 6 + 16,
        cross_attention_dim=32, norm_num_groups=8,
    )
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(
        vae=_vae(seed), text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2, unet=unet,
        scheduler=sched, force_zeros_for_empty_prompt=True,
    )


def tiny_ldm(seed: int = 0):
    """Latent diffusion (LDMTextToImagePipeline): VQ autoencoder, UNet, a text transformer."""
    from diffusers import DDIMScheduler, LDMTextToImagePipeline, UNet2DConditionModel

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    vq = _vq(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=4, in_channels=3, out_channels=3,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=8,
    )
    sched = DDIMScheduler(beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False)
    return LDMTextToImagePipeline(vqvae=vq, bert=_clip_text(16, 2, "quick_gelu", tok, seed=seed), tokenizer=tok,
                                  unet=unet, scheduler=sched)


def _vq(seed: int):
    from diffusers import VQModel

    torch.manual_seed(seed)
    # four levels: factor 8, which LDM pipelines assume (they divide the size by 8 themselves)
    return VQModel(block_out_channels=(8, 8, 16, 16), in_channels=3, out_channels=3, latent_channels=3,
                   norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 4,
                   up_block_types=("UpDecoderBlock2D",) * 4, num_vq_embeddings=32, sample_size=32)


def tiny_ldm_uncond(seed: int = 0):
    """Unconditional latent diffusion (LDMPipeline): VQ autoencoder + UNet2DModel, no text."""
    from diffusers import DDIMScheduler, LDMPipeline, UNet2DModel

    vq = _vq(seed)
    torch.manual_seed(seed)
    unet = UNet2DModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=4, in_channels=3,
                       out_channels=3, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
    return LDMPipeline(vqvae=vq, unet=unet, scheduler=DDIMScheduler(clip_sample=False))


BUILDERS = {"sd1": tiny_sd1, "sd2": tiny_sd2, "sdxl": tiny_sdxl, "ldm": tiny_ldm, "ldm-uncond": tiny_ldm_uncond}


def tiny_pipeline(family: str, seed: int = 0):
    """A seeded tiny pipeline of ``family`` (sd1, sd2, sdxl, ldm, or ldm-uncond)."""
    if family not in BUILDERS:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(BUILDERS)}")
    pipe = BUILDERS[family](seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny(family: str, folder: str | Path, seed: int = 0) -> Path:
    """Build a tiny ``family`` pipeline and save it as a diffusers folder; returns the folder."""
    folder = Path(folder)
    tiny_pipeline(family, seed).save_pretrained(folder, safe_serialization=True)
    return folder
