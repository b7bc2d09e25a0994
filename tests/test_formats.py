"""studio.formats: LoRA files between the diffusers and kohya layouts, original-LDM names, LyCORIS.

Key names are checked against names of real sd-scripts files written out below (not against our
own reader), on the real SD 1.5 / SDXL module name spaces built on the meta device; numbers are
checked against the pipeline's own outputs, vanilla diffusers' loader and direct computations.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from studio.errors import StudioError
from studio.formats import detect_lora_format, load_lycoris_into, lycoris_delta, read_lora, to_diffusers, to_kohya
from studio.formats.kohya import ADAPTER_METADATA_KEY, KohyaNames, bundled_unet_config, text_model_prefix
from studio.single_file import CONFIGS_DIR, FAMILY_CONFIGS
from studio.testing import tiny_pipeline


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread, and a busy machine does not oversubscribe."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------
# real sd-scripts names (networks/lora.py: lora_unet / lora_te / lora_te1 / lora_te2 + module path
# with dots as underscores; SD 1.x UNet paths like diffusers, SDXL ones like the original LDM UNet,
# text encoders after transformers 4's ``text_model.encoder.layers.N``)
# ----------------------------------------------------------------------------------------------

SD1_NAMES: list[tuple[str, str, str]] = [  # kohya name, component, diffusers module
    ("lora_unet_down_blocks_0_attentions_0_proj_in", "unet", "down_blocks.0.attentions.0.proj_in"),
    ("lora_unet_down_blocks_0_attentions_0_proj_out", "unet", "down_blocks.0.attentions.0.proj_out"),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", "unet",
     "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k", "unet",
     "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v", "unet",
     "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v"),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0", "unet",
     "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"),
    ("lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_k", "unet",
     "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k"),
    ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj", "unet",
     "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj"),
    ("lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_ff_net_2", "unet",
     "down_blocks.1.attentions.1.transformer_blocks.0.ff.net.2"),
    ("lora_unet_down_blocks_2_attentions_1_transformer_blocks_0_attn2_to_out_0", "unet",
     "down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_out.0"),
    ("lora_unet_mid_block_attentions_0_proj_in", "unet", "mid_block.attentions.0.proj_in"),
    ("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q", "unet",
     "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"),
    ("lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj", "unet",
     "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj"),
    ("lora_unet_up_blocks_1_attentions_0_proj_in", "unet", "up_blocks.1.attentions.0.proj_in"),
    ("lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_v", "unet",
     "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_v"),
    ("lora_unet_up_blocks_2_attentions_1_transformer_blocks_0_ff_net_2", "unet",
     "up_blocks.2.attentions.1.transformer_blocks.0.ff.net.2"),
    ("lora_unet_up_blocks_3_attentions_2_proj_out", "unet", "up_blocks.3.attentions.2.proj_out"),
    ("lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0", "unet",
     "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0"),
    # LoCon (conv_dim): resnets, down/upsamplers
    ("lora_unet_down_blocks_0_resnets_0_conv1", "unet", "down_blocks.0.resnets.0.conv1"),
    ("lora_unet_down_blocks_0_resnets_0_conv2", "unet", "down_blocks.0.resnets.0.conv2"),
    ("lora_unet_down_blocks_0_resnets_0_time_emb_proj", "unet", "down_blocks.0.resnets.0.time_emb_proj"),
    ("lora_unet_down_blocks_1_resnets_0_conv_shortcut", "unet", "down_blocks.1.resnets.0.conv_shortcut"),
    ("lora_unet_down_blocks_0_downsamplers_0_conv", "unet", "down_blocks.0.downsamplers.0.conv"),
    ("lora_unet_up_blocks_0_upsamplers_0_conv", "unet", "up_blocks.0.upsamplers.0.conv"),
    ("lora_unet_mid_block_resnets_1_conv2", "unet", "mid_block.resnets.1.conv2"),
    # text encoder (CLIP ViT-L, 12 layers)
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", "text_encoder", "encoder.layers.0.self_attn.q_proj"),
    ("lora_te_text_model_encoder_layers_0_self_attn_k_proj", "text_encoder", "encoder.layers.0.self_attn.k_proj"),
    ("lora_te_text_model_encoder_layers_0_self_attn_v_proj", "text_encoder", "encoder.layers.0.self_attn.v_proj"),
    ("lora_te_text_model_encoder_layers_0_self_attn_out_proj", "text_encoder",
     "encoder.layers.0.self_attn.out_proj"),
    ("lora_te_text_model_encoder_layers_0_mlp_fc1", "text_encoder", "encoder.layers.0.mlp.fc1"),
    ("lora_te_text_model_encoder_layers_5_self_attn_out_proj", "text_encoder",
     "encoder.layers.5.self_attn.out_proj"),
    ("lora_te_text_model_encoder_layers_11_mlp_fc2", "text_encoder", "encoder.layers.11.mlp.fc2"),
]

SDXL_LDM_NAMES: list[tuple[str, str, str]] = [
    ("lora_unet_input_blocks_4_1_proj_in", "unet", "down_blocks.1.attentions.0.proj_in"),
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "unet",
     "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
    ("lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k", "unet",
     "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"),
    ("lora_unet_input_blocks_5_1_transformer_blocks_1_ff_net_0_proj", "unet",
     "down_blocks.1.attentions.1.transformer_blocks.1.ff.net.0.proj"),
    ("lora_unet_input_blocks_7_1_transformer_blocks_9_ff_net_2", "unet",
     "down_blocks.2.attentions.0.transformer_blocks.9.ff.net.2"),
    ("lora_unet_input_blocks_8_1_proj_out", "unet", "down_blocks.2.attentions.1.proj_out"),
    ("lora_unet_middle_block_1_proj_in", "unet", "mid_block.attentions.0.proj_in"),
    ("lora_unet_middle_block_1_transformer_blocks_0_attn1_to_out_0", "unet",
     "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0"),
    ("lora_unet_middle_block_1_transformer_blocks_9_attn2_to_v", "unet",
     "mid_block.attentions.0.transformer_blocks.9.attn2.to_v"),
    ("lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_k", "unet",
     "up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"),
    ("lora_unet_output_blocks_2_1_transformer_blocks_9_ff_net_2", "unet",
     "up_blocks.0.attentions.2.transformer_blocks.9.ff.net.2"),
    ("lora_unet_output_blocks_3_1_proj_out", "unet", "up_blocks.1.attentions.0.proj_out"),
    ("lora_unet_output_blocks_5_1_transformer_blocks_1_attn2_to_out_0", "unet",
     "up_blocks.1.attentions.2.transformer_blocks.1.attn2.to_out.0"),
    # LoCon on the SGM UNet: ResBlock in_layers.2 / emb_layers.1 / out_layers.3 / skip_connection, Downsample op
    ("lora_unet_input_blocks_1_0_in_layers_2", "unet", "down_blocks.0.resnets.0.conv1"),
    ("lora_unet_input_blocks_1_0_emb_layers_1", "unet", "down_blocks.0.resnets.0.time_emb_proj"),
    ("lora_unet_input_blocks_1_0_out_layers_3", "unet", "down_blocks.0.resnets.0.conv2"),
    ("lora_unet_input_blocks_4_0_skip_connection", "unet", "down_blocks.1.resnets.0.conv_shortcut"),
    ("lora_unet_input_blocks_3_0_op", "unet", "down_blocks.0.downsamplers.0.conv"),
    ("lora_unet_output_blocks_2_2_conv", "unet", "up_blocks.0.upsamplers.0.conv"),
    ("lora_unet_output_blocks_8_0_skip_connection", "unet", "up_blocks.2.resnets.2.conv_shortcut"),
    ("lora_unet_middle_block_0_in_layers_2", "unet", "mid_block.resnets.0.conv1"),
    # two text encoders: CLIP ViT-L (12 layers) and OpenCLIP ViT-bigG (32 layers)
    ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "text_encoder", "encoder.layers.0.self_attn.q_proj"),
    ("lora_te1_text_model_encoder_layers_11_mlp_fc2", "text_encoder", "encoder.layers.11.mlp.fc2"),
    ("lora_te2_text_model_encoder_layers_0_self_attn_out_proj", "text_encoder_2",
     "encoder.layers.0.self_attn.out_proj"),
    ("lora_te2_text_model_encoder_layers_15_self_attn_k_proj", "text_encoder_2",
     "encoder.layers.15.self_attn.k_proj"),
    ("lora_te2_text_model_encoder_layers_31_mlp_fc1", "text_encoder_2", "encoder.layers.31.mlp.fc1"),
]

# SDXL files from diffusers-based trainers carry diffusers-style UNet names (what we write by default)
SDXL_DIFFUSERS_NAMES: list[tuple[str, str, str]] = [
    ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_k", "unet",
     "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"),
    ("lora_unet_mid_block_attentions_0_transformer_blocks_9_ff_net_0_proj", "unet",
     "mid_block.attentions.0.transformer_blocks.9.ff.net.0.proj"),
    ("lora_unet_up_blocks_0_attentions_2_proj_out", "unet", "up_blocks.0.attentions.2.proj_out"),
]

_SD_SCRIPTS_UNET = ("Transformer2DModel",)
_SD_SCRIPTS_UNET_CONV = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
_SD_SCRIPTS_TE = ("CLIPAttention", "CLIPMLP")


def _sd_scripts_targets(model: torch.nn.Module, classes: tuple[str, ...]) -> list[str]:
    """The Linear/Conv2d modules sd-scripts adapts: children of modules of the given classes."""
    out = []
    for name, module in model.named_modules():
        if type(module).__name__ in classes:
            for child, sub in module.named_modules():
                if child and type(sub).__name__ in ("Linear", "Conv2d"):
                    out.append(f"{name}.{child}")
    return out


def _meta_models(family: str) -> dict[str, torch.nn.Module]:
    """The real-sized UNet and text encoders of a family on the meta device (no weights)."""
    import transformers
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        models = {"unet": UNet2DConditionModel.from_config(bundled_unet_config(family))}
        for comp in ("text_encoder", "text_encoder_2"):
            file = CONFIGS_DIR / FAMILY_CONFIGS[family] / comp / "config.json"
            if file.is_file():
                cfg = json.loads(file.read_text())
                cls = getattr(transformers, cfg["architectures"][0])
                models[comp] = cls(transformers.CLIPTextConfig.from_dict(cfg))
    return models


def _written_names(tmp_path: Path, family: str, modules: list[tuple[str, str]], **kw) -> dict[tuple[str, str], str]:
    """Run the real writer on a diffusers file holding ``modules``; {(component, module): kohya name}.

    Module i carries lora_A = i, so each kohya name is traced back by value, not by our reader.
    """
    tensors = {}
    for i, (comp, module) in enumerate(modules):
        tensors[f"{comp}.{module}.lora_A.weight"] = torch.full((1, 1), float(i))
        tensors[f"{comp}.{module}.lora_B.weight"] = torch.zeros(1, 1)
    src = tmp_path / f"{family}-all.safetensors"
    save_file(tensors, str(src), metadata={"format": "pt"})
    out = to_kohya(src, tmp_path / f"{family}-kohya.safetensors", family=family, **kw)
    with safe_open(str(out), "pt") as fh:
        names = {}
        for key in fh.keys():
            if key.endswith(".lora_down.weight"):
                comp, module = modules[int(fh.get_tensor(key).item())]
                names[(comp, module.removeprefix("text_model."))] = key.removesuffix(".lora_down.weight")
    assert len(set(names.values())) == len(modules)
    return names


def test_writer_names_match_real_sd1_files(tmp_path):
    models = _meta_models("sd1")
    attn = _sd_scripts_targets(models["unet"], _SD_SCRIPTS_UNET)
    conv = _sd_scripts_targets(models["unet"], _SD_SCRIPTS_UNET_CONV)
    te = _sd_scripts_targets(models["text_encoder"], _SD_SCRIPTS_TE)
    assert (len(attn), len(te)) == (192, 72)  # the module counts of an SD 1.5 kohya LoRA: 16 x 12, 12 x 6
    modules = [("unet", m) for m in attn + conv] + [("text_encoder", m) for m in te]
    names = _written_names(tmp_path, "sd1", modules)
    for kohya, comp, module in SD1_NAMES:
        assert names[(comp, module)] == kohya
    assert all(n.startswith(("lora_unet_down_blocks_", "lora_unet_mid_block_", "lora_unet_up_blocks_",
                             "lora_te_text_model_encoder_layers_")) for n in names.values())


def test_writer_names_match_real_sdxl_files(tmp_path):
    models = _meta_models("sdxl")
    attn = _sd_scripts_targets(models["unet"], _SD_SCRIPTS_UNET)
    conv = _sd_scripts_targets(models["unet"], _SD_SCRIPTS_UNET_CONV)
    te1 = _sd_scripts_targets(models["text_encoder"], _SD_SCRIPTS_TE)
    te2 = _sd_scripts_targets(models["text_encoder_2"], _SD_SCRIPTS_TE)
    assert (len(attn), len(te1), len(te2)) == (722, 72, 192)
    modules = ([("unet", m) for m in attn + conv] + [("text_encoder", m) for m in te1]
               + [("text_encoder_2", m) for m in te2])
    ldm = _written_names(tmp_path, "sdxl", modules, unet_names="ldm")  # sd-scripts' own SDXL naming
    for kohya, comp, module in SDXL_LDM_NAMES:
        assert ldm[(comp, module)] == kohya
    diffusers = _written_names(tmp_path, "sdxl", modules, unet_names="diffusers")
    for kohya, comp, module in SDXL_DIFFUSERS_NAMES:
        assert diffusers[(comp, module)] == kohya
    assert diffusers[("text_encoder_2", "encoder.layers.31.mlp.fc1")] == "lora_te2_text_model_encoder_layers_31_mlp_fc1"


def test_sdxl_default_names_are_sd_scripts_ldm_ones_when_the_lora_fits_sdxl_base(tmp_path, caplog):
    """sd-scripts writes SDXL LoRAs with original-LDM UNet names; a LoRA that does not fit SDXL base's
    UNet (another layout) keeps diffusers-style names rather than get the names of wrong layers."""
    q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"  # 640 -> 640 in SDXL base

    def write(name: str, dims: int) -> Path:
        src = tmp_path / f"{name}.safetensors"
        save_file({f"unet.{q}.lora_A.weight": torch.ones(2, dims), f"unet.{q}.lora_B.weight": torch.ones(dims, 2)},
                  str(src), metadata={"format": "pt"})
        with safe_open(str(to_kohya(src, tmp_path / f"{name}-k.safetensors", family="sdxl")), "pt") as fh:
            return {k.rsplit(".", 2)[0] for k in fh.keys()}

    assert write("fits", 640) == {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"}
    assert write("other", 64) == {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"}
    assert "does not fit SDXL base's UNet" in caplog.text


@pytest.mark.parametrize("family,table", [("sd1", SD1_NAMES), ("sdxl", SDXL_LDM_NAMES + SDXL_DIFFUSERS_NAMES)])
def test_real_names_read_back_to_existing_modules(family, table):
    models = _meta_models(family)
    names = KohyaNames(unet_config=bundled_unet_config(family), dual_text_encoders=family == "sdxl")
    for kohya, comp, module in table:
        assert names.parse(kohya) == (comp, module)
        prefix = text_model_prefix(comp) if comp != "unet" else ""
        models[comp].get_submodule(prefix + module)  # raises when the module does not exist


# original-LDM names on SD 1.5 (layers_per_block 2, attention at levels 0-2): written out by hand
SD15_LDM: list[tuple[str, str]] = [
    ("input_blocks_1_1_proj_in", "down_blocks.0.attentions.0.proj_in"),
    ("input_blocks_2_1_transformer_blocks_0_attn1_to_q", "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q"),
    ("input_blocks_4_1_transformer_blocks_0_attn2_to_k", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"),
    ("input_blocks_8_1_transformer_blocks_0_ff_net_2", "down_blocks.2.attentions.1.transformer_blocks.0.ff.net.2"),
    ("input_blocks_3_0_op", "down_blocks.0.downsamplers.0.conv"),
    ("input_blocks_1_0_in_layers_2", "down_blocks.0.resnets.0.conv1"),
    ("input_blocks_11_0_out_layers_3", "down_blocks.3.resnets.1.conv2"),
    ("middle_block_1_transformer_blocks_0_attn1_to_out_0",
     "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0"),
    ("middle_block_2_emb_layers_1", "mid_block.resnets.1.time_emb_proj"),
    ("output_blocks_0_0_skip_connection", "up_blocks.0.resnets.0.conv_shortcut"),
    ("output_blocks_2_1_conv", "up_blocks.0.upsamplers.0.conv"),
    ("output_blocks_3_1_proj_out", "up_blocks.1.attentions.0.proj_out"),
    ("output_blocks_5_2_conv", "up_blocks.1.upsamplers.0.conv"),
    ("output_blocks_11_1_transformer_blocks_0_attn2_to_v", "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_v"),
    ("time_embed_0", "time_embedding.linear_1"),
    ("out_2", "conv_out"),
]
# the tiny sd1 UNet of studio.testing (2 levels, 1 layer per block, attention at level 0 only)
TINY_SD1_LDM: list[tuple[str, str]] = [
    ("input_blocks_1_1_proj_in", "down_blocks.0.attentions.0.proj_in"),
    ("input_blocks_2_0_op", "down_blocks.0.downsamplers.0.conv"),
    ("input_blocks_3_0_skip_connection", "down_blocks.1.resnets.0.conv_shortcut"),
    ("output_blocks_1_1_conv", "up_blocks.0.upsamplers.0.conv"),
    ("output_blocks_2_1_transformer_blocks_0_attn1_to_k", "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k"),
    ("output_blocks_3_1_proj_out", "up_blocks.1.attentions.1.proj_out"),
]


@pytest.mark.parametrize("config,table", [("sd1", SD15_LDM), ("tiny", TINY_SD1_LDM)])
def test_ldm_names_map_to_the_right_modules(config, table):
    cfg = bundled_unet_config("sd1") if config == "sd1" else dict(tiny_pipeline("sd1").unet.config)
    reader = KohyaNames(unet_config=cfg)
    writer = KohyaNames(unet_config=cfg, unet_names="ldm")
    for ldm, module in table:
        assert reader.parse(f"lora_unet_{ldm}") == ("unet", module)
        assert writer.name("unet", module) == f"lora_unet_{ldm}"
        assert KohyaNames().parse(f"lora_unet_{module.replace('.', '_')}") == ("unet", module)
    with pytest.raises(StudioError, match="no such block"):
        reader.parse("lora_unet_input_blocks_99_1_proj_in")
    with pytest.raises(StudioError, match="config"):
        KohyaNames().parse("lora_unet_input_blocks_1_1_proj_in")


def test_detect_lora_format():
    assert detect_lora_format(["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight",
                               "text_encoder.encoder.layers.0.mlp.fc1.lora_B.weight"]) == "diffusers"
    assert detect_lora_format(["down_blocks.0.attentions.0.proj_in.lora_A.weight"]) == "peft"
    assert detect_lora_format(["base_model.model.encoder.layers.0.mlp.fc1.lora_A.weight"]) == "peft"
    assert detect_lora_format([f"{SD1_NAMES[0][0]}.lora_down.weight", f"{SD1_NAMES[0][0]}.alpha"]) == "kohya"
    assert detect_lora_format([f"{SDXL_LDM_NAMES[0][0]}.lora_up.weight",
                               "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"]) == "kohya-ldm"
    assert detect_lora_format(["lora_unet_mid_block_attentions_0_proj_in.hada_w1_a"]) == "lycoris-loha"
    assert detect_lora_format(["lora_te_text_model_encoder_layers_0_mlp_fc1.lokr_w1"]) == "lycoris-lokr"
    assert detect_lora_format(["model.diffusion_model.input_blocks.0.0.weight"]) is None
    assert detect_lora_format(["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora"
                               ".down.weight"]) is None  # diffusers' pre-PEFT layout


# ----------------------------------------------------------------------------------------------
# round trips on tiny pipelines
# ----------------------------------------------------------------------------------------------

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1", "conv_shortcut", "time_emb_proj"]


def _generate(pipe) -> torch.Tensor:
    return pipe("a red circle", num_inference_steps=2, guidance_scale=3.0, generator=torch.Generator().manual_seed(3),
                output_type="pt").images


def _with_random_lora(family: str):
    """A tiny pipeline with a non-zero PEFT LoRA on the UNet and text encoders (mixed ranks and alphas)."""
    from peft import LoraConfig, inject_adapter_in_model

    pipe = tiny_pipeline(family)
    configs = {
        "unet": LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS, rank_pattern={"to_v": 2},
                           alpha_pattern={"to_k": 3, "conv1": 2.5}),
        "text_encoder": LoraConfig(r=2, lora_alpha=5, target_modules=["q_proj", "out_proj", "fc1"]),
    }
    if family == "sdxl":
        # with out_proj: diffusers 0.42 drops q/k/v of kohya text-encoder LoRAs that lack it (real files have it)
        configs["text_encoder_2"] = LoraConfig(r=3, lora_alpha=1.5, target_modules=["k_proj", "out_proj", "fc2"])
    pipe.unet.add_adapter(configs["unet"])
    for comp in configs:
        if comp != "unet":
            inject_adapter_in_model(configs[comp], getattr(pipe, comp), "default")
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for comp in configs:
            for name, p in getattr(pipe, comp).named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return pipe, configs


def _layer_scales(pipe, comps) -> dict[tuple[str, str], tuple[int, float]]:
    """(component, module without text_model.) -> (rank, scale) of every PEFT LoRA layer."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for comp in comps:
        for name, layer in getattr(pipe, comp).named_modules():
            if isinstance(layer, LoraLayer):
                adapter = next(iter(layer.r))
                out[(comp, name.removeprefix("text_model."))] = (layer.r[adapter], layer.scaling[adapter])
    return out


