"""Adapter mixing at generation time: one spec for every front, fused static mixes, batched dynamic ones.

An adapter in a mix is written the same way everywhere (Python, CLI, UI, the A1111 prompt tag)::

    NAME_OR_PATH[:WEIGHT][@START-END][:SCOPE][:GROUP=WEIGHT ...]

``heart:0.9``, ``checkered:0.7@0.4-1`` (active in the last 60 % of the denoising run),
``heart:1:unet`` (denoiser only), ``heart:0.8:mid=0:up.2=0.5`` (per-block multipliers, which
reach every adapted layer of a block: attention, ResNet and down/upsampler convolutions).
docs/mixing.md is the full reference.

How a mix runs:

* static (no window, no schedule): every adapter's delta is fused into the base weights, so
  sampling costs what the base model costs; the original weights are kept and copied back on
  removal, which restores them exactly.
* dynamic (windows or a per-step ``schedule``): the denoiser's dynamic adapters run unfused, a
  forward hook on each of their layers adding them (the mix's static adapters are still fused). The LoRAs of one layer are concatenated into one
  rank-sum down/up pair whose per-rank scales change with the step (4 LoRAs: 2 matmuls, not 8);
  other kinds (LoHa, LoKr, DoRA, any method PEFT can merge) become one summed dense delta per
  layer. The current step comes from :class:`DenoisingClock`, a listener on the denoiser's one
  timestep hook (:mod:`studio.hooks`, DESIGN.md "Time") that maps the scheduler's timestep to a
  fraction of the run.
* text encoders run once per prompt, before the first step: their part of an adapter is always
  fused, and a window does not apply to it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
import re
import types
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from studio.errors import StudioError

log = logging.getLogger(__name__)

SCOPES: tuple[str, ...] = ("both", "unet", "te")
_NUM = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_UNUM = r"(?:\d+\.?\d*|\.\d+)"
_WINDOW = rf"@(?P<start>{_UNUM})-(?P<end>{_UNUM})"
_WEIGHT_TOKEN = re.compile(rf"^(?P<weight>{_NUM})(?:{_WINDOW})?$")
_WINDOW_TAIL = re.compile(rf"{_WINDOW}$")
_BLOCK_KEY = re.compile(r"^(?:(?:down|up)(?:\.\d+(?:\.(?:attn|res|sampler))?)?|mid(?:\.(?:attn|res))?|io)$")
_BLOCK_TOKEN = re.compile(rf"^(?P<key>[a-z][a-z0-9.]*)=(?P<value>{_NUM})$")
_PROMPT_TAG = re.compile(r"<(?:lora|lyco):([^<>]*)>")
GRAMMAR = "NAME_OR_PATH[:WEIGHT][@START-END][:unet|:te][:BLOCK=WEIGHT...]"


# ----------------------------------------------------------------------------- the spec


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """One adapter of a mix: what (a library name or a path), how strong, when, where.

    ``start``/``end``: the fraction of the denoising run in which the adapter is active (0-1 is
    the whole run). ``scope``: ``both``, ``unet`` (denoiser only) or ``te`` (text encoders only).
    ``blocks``: denoiser block -> multiplier (keys ``down``, ``down.1``, ``down.1.res``, ``mid``,
    ``mid.attn``, ``up.2.sampler``, ``io``...; the longest key that names a layer's block wins).
    """

    target: str
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    scope: str = "both"
    blocks: tuple[tuple[str, float], ...] = ()
    gated: bool = False  # ``gated:SPEC``: AutoLoRA's learned gates instead of a fixed weight (studio.autolora.gates)

    def __post_init__(self) -> None:
        blocks = self.blocks.items() if isinstance(self.blocks, Mapping) else self.blocks
        object.__setattr__(self, "blocks", tuple(sorted((str(k), float(v)) for k, v in blocks)))
        object.__setattr__(self, "weight", float(self.weight))
        if not self.target.strip():
            raise StudioError(f"adapter spec {self}: no adapter name or path; expected {GRAMMAR}")
        if not math.isfinite(self.weight):
            raise StudioError(f"adapter {self.target}: weight {self.weight} is not a finite number")
        if not 0.0 <= self.start < self.end <= 1.0:
            raise StudioError(f"adapter {self.target}: window @{self.start:g}-{self.end:g} must satisfy "
                              f"0 <= START < END <= 1 (fractions of the denoising run, e.g. @0.5-1)")
        if self.scope not in SCOPES:
            raise StudioError(f"adapter {self.target}: scope {self.scope!r}; choose unet, te or both")
        if self.gated and (self.windowed or self.blocks or self.scope == "te"):
            raise StudioError(f"adapter {self.target}: a gated adapter takes a weight and a scope unet/both; its "
                              f"gates decide where and when it acts (no window, no block weights)")
        if self.scope == "te" and self.windowed:
            raise StudioError(f"adapter {self.target}: a window applies to the denoiser; the text encoders (scope te) "
                              f"run once before the first step")
        for key, value in self.blocks:
            if not _BLOCK_KEY.match(key):
                raise StudioError(f"adapter {self.target}: unknown block {key!r}; use down, down.N, down.N.attn|res|"
                                  f"sampler, mid, mid.attn|res, up, up.N, up.N.attn|res|sampler or io")
            if not math.isfinite(value):
                raise StudioError(f"adapter {self.target}: block {key}={value} is not a finite number")

    @property
    def windowed(self) -> bool:
        """Whether the adapter is active in part of the run only (a window of 0-1 is no window)."""
        return self.start > 0.0 or self.end < 1.0

    def active_at(self, fraction: float) -> bool:
        """Whether the window covers this fraction of the run (half-open: START <= f < END; END 1 covers the end)."""
        return self.start <= fraction and (fraction < self.end or self.end >= 1.0)

    def block_weight(self, address: tuple[str, ...]) -> float:
        """The multiplier of a denoiser block address such as ``("down", "1", "res")``."""
        table = dict(self.blocks)
        for n in range(len(address), 0, -1):
            key = ".".join(address[:n])
            if key in table:
                return table[key]
        return 1.0

    def __str__(self) -> str:
        text = ("gated:" if self.gated else "") + f"{self.target}:{self.weight:g}"
        if self.windowed:
            text += f"@{self.start:g}-{self.end:g}"
        if self.scope != "both":
            text += f":{self.scope}"
        return text + "".join(f":{k}={v:g}" for k, v in self.blocks)


def parse_spec(text: str) -> AdapterSpec:
    """``NAME_OR_PATH[:WEIGHT][@START-END][:unet|:te][:BLOCK=WEIGHT...]`` -> an :class:`AdapterSpec`.

    Options are read from the right, so a path may contain ``:`` as long as its last part is not
    an option. A ``gated:`` prefix fuses the adapter with AutoLoRA's learned gates.
    """
    if text.strip().startswith("gated:"):
        return dataclasses.replace(parse_spec(text.strip()[len("gated:"):]), gated=True)
    tokens = [t.strip() for t in text.strip().split(":")]
    scope = "both"
    blocks: dict[str, float] = {}
    while len(tokens) > 1:
        tok = tokens[-1]
        m = _BLOCK_TOKEN.match(tok)
        if tok in SCOPES:
            scope = tok
        elif m:
            blocks[m.group("key")] = float(m.group("value"))
        else:
            break
        tokens.pop()
    weight, start, end = 1.0, 0.0, 1.0
    m = _WEIGHT_TOKEN.match(tokens[-1]) if len(tokens) > 1 else None
    if m:
        tokens.pop()
        weight = float(m.group("weight"))
        if m.group("start") is not None:
            start, end = float(m.group("start")), float(m.group("end"))
        if len(tokens) > 1 and _WEIGHT_TOKEN.match(tokens[-1]):
            raise StudioError(f"adapter spec {text!r}: two weights (A1111's te:unet form); write one weight and a "
                              f"scope instead, e.g. {tokens[0]}:0.8:unet ({GRAMMAR})")
    else:
        w = _WINDOW_TAIL.search(tokens[-1])
        if w and w.start() > 0:
            start, end = float(w.group("start")), float(w.group("end"))
            tokens[-1] = tokens[-1][: w.start()]
    target = ":".join(tokens).strip()
    if not target:
        raise StudioError(f"adapter spec {text!r}: no adapter name or path; expected {GRAMMAR}")
    return AdapterSpec(target, weight, start, end, scope, tuple(blocks.items()))


def as_spec(adapter: str | AdapterSpec) -> AdapterSpec:
    """An :class:`AdapterSpec` from a spec string (or the spec itself)."""
    return adapter if isinstance(adapter, AdapterSpec) else parse_spec(adapter)


def parse_prompt(prompt: str) -> tuple[str, list[AdapterSpec]]:
    """Take the A1111 tags ``<lora:SPEC>`` (and ``<lyco:SPEC>``) out of a prompt: (clean prompt, specs)."""
    specs = [parse_spec(m.group(1)) for m in _PROMPT_TAG.finditer(prompt)]
    if not specs:
        return prompt, []
    clean = _PROMPT_TAG.sub(" ", prompt)
    clean = re.sub(r"\s*,(\s*,)+", ",", clean)  # "a, <lora:x>, b" leaves no empty list item behind
    clean = re.sub(r"[ \t]+", " ", clean).strip().strip(",").strip()
    return clean, specs


@dataclasses.dataclass(frozen=True)
class Sweep:
    """One adapter at several weights: the X axis of a comparison grid (``NAME=0,0.5,1``)."""

    spec: AdapterSpec
    values: tuple[float, ...]

    def specs(self) -> list[AdapterSpec]:
        """The adapter at each weight, window/scope/blocks kept."""
        return [dataclasses.replace(self.spec, weight=v) for v in self.values]


def parse_sweep(text: str) -> Sweep:
    """``SPEC=W1,W2,...`` (the spec's own weight, if any, is replaced by each value)."""
    spec_text, eq, values_text = text.rpartition("=")
    if not eq or not spec_text.strip():
        raise StudioError(f"--sweep {text}: expected NAME=W1,W2,... e.g. heart=0,0.5,1")
    try:
        values = tuple(float(v) for v in values_text.split(",") if v.strip())
    except ValueError:
        raise StudioError(f"--sweep {text}: the weights {values_text!r} are not comma-separated numbers") from None
    if not values:
        raise StudioError(f"--sweep {text}: no weights after '='")
    return Sweep(parse_spec(spec_text), values)


# ----------------------------------------------------------------------------- the clock (one hook on the denoiser)


class DenoisingClock:
    """The current fraction of the denoising run, from the scheduler's timestep of each denoiser call.

    It listens on the denoiser's one timestep hook (:mod:`studio.hooks`) and finds each call's
    timestep among the scheduler's ``timesteps``: the position among the distinct timesteps over
    their number, 0 at the first step and (n-1)/n at the last. Classifier-free guidance and extra
    passes call the denoiser again with the same timestep, so they cannot skew it as a call
    counter would. A timestep that is not in the schedule (a denoiser called outside a pipeline)
    maps to ``1 - t / T``. Listeners are called when the fraction changes.
    """

    def __init__(self, pipe: Any) -> None:
        self._pipe = weakref.ref(pipe)
        self.fraction = 0.0
        self._listeners: list[Callable[[float], None]] = []
        self._schedule: Any = None
        self._index: dict[float, float] = {}

    @property
    def idle(self) -> bool:
        return not self._listeners

    def fraction_of(self, t: float) -> float:
        """Where timestep ``t`` lies in the current run, in [0, 1)."""
        sched = getattr(self._pipe(), "scheduler", None)
        ts = getattr(sched, "timesteps", None)
        if ts is not None and ts is not self._schedule:  # set_timesteps made a new schedule
            self._schedule = ts
            distinct: dict[float, int] = {}
            for v in (ts.tolist() if isinstance(ts, torch.Tensor) else list(ts)):
                distinct.setdefault(float(v), len(distinct))  # second-order samplers repeat timesteps
            self._index = {v: i / len(distinct) for v, i in distinct.items()}
        if t in self._index:
            return self._index[t]
        total = getattr(getattr(sched, "config", None), "num_train_timesteps", 1000) or 1000
        return min(max(1.0 - t / total, 0.0), math.nextafter(1.0, 0.0))

    def tick(self, t: float) -> None:
        """The timestep hook's listener."""
        fraction = self.fraction_of(t)
        if fraction != self.fraction:
            self.fraction = fraction
            for listener in list(self._listeners):
                listener(fraction)


def listen(pipe: Any, listener: Callable[[float], None]) -> DenoisingClock:
    """Call ``listener(fraction)`` whenever the fraction of the denoising run changes; returns the clock."""
    from studio.adapters.core import denoiser
    from studio.hooks import listen_timestep

    c = getattr(pipe, "_studio_clock", None)
    if c is None:
        c = pipe._studio_clock = DenoisingClock(pipe)
    if listener not in c._listeners:
        c._listeners.append(listener)
    listen_timestep(denoiser(pipe), c.tick)
    return c


def unlisten(pipe: Any, listener: Callable[[float], None]) -> None:
    """Stop calling ``listener``; the clock leaves the timestep hook with its last listener."""
    from studio.adapters.core import denoiser
    from studio.hooks import unlisten_timestep

    c = getattr(pipe, "_studio_clock", None)
    if c is None:
        return
    c._listeners = [f for f in c._listeners if f != listener]  # bound methods are new objects: compare
    if c.idle:
        unlisten_timestep(denoiser(pipe), c.tick)
        pipe._studio_clock = None


# ----------------------------------------------------------------------------- adapters as per-layer factors


@dataclasses.dataclass
class _Factor:
    """One adapter's part of one layer: a LoRA pair (file shapes) or a dense delta (fp32), times ``scale``."""

    component: str
    path: str  # module path inside the component, as the model names it
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    delta: torch.Tensor | None = None
    scale: float = 1.0


@dataclasses.dataclass(frozen=True)
class MixedAdapter:
    """An adapter of a mix once resolved: what the infotext records and the UI shows."""

    spec: AdapterSpec
    name: str  # the library name, or the file's (folder's) name for a path
    file: Path
    file_hash: str  # sha256 of the whole file (the library's hash)
    lora_hash: str  # A1111's short hash: sd-scripts' sshs_model_hash or the sha256 of the tensor data, 12 digits
    family: str | None
    method: str


_CACHE_SIZE = 8
_factor_cache: weakref.WeakKeyDictionary[torch.nn.Module, OrderedDict] = weakref.WeakKeyDictionary()


def _base(module: torch.nn.Module) -> torch.nn.Module:
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def _find_layer(model: torch.nn.Module, component: str, module: str) -> tuple[str, torch.nn.Module] | None:
    # kohya readers name text-encoder modules without transformers 4's "text_model." prefix
    for name in (module,) if component == "unet" else (module, "text_model." + module):
        try:
            layer = _base(model.get_submodule(name))
        except AttributeError:
            continue
        if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            return name, layer
    return None


def _read_factors(pipe: Any, file: Path) -> list[_Factor]:
    """The file's per-layer factors for this pipeline (cached per denoiser and file version)."""
    from studio.adapters.core import denoiser, read_metadata

    st = file.stat()
    key = (str(file.resolve()), st.st_size, st.st_mtime_ns)
    cache = _factor_cache.setdefault(denoiser(pipe), OrderedDict())
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    # the formats reader knows every layout of LoRA/LoHa/LoKr; other studio methods go through PEFT
    method = read_metadata(file).get("studio.method", "lora")
    if method not in ("lora", "loha", "lokr"):
        factors = _peft_factors(pipe, file, method)
    else:
        try:
            factors = _kohya_factors(pipe, file)
        except StudioError as exc:
            factors = _diffusers_factors(pipe, file, exc)
    _check_fit(pipe, file, factors)
    cache[key] = factors
    while len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)
    return factors


def _kohya_factors(pipe: Any, file: Path) -> list[_Factor]:
    """LoRA/LoHa/LoKr files of any layout (studio, diffusers, kohya, LyCORIS) through the formats reader."""
    from studio.adapters.core import denoiser
    from studio.formats.kohya import lycoris_delta, read_lora

    unet = denoiser(pipe)
    lora = read_lora(file, unet_config=dict(unet.config) if hasattr(unet, "config") else None)
    have = getattr(getattr(pipe, "studio_source", None), "family", None)
    if lora.family and have and lora.family != have:  # kohya files name their family in keys or header
        raise StudioError(f"adapter {file} was made for {lora.family} models, but this base model is {have}; "
                          f"choose a {have} adapter")
    out = []
    for m in lora.modules:
        if m.kind == "lora":
            out.append(_Factor(m.component, m.module, down=m.tensors["lora_down.weight"],
                               up=m.tensors["lora_up.weight"], scale=m.scale))
        else:  # the layer checks the delta's size against its weight
            out.append(_Factor(m.component, m.module, delta=lycoris_delta(m.tensors, m.kind, m.alpha)))
    return out


def _diffusers_factors(pipe: Any, file: Path, why: StudioError) -> list[_Factor]:
    """Layouts only diffusers converts (its older ``lora.down`` names and the like), else the reader's error."""
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    reader = getattr(pipe, "lora_state_dict", None)
    if reader is None:
        raise why
    try:
        state, alphas = reader(str(file))
    except Exception:  # noqa: BLE001 - diffusers raises several kinds; the formats reader's message is clearer
        raise why from None
    pairs: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in convert_unet_state_dict_to_peft(dict(state)).items():
        m = re.match(r"^([a-z_0-9]+)\.(.+)\.(lora_A|lora_B)\.weight$", key)
        if m is None:
            raise why
        pairs.setdefault((m.group(1), m.group(2)), {})[m.group(3)] = value
    out = []
    for (comp, module), t in pairs.items():
        if set(t) != {"lora_A", "lora_B"}:
            raise why
        alpha = (alphas or {}).get(f"{comp}.{module}.alpha")
        scale = 1.0 if alpha is None else float(alpha) / t["lora_A"].shape[0]
        out.append(_Factor(comp, module, down=t["lora_A"], up=t["lora_B"], scale=scale))
    log.info("%s: read through diffusers' converters (%d layers)", file, len(out))
    return out


def _check_fit(pipe: Any, file: Path, factors: list[_Factor]) -> None:
    """Name the factors' layers as the pipeline does; refuse a file whose layers it lacks."""
    from studio.adapters.core import adapted_models

    models = adapted_models(pipe)
    missing = []
    for f in factors:
        model = models.get(f.component)
        found = _find_layer(model, f.component, f.path) if model is not None else None
        if found is None:
            missing.append(f"{f.component}.{f.path}")
        else:
            f.path = found[0]
    if missing:
        raise StudioError(f"{file}: {len(missing)} of {len(factors)} adapted layers are not in this "
                          f"{type(pipe).__name__} (e.g. {missing[0]}); was it made for another model?")


def _peft_factors(pipe: Any, file: Path, method: str) -> list[_Factor]:
    """Any method PEFT can merge (DoRA, the studio's own): its exact delta per layer, as a dense delta.

    The adapter is loaded into a skeleton holding copies of just the adapted layers, merged
    there, and read back as merged - base; the pipeline itself is not touched.
    """
    from safetensors import safe_open

    from studio.adapters.core import adapted_models, load_adapter, tuner_layers
    from studio.adapters.methods import get_method

    if not get_method(method).can_merge:
        raise StudioError(f"{file}: {method} adapters cannot be fused, so they cannot be mixed yet")
    models = adapted_models(pipe)
    with safe_open(str(file), framework="pt") as fh:
        keys = list(fh.keys())
    skeletons = {comp: torch.nn.Module() for comp in models}
    for key in keys:
        comp, _, rest = key.partition(".")
        if comp not in models:
            continue
        parts = rest.split(".")
        for n in range(len(parts) - 1, 0, -1):  # the longest prefix that names a Linear/Conv2d layer
            found = _find_layer(models[comp], comp, ".".join(parts[:n]))
            if found is not None and found[0] == ".".join(parts[:n]):
                _graft(skeletons[comp], found[0], found[1])
                break
    holder = types.SimpleNamespace(unet=skeletons["unet"], **{c: m for c, m in skeletons.items() if c != "unet"})
    load_adapter(holder, file, "mix", trigger=False)  # the skeleton has no text encoder; the mixer installs triggers
    out = []
    with torch.no_grad():
        for comp, skel in skeletons.items():
            for name, layer in tuner_layers(skel):
                base = layer.get_base_layer()
                before = base.weight.detach().clone()
                layer.merge(safe_merge=True, adapter_names=["mix"])
                out.append(_Factor(comp, name, delta=(base.weight.detach().float() - before.float())))
    return out


def _graft(root: torch.nn.Module, path: str, layer: torch.nn.Module) -> None:
    node = root
    *parents, leaf = path.split(".")
    for part in parents:
        if not hasattr(node, part):
            node.add_module(part, torch.nn.Module())
        node = getattr(node, part)
    if not hasattr(node, leaf):
        node.add_module(leaf, copy.deepcopy(layer))


def block_address(path: str) -> tuple[str, ...]:
    """The block of a denoiser module path: ``("down", "1", "res")``, ``("mid", "attn")``, ``("io",)``."""
    parts = path.split(".")
    kinds = {"attentions": "attn", "resnets": "res", "downsamplers": "sampler", "upsamplers": "sampler"}
    if parts[0] in ("down_blocks", "up_blocks") and len(parts) > 2:
        return (parts[0].removesuffix("_blocks"), parts[1], kinds.get(parts[2], parts[2]))
    if parts[0] == "mid_block" and len(parts) > 1:
        return ("mid", kinds.get(parts[1], parts[1]))
    return ("io",)


def _block_keys(model: torch.nn.Module) -> set[str]:
    keys = set()
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            address = block_address(name)
            keys.update(".".join(address[:n]) for n in range(1, len(address) + 1))
    return keys


# ----------------------------------------------------------------------------- one layer's share of the mix


class _LayerMix:
    """The adapters of one Linear/Conv2d layer: LoRAs concatenated into one rank-sum pair, the rest summed dense.

    ``set_scales(a)`` (a: one multiplier per adapter of the mix) rebuilds the effective pair,
    keeping only the ranks of adapters whose multiplier is not zero; the forward hook then costs
    two matmuls whatever the number of LoRAs, and nothing when none is active.
    """

    def __init__(self, layer: torch.nn.Module, where: str,
                 entries: list[tuple[int, _Factor, float]]) -> None:
        self.layer = layer
        self.where = where
        self.conv = isinstance(layer, torch.nn.Conv2d)
        w = layer.weight
        lowrank = [(i, *self._pair(f), s * f.scale) for i, f, s in entries if f.down is not None and self._lowrank_ok()]
        dense = [(i, self._dense(f), s * f.scale) for i, f, s in entries if f.down is None or not self._lowrank_ok()]
        self.down = self.up = self.owner = self.col_scale = None
        if lowrank:
            self.down = torch.cat([d for _, d, _, _ in lowrank]).to(w)
            self.up = torch.cat([u for _, _, u, _ in lowrank], dim=1).to(w)
            self.owner = torch.tensor([i for i, d, _, _ in lowrank for _ in range(d.shape[0])])
            self.col_scale = torch.tensor([s for _, d, _, s in lowrank for _ in range(d.shape[0])], dtype=torch.float32)
        self.dense = dense
        self.down_eff: torch.Tensor | None = None
        self.up_eff: torch.Tensor | None = None
        self.dense_eff: torch.Tensor | None = None
        self.original: torch.Tensor | None = None
        self.handle: Any = None

    def _lowrank_ok(self) -> bool:
        # a concatenated pair needs plain convolutions; grouped or non-zero-padded ones take the dense path
        return not self.conv or (self.layer.groups == 1 and self.layer.padding_mode == "zeros")

    def _pair(self, f: _Factor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.layer.weight
        down, up = f.down, f.up
        if self.conv:
            down = down[:, :, None, None] if down.dim() == 2 else down
            up = up[:, :, None, None] if up.dim() == 2 else up
        else:
            down, up = down.reshape(down.shape[0], -1), up.reshape(up.shape[0], -1)
        if tuple(down.shape[1:]) != tuple(w.shape[1:]) or up.shape[0] != w.shape[0] or up.shape[1] != down.shape[0] \
                or (self.conv and tuple(up.shape[2:]) != (1, 1)):
            raise StudioError(f"{self.where}: LoRA factors {tuple(down.shape)} / {tuple(up.shape)} do not fit the "
                              f"layer weight {tuple(w.shape)}; was the adapter trained on another model?")
        return down, up

    def _dense(self, f: _Factor) -> torch.Tensor:
        w = self.layer.weight
        if f.delta is not None:
            if f.delta.numel() != w.numel():
                raise StudioError(f"{self.where}: adapter delta of {f.delta.numel()} values does not fit the layer "
                                  f"weight {tuple(w.shape)}; was the adapter trained on another model?")
            return f.delta.reshape(w.shape).float()
        down, up = self._pair(f)
        return (up.float().flatten(1) @ down.float().flatten(1)).reshape(w.shape)

    def set_scales(self, a: torch.Tensor) -> None:
        """Rebuild the effective factors for per-adapter multipliers ``a``."""
        w = self.layer.weight
        self.down_eff = self.up_eff = None
        if self.down is not None:
            s = self.col_scale * a.cpu()[self.owner]  # bookkeeping on the CPU, factors where the layer is
            keep = s != 0
            if bool(keep.all()):
                self.down_eff = self.down * s.to(w.device, w.dtype).view(-1, *([1] * (self.down.dim() - 1)))
                self.up_eff = self.up
            elif bool(keep.any()):
                idx = keep.nonzero().squeeze(1)
                self.down_eff = (self.down[idx.to(w.device)]
                                 * s[idx].to(w.device, w.dtype).view(-1, *([1] * (self.down.dim() - 1))))
                self.up_eff = self.up[:, idx.to(w.device)].contiguous()
        total = None
        for i, delta, scale in self.dense:
            k = float(a[i]) * scale
            if k != 0.0:
                total = delta * k if total is None else total + delta * k
        self.dense_eff = None if total is None else total.to(device=w.device, dtype=w.dtype)

    def delta(self) -> torch.Tensor | None:
        """The current effective weight difference (fp32), or None when nothing is active."""
        total = None
        if self.down_eff is not None:
            total = (self.up_eff.float().flatten(1) @ self.down_eff.float().flatten(1)).reshape(self.layer.weight.shape)
        if self.dense_eff is not None:
            total = self.dense_eff.float() if total is None else total + self.dense_eff.float()
        return total

    @torch.no_grad()
    def fuse(self) -> None:
        w = self.layer.weight
        delta = self.delta()
        if delta is None:
            return
        fused = (w.float() + delta).to(w.dtype)
        if not torch.isfinite(fused).all():
            raise StudioError(f"{self.where}: fusing the mix gives non-finite weights; lower the adapter weights")
        self.original = w.detach().clone()  # kept so that unfusing restores the base exactly, not to float error
        w.copy_(fused)

    @torch.no_grad()
    def unfuse(self) -> None:
        if self.original is not None:
            self.layer.weight.copy_(self.original)
            self.original = None

    def attach(self) -> None:
        self.handle = self.layer.register_forward_hook(self)

    def detach(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def __call__(self, module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        inplace = not torch.is_grad_enabled()  # sampling: add into the layer's output, no extra tensor
        if self.down_eff is not None:
            if self.conv:
                h = F.conv2d(x, self.down_eff, None, module.stride, module.padding, module.dilation)
                output = output.add_(F.conv2d(h, self.up_eff)) if inplace else output + F.conv2d(h, self.up_eff)
            elif inplace and output.is_contiguous() and output.dtype == self.up_eff.dtype:  # not under autocast
                h = F.linear(x, self.down_eff)
                output.view(-1, output.shape[-1]).addmm_(h.view(-1, h.shape[-1]), self.up_eff.t())
            else:
                output = output + F.linear(F.linear(x, self.down_eff), self.up_eff)
        if self.dense_eff is not None:
            extra = module._conv_forward(x, self.dense_eff, None) if self.conv else F.linear(x, self.dense_eff)
            output = output.add_(extra) if inplace else output + extra
        return output


# ----------------------------------------------------------------------------- resolving and the mixer


def _library() -> types.ModuleType | None:
    try:
        from studio import library
    except ImportError:  # the library is optional: paths still work without it
        return None
    return library


def _lora_hash(file: Path, meta: Mapping[str, str]) -> str:
    from studio.generation import file_sha256

    return (meta.get("sshs_model_hash") or file_sha256(file, data_only=True))[:12]


def _check_family(pipe: Any, target: str, family: str | None) -> None:
    """Refuse an adapter whose header names another family than the base's."""
    have = getattr(getattr(pipe, "studio_source", None), "family", None)
    if family and have and family != have:
        raise StudioError(f"adapter {target!r} was made for {family} models, but this base model is {have}; "
                          f"choose a {have} adapter")


def resolve(pipe: Any, spec: str | AdapterSpec, home: str | os.PathLike | None = None) -> MixedAdapter:
    """Find an adapter (a path, else a library name), hash it and refuse it for a base of another family."""
    from studio.adapters.core import adapter_file, read_metadata
    from studio.generation import file_sha256

    spec = as_spec(spec)
    lib = _library()
    p = Path(spec.target).expanduser()
    record = None
    if p.exists():
        file = adapter_file(p)
        name = p.name if p.is_dir() else (p.parent.name if p.name in _STANDARD_FILES else p.stem)
    elif lib is None:
        raise StudioError(f"adapter {spec.target!r}: no such file or folder (library names need studio.library); "
                          f"expected {GRAMMAR}")
    else:
        file = adapter_file(lib.resolve_adapter(spec.target, home=home))
        record = lib.Library(Path(home) if home else None).get(spec.target)
        name = record.name
    meta = read_metadata(file)
    if record is not None and hasattr(lib, "check_family"):
        lib.check_family(record, pipe)
    else:  # the header says it; files without one are checked by their layer names and shapes when read
        _check_family(pipe, spec.target, meta.get("studio.base_family"))
    method = meta.get("studio.method") or (record.method if record else None)
    if method is None:  # a community file: LoHa/LoKr show in its tensor names
        from safetensors import safe_open

        from studio.formats.kohya import detect_lora_format

        with safe_open(str(file), framework="pt") as fh:
            layout = detect_lora_format(fh.keys())
        method = {"lycoris-loha": "loha", "lycoris-lokr": "lokr"}.get(layout or "", "lora")
    file_hash = record.file_hash if record is not None else file_sha256(file)
    return MixedAdapter(spec, name, file, file_hash, _lora_hash(file, meta), meta.get("studio.base_family"), method)


_STANDARD_FILES = ("pytorch_lora_weights.safetensors", "studio_adapter.safetensors")


def _order_key(a: MixedAdapter) -> tuple:
    # a canonical order: sums run in the same order whatever order the user gave, so results are identical
    s = a.spec
    return (a.file_hash, s.weight, s.start, s.end, s.scope, s.blocks, s.target)


class Mixer:
    """A set of adapters applied to a pipeline, and removed again (a context manager).

    ``fuse``: None (default) fuses static mixes and hooks dynamic ones; False always hooks (the
    reference the tests compare against); True insists on fusing. ``schedule``: for per-step
    behaviour, a function of the run fraction returning one multiplier per adapter (in the order
    given), applied on top of weights and windows.
    """

    def __init__(self, pipe: Any, adapters: Sequence[str | AdapterSpec], *, fuse: bool | None = None,
                 schedule: Callable[[float], Sequence[float]] | None = None,
                 home: str | os.PathLike | None = None, gates: str | os.PathLike | None = None) -> None:
        self.pipe = pipe
        self.gates_file = gates  # AutoLoRA gate file of ``gated:`` adapters (default: the bundled one)
        self.gated: Any = None  # the studio.autolora.gates.GatedFusion while applied
        self.specs = [as_spec(a) for a in adapters]
        self.adapters = [resolve(pipe, s, home) for s in self.specs]
        self.schedule = schedule
        dynamic = schedule is not None or any((s.windowed or s.gated) and s.scope != "te" and s.weight != 0
                                              for s in self.specs)
        if fuse and dynamic:
            raise StudioError("this mix has windows or a schedule, so it cannot be fused; leave fuse unset")
        self.fused = (not dynamic) if fuse is None else bool(fuse)  # everything fused
        self._fuse = fuse
        self._order = sorted(range(len(self.adapters)), key=lambda i: _order_key(self.adapters[i]))
        self._fused_layers: list[_LayerMix] = []  # text encoders, and the denoiser's static adapters
        self._hooked_layers: list[_LayerMix] = []  # the denoiser's dynamic adapters
        self._listening = False
        self._last: torch.Tensor | None = None
        self._triggers: list[Any] = []  # learned trigger embeddings (pivotal tuning), hooked on the text side
        self.applied = False

    # ------------------------------------------------------------------ applying
    def apply(self) -> Mixer:
        """Put the mix into the pipeline (fused or hooked)."""
        from studio.adapters.core import adapted_models

        if getattr(self.pipe, "_studio_mix", None) is not None:
            raise StudioError("this pipeline already carries a mix of adapters; remove it before applying another")
        models = adapted_models(self.pipe)
        self._check_blocks(models["unet"])
        per_layer: dict[tuple[str, str, bool], list[tuple[int, _Factor, float]]] = {}
        layers: dict[tuple[str, str], torch.nn.Module] = {}
        warned = False
        for slot, i in enumerate(self._order):
            a = self.adapters[i]
            if a.spec.weight == 0:
                continue  # weight 0 is the base model, exactly
            for f in _read_factors(self.pipe, a.file):
                if a.spec.scope != "both" and (f.component == "unet") != (a.spec.scope == "unet"):
                    continue  # out of scope
                if a.spec.gated and f.component == "unet":
                    continue  # the gated fusion below runs it
                if f.component != "unet" and a.spec.windowed and not warned:
                    log.warning("adapter %s: its text-encoder part applies to the whole run (the prompt is encoded "
                                "once); the window @%g-%g applies to the denoiser", a.spec.target, a.spec.start,
                                a.spec.end)
                    warned = True
                static = a.spec.block_weight(block_address(f.path)) if f.component == "unet" else 1.0
                # a dynamic mix hooks only its dynamic adapters: the static ones are fused under the hooks
                hooked = f.component == "unet" and (self._fuse is False or (
                    self._fuse is None and (self.schedule is not None or a.spec.windowed)))
                per_layer.setdefault((f.component, f.path, hooked), []).append((slot, f, static))
                layers[(f.component, f.path)] = _find_layer(models[f.component], f.component, f.path)[1]
        try:
            for (comp, path, hooked), entries in per_layer.items():
                lm = _LayerMix(layers[(comp, path)], f"{comp}.{path}", entries)
                (self._hooked_layers if hooked else self._fused_layers).append(lm)
            self._install_triggers()
            self._apply_gated()
            weights = self._weights(0.0, with_gates=False)
            for lm in self._fused_layers:
                lm.set_scales(weights)
                lm.fuse()
            if self._hooked_layers:
                self._listening = True
                listen(self.pipe, self._on_step)
                self._on_step(0.0)
                for lm in self._hooked_layers:
                    lm.attach()
        except BaseException:
            self._undo()
            raise
        self.pipe._studio_mix = self
        self.applied = True
        log.info("mixed %d adapters (%s): %s", len(self.specs), "fused" if self.fused else "hooked, batched",
                 ", ".join(map(str, self.specs)))
        return self

    def _check_blocks(self, unet: torch.nn.Module) -> None:
        wanted = {k for s in self.specs for k, _ in s.blocks}
        if wanted:
            have = _block_keys(unet)
            bad = sorted(wanted - have)
            if bad:
                raise StudioError(f"block {bad[0]}: this denoiser has no such block; it has "
                                  f"{', '.join(sorted(k for k in have if k.count('.') < 1 or k[-1].isdigit()))}")

    def _weights(self, fraction: float, with_gates: bool = True) -> torch.Tensor:
        """One multiplier per adapter slot (canonical order): weight x window x schedule."""
        extra = list(self.schedule(fraction)) if (self.schedule is not None and with_gates) else None
        if extra is not None and len(extra) != len(self.specs):
            raise StudioError(f"the mix schedule returned {len(extra)} multipliers for {len(self.specs)} adapters")
        out = []
        for i in self._order:
            s = self.specs[i]
            w = s.weight if (not with_gates or s.active_at(fraction)) else 0.0
            out.append(w * (float(extra[i]) if extra is not None else 1.0))
        return torch.tensor(out, dtype=torch.float32)

    def _on_step(self, fraction: float) -> None:
        weights = self._weights(fraction)
        if self._last is not None and torch.equal(weights, self._last):
            return
        self._last = weights
        for lm in self._hooked_layers:
            lm.set_scales(weights)

    # ------------------------------------------------------------------ removing
    def remove(self) -> None:
        """Take the mix out: fused weights are restored exactly, hooks removed."""
        if not self.applied:
            return
        self._undo()
        self.pipe._studio_mix = None
        self.applied = False

    def _install_triggers(self) -> None:
        """Hook the trigger embeddings of adapters that carry them, blended by each adapter's weight."""
        from safetensors import safe_open

        from studio.adapters.trigger import KEY_PREFIX, TriggerEmbeddings

        for a in self.adapters:
            if a.spec.weight == 0 or a.spec.scope == "unet":
                continue
            with safe_open(str(a.file), framework="pt") as fh:
                keys = [k for k in fh.keys() if k.startswith(KEY_PREFIX)]
                if not keys:
                    continue
                trig = TriggerEmbeddings.from_file_parts({k: fh.get_tensor(k) for k in keys}, fh.metadata() or {})
            trig.weight = float(a.spec.weight)
            self._triggers.append(trig.install(self.pipe))

    def _apply_gated(self) -> None:
        gated = [a for a in self.adapters if a.spec.gated and a.spec.weight != 0]
        if not gated:
            return
        from studio.autolora.gates import DEFAULT_GATES, GatedFusion, load_gates

        gates = load_gates(self.gates_file or DEFAULT_GATES, self.pipe)
        self.gated = GatedFusion(self.pipe, [a.file for a in gated], gates, [a.spec.weight for a in gated]).apply()

    def _undo(self) -> None:
        if self.gated is not None:
            self.gated.remove()
            self.gated = None
        for trig in self._triggers:
            trig.remove()
        self._triggers = []
        for lm in self._fused_layers + self._hooked_layers:
            lm.unfuse()
            lm.detach()
        if self._listening:
            unlisten(self.pipe, self._on_step)
            self._listening = False
        self._fused_layers, self._hooked_layers, self._last = [], [], None

    def __enter__(self) -> Mixer:
        return self.apply()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # ------------------------------------------------------------------ recording
    def gate_means(self) -> dict[str, float]:
        """Each gated adapter's mean gate over the denoising calls so far (AutoLoRA; empty without gated adapters)."""
        if self.gated is None:
            return {}
        names = [a.name for a in self.adapters if a.spec.gated and a.spec.weight != 0]
        return dict(zip(names, self.gated.mean_gates(), strict=True))

    def infotext_fields(self) -> dict[str, str]:
        """A1111's ``Lora hashes`` plus the studio's ``Adapters`` (exact specs) and ``Adapter hashes`` (sha256)."""
        if not self.adapters:
            return {}
        return {
            "Lora hashes": ", ".join(f"{a.name}: {a.lora_hash}" for a in self.adapters),
            "Adapters": ", ".join(str(a.spec) for a in self.adapters),
            "Adapter hashes": ", ".join(f"{a.name}: {a.file_hash[:12]}" for a in self.adapters),
        }


@contextlib.contextmanager
def mixed(pipe: Any, adapters: Sequence[str | AdapterSpec], **options: Any) -> Iterator[Mixer]:
    """``with mixed(pipe, ["heart:0.9", "checkered:0.7@0.4-1"]): pipe(...)`` (see :class:`Mixer`)."""
    with Mixer(pipe, adapters, **options) as mix:
        yield mix


__all__ = [
    "AdapterSpec", "DenoisingClock", "GRAMMAR", "MixedAdapter", "Mixer", "SCOPES", "Sweep", "as_spec",
    "block_address", "listen", "mixed", "parse_prompt", "parse_spec", "parse_sweep", "resolve", "unlisten",
]
