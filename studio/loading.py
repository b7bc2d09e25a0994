"""Load any supported base model as an ordinary diffusers pipeline.

``load_pipeline(spec)`` takes ``micro`` (the embedded model), a local diffusers folder, a single
checkpoint file, or a hub id (only when online). The family (sd1, sd2, sdxl, ldm) is detected
from the components, never asked for. Every failure that is the user's to fix raises a
:class:`~studio.errors.StudioError` naming the input and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import socket
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from studio.errors import StudioError

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parents[1] / "assets"
MICRO_DIR = ASSETS / "micro"
FAMILIES: tuple[str, ...] = ("sd1", "sd2", "sdxl", "ldm")
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """CUDA when present, else CPU; a named device that is not there is a StudioError."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(str(device))
    except RuntimeError as exc:
        raise StudioError(f"--device {device}: not a device name; use cpu, cuda or cuda:N") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise StudioError(f"--device {device}: no CUDA device on this machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise StudioError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise StudioError(f"--device {device}: no Apple MPS device on this machine; use --device cpu")
    elif dev.type != "cpu":
        raise StudioError(f"--device {device}: unsupported device type; use cpu, cuda or mps")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """fp16 on CUDA, fp32 elsewhere unless asked (bf16 on CPU pays only on some CPUs: see README)."""
    if dtype is None or dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise StudioError(f"--dtype {dtype}: unknown dtype; use fp32, fp16 or bf16")
    return DTYPES[dtype]


@dataclasses.dataclass
class ModelSource:
    """Where a pipeline came from, kept on the pipeline as ``pipe.studio_source``."""

    spec: str
    kind: str  # micro | folder | quantized | file | hub
    path: str
    family: str


def detect_family(pipe: Any) -> str:
    """The family of a loaded pipeline: sd1, sd2, sdxl or ldm."""
    comps = getattr(pipe, "components", {})
    if "text_encoder_2" in comps or "StableDiffusionXL" in type(pipe).__name__:
        return "sdxl"
    if "vqvae" in comps or type(pipe).__name__.startswith("LDM"):
        return "ldm"
    unet = comps.get("unet")
    te = comps.get("text_encoder")
    if unet is not None and hasattr(unet, "config"):
        sched = comps.get("scheduler")
        v_pred = getattr(getattr(sched, "config", None), "prediction_type", "epsilon") == "v_prediction"
        linear = bool(unet.config.get("use_linear_projection", False))
        gelu = getattr(getattr(te, "config", None), "hidden_act", "quick_gelu") == "gelu"
        # SD 2.x: OpenCLIP text encoder (gelu), linear projections in the transformer blocks,
        # and v-prediction for the 768px models; SD 1.x has none of the three
        return "sd2" if (v_pred or linear or gelu) else "sd1"
    raise StudioError(f"{type(pipe).__name__}: unknown model family; supported: {', '.join(FAMILIES)}")


def _read_model_index(folder: Path) -> dict:
    index = folder / "model_index.json"
    if not index.is_file():
        raise StudioError(
            f"{folder}: not a diffusers model folder (no model_index.json); point --base at the folder "
            f"that holds model_index.json, or at a .safetensors checkpoint file"
        )
    try:
        data = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StudioError(f"{index}: malformed JSON ({exc}); re-download or re-save the model folder") from exc
    if not isinstance(data, dict) or "_class_name" not in data:
        raise StudioError(f"{index}: no _class_name entry; this is not a diffusers model_index.json")
    for name, value in data.items():
        if name.startswith("_") or not isinstance(value, list) or value == [None, None]:
            continue
        if not (folder / name).is_dir():
            raise StudioError(f"{folder}: component folder '{name}/' named in model_index.json is missing; "
                              f"re-download or re-save the model folder")
    return data


def _from_folder(folder: Path, dtype: torch.dtype) -> Any:
    from diffusers import DiffusionPipeline

    index = _read_model_index(folder)
    supported = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "LDMTextToImagePipeline", "LDMPipeline")
    if index["_class_name"] not in supported:
        raise StudioError(
            f"{folder}: {index['_class_name']} is not a supported family; supported pipelines: {', '.join(supported)}"
        )
    kwargs: dict[str, Any] = {"local_files_only": True, "torch_dtype": dtype}
    if index["_class_name"] == "StableDiffusionPipeline":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        return DiffusionPipeline.from_pretrained(str(folder), **kwargs)
    except StudioError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, json.JSONDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StudioError(f"{folder}: cannot load this model folder ({first[:300]}); "
                          f"check that every component's weights and config are complete") from exc


