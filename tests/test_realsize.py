"""Real-size architectures (issue 15): the factory, family detection, training, kohya key sets.

The default suite builds the factory's models with every width divided by 16 (same blocks,
layers and so key names as the real ones) and checks key layouts of the full-size models on the
meta device. The full-size checks (GBs of weights, minutes per step on a CPU) are marked slow:
``pytest -m slow tests/test_realsize.py``; they build into $STUDIO_REALSIZE_DIR, else
~/.cache/diffusion-studio/realsize, and reuse what is there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from studio import realsize
from studio.cli import main
from studio.single_file import detect_checkpoint_family, read_header

FIXTURES = Path(__file__).parent / "fixtures"
FAMILY = {"sd15": "sd1", "sd21": "sd2", "sdxl": "sdxl"}
PREDICTION = {"sd15": "epsilon", "sd21": "v_prediction", "sdxl": "epsilon"}
# the shared cache of full-size builds: the conftest gives every test its own STUDIO_HOME
SHARED_CACHE = Path(os.environ.get("STUDIO_REALSIZE_DIR") or Path.home() / ".cache" / "diffusion-studio" / "realsize")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Each model built at widths / 16 by the factory: {name: RealsizeFiles}."""
    root = tmp_path_factory.mktemp("realsize-small")
    return lambda name: realsize.make(name, root / name, width_div=16)


@pytest.mark.parametrize("name", sorted(realsize.MODELS))
def test_small_build_has_the_full_size_key_layout(name, small):
    files = small(name)
    shapes, meta = read_header(files.single_file)
    full = realsize.single_file_keys(name)  # full-size models on the meta device
    assert set(shapes) == set(full)
    assert detect_checkpoint_family(full) == FAMILY[name]
    assert meta["studio.family"] == FAMILY[name]
    # the diffusers folder holds the same components, with the same key names as full size
    keys = realsize.key_names(name)
    from safetensors import safe_open

    for comp, names in keys.items():
        stored = set()
        for f in (files.folder / comp).glob("*.safetensors"):
            with safe_open(str(f), "pt") as fh:
                stored |= set(fh.keys())
        assert stored == set(names), comp


def test_full_size_parameter_counts_on_meta():
    """The architectures are the real ones: parameter counts of the published models."""
    def count(name: str) -> dict[str, float]:
        with torch.device("meta"):
            pipe = realsize.build_pipeline(name, dtype=torch.float32)
        return {c: round(sum(p.numel() for p in pipe.components[c].parameters()) / 1e6, 1)
                for c in realsize.component_configs(name)}

    assert count("sd15") == {"unet": 859.5, "vae": 83.7, "text_encoder": 123.1}
    sd21 = count("sd21")
    assert sd21["unet"] == 865.9 and sd21["text_encoder"] == 340.4  # 23 of OpenCLIP-H's 24 layers
    sdxl = count("sdxl")
    assert sdxl["unet"] == 2567.5 and sdxl["text_encoder_2"] == 694.7


@pytest.mark.parametrize("name", sorted(realsize.MODELS))
def test_info_names_family_and_prediction(name, small, capsys):
    files = small(name)
    assert main(["info", str(files.single_file), "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["family"] == FAMILY[name] and info["source"] == "file"
    assert info["scheduler"]["prediction_type"] == PREDICTION[name]


def test_make_reuses_a_complete_build_and_refuses_foreign_folders(small, tmp_path, capsys):
    files = small("sd15")
    stamp = files.single_file.stat().st_mtime_ns
    again = realsize.make("sd15", files.single_file.parent, width_div=16)
    assert again.single_file.stat().st_mtime_ns == stamp
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["realsize", "make", "sd15", "--width-div", "16", "--out", str(foreign)]) == 2
    assert "not a real-size build" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(Exception, match="unknown real-size model"):
        realsize.get_model("sd3")


def test_cli_make_prints_the_paths(tmp_path, capsys):
    assert main(["realsize", "make", "sd21", "--width-div", "16", "--out", str(tmp_path / "m"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert Path(info["single_file"]).name == "sd21-768-v.safetensors"
    assert (Path(info["folder"]) / "model_index.json").is_file()
    assert not (tmp_path / "m" / ".building").exists()