def _sd_scripts_name(comp: str, module: str, dual: bool) -> str:
    """sd-scripts' rule: prefix + '.' + module path (transformers 4 names) with dots as underscores."""
    if comp == "unet":
        return "lora_unet_" + module.replace(".", "_")
    prefix = "lora_te2" if comp == "text_encoder_2" else ("lora_te1" if dual else "lora_te")
    return prefix + "_" + ("text_model." + module).replace(".", "_")


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def case(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(f"lora-{family}")
    from peft import get_peft_model_state_dict

    base = _generate(tiny_pipeline(family))
    pipe, configs = _with_random_lora(family)
    expected = _generate(pipe)
    assert (expected - base).abs().max() > 1e-3  # the LoRA does change the image
    kwargs = {}
    for comp, cfg in configs.items():
        kwargs[f"{comp}_lora_layers"] = get_peft_model_state_dict(getattr(pipe, comp))
        kwargs[f"{comp}_lora_adapter_metadata"] = cfg.to_dict()
    pipe.save_lora_weights(root / "orig", **kwargs)
    return {"family": family, "root": root, "expected": expected, "scales": _layer_scales(pipe, configs),
            "comps": tuple(configs), "unet_config": dict(pipe.unet.config)}


def _tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})


def test_diffusers_kohya_diffusers_is_exact(case):
    root, family = case["root"], case["family"]
    kohya = to_kohya(root / "orig", root / "kohya", family=family)
    assert kohya == root / "kohya" / "orig.safetensors"
    back = to_diffusers(kohya, root / "back")
    orig_t, _ = _tensors(root / "orig" / "pytorch_lora_weights.safetensors")
    back_t, back_md = _tensors(back)
    assert orig_t.keys() == back_t.keys()
    assert all(torch.equal(orig_t[k], back_t[k]) for k in orig_t)
    # every module's rank and alpha, read straight from the kohya tensors by sd-scripts' naming rule
    k_t, k_md = _tensors(kohya)
    dual = family == "sdxl"
    assert len(k_t) == 3 * len(case["scales"])
    for (comp, module), (rank, scale) in case["scales"].items():
        name = _sd_scripts_name(comp, module, dual)
        assert k_t[f"{name}.lora_down.weight"].shape[0] == rank
        assert k_t[f"{name}.alpha"].item() / rank == pytest.approx(scale, rel=1e-6)
    # sd-scripts' metadata
    assert k_md["ss_network_module"] == "networks.lora"
    assert (k_md["ss_network_dim"], k_md["ss_network_alpha"]) == ("4", "8.0")
    assert k_md["ss_base_model_version"] == {"sd1": "sd_v1", "sdxl": "sdxl_base_v1-0"}[family]
    assert k_md["ss_v2"] == "False" and k_md["ss_output_name"] == "orig"
    assert json.loads(k_md["ss_network_args"])["conv_dim"] == "4"  # conv1 (3x3) makes it a LoCon
    raw = kohya.read_bytes()
    header = int.from_bytes(raw[:8], "little")
    assert k_md["sshs_model_hash"] == hashlib.sha256(raw[8 + header:]).hexdigest()
    # diffusers' adapter metadata of the result gives every module its rank and alpha back
    back_scales = {(m.component, m.module): (m.rank, m.scale) for m in read_lora(back).modules}
    assert back_scales.keys() == case["scales"].keys()
    for key, (rank, scale) in case["scales"].items():
        assert back_scales[key][0] == rank and back_scales[key][1] == pytest.approx(scale, rel=1e-6)
    assert ADAPTER_METADATA_KEY in back_md and back_md["studio.family"] == family