@lru_cache(maxsize=1)
def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face hub answers; False at once when HF_HUB_OFFLINE is set."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def _from_hub(repo_id: str, dtype: torch.dtype) -> Any:
    from diffusers import DiffusionPipeline

    try:  # a copy already in the local cache works offline too
        return DiffusionPipeline.from_pretrained(repo_id, local_files_only=True, torch_dtype=dtype)
    except Exception:  # noqa: BLE001 - any failure here just means "not cached"
        pass
    if not hub_reachable():
        raise StudioError(
            f"{repo_id}: looks like a hub id, but the hub cannot be reached (offline). Download it on a machine "
            f"that is online (e.g. `huggingface-cli download {repo_id} --local-dir DIR`) and pass --base DIR, "
            f"or pass a single .safetensors checkpoint file"
        )
    try:
        return DiffusionPipeline.from_pretrained(repo_id, torch_dtype=dtype)
    except Exception as exc:  # noqa: BLE001
        raise StudioError(f"{repo_id}: could not be loaded from the hub ({str(exc).splitlines()[0][:300]})") from exc


def _is_quantized(folder: Path) -> bool:
    """Whether ``folder`` was written by `studio quantize` (its marker file, studio_quant.json)."""
    return (folder / "studio_quant.json").is_file()


def resolve_spec(spec: str) -> tuple[str, Path | None]:
    """Classify a model spec: ('micro'|'folder'|'file'|'hub', path)."""
    if spec == "micro":
        return "micro", MICRO_DIR
    path = Path(spec).expanduser()
    if path.is_dir():
        return "folder", path
    if path.is_file():
        return "file", path
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")) and not path.parent.exists():
        return "hub", None
    raise StudioError(
        f"{spec}: no such model folder or file; pass `micro`, a diffusers folder (with model_index.json), "
        f"a .safetensors checkpoint, or a hub id like owner/name"
    )


def load_pipeline(
    spec: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    trust_pickle: bool = False,
    config: str | os.PathLike | None = None,
    staged: bool = False,
) -> Any:
    """Load ``spec`` (micro, folder, single file, hub id) as a diffusers pipeline on ``device``.

    ``config`` names a diffusers folder whose component configs describe a single-file
    checkpoint (by default the configs bundled in assets/configs, or those embedded in the
    file by the studio). ``.ckpt`` pickles load only with ``trust_pickle=True``.

    ``staged``: for a diffusers folder or a ``.safetensors`` file on the CPU, the denoiser, VAE and
    text encoder(s) are built with no weights (on the meta device); :func:`materialize` reads one
    component's weights, one tensor at a time, and :func:`release` frees it again, so that a
    trainer never holds the whole pipeline (docs/realsize.md). Other sources load whole, as usual
    (:func:`is_staged` tells which happened).
    """
    spec = str(spec)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    kind, path = resolve_spec(spec)
    if staged and dev.type == "cpu" and (
            (kind == "folder" and not _is_quantized(path))
            or (kind == "file" and path.suffix.lower() == ".safetensors")):
        pipe = _empty_pipeline(kind, path, dt, config)
        if pipe is not None:
            family = detect_family(pipe)
            if hasattr(pipe, "set_progress_bar_config"):
                pipe.set_progress_bar_config(disable=True)
            pipe.studio_source = ModelSource(spec=spec, kind=kind, path=str(path), family=family)
            log.debug("built %s (%s, %s) empty, staged loading as %s", spec, kind, family, dt)
            return pipe
    if kind == "micro":
        if not (MICRO_DIR / "model_index.json").is_file():
            raise StudioError(f"{MICRO_DIR}: the micro model's weights are missing from this checkout; "
                              f"run `studio micro pretrain --out assets` or restore assets/ from git")
        pipe = _from_folder(MICRO_DIR, dt)
    elif kind == "folder" and _is_quantized(path):
        from studio.quant.export import load_quantized  # a `studio quantize` folder: integer denoiser

        pipe = load_quantized(path, dt)
        kind = "quantized"
    elif kind == "folder":
        pipe = _from_folder(path, dt)
    elif kind == "file":
        suffix = path.suffix.lower()
        if suffix in PICKLE_SUFFIXES and not trust_pickle:
            raise StudioError(f"{path}: a pickle checkpoint can run arbitrary code when loaded; convert it to "
                              f".safetensors, or pass --trust-pickle if you trust its source")
        if suffix not in PICKLE_SUFFIXES + (".safetensors",):
            raise StudioError(f"{path}: not a checkpoint (expected .safetensors, or .ckpt with --trust-pickle) "
                              f"nor a diffusers folder")
        from studio.single_file import load_single_file

        pipe = load_single_file(path, dtype=dt, trust_pickle=trust_pickle, config=config)
    else:
        pipe = _from_hub(spec, dt)
    family = detect_family(pipe)
    pipe.to(dev)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    pipe.studio_source = ModelSource(spec=spec, kind=kind, path=str(path) if path else spec, family=family)
    log.debug("loaded %s (%s, %s) on %s as %s", spec, kind, family, dev, dt)
    return pipe


