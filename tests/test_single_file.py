"""Single-file checkpoints: original-layout names, round trips, family detection, bad input.

Key names are checked against fixtures of real SD 1.5 / SD 2.1 / SDXL files' names and shapes
(written from the original LDM/sgm code's module names), and against diffusers' own converters
as an independent reader, never only against our reader.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from studio.errors import StudioError
from studio.loading import load_pipeline
from studio.single_file import (
    CONFIGS_DIR,
    convert_to_ldm,
    detect_checkpoint_family,
    guess_v_prediction,
    load_single_file,
    read_header,
    save_single_file,
)
from studio.testing import tiny_pipeline, tiny_tokenizer

PROMPT = "a red circle on a blue background"
BUNDLED = {"sd15": "sd1", "sd21": "sd2", "sd21-v": "sd2", "sdxl": "sdxl"}

# ---------------------------------------------------------------------------------------------
# fixtures of real files' key names (and shapes), per family
# ---------------------------------------------------------------------------------------------

REAL_SD15 = {
    "model.diffusion_model.time_embed.0.weight": (1280, 320),
    "model.diffusion_model.time_embed.2.weight": (1280, 1280),
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "model.diffusion_model.input_blocks.1.0.in_layers.0.weight": (320,),
    "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": (320, 320, 3, 3),
    "model.diffusion_model.input_blocks.1.0.emb_layers.1.weight": (320, 1280),
    "model.diffusion_model.input_blocks.1.0.out_layers.3.weight": (320, 320, 3, 3),
    "model.diffusion_model.input_blocks.1.1.norm.weight": (320,),
    "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (320, 320),
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.2.weight": (320, 1280),
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.norm3.weight": (320,),
    "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
    "model.diffusion_model.input_blocks.11.0.out_layers.3.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.middle_block.0.in_layers.0.weight": (1280,),
    "model.diffusion_model.middle_block.1.proj_out.weight": (1280, 1280, 1, 1),
    "model.diffusion_model.middle_block.2.out_layers.3.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.0.0.skip_connection.weight": (1280, 2560, 1, 1),
    "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.3.1.transformer_blocks.0.attn2.to_v.weight": (1280, 768),
    "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.8.2.conv.weight": (640, 640, 3, 3),
    "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
    "model.diffusion_model.output_blocks.11.1.proj_out.weight": (320, 320, 1, 1),
    "model.diffusion_model.out.0.weight": (320,),
    "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
    "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
    "first_stage_model.encoder.down.0.block.0.conv1.weight": (128, 128, 3, 3),
    "first_stage_model.encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
    "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "first_stage_model.encoder.mid.block_1.norm1.weight": (512,),
    "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "first_stage_model.encoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
    "first_stage_model.encoder.mid.attn_1.norm.weight": (512,),
    "first_stage_model.encoder.norm_out.weight": (512,),
    "first_stage_model.encoder.conv_out.weight": (8, 512, 3, 3),
    "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
    "first_stage_model.post_quant_conv.weight": (4, 4, 1, 1),
    "first_stage_model.decoder.conv_in.weight": (512, 4, 3, 3),
    "first_stage_model.decoder.mid.block_2.conv2.weight": (512, 512, 3, 3),
    "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    "first_stage_model.decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
    "first_stage_model.decoder.up.1.upsample.conv.weight": (256, 256, 3, 3),
    "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
    "first_stage_model.decoder.conv_out.weight": (3, 128, 3, 3),
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
    "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
    "cond_stage_model.transformer.text_model.embeddings.position_ids": (1, 77),
    "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": (768, 768),
    "cond_stage_model.transformer.text_model.encoder.layers.0.layer_norm1.weight": (768,),
    "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc1.weight": (3072, 768),
    "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,),
}
NOT_SD15 = [  # no attention at the lowest level; the first upsampler follows a resnet
    "model.diffusion_model.input_blocks.10.1.norm.weight",
    "model.diffusion_model.output_blocks.2.2.conv.weight",
    "first_stage_model.decoder.up.0.upsample.conv.weight",
    "first_stage_model.encoder.down.3.downsample.conv.weight",
]
REAL_SD21 = {
    "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),
    "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
    "model.diffusion_model.middle_block.1.proj_out.weight": (1280, 1280),
    "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
    "first_stage_model.encoder.mid.attn_1.k.weight": (512, 512, 1, 1),
    "cond_stage_model.model.token_embedding.weight": (49408, 1024),
    "cond_stage_model.model.positional_embedding": (77, 1024),
    "cond_stage_model.model.ln_final.weight": (1024,),
    "cond_stage_model.model.transformer.resblocks.0.ln_1.weight": (1024,),
    "cond_stage_model.model.transformer.resblocks.0.ln_2.bias": (1024,),
    "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (3072, 1024),
    "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_bias": (3072,),
    "cond_stage_model.model.transformer.resblocks.0.attn.out_proj.weight": (1024, 1024),
    "cond_stage_model.model.transformer.resblocks.22.mlp.c_fc.weight": (4096, 1024),
    "cond_stage_model.model.transformer.resblocks.22.mlp.c_proj.weight": (1024, 4096),
}
# real SD 2.x files also carry OpenCLIP's last block and projection, which SD 2.x never uses
REAL_SD21_UNUSED = [
    "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight",
    "cond_stage_model.model.text_projection",
    "cond_stage_model.model.logit_scale",
]
REAL_SDXL = {
    "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
    "model.diffusion_model.label_emb.0.2.weight": (1280, 1280),
    "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": (320, 320, 3, 3),
    "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
    "model.diffusion_model.input_blocks.4.1.proj_in.weight": (640, 640),
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 2048),
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight": (640, 640),
    "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
    "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_v.weight": (1280, 2048),
    "model.diffusion_model.middle_block.1.transformer_blocks.9.norm1.weight": (1280,),
    "model.diffusion_model.output_blocks.0.1.transformer_blocks.9.attn1.to_out.0.weight": (1280, 1280),
    "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.5.2.conv.weight": (640, 640, 3, 3),
    "model.diffusion_model.output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
    "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
    "first_stage_model.decoder.up.3.block.0.conv1.weight": (512, 512, 3, 3),
    "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
    "conditioner.embedders.0.transformer.text_model.encoder.layers.11.self_attn.out_proj.weight": (768, 768),
    "conditioner.embedders.1.model.token_embedding.weight": (49408, 1280),
    "conditioner.embedders.1.model.positional_embedding": (77, 1280),
    "conditioner.embedders.1.model.text_projection": (1280, 1280),
    "conditioner.embedders.1.model.ln_final.bias": (1280,),
    "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": (3840, 1280),
    "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,),
    "conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_fc.weight": (5120, 1280),
}
NOT_SDXL = [  # no attention at the highest-resolution level; nine input blocks
    "model.diffusion_model.input_blocks.1.1.norm.weight",
    "model.diffusion_model.input_blocks.9.0.in_layers.0.weight",
    "model.diffusion_model.output_blocks.6.1.norm.weight",
    "model.diffusion_model.output_blocks.2.1.conv.weight",
]
LORA_KEYS = [
    "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
    "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight",
    "lora_unet_down_blocks_0_attentions_0_proj_in.alpha",
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
]


# ---------------------------------------------------------------------------------------------
# helpers and fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The suite shares two cores with background jobs: one thread is faster and deterministic."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""
    attempts: list = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"network access attempted in an offline test: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    yield
    assert not attempts, f"tried to reach the network: {attempts}"


@pytest.fixture(scope="module")
def pipes():
    """One seeded tiny pipeline per family, built on first use."""
    cache: dict = {}

    def get(family: str):
        if family not in cache:
            cache[family] = tiny_pipeline(family)
        return cache[family]

    return get


@pytest.fixture(scope="module")
def files(pipes, tmp_path_factory):
    """The tiny pipeline of each family written once as a single file (configs embedded)."""
    folder = tmp_path_factory.mktemp("single")
    cache: dict = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = save_single_file(pipes(family), folder / f"tiny-{family}.safetensors")
        return cache[family]

    return get


def generate(pipe) -> torch.Tensor:
    return pipe(PROMPT, num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(0),
                output_type="pt").images


def read_all(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata() or {}


def write_keys(path: Path, keys, metadata: dict | None = None) -> Path:
    """A small safetensors file with the given key names (one-element tensors)."""
    save_file({k: torch.zeros(1) for k in keys}, str(path), metadata=metadata)
    return path


def meta_components(name: str) -> dict:
    """The components of a bundled config set, built on the meta device (no memory, no weights)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    root = CONFIGS_DIR / name
    index = json.loads((root / "model_index.json").read_text())
    classes = {"CLIPTextModel": CLIPTextModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection}
    comps = {}
    with torch.device("meta"):
        comps["unet"] = UNet2DConditionModel.from_config(json.loads((root / "unet/config.json").read_text()))
        comps["vae"] = AutoencoderKL.from_config(json.loads((root / "vae/config.json").read_text()))
        for te in ("text_encoder", "text_encoder_2"):
            if te in index:
                cfg = CLIPTextConfig.from_dict(json.loads((root / te / "config.json").read_text()))
                comps[te] = classes[index[te][1]](cfg)
    return comps


