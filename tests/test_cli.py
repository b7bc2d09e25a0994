"""The `studio` command line: generate, info, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from studio.cli import main
from studio.loading import MICRO_DIR

needs_micro = pytest.mark.skipif(not (MICRO_DIR / "model_index.json").is_file(), reason="micro weights not built")


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it."""
    exe = Path(sys.executable).with_name("studio")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "studio.cli"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("info", "generate", "micro"):
        assert cmd in out


@pytest.mark.parametrize("family", ["sd1", "sdxl", "ldm"])
def test_generate_writes_pngs_with_infotext(family, tiny_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["generate", "--base", str(tiny_dirs[family]), "--prompt", "a red circle", "--negative", "blurry",
               "--steps", "2", "--seed", "7", "--num", "2", "--batch-size", "1", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == 2 and all(Path(p).is_file() for p in printed)
    params = [Image.open(p).info["parameters"] for p in printed]
    assert params[0].startswith("a red circle\n")
    assert "Steps: 2" in params[0] and "Seed: 7" in params[0] and "Seed: 8" in params[1]
    assert f"Family: {'ldm' if family == 'ldm' else family}" in params[0]
    if family != "ldm":
        assert "Negative prompt: blurry" in params[0]
    # the same seed gives the same image; numbering continues instead of overwriting
    main(["generate", "--base", str(tiny_dirs[family]), "--prompt", "a red circle", "--negative", "blurry",
          "--steps", "2", "--seed", "7", "--out", str(out)])
    again = capsys.readouterr().out.split()
    assert Path(again[0]).name.startswith("00002-")
    assert list(Image.open(again[0]).getdata()) == list(Image.open(printed[0]).getdata())


def test_generate_size(tiny_dirs, tmp_path, capsys):
    assert main(["generate", "--base", str(tiny_dirs["sd1"]), "--prompt", "x", "--steps", "1", "--size", "48x32",
                 "--out", str(tmp_path)]) == 0
    assert Image.open(capsys.readouterr().out.split()[0]).size == (48, 32)


def test_info_json(tiny_dirs, capsys):
    assert main(["info", str(tiny_dirs["sdxl"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "sdxl"
    assert {"unet", "vae", "text_encoder", "text_encoder_2"} <= set(info["components"])
    assert info["parameters"] == sum(c.get("parameters", 0) for c in info["components"].values()) > 0


def _bad_inputs(tmp_path: Path, tiny_dirs) -> dict[str, list[str]]:
    malformed = tmp_path / "malformed"
    malformed.mkdir()
    (malformed / "model_index.json").write_text("{not json")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "model_index.json").write_text((Path(tiny_dirs["sd1"]) / "model_index.json").read_text())
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x02}q\x00.")
    sd1 = str(tiny_dirs["sd1"])
    return {
        "missing folder": ["--base", str(tmp_path / "nope")],
        "empty folder": ["--base", str(tmp_path)],
        "malformed model_index": ["--base", str(malformed)],
        "missing component": ["--base", str(partial)],
        "unknown family": ["--base", str(other)],
        "not a checkpoint": ["--base", str(text)],
        "pickle without --trust-pickle": ["--base", str(ckpt)],
        "hub id offline": ["--base", "someone/some-model"],
        "impossible size": ["--base", sd1, "--size", "33x32"],
        "bad size syntax": ["--base", sd1, "--size", "big"],
        "no such device": ["--base", sd1, "--device", "cuda:7"],
        "zero steps": ["--base", sd1, "--steps", "0"],
        "xformers asked for": ["--base", sd1, "--attention", "xformers"],
    }


BAD = ["missing folder", "empty folder", "malformed model_index", "missing component", "unknown family",
       "not a checkpoint", "pickle without --trust-pickle", "hub id offline", "impossible size", "bad size syntax",
       "no such device", "zero steps", "xformers asked for"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_exit_2(case, tmp_path, tiny_dirs, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = _bad_inputs(tmp_path, tiny_dirs)[case]
    rc = main(["generate", "--prompt", "x", "--steps", "2", "--out", str(tmp_path / "o"), *args]
              if "--steps" not in args else ["generate", "--prompt", "x", "--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("studio: error: ") and "\n" not in err and "Traceback" not in err
    assert not list((tmp_path / "o").glob("*.png")) if (tmp_path / "o").exists() else True


def test_console_script_exit_2_without_traceback_and_debug_shows_it(tmp_path):
    res = _run("generate", "--base", str(tmp_path / "missing"), "--prompt", "x", "--out", str(tmp_path / "o"))
    assert res.returncode == 2
    assert "Traceback" not in res.stderr and str(tmp_path / "missing") in res.stderr
    res = _run("--debug", "generate", "--base", str(tmp_path / "missing"), "--prompt", "x")
    assert res.returncode != 0 and "Traceback" in res.stderr


@needs_micro
def test_generate_micro_console_script(tmp_path):
    res = _run("generate", "--base", "micro", "--prompt", "a red circle on a white background", "--steps", "4",
               "--seed", "1", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    pngs = sorted(tmp_path.glob("*.png"))
    assert len(pngs) == 1 and str(pngs[0]) in res.stdout
    im = Image.open(pngs[0])
    assert im.size == (64, 64) and "Model: micro" in im.info["parameters"]
