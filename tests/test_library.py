"""studio.library: the adapter library (SQLite + folders), its commands, and its crash safety.

Adapters are real: studio files saved from a tiny pipeline, and kohya / LyCORIS / diffusers files
with the key names and header entries of community files. The crash tests kill a process with
SIGKILL at each named stage of a write (and at random instants), then open the library and check
that the database and the folders agree and the adapter is wholly there or wholly absent.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import select
import signal
import sqlite3
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from studio import library
from studio.cli import main
from studio.errors import StudioError
from studio.library import AdapterRecord, Library, check_family, resolve_adapter

posix_only = pytest.mark.skipif(not hasattr(os, "fork"), reason="the crash tests kill forked processes (POSIX)")

SD1_UNET = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
SD1_CONV = "lora_unet_down_blocks_0_resnets_0_conv1"
SD1_TE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
SDXL_TE1 = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
SDXL_TE2 = "lora_te2_text_model_encoder_layers_0_mlp_fc1"


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _lora(name: str, down: tuple[int, ...], up: tuple[int, ...], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"{name}.lora_down.weight": torch.randn(*down, generator=g),
            f"{name}.lora_up.weight": torch.randn(*up, generator=g), f"{name}.alpha": torch.tensor(2.0)}


def _community_files(root: Path) -> dict[str, Path]:
    """Files as kohya sd-scripts, LyCORIS and diffusers write them (names and header entries)."""
    root.mkdir(parents=True, exist_ok=True)
    files: dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]] = {
        "kohya-sd1": ({**_lora(SD1_UNET, (4, 320), (320, 4)), **_lora(SD1_TE, (4, 768), (768, 4), 1)},
                      {"ss_base_model_version": "sd_v1", "ss_network_module": "networks.lora",
                       "ss_sd_model_name": "v1-5-pruned.safetensors", "ss_new_sd_model_hash": "a" * 64,
                       "ss_tag_frequency": json.dumps({"10_ohwx dog": {"ohwx dog": 20, "grass": 4, "dog": 19}}),
                       "ss_training_comment": "my dog"}),
        "kohya-sdxl": ({**_lora(SDXL_TE1, (4, 768), (768, 4)), **_lora(SDXL_TE2, (4, 1280), (5120, 4), 1)}, {}),
        "locon": ({**_lora(SD1_UNET, (4, 320), (320, 4)), **_lora(SD1_CONV, (4, 320, 3, 3), (320, 4, 1, 1), 1)},
                  {"ss_base_model_version": "sd_v1",
                   "ss_dataset_dirs": json.dumps({"5_zwx style": {"n_repeats": 5, "img_count": 10}})}),
        "loha": ({f"{SD1_UNET}.{p}": torch.randn(4, 320) if p.endswith("b") else torch.randn(320, 4)
                  for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")} | {f"{SD1_UNET}.alpha": torch.tensor(4.0)},
                 {"ss_base_model_version": "sd_v2", "modelspec.trigger_phrase": "pxl art, retro"}),
        "lokr": ({f"{SD1_UNET}.lokr_w1": torch.randn(4, 4), f"{SD1_UNET}.lokr_w2": torch.randn(80, 80)},
                 {"modelspec.architecture": "stable-diffusion-xl-v1-base"}),
        # diffusers' own trainer output: PEFT names under the component, no studio entries
        "diffusers": ({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight":
                       torch.randn(4, 1024),
                       "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight":
                       torch.randn(320, 4)}, {"format": "pt"}),
    }
    out = {}
    for key, (tensors, meta) in files.items():
        target = root / key / "pytorch_lora_weights.safetensors" if key == "diffusers" else root / f"{key}.safetensors"
        target.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(target), metadata=meta)
        out[key] = target.parent if key == "diffusers" else target
    return out


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Studio adapters saved from a tiny sd1 pipeline (LoRA with samples, LoHa) and community files."""
    from studio.adapters import AdapterSettings, add_adapter, save_adapter
    from studio.testing import tiny_pipeline

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("adapters")
    pipe = tiny_pipeline("sd1")
    meta = {"kind": "subject", "trigger": "sks", "base": "micro", "base_family": "sd1", "base_hash": "0123456789",
            "train_config": {"steps": 2, "rank": 2, "kind": "subject"}, "class_word": "shape"}
    add_adapter(pipe, "lora", AdapterSettings(rank=2), "default")
    save_adapter(pipe, root / "subj", "default", metadata=meta)
    (root / "subj" / "samples").mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / "subj" / "samples" / f"step-2-{i}.png")
    (root / "subj" / "checkpoints").mkdir()  # training state stays out of the library
    (root / "subj" / "checkpoints" / "state.safetensors").write_bytes(b"x" * 64)
    add_adapter(pipe, "loha", AdapterSettings(rank=2), "style")
    save_adapter(pipe, root / "loha-style", "style", metadata={**meta, "kind": "style", "trigger": "zkz"})
    # the same LoRA with other weights, for replace
    with torch.no_grad():
        for p in pipe.unet.parameters():
            if p.requires_grad:
                p.add_(0.5)
    save_adapter(pipe, root / "subj-v2", "default", metadata=meta)
    return types.SimpleNamespace(root=root, pipe=pipe, subj=root / "subj", loha=root / "loha-style",
                                 subj2=root / "subj-v2", files=_community_files(root / "community"))