def diffusers_reading(ldm: dict, comps: dict, family: str) -> dict[str, dict]:
    """diffusers' own single-file converters applied to our file's state dict, per component."""
    from diffusers.loaders import single_file_utils as su

    out = {"unet": su.convert_ldm_unet_checkpoint(ldm, dict(comps["unet"].config)),
           "vae": su.convert_ldm_vae_checkpoint(ldm, dict(comps["vae"].config))}
    if family == "sd2":
        te = su.convert_open_clip_checkpoint(comps["text_encoder"], ldm, prefix="cond_stage_model.model.")
        out["text_encoder"] = {k.removeprefix("text_model."): v for k, v in te.items()}
    else:
        prefix = "cond_stage_model.transformer." if family == "sd1" else "conditioner.embedders.0.transformer."
        te = {k: v for k, v in ldm.items() if k.startswith(prefix)}
        out["text_encoder"] = {k.removeprefix("text_model."): v for k, v in su.convert_ldm_clip_checkpoint(te).items()
                               if not k.endswith("position_ids")}
    if family == "sdxl":
        out["text_encoder_2"] = su.convert_open_clip_checkpoint(comps["text_encoder_2"], ldm,
                                                                prefix="conditioner.embedders.1.model.")
    return out


# ---------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_round_trip_generates_the_same_image(family, pipes, files):
    pipe = pipes(family)
    path = files(family)
    shapes, _ = read_header(path)
    assert detect_checkpoint_family(shapes) == family
    loaded = load_pipeline(path)
    assert loaded.studio_source.kind == "file" and loaded.studio_source.family == family
    assert type(loaded).__name__ == type(pipe).__name__
    for name in ("tokenizer", "tokenizer_2"):
        if name in pipe.components:
            assert loaded.components[name](PROMPT, padding="max_length").input_ids == \
                pipe.components[name](PROMPT, padding="max_length").input_ids
    assert loaded.scheduler.config.prediction_type == pipe.scheduler.config.prediction_type
    expected, got = generate(pipe), generate(loaded)
    assert expected.std() > 0.01
    assert (expected - got).abs().max().item() <= 1e-5