# ----------------------------------------------------------------------------------------------
# staged loading: components built empty, their weights read (and freed) one component at a time
# ----------------------------------------------------------------------------------------------

WEIGHTED = ("text_encoder", "text_encoder_2", "vae", "unet")


@dataclasses.dataclass
class StagedWeights:
    """Where a staged pipeline's weights come from, and which components hold them now."""

    kind: str  # folder | file
    path: Path
    dtype: torch.dtype
    resident: set[str]
    entries: dict[str, Any] = dataclasses.field(default_factory=dict)  # file: single_file entries per component


class _TensorFile:
    """One ``.safetensors`` file read tensor by tensor with ``pread``, never memory-mapped.

    A mapped file's pages count in the process's resident memory until it is unmapped: reading
    SD 1.5's fp16 UNet through a mapping held its 1.6 GiB beside the 3.2 GiB fp32 copy.
    """

    DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}

    def __init__(self, path: Path) -> None:
        from studio.single_file import read_header_entries

        self.path = path
        self.header, _, self.base = read_header_entries(path)  # checked: offsets inside the file

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.header[key]["shape"])

    def read(self, key: str, fh: Any) -> torch.Tensor:
        info = self.header[key]
        dt = self.DTYPES.get(info["dtype"])
        if dt is None:
            raise StudioError(f"{self.path}: tensor {key} has dtype {info['dtype']}, which the studio cannot read")
        start, end = info["data_offsets"]
        out = torch.empty(tuple(info["shape"]), dtype=dt)
        if end > start:
            view = memoryview(out.view(-1).view(torch.uint8).numpy())
            got = os.preadv(fh.fileno(), [view], self.base + start)
            if got != end - start:
                raise StudioError(f"{self.path}: tensor {key} is cut short; re-download or re-save the file")
        return out


def _set_tensor(model: torch.nn.Module, key: str, value: torch.Tensor) -> None:
    """Put ``value`` in place of the parameter or buffer ``key`` (no copy: assigned)."""
    path, _, attr = key.rpartition(".")
    mod = model.get_submodule(path) if path else model
    if attr in mod._parameters:
        old = mod._parameters[attr]
        mod._parameters[attr] = torch.nn.Parameter(value, requires_grad=old.requires_grad if old is not None else False)
    elif attr in mod._buffers:
        mod._buffers[attr] = value
    else:
        raise KeyError(key)