def test_kohya_file_loads_to_the_same_images(case):
    root, family = case["root"], case["family"]
    kohya = to_kohya(root / "orig", root / "load.safetensors", family=family)
    pipe = tiny_pipeline(family)
    counts = load_lycoris_into(pipe, kohya, adapter_name="k")
    assert sum(counts.values()) == len(case["scales"])
    assert torch.allclose(_generate(pipe), case["expected"], atol=1e-5)


def test_ldm_named_file_loads_like_the_original(case):
    """Original-LDM names, written with the pipeline's own UNet config, read back through it."""
    root, family = case["root"], case["family"]
    kohya = to_kohya(root / "orig", root / "ldm.safetensors", family=family, unet_names="ldm",
                     unet_config=case["unet_config"])
    names, _ = _tensors(kohya)
    assert detect_lora_format(names) == "kohya-ldm"
    assert any(k.startswith("lora_unet_input_blocks_") for k in names)
    pipe = tiny_pipeline(family)
    load_lycoris_into(pipe, kohya)
    assert torch.allclose(_generate(pipe), case["expected"], atol=1e-5)


def _loaded_factors(pipe, comps) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]:
    """(component, module) -> (lora_A, lora_B) weights of every PEFT LoRA layer."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for comp in comps:
        for name, layer in getattr(pipe, comp).named_modules():
            if isinstance(layer, LoraLayer):
                adapter = next(iter(layer.r))
                out[(comp, name.removeprefix("text_model."))] = (layer.lora_A[adapter].weight.detach(),
                                                                  layer.lora_B[adapter].weight.detach())
    return out


@pytest.mark.filterwarnings("ignore:The following alpha_pattern keys did not match")  # the diffusers bug below
def test_vanilla_diffusers_loads_our_files(case):
    """diffusers' own loader reads our diffusers file (ranks, alphas, images) and our kohya files: its
    kohya and SGM converters put every tensor on the module it came from. (Per-module alphas of kohya
    files are not compared: diffusers 0.42 drops those of SD 1.x attention layers, whose alpha_pattern
    keys it leaves under pre-PEFT names.)"""
    root, family, comps = case["root"], case["family"], case["comps"]
    kohya = to_kohya(root / "orig", root / "v-kohya.safetensors", family=family)
    ours = to_diffusers(kohya, root / "v-diffusers")
    pipe = tiny_pipeline(family)
    pipe.load_lora_weights(str(ours.parent))
    got = _layer_scales(pipe, comps)
    assert got.keys() == case["scales"].keys()
    for key, (rank, scale) in case["scales"].items():
        assert got[key][0] == rank and got[key][1] == pytest.approx(scale, rel=1e-6)
    assert torch.allclose(_generate(pipe), case["expected"], atol=1e-5)

    orig, _ = _tensors(root / "orig" / "pytorch_lora_weights.safetensors")
    ldm = to_kohya(root / "orig", root / "v-ldm.safetensors", family=family, unet_names="ldm",
                   unet_config=case["unet_config"])
    for path in (kohya, ldm):
        pipe = tiny_pipeline(family)
        # diffusers maps original-LDM names through the UNet config, which only its SDXL loader passes itself
        pipe.load_lora_weights(str(path), **({"unet_config": pipe.unet.config} if path == ldm and family == "sd1"
                                             else {}))
        loaded = _loaded_factors(pipe, comps)
        assert loaded.keys() == case["scales"].keys()
        for (comp, module), (a, b) in loaded.items():
            key = f"{comp}.{text_model_prefix(comp) if comp != 'unet' else ''}{module}"
            assert torch.equal(a, orig[f"{key}.lora_A.weight"]) and torch.equal(b, orig[f"{key}.lora_B.weight"])


def test_peft_folder_and_metadata_pass_through(tmp_path):
    """A PEFT adapter folder (adapter_model.safetensors + adapter_config.json) converts with its alphas;
    studio.* header entries survive both directions."""
    from peft import LoraConfig, get_peft_model_state_dict

    unet = tiny_pipeline("sd1").unet
    cfg = LoraConfig(r=2, lora_alpha=6, target_modules=["to_q", "proj_out"], alpha_pattern={"proj_out": 1})
    unet.add_adapter(cfg)
    folder = tmp_path / "peft"
    folder.mkdir()
    save_file({f"base_model.model.{k}": v for k, v in get_peft_model_state_dict(unet).items()},
              str(folder / "adapter_model.safetensors"), metadata={"studio.trigger": "sks", "format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(cfg.to_dict(), default=sorted))
    assert read_lora(folder).layout == "peft"
    out = to_kohya(folder, tmp_path / "x.safetensors", family="sd1")
    tensors, md = _tensors(out)
    assert md["studio.trigger"] == "sks"
    alphas = {k.removesuffix(".alpha"): v.item() for k, v in tensors.items() if k.endswith(".alpha")}
    assert alphas["lora_unet_down_blocks_0_attentions_0_proj_out"] == 1.0
    assert alphas["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"] == 6.0
    back = to_diffusers(out, tmp_path / "d")
    assert _tensors(back)[1]["studio.trigger"] == "sks"


# ----------------------------------------------------------------------------------------------
# LyCORIS: the math, and loading through PEFT's tuners
# ----------------------------------------------------------------------------------------------


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.3


def test_lora_conv_delta_equals_down_then_up():
    down, up = _rand(3, 5, 3, 3, seed=1), _rand(7, 3, 1, 1, seed=2)
    x = _rand(2, 5, 9, 9, seed=3)
    delta = lycoris_delta({"lora_down.weight": down, "lora_up.weight": up}, "lora", alpha=1.5)
    want = F.conv2d(F.conv2d(x, down, padding=1), up) * (1.5 / 3)
    assert torch.allclose(F.conv2d(x, delta, padding=1), want, atol=1e-5)


def test_loha_and_lokr_deltas_by_their_definitions():
    w1a, w1b, w2a, w2b = _rand(4, 2, seed=1), _rand(2, 6, seed=2), _rand(4, 2, seed=3), _rand(2, 6, seed=4)
    d = lycoris_delta({"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b}, "loha", alpha=1.0)
    for i in range(4):
        for j in range(6):
            want = sum(w1a[i, r] * w1b[r, j] for r in range(2)) * sum(w2a[i, s] * w2b[s, j] for s in range(2))
            assert d[i, j] == pytest.approx(float(want) * 0.5, abs=1e-6)
    # Tucker form: W[p, q, k, l] = sum_ij t[i, j, k, l] a[i, p] b[j, q], per factor
    t1, a1, b1 = _rand(2, 2, 3, 3, seed=5), _rand(2, 4, seed=6), _rand(2, 5, seed=7)
    t2, a2, b2 = _rand(2, 2, 3, 3, seed=8), _rand(2, 4, seed=9), _rand(2, 5, seed=10)
    d = lycoris_delta({"hada_t1": t1, "hada_w1_a": a1, "hada_w1_b": b1, "hada_t2": t2, "hada_w2_a": a2,
                       "hada_w2_b": b2}, "loha")
    f1 = sum(t1[i, j][None, None] * (a1[i][:, None] * b1[j][None, :])[:, :, None, None]
             for i in range(2) for j in range(2))
    f2 = sum(t2[i, j][None, None] * (a2[i][:, None] * b2[j][None, :])[:, :, None, None]
             for i in range(2) for j in range(2))
    assert torch.allclose(d, f1 * f2, atol=1e-6)
    # LoKr: block (a, c) of the delta is w1[a, c] * w2, scale alpha / rank of the low-rank factor
    w1, w2a_, w2b_ = _rand(2, 3, seed=11), _rand(4, 2, seed=12), _rand(2, 5, seed=13)
    d = lycoris_delta({"lokr_w1": w1, "lokr_w2_a": w2a_, "lokr_w2_b": w2b_}, "lokr", alpha=1.0)
    w2 = w2a_ @ w2b_
    for a in range(2):
        for c in range(3):
            assert torch.allclose(d[a * 4:(a + 1) * 4, c * 5:(c + 1) * 5], w1[a, c] * w2 * 0.5, atol=1e-6)
    full = lycoris_delta({"lokr_w1": w1, "lokr_w2": w2}, "lokr", alpha=7.0)  # no rank: scale 1
    assert torch.allclose(full, torch.kron(w1, w2), atol=1e-6)


def _lycoris_modules(pipe, kind: str) -> dict[str, tuple[str, str, dict[str, torch.Tensor], float | None]]:
    """Synthetic LyCORIS modules for the tiny sd1 pipeline: kohya name -> (component, module, tensors, alpha)."""
    u, te = pipe.unet, pipe.text_encoder

    def shape(comp: str, module: str) -> torch.Size:
        return (u if comp == "unet" else te).get_submodule(module).weight.shape

    specs = {  # kohya name: component, module
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
            ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
        "lora_unet_down_blocks_0_attentions_0_proj_in": ("unet", "down_blocks.0.attentions.0.proj_in"),
        "lora_unet_down_blocks_0_resnets_0_conv1": ("unet", "down_blocks.0.resnets.0.conv1"),
        "lora_unet_up_blocks_0_resnets_1_conv2": ("unet", "up_blocks.0.resnets.1.conv2"),
        "lora_unet_down_blocks_1_resnets_0_conv_shortcut": ("unet", "down_blocks.1.resnets.0.conv_shortcut"),
        "lora_unet_mid_block_resnets_0_time_emb_proj": ("unet", "mid_block.resnets.0.time_emb_proj"),
        "lora_unet_down_blocks_0_downsamplers_0_conv": ("unet", "down_blocks.0.downsamplers.0.conv"),
        "lora_te_text_model_encoder_layers_1_mlp_fc2": ("text_encoder", "encoder.layers.1.mlp.fc2"),
    }
    out = {}
    for i, (name, (comp, module)) in enumerate(specs.items()):
        w = shape(comp, module)
        o, n, k = w[0], w[1], tuple(w[2:])
        kk = math.prod(k)
        r = 2 + i % 2
        alpha = None if i == 3 else 1.0 + i / 2
        if kind == "lora":  # LoCon: kohya keeps convolution shapes (3x3 down, 1x1 up)
            t = {"lora_down.weight": _rand(r, n, *k, seed=i),
                 "lora_up.weight": _rand(o, r, *([1] * len(k)), seed=50 + i)}
        elif kind == "loha":
            if len(k) == 2 and k != (1, 1) and i % 2 == 0:  # Tucker form on a 3x3 kernel
                t = {"hada_t1": _rand(r, r, *k, seed=i), "hada_w1_a": _rand(r, o, seed=10 + i),
                     "hada_w1_b": _rand(r, n, seed=20 + i), "hada_t2": _rand(r, r, *k, seed=30 + i),
                     "hada_w2_a": _rand(r, o, seed=40 + i), "hada_w2_b": _rand(r, n, seed=50 + i)}
            else:
                t = {"hada_w1_a": _rand(o, r, seed=i), "hada_w1_b": _rand(r, n * kk, seed=10 + i),
                     "hada_w2_a": _rand(o, r, seed=20 + i), "hada_w2_b": _rand(r, n * kk, seed=30 + i)}
        else:  # LoKr: out = a*b, in = c*d, factors full or low-rank, some not PEFT's own factorization
            a, b = (2, o // 2) if i % 2 else (o // 8, 8)
            c, d = (2, n // 2) if i % 3 else (1, n)
            if i % 4 == 0:
                t = {"lokr_w1": _rand(a, c, seed=i), "lokr_w2_a": _rand(b, r, seed=10 + i),
                     "lokr_w2_b": _rand(r, d * kk, seed=20 + i)}
            elif i % 4 == 1:
                t = {"lokr_w1_a": _rand(a, r, seed=i), "lokr_w1_b": _rand(r, c, seed=10 + i),
                     "lokr_w2": _rand(b, d, *k, seed=20 + i)}
            elif i % 4 == 2 and len(k) == 2 and k != (1, 1):  # Tucker form of w2
                t = {"lokr_w1": _rand(a, c, seed=i), "lokr_t2": _rand(r, r, *k, seed=10 + i),
                     "lokr_w2_a": _rand(r, b, seed=20 + i), "lokr_w2_b": _rand(r, d, seed=30 + i)}
            else:  # both full: scale 1 whatever alpha says
                t = {"lokr_w1": _rand(a, c, seed=i), "lokr_w2": _rand(b, d, *k, seed=10 + i)}
        out[name] = (comp, module, t, alpha)
    return out


@pytest.mark.parametrize("kind,weight", [("lora", 1.0), ("loha", 0.7), ("lokr", 1.0)])
def test_lycoris_file_matches_the_merged_reference(kind, weight, tmp_path):
    reference = tiny_pipeline("sd1")
    modules = _lycoris_modules(reference, kind)
    tensors = {}
    for name, (_, _, t, alpha) in modules.items():
        tensors.update({f"{name}.{part}": v for part, v in t.items()})
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(alpha)
    path = tmp_path / f"{kind}.safetensors"
    save_file(tensors, str(path), metadata={"ss_network_module": "lycoris.kohya"})
    assert detect_lora_format(tensors) == {"lora": "kohya", "loha": "lycoris-loha", "lokr": "lycoris-lokr"}[kind]
    base = _generate(reference)
    with torch.no_grad():  # the reference: W + weight * delta, merged by hand
        for comp, module, t, alpha in modules.values():
            w = getattr(reference, comp).get_submodule(module).weight
            w += weight * lycoris_delta(t, kind, alpha, shape=w.shape)
    want = _generate(reference)
    assert (want - base).abs().max() > 1e-3
    pipe = tiny_pipeline("sd1")
    assert load_lycoris_into(pipe, path, adapter_name="ly", weight=weight) == {"unet": 7, "text_encoder": 1}
    for comp, module, t, alpha in modules.values():  # each PEFT layer adds exactly the reference delta
        layer = getattr(pipe, comp).get_submodule(module)
        w = layer.get_base_layer().weight
        assert torch.allclose(layer.get_delta_weight("ly"), weight * lycoris_delta(t, kind, alpha, shape=w.shape),
                              atol=1e-6), module
    assert torch.allclose(_generate(pipe), want, atol=1e-5)


def test_loading_a_file_for_another_model_changes_nothing(tmp_path):
    pipe = tiny_pipeline("sd1")
    tensors = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 16, 1, 1),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(16, 2, 1, 1),
               "lora_unet_down_blocks_3_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 16, 1, 1),
               "lora_unet_down_blocks_3_attentions_0_proj_in.lora_up.weight": torch.zeros(16, 2, 1, 1)}
    save_file(tensors, str(tmp_path / "other.safetensors"))
    with pytest.raises(StudioError, match="down_blocks.3.attentions.0.proj_in: no such module"):
        load_lycoris_into(pipe, tmp_path / "other.safetensors")
    assert not any("lora" in n for n, _ in pipe.unet.named_parameters())


# ----------------------------------------------------------------------------------------------
# the command line
# ----------------------------------------------------------------------------------------------


@pytest.fixture()
def studio_main(monkeypatch):
    from studio import cli

    if "studio.formats.cli" not in cli.COMMAND_MODULES:
        monkeypatch.setattr(cli, "COMMAND_MODULES", (*cli.COMMAND_MODULES, "studio.formats.cli"))
    return cli.main


def test_cli_converts_and_prints_the_path(tmp_path, studio_main, capsys):
    tensors = {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": _rand(2, 16, 1, 1, seed=1),
               "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": _rand(16, 2, 1, 1, seed=2)}
    save_file(tensors, str(tmp_path / "a.safetensors"), metadata={"format": "pt"})
    assert studio_main(["convert", "--to", "kohya", str(tmp_path / "a.safetensors"), str(tmp_path / "out"),
                        "--family", "sd2"]) == 0
    printed = Path(capsys.readouterr().out.strip())
    assert printed == tmp_path / "out" / "a.safetensors" and printed.is_file()
    t, md = _tensors(printed)
    assert set(t) == {f"lora_unet_down_blocks_0_attentions_0_proj_in.{p}" for p in ("lora_down.weight",
                                                                                     "lora_up.weight", "alpha")}
    assert md["ss_v2"] == "True" and md["ss_base_model_version"] == "sd_v2"
    assert studio_main(["convert", "--to", "diffusers", str(printed), str(tmp_path / "d")]) == 0
    assert Path(capsys.readouterr().out.strip()) == tmp_path / "d" / "pytorch_lora_weights.safetensors"


def test_cli_errors(tmp_path, studio_main, capsys):
    def fails(*argv: str) -> str:
        assert studio_main(["convert", *argv]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]  # one line, after any log notes
        assert last.startswith("studio: error: ")
        return last

    out = str(tmp_path / "out.safetensors")
    assert "no such LoRA file" in fails("--to", "kohya", str(tmp_path / "missing.safetensors"), out)
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, str(tmp_path / "ckpt.safetensors"))
    assert "not a LoRA file" in fails("--to", "kohya", str(tmp_path / "ckpt.safetensors"), out)
    save_file({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight":
               torch.zeros(2, 2)}, str(tmp_path / "old.safetensors"))
    assert "unknown LoRA layout" in fails("--to", "diffusers", str(tmp_path / "old.safetensors"), out)
    loha = {f"lora_unet_mid_block_attentions_0_proj_in.{p}": torch.zeros(2, 2)
            for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
    save_file(loha, str(tmp_path / "loha.safetensors"))
    err = fails("--to", "diffusers", str(tmp_path / "loha.safetensors"), str(tmp_path / "loha-out"))
    assert "LoHa" in err and "not representable as a plain LoRA" in err
    assert not (tmp_path / "loha-out").exists() and not Path(out).exists()
    assert not list(tmp_path.glob(".*.tmp"))  # nothing half-written left behind
    # LoHa stays LoHa in the kohya layout
    assert studio_main(["convert", "--to", "kohya", str(tmp_path / "loha.safetensors"),
                        str(tmp_path / "loha-k.safetensors")]) == 0
    assert detect_lora_format(_tensors(tmp_path / "loha-k.safetensors")[0]) == "lycoris-loha"


def test_cli_register_standalone():
    from studio.formats.cli import register, run

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["convert", "in.safetensors", "out", "--to", "diffusers"])
    assert args.func is run and (args.to, args.input, args.output) == ("diffusers", "in.safetensors", "out")