def _home() -> Path:
    return Path(os.environ["STUDIO_HOME"])


def _assert_consistent(home: Path) -> dict[str, AdapterRecord]:
    """Open the library (finishing any interrupted write) and check that rows and folders agree."""
    records = {r.name: r for r in Library(home).list()}
    if (home / library.DB_NAME).exists():
        con = sqlite3.connect(home / library.DB_NAME)
        assert con.execute("SELECT count(*) FROM adapters WHERE state != 'ready'").fetchone()[0] == 0
        con.close()
    folders = sorted(p.name for p in (home / "adapters").iterdir()) if (home / "adapters").is_dir() else []
    assert folders == sorted(records), "every folder has a row and every row a folder"
    for r in records.values():
        assert r.file.is_file() and _sha(r.file) == r.file_hash, f"{r.name}: file whole and as recorded"
        assert all(s.is_file() for s in r.samples)
    tmp = home / library.TMP_DIR
    assert not tmp.exists() or not list(tmp.iterdir()), "no staging copies or trash left behind"
    return records


# ----------------------------------------------------------------------------------------------
# add / get / find
# ----------------------------------------------------------------------------------------------


def test_add_a_training_folder_keeps_its_metadata_samples_and_weights(made):
    lib = Library()
    rec = lib.add(made.subj, description="red heart")
    assert rec.name == "subj" and rec.path == _home() / "adapters" / "subj"
    assert (_home() / "library.sqlite").is_file()
    assert rec.file == rec.path / "pytorch_lora_weights.safetensors" and rec.file_hash == _sha(made.subj / rec.file.name)
    assert (rec.method, rec.kind, rec.family, rec.base, rec.base_hash) == ("lora", "subject", "sd1", "micro", "0123456789")
    assert rec.triggers == ["sks"] and rec.description == "red heart"
    assert rec.train_config == {"steps": 2, "rank": 2, "kind": "subject"}
    assert [p.name for p in rec.samples] == ["step-2-0.png", "step-2-1.png"] and all(p.is_file() for p in rec.samples)
    assert not (rec.path / "checkpoints").exists()
    assert abs(rec.created - time.time()) < 60
    assert lib.get("subj") == rec and lib.get("SUBJ") == rec  # names are case-insensitive
    assert json.loads(json.dumps(rec.to_dict()))["file"] == str(rec.file)
    # what the library holds is a working adapter: it loads back into the pipeline
    from studio.adapters import load_adapter, remove_adapter

    load_adapter(made.pipe, rec.file, "from-library")
    remove_adapter(made.pipe, "from-library")
    _assert_consistent(_home())