def test_round_trip_comparison_is_sensitive(pipes, files):
    loaded = load_single_file(files("sd1"))
    with torch.no_grad():
        loaded.unet.conv_out.bias.add_(0.05)
    assert (generate(pipes("sd1")) - generate(loaded)).abs().max().item() > 1e-3


def test_config_folder_instead_of_embedded_configs(pipes, tmp_path):
    """Without embedded configs, --config supplies the architecture; weights still come from the file."""
    pipe = pipes("sd2")
    path = save_single_file(pipe, tmp_path / "plain.safetensors", embed_config=False)
    assert not any(k.startswith("studio.") for k in read_header(path)[1])
    folder = tmp_path / "cfg"
    pipe.save_pretrained(folder)
    for weights in folder.rglob("*.safetensors"):
        weights.unlink()
    loaded = load_pipeline(path, config=folder)
    assert (generate(pipe) - generate(loaded)).abs().max().item() <= 1e-5
    assert load_single_file(path, config=folder, prediction_type="epsilon").scheduler.config.prediction_type == "epsilon"


def test_fp16_file_and_loaded_pipeline_saves_as_folder(pipes, tmp_path):
    pipe = pipes("sd1")
    path = save_single_file(pipe, tmp_path / "half.safetensors", dtype=torch.float16)
    with safe_open(str(path), framework="pt") as fh:
        dtypes = {k: fh.get_slice(k).get_dtype() for k in fh.keys()}
    assert dtypes.pop("cond_stage_model.transformer.text_model.embeddings.position_ids") == "I64"
    assert set(dtypes.values()) == {"F16"}
    loaded = load_single_file(path, dtype=torch.float32)
    assert loaded.unet.conv_in.weight.dtype == torch.float32
    assert (loaded.unet.conv_in.weight - pipe.unet.conv_in.weight).abs().max() < 1e-2
    loaded.save_pretrained(tmp_path / "folder")  # tokenizers survive their temporary folder
    assert (tmp_path / "folder" / "tokenizer" / "tokenizer_config.json").is_file()


