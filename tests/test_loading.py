"""Loading every family from a folder, family detection, devices and dtypes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from studio.errors import StudioError
from studio import loading
from studio.loading import detect_family, load_pipeline, resolve_device, resolve_dtype
from studio.testing import BUILDERS, tiny_pipeline

EXPECTED_FAMILY = {"sd1": "sd1", "sd2": "sd2", "sdxl": "sdxl", "ldm": "ldm", "ldm-uncond": "ldm"}


def _two_steps(pipe, seed: int = 3) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    if type(pipe).__name__ == "LDMPipeline":
        return pipe(batch_size=1, num_inference_steps=2, generator=g, output_type="np").images
    return pipe("a red circle", num_inference_steps=2, generator=g, output_type="np").images


@pytest.mark.parametrize("family", list(BUILDERS))
def test_folder_round_trip_same_image(family, tiny_dirs):
    built = tiny_pipeline(family)
    loaded = load_pipeline(tiny_dirs[family])
    assert detect_family(built) == EXPECTED_FAMILY[family]
    assert loaded.studio_source.family == EXPECTED_FAMILY[family]
    assert loaded.studio_source.kind == "folder"
    a, b = _two_steps(built), _two_steps(loaded)
    assert a.shape == b.shape and a.shape[0] == 1
    np.testing.assert_array_equal(a, b)
    # a different seed gives a different image: the comparison above is not vacuous
    assert np.abs(_two_steps(loaded, seed=4) - b).max() > 1e-3


def test_sd2_is_v_prediction_and_sd1_is_not(tiny_dirs):
    assert load_pipeline(tiny_dirs["sd2"]).scheduler.config.prediction_type == "v_prediction"
    assert load_pipeline(tiny_dirs["sd1"]).scheduler.config.prediction_type == "epsilon"


def test_dtype_and_device_defaults():
    cpu = resolve_device(None)
    assert cpu.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.float16
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16


def test_load_with_dtype(tiny_dirs):
    pipe = load_pipeline(tiny_dirs["sd1"], dtype="bf16")
    assert pipe.unet.dtype == torch.bfloat16


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_missing_cuda_device_is_a_clear_error():
    with pytest.raises(StudioError, match="no CUDA device"):
        resolve_device("cuda")


def test_unknown_device_and_dtype():
    with pytest.raises(StudioError, match="--device"):
        resolve_device("tpu")
    with pytest.raises(StudioError, match="--dtype"):
        resolve_dtype("int3", torch.device("cpu"))


def test_mmap_threshold_is_read_at_the_call(monkeypatch):
    """The trainer's threshold (bench/realsize.py --frontier sets the module value) reaches mallopt."""
    import ctypes

    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibc())
    assert loading.hand_back_freed_memory() is True
    monkeypatch.setattr(loading, "MMAP_THRESHOLD", 8 << 20)
    assert loading.hand_back_freed_memory() is True
    assert loading.hand_back_freed_memory(3 << 20) is True
    assert calls == [(-3, 1 << 20), (-3, 8 << 20), (-3, 3 << 20)]
    # the user's setting: MiB, 0 leaves glibc's own threshold, nonsense is said
    monkeypatch.setenv("STUDIO_MMAP_THRESHOLD_MB", "16")
    assert loading.hand_back_freed_memory() is True and calls[-1] == (-3, 16 << 20)
    monkeypatch.setenv("STUDIO_MMAP_THRESHOLD_MB", "0")
    assert loading.hand_back_freed_memory() is False and len(calls) == 4
    monkeypatch.setenv("STUDIO_MMAP_THRESHOLD_MB", "lots")
    with pytest.raises(StudioError, match="STUDIO_MMAP_THRESHOLD_MB"):
        loading.hand_back_freed_memory()