def test_add_a_studio_loha_by_its_file_path(made):
    rec = Library().add(made.loha / "studio_adapter.safetensors")
    assert (rec.name, rec.method, rec.kind, rec.triggers) == ("loha-style", "loha", "style", ["zkz"])
    assert rec.file.name == "studio_adapter.safetensors"


@pytest.mark.parametrize("key,method,family,triggers", [
    ("kohya-sd1", "lora", "sd1", ["ohwx dog", "dog"]),  # the tags in most captions, not "grass"
    ("kohya-sdxl", "lora", "sdxl", []),                 # lora_te1_/lora_te2_ names say SDXL
    ("locon", "locon", "sd1", ["zwx style"]),           # 3x3 convolutions; trigger from the 5_zwx style folder
    ("loha", "loha", "sd2", ["pxl art", "retro"]),
    ("lokr", "lokr", "sdxl", []),
    ("diffusers", "lora", "sd2", []),                   # no header: the 1024-wide cross-attention says SD 2.x
])
def test_add_community_files(made, key, method, family, triggers):
    rec = Library().add(made.files[key])
    assert (rec.name, rec.method, rec.family, rec.triggers, rec.kind) == (key, method, family, triggers, "other")
    assert rec.file_hash == _sha(library._locate(made.files[key])[0])
    if key == "kohya-sd1":
        assert rec.base == "v1-5-pruned.safetensors" and rec.base_hash == "a" * 10
        assert rec.description == "my dog" and rec.train_config["ss_network_module"] == "networks.lora"
        assert "ss_tag_frequency" not in rec.train_config
    _assert_consistent(_home())


def test_add_with_kind_and_name(made):
    rec = Library().add(made.files["loha"], name="Retro.Pixels_1", kind="style", description="d")
    assert (rec.name, rec.kind, rec.description) == ("Retro.Pixels_1", "style", "d")
    assert rec.path.name == "Retro.Pixels_1" and rec.file.name == "loha.safetensors"