def test_trusted_ckpt_loads(pipes, tmp_path):
    pipe = pipes("sd1")
    ldm = convert_to_ldm(pipe.components, "sd1")
    torch.save({"state_dict": ldm, "global_step": 1}, tmp_path / "model.ckpt")
    folder = tmp_path / "cfg"
    pipe.save_pretrained(folder)
    loaded = load_pipeline(tmp_path / "model.ckpt", trust_pickle=True, config=folder)
    assert (generate(pipe) - generate(loaded)).abs().max().item() <= 1e-5


def test_real_file_quirks_are_tolerated(files, pipes, tmp_path):
    """SD 2.x files carry OpenCLIP's unused last block and projection; older SD 1.x lack 'text_model.'."""
    tensors, meta = read_all(files("sd2"))
    prefix = "cond_stage_model.model.transformer.resblocks."
    n = 1 + max(int(k[len(prefix):].split(".")[0]) for k in tensors if k.startswith(prefix))
    for k in [k for k in tensors if k.startswith(f"{prefix}0.")]:
        tensors[k.replace(f"{prefix}0.", f"{prefix}{n}.")] = tensors[k].clone()
    tensors["cond_stage_model.model.text_projection"] = torch.eye(24)
    tensors["cond_stage_model.model.logit_scale"] = torch.tensor(4.6)
    tensors["alphas_cumprod"] = torch.ones(1000)
    save_file(tensors, str(tmp_path / "sd2.safetensors"), metadata=meta)
    assert load_single_file(tmp_path / "sd2.safetensors").text_encoder.config.num_hidden_layers == n

    tensors, meta = read_all(files("sd1"))
    old = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
           for k, v in tensors.items()}
    save_file(old, str(tmp_path / "old.safetensors"), metadata=meta)
    loaded = load_single_file(tmp_path / "old.safetensors")
    assert torch.equal(loaded.text_encoder.embeddings.token_embedding.weight,
                       pipes("sd1").text_encoder.embeddings.token_embedding.weight)


