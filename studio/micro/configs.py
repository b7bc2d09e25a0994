"""Architectures of the micro model (and of the tiny one the pre-training smoke test uses)."""

from __future__ import annotations

from typing import Any

from studio.micro.world import BACKGROUNDS, COLORS, ENGLISH_WORDS, SHAPES, TEXTURES

# Sampling defaults of the committed weights. Guidance 2.5 was chosen by sweeping
# `studio eval base --guidance G` over 2..7.5 (docs/micro.md has the table): a small model
# trained with 10% caption dropout over-saturates at the usual 7.5.
SAMPLING = {"steps": 20, "guidance": 2.5}
LATENT_FACTOR = 4  # 64x64 images -> 16x16 latents: stripes and dots must survive the VAE

MICRO: dict[str, dict[str, Any]] = {
    "vae": dict(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(24, 48, 64), layers_per_block=1, norm_num_groups=8,
    ),
    "unet": dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16,
    ),
    "text_encoder": dict(
        hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=64, hidden_act="quick_gelu",
    ),
}

# The smoke test's model: same families of classes, a fraction of the width.
TINY: dict[str, dict[str, Any]] = {
    "vae": dict(MICRO["vae"], block_out_channels=(8, 8, 8), norm_num_groups=4),
    "unet": dict(MICRO["unet"], block_out_channels=(8, 16, 16), norm_num_groups=4,
                 cross_attention_dim=16, attention_head_dim=2),
    "text_encoder": dict(MICRO["text_encoder"], hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, projection_dim=16),
}

SCHEDULER: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", steps_offset=1, clip_sample=False,
)


def vocabulary() -> list[str]:
    """Every word the micro tokenizer keeps whole."""
    return sorted(set(ENGLISH_WORDS) | set(SHAPES) | set(COLORS) | set(BACKGROUNDS) | set(TEXTURES))