def test_bad_inputs_leave_nothing_behind(made, tmp_path):
    lib = Library()
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "model.pt").write_bytes(b"\x80\x02")
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, str(tmp_path / "ckpt.safetensors"))
    good = made.files["kohya-sd1"].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(good[: len(good) // 2])
    (tmp_path / "empty").mkdir()
    (tmp_path / "several").mkdir()
    for name in ("a", "b"):
        (tmp_path / "several" / f"{name}.safetensors").write_bytes(good)
    cases = {
        tmp_path / "missing.safetensors": "no such adapter file or folder",
        tmp_path / "notes.txt": "read from .safetensors files",
        tmp_path / "model.pt": "pickled weights",
        tmp_path / "ckpt.safetensors": "not an adapter",
        tmp_path / "cut.safetensors": "not a readable .safetensors file",
        tmp_path / "empty": "no adapter file",
        tmp_path / "several": "holds 2 .safetensors files; .*studio library import",
    }
    for path, message in cases.items():
        with pytest.raises(StudioError, match=message) as exc:
            lib.add(path)
        assert str(path) in str(exc.value)
    for name in ("has space", "a/b", "x:1", "<lora>", "-lead", "é", "x" * 81):
        with pytest.raises(StudioError, match="letters, digits"):
            lib.add(made.subj, name=name)
    with pytest.raises(StudioError, match="choose one of subject, style, content, combined, other"):
        lib.add(made.subj, kind="person")
    assert lib.list() == []
    assert not (_home() / "adapters").exists() or not list((_home() / "adapters").iterdir())
    _assert_consistent(_home())


def test_duplicate_names_replace_and_unique(made):
    lib = Library()
    first = lib.add(made.subj, name="dup")
    with pytest.raises(StudioError, match="already in the library as 'dup'.*--name.*--replace"):
        lib.add(made.subj, name="dup")
    with pytest.raises(StudioError, match="the name 'dup' is taken"):
        lib.add(made.subj2, name="DUP")  # the same name in another case is the same name
    lib.set_embedding("dup", np.ones(4))
    replaced = lib.add(made.subj2, name="dup", replace=True)
    assert replaced.name == "dup" and replaced.file_hash == _sha(made.subj2 / "pytorch_lora_weights.safetensors")
    assert replaced.file_hash != first.file_hash and _sha(replaced.file) == replaced.file_hash
    assert lib.embedding("dup") is None  # the old weights' retrieval vector does not describe the new ones
    second = lib.add(made.subj, name="dup", unique=True)
    third = lib.add(made.subj, name="dup", unique=True)
    assert (second.name, third.name) == ("dup-2", "dup-3")
    assert sorted(_assert_consistent(_home())) == ["dup", "dup-2", "dup-3"]


def test_a_foreign_folder_in_the_way_is_not_overwritten(made):
    (_home() / "adapters" / "subj").mkdir(parents=True)
    (_home() / "adapters" / "subj" / "mine.txt").write_text("keep")
    with pytest.raises(StudioError, match="exists but is not in the library"):
        Library().add(made.subj)
    assert (_home() / "adapters" / "subj" / "mine.txt").read_text() == "keep"
    assert Library().add(made.subj, unique=True).name == "subj-2"


def test_get_unknown_names_close_matches():
    lib = Library()
    with pytest.raises(StudioError, match="the library .* is empty"):
        lib.get("anything")
    assert Library(_home() / "nowhere").list() == [] and not (_home() / "nowhere").exists()  # reads create nothing


def test_get_unknown_suggests(made):
    lib = Library()
    for name in ("red-heart", "blue-star", "watercolor"):
        lib.add(made.files["lokr"], name=name)
    with pytest.raises(StudioError, match=r"no adapter named 'red-hart'.*did you mean red-heart\?"):
        lib.get("red-hart")
    with pytest.raises(StudioError, match=r"did you mean watercolor"):
        lib.embedding("water")
    with pytest.raises(StudioError, match=r"3 adapters in it"):
        lib.get("zzzzzz")


def test_find_searches_names_triggers_and_descriptions(made):
    lib = Library()
    lib.add(made.subj, description="A red HEART")
    lib.add(made.files["loha"])
    lib.add(made.files["kohya-sdxl"], name="other")
    assert [r.name for r in lib.find("heart")] == ["subj"]
    assert [r.name for r in lib.find("PXL")] == ["loha"]
    assert [r.name for r in lib.find("oth")] == ["other"]
    assert [r.name for r in lib.find("")] == ["loha", "other", "subj"] == [r.name for r in lib.list()]


def test_a_file_deleted_by_hand_is_reported(made):
    lib = Library()
    rec = lib.add(made.subj)
    rec.file.unlink()
    with pytest.raises(StudioError, match="is missing.*studio library remove subj"):
        lib.get("subj")
    lib.remove("subj")
    assert lib.list() == []


# ----------------------------------------------------------------------------------------------
# rename / remove / import
# ----------------------------------------------------------------------------------------------


def test_rename(made):
    lib = Library()
    lib.add(made.subj)
    lib.add(made.files["loha"])
    rec = lib.rename("subj", "heart")
    assert rec.name == "heart" and rec.path == _home() / "adapters" / "heart" and rec.file.is_file()
    assert all(s.is_file() and s.parent.parent == rec.path for s in rec.samples)
    assert not (_home() / "adapters" / "subj").exists()
    with pytest.raises(StudioError, match="no adapter named 'subj'"):
        lib.get("subj")
    with pytest.raises(StudioError, match="already has an adapter named 'loha'"):
        lib.rename("heart", "LOHA")
    with pytest.raises(StudioError, match="letters, digits"):
        lib.rename("heart", "a heart")
    with pytest.raises(StudioError, match="did you mean heart"):
        lib.rename("haert", "x")
    assert lib.rename("heart", "Heart").name == "Heart"  # a change of case only
    assert lib.rename("Heart", "Heart").name == "Heart"
    _assert_consistent(_home())


def test_remove_twice(made):
    lib = Library()
    rec = lib.add(made.subj)
    lib.remove("SUBJ")
    assert not rec.path.exists() and lib.list() == []
    with pytest.raises(StudioError, match="no adapter named 'subj'"):
        lib.remove("subj")
    _assert_consistent(_home())


def test_import_dir_adds_what_it_finds_and_says_what_it_skipped(made, tmp_path):
    import shutil

    src = tmp_path / "downloads"
    shutil.copytree(made.subj, src / "trained" / "subj")
    shutil.copytree(made.files["diffusers"], src / "trained" / "diffusers")
    shutil.copy(made.files["kohya-sd1"], src / "kohya-sd1.safetensors")
    (src / "nested" / "deeper").mkdir(parents=True)
    shutil.copy(made.files["loha"], src / "nested" / "deeper" / "loha.safetensors")
    shutil.copy(made.files["loha"], src / "nested" / "loha-copy.safetensors")  # the same file twice
    save_file({"first_stage_model.decoder.conv_in.weight": torch.zeros(2)}, str(src / "vae.safetensors"))
    (src / "old.ckpt").write_bytes(b"\x80\x02")
    (src / "readme.txt").write_text("not weights")
    (src / ".hidden").mkdir()
    shutil.copy(made.files["lokr"], src / ".hidden" / "lokr.safetensors")
    skipped: list[tuple[Path, str]] = []
    added = Library().import_dir(src, skipped=skipped)
    assert sorted(r.name for r in added) == ["diffusers", "kohya-sd1", "loha", "subj"]
    reasons = {p.name: why for p, why in skipped}
    assert set(reasons) == {"loha-copy.safetensors", "vae.safetensors", "old.ckpt"}
    assert reasons["loha-copy.safetensors"] == "already in the library as 'loha'"
    assert "not an adapter" in reasons["vae.safetensors"] and "pickled" in reasons["old.ckpt"]
    assert next(r for r in added if r.name == "subj").samples  # a training folder comes with its samples
    again: list[tuple[Path, str]] = []
    assert Library().import_dir(src, skipped=again) == []
    assert len(again) == 7 and sum("already in the library" in why for _, why in again) == 5
    with pytest.raises(StudioError, match="not a folder"):
        Library().import_dir(src / "kohya-sd1.safetensors")
    _assert_consistent(_home())


def test_a_lost_database_is_rebuilt_from_the_adapter_folders(made):
    lib = Library()
    lib.add(made.subj, name="one")
    lib.add(made.files["locon"], name="two")
    before = {r.name: r.file_hash for r in lib.list()}
    (_home() / "library.sqlite").unlink()
    added = lib.import_dir(_home() / "adapters")
    assert {r.name: r.file_hash for r in added} == before  # registered in place, not copied to new names
    assert sorted(p.name for p in (_home() / "adapters").iterdir()) == ["one", "two"]
    assert lib.get("one").samples and lib.get("two").method == "locon"
    _assert_consistent(_home())


def test_unreadable_database(made):
    home = _home()
    home.mkdir(parents=True)
    (home / "library.sqlite").write_bytes(b"this is not sqlite" * 100)
    lib = Library()
    for call in (lib.list, lambda: lib.get("x"), lambda: lib.add(made.subj), lambda: lib.remove("x")):
        with pytest.raises(StudioError, match=r"library\.sqlite: the library database cannot be read .*"
                                              r"studio library import"):
            call()
    (home / "library.sqlite").unlink()
    con = sqlite3.connect(home / "library.sqlite")
    con.execute("PRAGMA user_version = 99")
    con.close()
    with pytest.raises(StudioError, match="newer diffusion-studio"):
        lib.list()


def test_embeddings(made):
    lib = Library()
    lib.add(made.subj)
    assert lib.embedding("subj") is None
    lib.set_embedding("subj", [0.5, -1, 2])
    vec = lib.embedding("subj")
    assert vec.dtype == np.float32 and vec.tolist() == [0.5, -1.0, 2.0]
    with pytest.raises(StudioError, match="1-D"):
        lib.set_embedding("subj", np.ones((2, 2)))
    with pytest.raises(StudioError, match="NaN"):
        lib.set_embedding("subj", [1.0, float("nan")])
    with pytest.raises(StudioError, match="no adapter named 'sub'"):
        lib.set_embedding("sub", [1.0])
    assert lib.embedding("subj").tolist() == [0.5, -1.0, 2.0]  # a refused vector changes nothing
    assert lib.embedding_with_source("subj")[1] == ""
    lib.set_embedding("subj", [1, 2], source="enc-abc")
    vec, source = lib.embedding_with_source("subj")
    assert vec.tolist() == [1.0, 2.0] and source == "enc-abc" and lib.embedding("subj").tolist() == [1.0, 2.0]
    lib.set_embedding("subj", None)
    assert lib.embedding("subj") is None and lib.embedding_with_source("subj") == (None, "")


def test_resolve_adapter(made, tmp_path):
    assert resolve_adapter(str(made.subj)) == made.subj  # a path stays a path
    rec = Library().add(made.subj, name="heart")
    assert resolve_adapter("heart") == rec.file == resolve_adapter("HEART")
    with pytest.raises(StudioError, match=r"no adapter of that name in the library .*did you mean heart"):
        resolve_adapter("hart")
    with pytest.raises(StudioError, match="no such file or folder"):
        resolve_adapter(str(tmp_path / "missing" / "x.safetensors"))
    with pytest.raises(StudioError, match="no adapter of that name"):
        resolve_adapter("heart", home=tmp_path / "other-home")


def test_check_family(made, tmp_path):
    from studio.loading import ModelSource

    lib = Library()
    sd1 = lib.add(made.subj)
    check_family(sd1, made.pipe)  # no studio_source: the family is detected (sd1)
    check_family(made.subj, made.pipe)
    check_family("subj", made.pipe)
    check_family(made.files["kohya-sd1"], made.pipe)
    xl = lib.add(made.files["kohya-sdxl"], name="xl-thing")
    made.pipe.studio_source = ModelSource(spec="micro", kind="micro", path="micro", family="sd1")
    try:
        with pytest.raises(StudioError, match=r"adapter 'xl-thing' was made for sdxl models, but the base model "
                                              r"micro is sd1"):
            check_family(xl, made.pipe)
        with pytest.raises(StudioError, match="made for sdxl"):
            check_family(made.files["lokr"], made.pipe)
        unknown = tmp_path / "nofamily.safetensors"
        save_file(_lora("lora_unet_mid_block_attentions_0_proj_in", (2, 7), (7, 2)), str(unknown))
        check_family(unknown, made.pipe)  # the file does not say: allowed
    finally:
        del made.pipe.studio_source


# ----------------------------------------------------------------------------------------------
# the command line
# ----------------------------------------------------------------------------------------------


def _fails(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("studio: error: ") and "Traceback" not in "\n".join(err)
    return err[-1]


def test_cli_every_command(made, tmp_path, capsys):
    assert main(["library", "list"]) == 0
    assert capsys.readouterr().out == ""
    assert main(["library", "add", str(made.subj), "--name", "accsubj", "--description", "a heart"]) == 0
    assert capsys.readouterr().out.strip() == "accsubj"
    assert main(["library", "add", str(made.files["loha"]), "--kind", "style"]) == 0
    assert capsys.readouterr().out.strip() == "loha"
    assert main(["library", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "kind", "method", "family", "triggers", "created"]
    assert lines[1].split()[:5] == ["accsubj", "subject", "lora", "sd1", "sks"]
    assert lines[2].split()[:6] == ["loha", "style", "loha", "sd2", "pxl", "art,"]
    assert main(["library", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [d["name"] for d in listed] == ["accsubj", "loha"] and listed[0]["triggers"] == ["sks"]
    assert main(["library", "list", "pxl"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]] == ["loha"]
    assert main(["library", "show", "accsubj"]) == 0
    shown = capsys.readouterr().out
    for expected in ("name         accsubj", "base         micro (hash 0123456789)", "description  a heart",
                     "samples      2", "step-2-1.png", "steps = 2", "embedding    none"):
        assert expected in shown
    Library().set_embedding("accsubj", np.zeros(8))
    assert main(["library", "show", "accsubj", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["name"] == "accsubj" and d["embedding"] == 8 and d["train_config"]["steps"] == 2
    assert main(["library", "rename", "accsubj", "heart"]) == 0
    assert capsys.readouterr().out.strip() == "heart"
    assert main(["library", "remove", "heart"]) == 0
    assert main(["library", "import", str(made.root / "community")]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(printed) == ["diffusers", "kohya-sd1", "kohya-sdxl", "locon", "lokr"]  # loha: already there
    assert main(["library", "list", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 6


def test_cli_errors(made, tmp_path, capsys):
    main(["library", "add", str(made.subj)])
    capsys.readouterr()
    assert "did you mean subj" in _fails(capsys, "library", "show", "sbj")
    assert "already in the library as 'subj'" in _fails(capsys, "library", "add", str(made.subj))
    assert "no such adapter file" in _fails(capsys, "library", "add", str(tmp_path / "nope"))
    main(["library", "add", str(made.files["lokr"])])
    capsys.readouterr()
    assert "already has an adapter named 'lokr'" in _fails(capsys, "library", "rename", "subj", "lokr")
    assert main(["library", "remove", "subj"]) == 0
    assert "no adapter named 'subj'" in _fails(capsys, "library", "remove", "subj")
    assert "not a folder" in _fails(capsys, "library", "import", str(tmp_path / "nope"))
    (_home() / "library.sqlite").write_bytes(b"garbage" * 200)
    assert "cannot be read" in _fails(capsys, "library", "list")


# ----------------------------------------------------------------------------------------------
# studio train registers its result
# ----------------------------------------------------------------------------------------------


def test_training_results_are_registered_under_a_free_name(made, caplog):
    import logging
    import shutil

    from studio.trainers.cli import _register

    out = made.root / "runs" / "subject-hearts"
    shutil.copytree(made.subj, out)
    result = types.SimpleNamespace(out=out)
    cfg = types.SimpleNamespace(register=True, name="", description="first run")
    with caplog.at_level(logging.INFO):
        _register(cfg, result)
        _register(cfg, result)
        _register(types.SimpleNamespace(register=True, name="my hearts", description=""), result)
        _register(types.SimpleNamespace(register=False, name="never", description=""), result)
    assert Library().names() == ["my_hearts", "subject-hearts", "subject-hearts-2"]
    assert Library().get("subject-hearts").description == "first run"
    assert "already has an adapter named subject-hearts; added this one as subject-hearts-2" in caplog.text
    # a broken library does not fail the training: the adapter is on disk either way
    (_home() / "library.sqlite").write_bytes(b"garbage" * 200)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _register(cfg, result)
    assert "not added to the adapter library" in caplog.text and f"studio library add {out}" in caplog.text


# ----------------------------------------------------------------------------------------------
# crashes: SIGKILL inside a write
# ----------------------------------------------------------------------------------------------


def _kill_at(stage: str | None, action, delay: float | None = None) -> bool:
    """Run ``action`` in a forked process and SIGKILL it when it reaches ``stage``, or ``delay`` seconds
    after it starts (neither: let it finish). Returns whether the process was killed before it finished.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            os.close(r)

            def pause(name: str) -> None:
                if name == stage:
                    os.write(w, b"p")
                    time.sleep(120)

            library._checkpoint = pause
            os.write(w, b"s")
            action()
        except BaseException:  # noqa: BLE001 - report through the exit code
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    try:
        assert os.read(r, 1) == b"s"
        if stage is not None:
            ready, _, _ = select.select([r], [], [], 60)
            assert ready and os.read(r, 1) == b"p", f"the writer never reached the stage {stage!r}"
        elif delay is not None:
            time.sleep(delay)
        if stage is not None or delay is not None:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(r)
    if os.WIFEXITED(status):
        assert os.WEXITSTATUS(status) == 0, "the writer failed on its own"
        return False
    return True


ADD_STAGES = {"copying": False, "staged": False, "committed": True, "moved": True, "done": True}


@posix_only
@pytest.mark.parametrize("stage,present", ADD_STAGES.items())
def test_add_killed_at_each_stage_is_all_or_nothing(made, stage, present):
    home = _home()
    Library(home).add(made.files["loha"])  # a neighbour that must survive untouched
    assert _kill_at(stage, lambda: Library(home).add(made.subj, name="victim"))
    records = _assert_consistent(home)
    assert ("victim" in records) == present and "loha" in records
    if present:
        assert records["victim"].file_hash == _sha(made.subj / "pytorch_lora_weights.safetensors")
        assert len(records["victim"].samples) == 2
    Library(home).add(made.subj, name="victim", replace=True)  # the library keeps working
    _assert_consistent(home)


@posix_only
@pytest.mark.parametrize("stage", ["staged", "committed", "moved"])
def test_replace_killed_keeps_one_whole_version(made, stage):
    home = _home()
    old = Library(home).add(made.subj, name="victim")
    assert _kill_at(stage, lambda: Library(home).add(made.subj2, name="victim", replace=True))
    rec = _assert_consistent(home)["victim"]
    new_hash = _sha(made.subj2 / "pytorch_lora_weights.safetensors")
    assert rec.file_hash == (old.file_hash if stage == "staged" else new_hash)


@posix_only
def test_remove_and_rename_killed_after_their_commit_complete(made):
    home = _home()
    Library(home).add(made.subj, name="a")
    Library(home).add(made.files["loha"], name="b")
    assert _kill_at("remove-committed", lambda: Library(home).remove("a"))
    assert _kill_at("rename-committed", lambda: Library(home).rename("b", "c"))
    assert sorted(_assert_consistent(home)) == ["c"]


@posix_only
def test_add_killed_at_random_instants(made, tmp_path):
    big = tmp_path / "big.safetensors"
    save_file({f"{SD1_UNET}.lora_down.weight": torch.randn(512, 2048), f"{SD1_UNET}.lora_up.weight": torch.randn(2048, 4)},
              str(big), metadata={"ss_base_model_version": "sd_v1"})
    digest = _sha(big)
    t0 = time.perf_counter()
    assert not _kill_at(None, lambda: Library(tmp_path / "calibrate").add(big))  # how long a whole add takes
    full = time.perf_counter() - t0
    rng = random.Random(0)
    outcomes = []
    for i in range(12):
        home = tmp_path / f"home{i}"
        killed = _kill_at(None, lambda home=home: Library(home).add(big, name="big"), delay=rng.uniform(0, full))
        records = _assert_consistent(home)
        assert set(records) <= {"big"} and all(r.file_hash == digest for r in records.values())
        outcomes.append(("killed" if killed else "finished", "big" in records))
    assert all(present for killed, present in outcomes if killed == "finished"), outcomes


@posix_only
def test_cli_process_killed_inside_library_add(made):
    """The real command in a fresh interpreter, killed with SIGKILL after its commit, before its renames."""
    home = _home()
    script = ("import sys, time, studio.library as L\n"
              "def pause(stage):\n"
              "    if stage == 'committed':\n"
              "        print('paused', flush=True); time.sleep(120)\n"
              "L._checkpoint = pause\n"
              "from studio.cli import main\n"
              "sys.exit(main(['library', 'add', sys.argv[1], '--name', 'accsubj']))\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(made.subj)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "STUDIO_HOME": str(home)})
    try:
        assert proc.stdout.readline().strip() == "paused", proc.stderr.read() if proc.poll() is not None else ""
        assert list((home / library.TMP_DIR).iterdir())  # killed with its copy staged and its row committed
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    assert main(["library", "list"]) == 0
    assert "accsubj" in _assert_consistent(home)