# ---------------------------------------------------------------------------------------------
# key layouts against real files' names, and against diffusers' own converters
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bundled, real, absent", [
    ("sd15", REAL_SD15, NOT_SD15),
    ("sd21", REAL_SD21, []),
    ("sd21-v", REAL_SD21, []),
    ("sdxl", REAL_SDXL, NOT_SDXL),
])
def test_bundled_architectures_write_real_key_names(bundled, real, absent):
    ldm = convert_to_ldm(meta_components(bundled), BUNDLED[bundled])
    wrong = {k: (tuple(ldm[k].shape) if k in ldm else "missing") for k, shape in real.items()
             if k not in ldm or tuple(ldm[k].shape) != shape}
    assert not wrong
    assert not [k for k in absent if k in ldm]
    assert detect_checkpoint_family(ldm) == BUNDLED[bundled]


@pytest.mark.parametrize("bundled, pipeline, prediction, pads", [
    ("sd15", "StableDiffusionPipeline", "epsilon", {"tokenizer": "<|endoftext|>"}),
    ("sd21", "StableDiffusionPipeline", "epsilon", {"tokenizer": "!"}),
    ("sd21-v", "StableDiffusionPipeline", "v_prediction", {"tokenizer": "!"}),
    ("sdxl", "StableDiffusionXLPipeline", "epsilon", {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}),
])
def test_bundled_config_sets_are_complete(bundled, pipeline, prediction, pads):
    from studio.single_file import _scheduler

    root = CONFIGS_DIR / bundled
    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] == pipeline
    scheduler = _scheduler(json.loads((root / "scheduler/scheduler_config.json").read_text()), bundled, None)
    assert type(scheduler).__name__ == index["scheduler"][1]
    assert scheduler.config.prediction_type == prediction
    for name, pad in pads.items():
        cfg = json.loads((root / name / "tokenizer_config.json").read_text())
        assert cfg["pad_token"] == pad and cfg["model_max_length"] == 77
    assert not list(root.rglob("vocab.json")) and not list(root.rglob("merges.txt"))


@pytest.mark.parametrize("bundled", ["sd15", "sd21", "sdxl"])
def test_diffusers_converters_read_our_layout_back_real_size(bundled):
    family = BUNDLED[bundled]
    comps = meta_components(bundled)
    read = diffusers_reading(convert_to_ldm(comps, family), comps, family)
    for name, state in read.items():
        expected = {k: tuple(v.shape) for k, v in comps[name].state_dict().items()}
        assert {k: tuple(v.shape) for k, v in state.items()} == expected, name


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_diffusers_converters_read_our_values_back(family, pipes):
    pipe = pipes(family)
    read = diffusers_reading(convert_to_ldm(pipe.components, family), pipe.components, family)
    for name, state in read.items():
        original = pipe.components[name].state_dict()
        assert state.keys() == original.keys(), name
        assert all(torch.equal(state[k], original[k]) for k in original), name


def test_tiny_layouts_use_the_original_prefixes(files):
    prefixes = {
        "sd1": ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model."),
        "sd2": ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.model."),
        "sdxl": ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.text_model.",
                 "conditioner.embedders.1.model."),
    }
    for family, allowed in prefixes.items():
        keys = set(read_header(files(family))[0])
        assert all(k.startswith(allowed) for k in keys), family
        assert all(any(k.startswith(p) for k in keys) for p in allowed), family
    sdxl = set(read_header(files("sdxl"))[0])
    assert {"model.diffusion_model.label_emb.0.0.weight", "model.diffusion_model.label_emb.0.2.weight",
            "conditioner.embedders.1.model.text_projection",
            "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"} <= sdxl


# ---------------------------------------------------------------------------------------------
# family detection
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keys, family", [
    ([*REAL_SD15, "alphas_cumprod", "model_ema.decay"], "sd1"),
    ([*REAL_SD21, *REAL_SD21_UNUSED], "sd2"),
    (list(REAL_SDXL), "sdxl"),
])
def test_detect_family_from_real_keys(keys, family):
    assert detect_checkpoint_family(keys) == family