def _empty_pipeline(kind: str, path: Path, dtype: torch.dtype, config: Any) -> Any:
    """The pipeline of ``path`` with its weighted components empty; None when that layout is not staged."""
    if kind == "file":
        from studio.single_file import load_single_file

        pipe = load_single_file(path, dtype=dtype, config=config, empty=True)
        entries = pipe._studio_entries
        del pipe._studio_entries
        pipe._studio_weights = StagedWeights("file", path, dtype, set(), entries)
        return pipe
    import diffusers
    import transformers
    from accelerate import init_empty_weights

    index = _read_model_index(path)
    if index["_class_name"] not in ("StableDiffusionPipeline", "StableDiffusionXLPipeline"):
        return None
    comps: dict[str, Any] = {}
    for name in WEIGHTED:
        entry = index.get(name)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[1]):
            continue
        lib = {"diffusers": diffusers, "transformers": transformers}.get(entry[0])
        cls = getattr(lib, entry[1], None) if lib is not None else None
        if cls is None:
            return None
        try:
            with init_empty_weights():
                if lib is diffusers:
                    model = cls.from_config(cls.load_config(path / name))
                else:
                    model = cls(cls.config_class.from_pretrained(path / name))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StudioError(f"{path / name}: its config cannot build the model ({first[:300]}); "
                              f"check that the model folder is complete") from exc
        comps[name] = model.eval()
    kwargs: dict[str, Any] = {"local_files_only": True, "torch_dtype": dtype, **comps}
    if index["_class_name"] == "StableDiffusionPipeline":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(path), **kwargs)
    pipe._studio_weights = StagedWeights("folder", path, dtype, set())
    return pipe


def is_staged(pipe: Any) -> bool:
    """Whether ``pipe`` was loaded with ``staged=True`` (its components load and free one at a time)."""
    return getattr(pipe, "_studio_weights", None) is not None


def resident(pipe: Any) -> set[str]:
    """The weighted components of ``pipe`` that hold their weights now (all of them when not staged)."""
    staged = getattr(pipe, "_studio_weights", None)
    if staged is None:
        return {n for n in WEIGHTED if getattr(pipe, n, None) is not None}
    return set(staged.resident)


def materialize(pipe: Any, names: Any = WEIGHTED) -> None:
    """Read the weights of the components ``names`` of a staged pipeline (no-op for those already there).

    Each tensor is read alone and converted to the pipeline's dtype before the next is read, so
    the peak is the converted component plus one tensor. Unstaged pipelines hold everything already.
    """
    staged = getattr(pipe, "_studio_weights", None)
    if staged is None:
        return
    for name in names:
        model = getattr(pipe, name, None)
        if model is None or name in staged.resident:
            continue
        if staged.kind == "file":
            _materialize_file(model, name, staged)
        else:
            _materialize_folder(model, name, staged)
        from studio.single_file import cast_float_buffers

        cast_float_buffers(model, staged.dtype)
        staged.resident.add(name)
        log.debug("materialized %s of %s", name, staged.path)


def release(pipe: Any, names: Any) -> None:
    """Free the weights of the components ``names`` of a staged pipeline (back to the meta device).

    The modules stay (their configs, hooks, adapters); :func:`materialize` reads the weights again.
    Buffers stay: some are not in the files (CLIP's position ids). No-op for unstaged pipelines.
    """
    staged = getattr(pipe, "_studio_weights", None)
    if staged is None:
        return
    freed = False
    for name in names:
        model = getattr(pipe, name, None)
        if model is None or name not in staged.resident:
            continue
        for mod in model.modules():
            for pname, p in mod._parameters.items():
                if p is not None:
                    mod._parameters[pname] = torch.nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)
        staged.resident.discard(name)
        freed = True
    if freed:
        trim_memory()


# glibc's malloc: blocks of this size and more get their own mappings, handed back to the system when
# freed. By default the threshold rises with every large block freed (up to 32 MiB) and such blocks then
# stay in the heap, whose freed pages stay resident: SD 1.5's training step at 512 px held 5.2 GiB that way
# (with staged loading), 4.2 GiB with the threshold fixed at 1 MiB (docs/realsize.md)
MMAP_THRESHOLD = 1 << 20