@pytest.mark.parametrize("keys, words", [
    (LORA_KEYS, "looks like a LoRA, not a base model; use it with --adapter"),
    (["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"], "use it with --adapter"),
    (["encoder.down.0.block.0.conv1.weight", "decoder.up.0.block.0.conv1.weight"], "standalone VAE"),
    (["down_blocks.0.resnets.0.conv1.weight", "conv_in.weight"], "model_index.json"),
    (["emb_params"], "textual-inversion"),
    (["model.diffusion_model.input_blocks.0.0.weight",
      "conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight"], "SDXL refiner"),
    (["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.quantize.embedding.weight",
      "cond_stage_model.transformer.attn_layers.layers.0.0.fn.to_q.weight"], "LDM has no standard single-file"),
    (["double_blocks.0.img_attn.qkv.weight"], "unsupported family"),
    (["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight"], "no known text encoder"),
    (["foo.weight", "bar"], "no base-model weights"),
])
def test_detect_family_rejects_what_is_not_a_base_model(keys, words):
    with pytest.raises(StudioError, match="x.safetensors: .*" + words.replace("(", r"\(").replace(".", r"\.")):
        detect_checkpoint_family(keys, source="x.safetensors")


def test_v_prediction_guess(tmp_path):
    assert guess_v_prediction(Path("v2-1_768-ema-pruned.safetensors"))
    assert guess_v_prediction(Path("my-model-v-pred.safetensors"))
    assert not guess_v_prediction(Path("v2-1_512-ema-pruned.safetensors"))
    sidecar = tmp_path / "v2-1_512-custom.safetensors"
    sidecar.with_suffix(".yaml").write_text("model:\n  params:\n    parameterization: \"v\"\n")
    assert guess_v_prediction(sidecar)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


def test_truncated_file(files, tmp_path):
    data = files("sd1").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(StudioError, match=r"cut\.safetensors: not a valid \.safetensors checkpoint \(truncated"):
        load_pipeline(cut)
    cut.write_bytes(data[:5])
    with pytest.raises(StudioError, match="not a valid .safetensors checkpoint"):
        load_pipeline(cut)


def test_random_bytes(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1),
                                   dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(StudioError, match=r"junk\.safetensors: not a valid \.safetensors checkpoint"):
        load_pipeline(junk)
    header = b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}'  # JSON cut short
    junk.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(StudioError, match="header is not JSON"):
        load_pipeline(junk)


def test_lora_and_unknown_files(tmp_path):
    with pytest.raises(StudioError, match=r"lora\.safetensors: looks like a LoRA.*--adapter"):
        load_pipeline(write_keys(tmp_path / "lora.safetensors", LORA_KEYS))
    with pytest.raises(StudioError, match=r"odd\.safetensors: no base-model weights"):
        load_pipeline(write_keys(tmp_path / "odd.safetensors", ["foo.weight", "bar.bias"]))


def test_pickle_needs_trust(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.out.2.weight": torch.zeros(1)}}, ckpt)
    with pytest.raises(StudioError, match=r"model\.ckpt: a pickle checkpoint.*--trust-pickle"):
        load_pipeline(ckpt)
    with pytest.raises(StudioError, match="--trust-pickle"):
        load_single_file(ckpt)
    ckpt.write_bytes(b"not a pickle at all")
    with pytest.raises(StudioError, match=r"model\.ckpt: not a valid \.ckpt checkpoint"):
        load_single_file(ckpt, trust_pickle=True)


def _rewrite(src: Path, dst: Path, change) -> Path:
    tensors, meta = read_all(src)
    change(tensors)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def test_missing_surplus_and_misshapen_weights(files, tmp_path):
    src = files("sd1")
    key = "model.diffusion_model.out.2.weight"
    with pytest.raises(StudioError, match=r"missing\.safetensors: 1 weight\(s\) .* missing \(e\.g\. " + key):
        load_pipeline(_rewrite(src, tmp_path / "missing.safetensors", lambda t: t.pop(key)))
    with pytest.raises(StudioError, match=r"shape\.safetensors: shape mismatch .*" + key.replace(".", r"\.")):
        load_pipeline(_rewrite(src, tmp_path / "shape.safetensors", lambda t: t.update({key: torch.zeros(3, 3)})))
    extra = "model.diffusion_model.input_blocks.42.0.in_layers.0.weight"
    with pytest.raises(StudioError, match=r"extra\.safetensors: 1 weight\(s\) .* no place for .*input_blocks\.42"):
        load_pipeline(_rewrite(src, tmp_path / "extra.safetensors", lambda t: t.update({extra: torch.zeros(2)})))


def test_bundled_configs_without_vocabulary_ask_for_a_tokenizer_folder(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    path = write_keys(tmp_path / "v1-5-pruned-emaonly.safetensors", REAL_SD15)
    with pytest.raises(StudioError, match=r"v1-5-pruned-emaonly\.safetensors: no CLIP tokenizer vocabulary .*"
                                          r"--config DIR where DIR/tokenizer/ holds vocab\.json and merges\.txt"):
        load_pipeline(path)
    # a folder holding only the tokenizer layers over the bundled sd15 configs, which then
    # (rightly) find this key-only file incomplete
    cfg = tmp_path / "cfg"
    tiny_tokenizer().save_pretrained(cfg / "tokenizer")
    with pytest.raises(StudioError, match=r"weight\(s\) that --config .* \(over the bundled sd15 configs\) need"):
        load_pipeline(path, config=cfg)


def test_bundled_configs_use_a_vocabulary_already_in_the_hub_cache(tmp_path, monkeypatch):
    """A CLIP vocabulary in the local Hugging Face cache serves, with the bundled tokenizer config."""
    import huggingface_hub.constants

    from studio.micro.configs import vocabulary
    from studio.micro.tokenizer import write_tokenizer
    from studio.single_file import _folder_spec, _tokenizer, open_checkpoint

    cache = tmp_path / "hub"
    repo = cache / "models--openai--clip-vit-large-patch14"
    snapshot = repo / "snapshots" / ("0" * 40)
    write_tokenizer(snapshot, vocabulary())
    (snapshot / "tokenizer_config.json").unlink()
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    path = write_keys(tmp_path / "v2-1_512-ema-pruned.safetensors", [*REAL_SD21, *REAL_SD21_UNUSED])
    spec = _folder_spec(open_checkpoint(path), "sd2", "sd21", None)
    tok = _tokenizer("tokenizer", spec.tokenizers["tokenizer"], spec.source)
    assert tok.pad_token == "!" and tok("red circle").input_ids == tiny_tokenizer()("red circle").input_ids
    with pytest.raises(StudioError, match=r"weight\(s\) that the bundled sd21 configs need are missing"):
        load_pipeline(path)


@pytest.mark.parametrize("name, bundled", [("v2-1_768-ema-pruned.safetensors", "sd21-v"),
                                           ("v2-1_512-ema-pruned.safetensors", "sd21")])
def test_sd2_files_pick_the_bundled_config_by_name(name, bundled, tmp_path):
    path = write_keys(tmp_path / name, [*REAL_SD21, *REAL_SD21_UNUSED])
    cfg = tmp_path / "cfg"
    tiny_tokenizer(pad="!").save_pretrained(cfg / "tokenizer")
    with pytest.raises(StudioError, match=rf"over the bundled {bundled} configs\)"):
        load_single_file(path, config=cfg)


def test_ldm_and_adapter_pipelines_are_refused(pipes, tmp_path):
    with pytest.raises(StudioError, match="LDM has no standard single-file format"):
        save_single_file(tiny_pipeline("ldm"), tmp_path / "ldm.safetensors")
    with pytest.raises(StudioError, match=r"\.safetensors"):
        save_single_file(pipes("sd1"), tmp_path / "model.ckpt")
    assert not list(tmp_path.iterdir())


def test_write_is_atomic(pipes, tmp_path, monkeypatch):
    import safetensors.torch

    target = tmp_path / "model.safetensors"
    target.write_bytes(b"previous")

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        save_single_file(pipes("sd1"), target)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