def hand_back_freed_memory(threshold: int | None = None) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes (default: ``$STUDIO_MMAP_THRESHOLD_MB`` MiB where
    set, else :data:`MMAP_THRESHOLD`, read at the call; ``STUDIO_MMAP_THRESHOLD_MB=0`` leaves glibc's own).

    Large tensors freed then leave the process's resident memory at once instead of staying in the
    heap. That costs page faults: SD 1.5's CPU training step at 512 px ran about 15% slower at 1 MiB
    than at 8 MiB, which held about 1 GiB more (docs/realsize.md), so a machine with memory to spare
    can trade it back. Process-wide and lasting; False where the C library is not glibc or nothing is set.
    """
    if threshold is None:
        env = os.environ.get("STUDIO_MMAP_THRESHOLD_MB", "").strip()
        try:
            threshold = MMAP_THRESHOLD if not env else int(float(env) * 2**20)
        except ValueError:
            raise StudioError(f"STUDIO_MMAP_THRESHOLD_MB={env!r}: give a size in MiB (0: glibc's default)") from None
        if threshold <= 0:
            return False
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, int(threshold)))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def trim_memory() -> None:
    """Collect garbage and hand freed heap pages back to the system (glibc's malloc_trim, tcmalloc's release;
    elsewhere a no-op)."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        # under tcmalloc (studio.allocator) glibc's heap is idle; tcmalloc keeps freed pages until told
        release = getattr(ctypes.CDLL(None), "MallocExtension_ReleaseFreeMemory", None)
        if release is not None:
            release()
    except (OSError, AttributeError):
        pass


def _materialize_folder(model: torch.nn.Module, name: str, staged: StagedWeights) -> None:
    folder = staged.path / name
    files = sorted(folder.glob("*.safetensors"))
    files = [f for f in files if f.name.count(".") == 1]  # not the fp16/ema variants beside the weights
    expected = dict(model.state_dict())
    readers = [_TensorFile(f) for f in files] if name == "unet" else []
    if readers and {k for r in readers for k in r.keys()} == set(expected):
        # the denoiser (most of the weights): tensor by tensor, names as stored
        for r in readers:
            with open(r.path, "rb") as fh:
                for key in sorted(r.keys(), key=lambda k: r.header[k]["data_offsets"][0]):
                    t = r.read(key, fh)
                    if tuple(t.shape) != tuple(expected[key].shape):
                        raise StudioError(f"{r.path}: {key} is {list(t.shape)}, the config says "
                                          f"{list(expected[key].shape)}; re-save the model folder")
                    _set_tensor(model, key, t.to(staged.dtype) if t.is_floating_point() else t)
        return
    # anything else (text encoders and VAEs are small; other layouts): the library's loader, then the
    # loaded tensors are moved into the empty module (its identity, hooks and adapters stay)
    kwargs = {"subfolder": name, "local_files_only": True}
    cls = type(model)
    try:
        if cls.__module__.startswith("transformers"):
            loaded = cls.from_pretrained(str(staged.path), dtype=staged.dtype, **kwargs)
        else:
            loaded = cls.from_pretrained(str(staged.path), torch_dtype=staged.dtype, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StudioError(f"{folder}: cannot load its weights ({first[:300]}); check that the model folder "
                          f"is complete") from exc
    for key, t in list(loaded.named_parameters()) + list(loaded.named_buffers()):
        _set_tensor(model, key, t.data if isinstance(t, torch.nn.Parameter) else t)
    del loaded


def _materialize_file(model: torch.nn.Module, name: str, staged: StagedWeights) -> None:
    from studio.single_file import _alias, _from_ldm

    reader = _TensorFile(staged.path)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    available = set(reader.keys())
    with open(staged.path, "rb") as fh:
        for entry in staged.entries[name]:
            key = entry.ldm if entry.ldm in available else _alias(entry.ldm)
            result = _from_ldm(entry, reader.read(key, fh), expected)
            if isinstance(result, str):  # checked on the header when the pipeline was built
                raise StudioError(f"{staged.path}: {key} is {result}; the file changed since it was opened")
            for k, t in result.items():
                _set_tensor(model, k, t.to(staged.dtype) if t.is_floating_point() else t)
