"""AutoLoRA's gated fusion: per-layer, per-token, per-channel gates over several adapters, run batched.

At every adapted Linear layer, with ``y0 = W x`` and ``y_i = x A_i^T B_i^T`` (adapter i's output)::

    g_i = sigmoid(w_base * LN(y0) + w_lora * LN(y_i) + w_cross * LN(y0) * LN(y_i) + b)
    y   = y0 + sum_i w_out * g_i * y_i

The gate parameters (``w_base``, ``w_lora``, ``w_cross``, ``b``: one per channel; ``w_out``: one per
layer) belong to the layer, not to an adapter, so one gate file serves any set of adapters of its
base model; an optional ``w_t`` adds the denoising fraction (through the studio's one timestep hook).
All adapters of a layer run in one batched pair of einsums (``K`` adapters: 2 ops, not ``2K``).
Layers the gate file does not know (or convolutions) add their adapters as a plain sum.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from studio.autolora.functional import effective_lowrank
from studio.errors import StudioError

log = logging.getLogger(__name__)

GATES_KIND = "autolora-gates"
DEFAULT_GATES = Path(__file__).resolve().parents[2] / "assets" / "autolora" / "gates.safetensors"


@dataclasses.dataclass(frozen=True)
class GateConfig:
    """How the gates are built."""

    init_bias: float = 3.0  # sigmoid(3) = 0.95: an untrained gate file is close to the plain sum
    timestep: bool = False  # add w_t * (fraction - 0.5) inside the sigmoid


class LayerGate(nn.Module):
    """The gate parameters of one layer of ``channels`` outputs."""

    def __init__(self, channels: int, config: GateConfig = GateConfig()) -> None:
        super().__init__()
        self.w_base = nn.Parameter(torch.zeros(channels))
        self.w_lora = nn.Parameter(torch.zeros(channels))
        self.w_cross = nn.Parameter(torch.zeros(channels))
        self.b = nn.Parameter(torch.full((channels,), float(config.init_bias)))
        self.w_out = nn.Parameter(torch.ones(()))
        self.w_t = nn.Parameter(torch.zeros(channels)) if config.timestep else None

    def forward(self, y0: torch.Tensor, ys: torch.Tensor,
                fraction: float | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(gated output, gates) for base output ``y0 (B, ..., C)`` and adapter outputs ``ys (K, B, ..., C)``.

        ``fraction``: the denoising fraction, one number for the whole batch (generation) or one per
        sample, shape ``(B,)`` (training draws a timestep per sample).
        """
        g = self.values(y0, ys, fraction)
        return torch.addcmul(y0, (g * ys).sum(0), self.w_out), g

    def values(self, y0: torch.Tensor, ys: torch.Tensor, fraction: float | torch.Tensor | None = None) -> torch.Tensor:
        """The gates ``(K, B, ..., C)`` alone (see :meth:`forward`)."""
        c = y0.shape[-1]
        y0n = F.layer_norm(y0, (c,))
        yin = F.layer_norm(ys, (c,))
        b = self.b
        if self.w_t is not None and fraction is not None:
            if isinstance(fraction, torch.Tensor) and fraction.dim() > 0:
                if fraction.numel() != y0.shape[0]:
                    raise ValueError(f"{fraction.numel()} per-sample fractions for a batch of {y0.shape[0]}")
                b = b + self.w_t * (fraction.to(y0).view(-1, *([1] * (y0.dim() - 1))) - 0.5)
            else:
                b = b + self.w_t * (float(fraction) - 0.5)
        # the formula of functional.gate_values/gated_sum regrouped for fewer ops over (K, ..., C) (the per-op
        # overhead is most of a gated layer's cost on micro's 64-128-wide layers):
        # z = LN(y_i) * (w_lora + w_cross*LN(y0)) + (b + w_base*LN(y0)), and w_out (one per layer) after the sum
        z = torch.addcmul(torch.addcmul(b, self.w_base, y0n), yin, torch.addcmul(self.w_lora, self.w_cross, y0n))
        return torch.sigmoid(z) if torch.is_grad_enabled() else z.sigmoid_()  # z is this call's own temporary


def _key(path: str) -> str:
    return path.replace(".", "__")  # ModuleDict keys cannot hold dots


class GateSet(nn.Module):
    """Gates of every Linear layer of a denoiser that an adapter may adapt."""

    def __init__(self, layers: dict[str, int], config: GateConfig = GateConfig()) -> None:
        super().__init__()
        self.config = config
        self.layers = dict(sorted(layers.items()))
        self.gates = nn.ModuleDict({_key(p): LayerGate(c, config) for p, c in self.layers.items()})

    def get(self, path: str) -> LayerGate | None:
        """The gate of a denoiser module path, or None when the file does not know the layer."""
        k = _key(path)
        return self.gates[k] if k in self.gates else None

    @classmethod
    def for_pipeline(cls, pipe: Any, config: GateConfig = GateConfig()) -> GateSet:
        """Gates for every adaptable Linear layer of the pipeline's denoiser."""
        from studio.autolora.encoder import slots_of

        layers = {s.key.split(".", 1)[1]: s.d_out for s in slots_of(pipe) if s.key.startswith("unet.")}
        from studio.adapters.core import denoiser

        unet = denoiser(pipe)
        layers = {p: c for p, c in layers.items() if isinstance(_base(unet.get_submodule(p)), nn.Linear)}
        return cls(layers, config)


def _base(m: nn.Module) -> nn.Module:
    return m.get_base_layer() if hasattr(m, "get_base_layer") else m


def save_gates(gates: GateSet, path: str | os.PathLike, *, base_hash: str, extra: dict | None = None,
               half: bool = False) -> Path:
    """Write a gate file (fp32, or fp16 with ``half``; config and layer list in the header) atomically.

    :func:`load_gates` reads either: fp16 values load into the fp32 gates.
    """
    from studio.autolora.encoder import write_module_file

    header = {"studio.kind": GATES_KIND, "studio.base_hash": base_hash,
              "config": json.dumps(dataclasses.asdict(gates.config)), "layers": json.dumps(gates.layers),
              "extra": json.dumps(extra or {})}
    return write_module_file(gates, path, header, torch.float16 if half else torch.float32)


def load_gates(path: str | os.PathLike, pipe: Any = None) -> GateSet:
    """A gate file; with ``pipe``, refuses one trained for another base model."""
    from studio.autolora.encoder import read_module_file

    p = Path(path)
    tensors, meta = read_module_file(p, GATES_KIND, "gate file",
                                     "no gate file; train one with `studio autolora gates`")
    if pipe is not None:
        from studio.generation import model_hash

        have = model_hash(pipe)
        if meta.get("studio.base_hash") and meta["studio.base_hash"] != have:
            raise StudioError(f"{p}: gates trained for another base model (hash {meta['studio.base_hash']}, this one "
                              f"is {have}); train gates for it with `studio autolora gates`")
    gates = GateSet({k: int(v) for k, v in json.loads(meta["layers"]).items()}, GateConfig(**json.loads(meta["config"])))
    gates.load_state_dict(tensors, strict=True)
    return gates


# ----------------------------------------------------------------------------- the fusion (forward hooks)


class _GatedLayer:
    """All adapters of one layer stacked: ``down (K, r, d_in)``, ``up (K, d_out, r)`` (zero-padded ranks)."""

    def __init__(self, layer: nn.Linear, path: str, parts: list[tuple[int, torch.Tensor, torch.Tensor]], k: int,
                 gate: LayerGate | None, owner: GatedFusion) -> None:
        r = max(d.shape[0] for _, d, _ in parts)
        w = layer.weight
        self.down = torch.zeros(k, r, w.shape[1], dtype=w.dtype, device=w.device)
        self.up = torch.zeros(k, w.shape[0], r, dtype=w.dtype, device=w.device)
        for i, d, u in parts:
            self.down[i, : d.shape[0]] = d.to(w)
            self.up[i, :, : d.shape[0]] = u.to(w)
        self.path, self.gate, self.owner = path, gate, owner
        self._t: tuple[Any, torch.Tensor, torch.Tensor] | None = None  # _project's factors and their key
        self.handle = layer.register_forward_hook(self)

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        active = self.owner.active
        ys = self._project(x) if active is None else self._project_subset(x, active)
        if self.gate is None:
            return output + ys.sum(0)
        g = self.gate.values(output, ys, self.owner.fraction if self.gate.w_t is not None else None)
        if self.owner.record:
            m = g.detach().mean(dim=tuple(range(1, g.dim())))
            m = m if m.device == self.owner.gate_sums.device else m.cpu()
            if active is None:
                self.owner.gate_sums += m
            else:
                self.owner.gate_sums[active] += m
            self.owner.gate_counts += 1
        # LayerGate.forward's sum; without autograd the product reuses this call's own ys (fewer allocations)
        return torch.addcmul(output, (g * ys if torch.is_grad_enabled() else ys.mul_(g)).sum(0), self.gate.w_out)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """Every adapter's weighted output ``(K, B, ..., C)``: one matmul against the stacked ``(d_in, K*r)``
        down factors, one batched matmul against the up factors with the weights folded in (made again only
        when the weights or the device change)."""
        scales = self.owner.scales
        key = (x.device, id(scales), scales._version)
        if self._t is None or self._t[0] != key:
            k, r = self.down.shape[:2]
            up_t = self.up.transpose(1, 2) * scales.to(self.up).view(k, 1, 1)
            self._t = (key, self.down.reshape(k * r, -1).t().contiguous().to(x.device), up_t.contiguous().to(x.device))
        _, down_all, up_t = self._t
        k, r = up_t.shape[:2]
        h = torch.matmul(x, down_all).view(-1, k, r).transpose(0, 1)  # (K, N, r), N = tokens of the batch
        return torch.bmm(h, up_t).view(k, *x.shape[:-1], up_t.shape[-1])

    def _project_subset(self, x: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """The same for a subset of the stacked adapters (gate training: one pair of many)."""
        down, up, scales = self.down[active], self.up[active], self.owner.scales[active]
        h = torch.einsum("...i,kri->k...r", x, down)
        return torch.einsum("k...r,kor->k...o", h, up) * scales.to(x).view(-1, *([1] * (h.dim() - 1)))


class GatedFusion:
    """Several adapters fused with gates in a pipeline's denoiser (a context manager).

    ``files``: adapter files (any layout/method the mixer reads); ``weights``: per-adapter
    multipliers of ``y_i``. Text-encoder parts of the adapters are not handled here (the mixer
    fuses them). ``mean_gates()`` reports each adapter's mean gate over the run (the UI shows it).
    """

    def __init__(self, pipe: Any, files: Sequence[str | os.PathLike], gates: GateSet | None,
                 weights: Sequence[float] | None = None, *, record: bool = True, clock: bool = True) -> None:
        self.pipe = pipe
        self.files = [Path(f) for f in files]
        self.gates = gates
        self.scales = torch.tensor(list(weights) if weights is not None else [1.0] * len(files), dtype=torch.float32)
        self.record = record
        # the denoising fraction the timestep gates read: from the denoiser's timestep hook when ``clock``;
        # else the caller sets it (gate training: a tensor of one fraction per sample)
        self.fraction: float | torch.Tensor = 0.0
        self.clock = clock
        # indices of the adapters that run (None: all); the others cost nothing, unlike a zero weight
        self.active: torch.Tensor | None = None
        self.layers: list[_GatedLayer] = []
        self.gate_sums = torch.zeros(len(files), dtype=torch.float64)
        self.gate_counts = 0
        self._listening = False

    def _tick(self, fraction: float) -> None:
        self.fraction = fraction

    def apply(self) -> GatedFusion:
        from studio.adapters.core import adapted_models
        from studio.mixing import _find_layer, _read_factors, listen

        unet = adapted_models(self.pipe)["unet"]
        per: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
        skipped = 0
        for i, f in enumerate(self.files):
            for fac in _read_factors(self.pipe, f):
                if fac.component != "unet":
                    skipped += 1
                    continue
                found = _find_layer(unet, "unet", fac.path)
                if found is None or not isinstance(found[1], nn.Linear):
                    raise StudioError(f"{f}: gated fusion runs on Linear layers; {fac.path} is not one (use a plain "
                                      f"mix for convolution adapters)")
                if fac.down is not None:
                    d, u = fac.down.float().flatten(1), fac.up.float().flatten(1) * float(fac.scale)
                else:  # exact for any delta: a full-rank SVD form
                    w = found[1].weight
                    d, u = effective_lowrank(fac.delta.float().reshape(w.shape) * float(fac.scale), min(w.shape))
                per.setdefault(fac.path, []).append((i, d, u))
        if skipped:
            log.warning("gated fusion: %d text-encoder layers of these adapters are left out (the denoiser is gated)",
                        skipped)
        unknown = 0
        try:
            for path in sorted(per):
                layer = _find_layer(unet, "unet", path)[1]
                gate = self.gates.get(path) if self.gates is not None else None
                unknown += gate is None and self.gates is not None
                self.layers.append(_GatedLayer(layer, path, per[path], len(self.files), gate, self))
            if self.clock and self.gates is not None and any(g.w_t is not None for g in self.gates.gates.values()):
                listen(self.pipe, self._tick)
                self._listening = True
        except BaseException:
            self.remove()
            raise
        if unknown:
            log.warning("gated fusion: %d adapted layers have no gate in the gate file; they add their adapters plainly",
                        unknown)
        return self

    def remove(self) -> None:
        from studio.mixing import unlisten

        for gl in self.layers:
            gl.handle.remove()
        self.layers = []
        if self._listening:
            unlisten(self.pipe, self._tick)
            self._listening = False

    def mean_gates(self) -> list[float]:
        """Each adapter's gate averaged over layers, tokens, channels and calls so far."""
        if not self.gate_counts:
            return [float("nan")] * len(self.files)
        return [float(v) for v in self.gate_sums / self.gate_counts]

    def __enter__(self) -> GatedFusion:
        return self.apply()

    def __exit__(self, *exc: object) -> None:
        self.remove()


# ----------------------------------------------------------------------------- training the gates


@dataclasses.dataclass(frozen=True)
class GateTrainSettings:
    """Gate training on zoo pairs: denoising on adapter 1's images plus a hinge away from adapter 2's caption."""

    steps: int = 200
    batch: int = 4
    lr: float = 1e-2
    hinge_weight: float = 0.1  # 0: denoising only (the ablation)
    margin: float = 0.05  # the hinge asks MSE(pred, adapter 2's caption's prediction) >= margin
    images: int = 8
    seed: int = 0
    val_pairs: int = 12  # fixed validation draws (pair, images, noise, timesteps), each a batch of ``batch``
    eval_every: int = 50  # validation loss every this many steps (and at the start and the end)
    # share of steps that draw a (subject, style) pair of the zoo and denoise renders of the subject in the
    # style under both prompts (not the paper's; 0: the paper's single-concept draws only)
    compose_share: float = 0.0


@dataclasses.dataclass
class _Draw:
    """One batch: a target set's images ``idx`` (latents and prompts), the adapters that run, noise,
    timesteps; for a single-concept draw the pair's other adapter ``other`` and its caption indices ``jdx``."""

    target: int
    active: list[int]
    idx: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    other: int | None = None
    jdx: torch.Tensor | None = None


def zoo_prompt(entry: dict[str, Any], caption: str) -> str:
    """The prompt a zoo adapter was trained with for a renderer caption (its recipe's form, trigger sks)."""
    import re

    if entry["kind"] == "style":
        return f"{caption} in {entry.get('trigger', 'sks')} style"
    return re.sub(rf"\b{entry['shape']}\b", f"{entry.get('trigger', 'sks')} shape", caption, count=1)


def _encode_set(pipe: Any, folder: Path, prompt: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A rendered folder's images as latents and ``prompt(caption)`` of each as text embeddings."""
    import numpy as np
    from PIL import Image

    vae, tok, te = pipe.vae, pipe.tokenizer, pipe.text_encoder
    pngs = sorted(folder.glob("*.png"))
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p in pngs])
    lat = vae.encode(x.float() / 127.5 - 1.0).latent_dist.mean * vae.config.scaling_factor
    prompts = [prompt(p.with_suffix(".txt").read_text().strip()) for p in pngs]
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    return lat, te(ids)[0]


def _zoo_data(pipe: Any, entries: Sequence[dict[str, Any]], images: int, seed: int, compose: bool = False
              ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[tuple[int, int]]]:
    """Target sets as (latents, text embeddings): each entry's freshly rendered images under its training
    prompts (set n = entry n); with ``compose``, then one set per (subject, style) pair of the entries:
    the subject's shape and colour in the style's texture, "a COLOR sks shape on a BG background in sks
    style" (the compose suite's form). Returns latents, embeddings and the pairs of the compose sets."""
    import tempfile

    from studio.autolora.zoo import Concept, _render
    from studio.micro.cli import render_set

    latents, emb, pairs = [], [], []
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        for n, e in enumerate(entries):
            folder = Path(tmp) / e["name"]
            _render(Concept(e["kind"], e["shape"], e["color"], e["texture"]), folder, images, seed * 7919 + n)
            lat, em = _encode_set(pipe, folder, lambda c, e=e: zoo_prompt(e, c))
            latents.append(lat)
            emb.append(em)
        if compose:
            subjects = [n for n, e in enumerate(entries) if e["kind"] == "subject"]
            styles = [n for n, e in enumerate(entries) if e["kind"] == "style"]
            for si in subjects:
                for sj in styles:
                    subj, style = entries[si], entries[sj]
                    folder = Path(tmp) / f"{subj['name']}+{style['name']}"
                    render_set(folder, max(2, images // 2), seed * 7919 + 100003 + 1000 * si + sj,
                               shape=subj["shape"], color=subj["color"], texture=style["texture"],
                               caption="content", overwrite=True)
                    lat, em = _encode_set(pipe, folder, lambda c, a=subj, b=style: f"{zoo_prompt(a, c)} in "
                                                                                  f"{b.get('trigger', 'sks')} style")
                    latents.append(lat)
                    emb.append(em)
                    pairs.append((si, sj))
    return latents, emb, pairs


def train_gates(pipe: Any, entries: Sequence[dict[str, Any]], config: GateConfig = GateConfig(),
                settings: GateTrainSettings = GateTrainSettings()) -> tuple[GateSet, dict[str, Any]]:
    """Train one gate set for the pipeline's base on pairs of the given zoo adapters (base and adapters frozen).

    Each step draws a pair (1, 2): the gated fusion of both denoises adapter 1's images under its
    prompt (epsilon MSE), and a hinge keeps that prediction at least ``margin`` away from the
    prediction for adapter 2's prompt on the same noisy input (so the gates do not let adapter 2's
    concept take over). Only the gate parameters train; only the pair's adapters run (the others
    are stacked but skipped). Each sample's gates read its own timestep (``config.timestep``).

    With ``compose_share`` > 0, that share of the steps instead draws a (subject, style) pair of the
    entries and denoises renders of the subject in the style under the composed prompt, both
    adapters on, no hinge (so the gates also see prompts that ask for both concepts).

    A fixed validation set (``val_pairs`` draws) gives the denoising loss at the start, every
    ``eval_every`` steps and at the end, beside two references on the same draws: the plain sum
    of the pair (a static merge at 1/1) and adapter 1 alone. The report holds the curve.
    """
    import random
    import time

    from studio.adapters.core import denoiser
    from studio.trainers.loop import training_noise_scheduler

    if len(entries) < 2:
        raise StudioError("gate training needs at least 2 zoo adapters")
    rng = random.Random(settings.seed)
    torch.manual_seed(settings.seed)
    unet = denoiser(pipe)
    for m in (unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False)
    latents, emb, pairs = _zoo_data(pipe, entries, settings.images, settings.seed, settings.compose_share > 0)
    if settings.compose_share > 0 and not pairs:
        raise StudioError("gate training with compose draws needs subject and style adapters among the zoo's")
    sched = training_noise_scheduler(pipe)  # the trainer's forward process, not the pipeline's sampler
    total = sched.config.num_train_timesteps

    def batch_of(target: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = torch.tensor([rng.randrange(latents[target].shape[0]) for _ in range(settings.batch)])
        return idx, torch.randn_like(latents[target][idx]), torch.randint(0, total, (settings.batch,))

    def draw() -> _Draw:
        i, j = rng.sample(range(len(entries)), 2)
        idx, noise, t = batch_of(i)
        jdx = torch.tensor([rng.randrange(emb[j].shape[0]) for _ in range(settings.batch)])
        return _Draw(i, [i, j], idx, noise, t, other=j, jdx=jdx)

    def draw_compose() -> _Draw:
        k = rng.randrange(len(pairs))
        idx, noise, t = batch_of(len(entries) + k)
        return _Draw(len(entries) + k, list(pairs[k]), idx, noise, t)

    val = [draw() for _ in range(settings.val_pairs)]
    val_both = [draw_compose() for _ in range(settings.val_pairs)] if pairs else []

    def predict(fusion: GatedFusion, d: _Draw, active: list[int], prompt_of_other: bool = False) -> torch.Tensor:
        fusion.active = torch.tensor(active)
        fusion.fraction = 1.0 - d.t.float() / total  # per sample, the clock's convention (0: the first step)
        noisy = sched.add_noise(latents[d.target][d.idx], d.noise, d.t)
        ctx = emb[d.other][d.jdx] if prompt_of_other else emb[d.target][d.idx]
        return unet(noisy, d.t, encoder_hidden_states=ctx).sample

    def val_loss(fusion: GatedFusion, draws: list[_Draw], alone: bool = False) -> float:
        with torch.no_grad():
            return sum(float(F.mse_loss(predict(fusion, d, d.active[:1] if alone else d.active), d.noise))
                       for d in draws) / max(1, len(draws))

    files = [e["file"] for e in entries]
    ones = [1.0] * len(entries)
    plain = GatedFusion(pipe, files, None, ones, record=False, clock=False).apply()
    try:
        refs = {"plain_sum": val_loss(plain, val), "adapter1_alone": val_loss(plain, val, alone=True),
                "both_plain_sum": val_loss(plain, val_both)}
    finally:
        plain.remove()
    gates = GateSet.for_pipeline(pipe, config)
    opt = torch.optim.Adam(gates.parameters(), lr=settings.lr)
    fusion = GatedFusion(pipe, files, gates, ones, record=False, clock=False).apply()
    t0 = time.time()
    hist: list[float] = []
    curve: list[tuple[int, float]] = []
    curve_both: list[tuple[int, float]] = []
    log.info("gates: validation loss (%d draws of %d): plain sum %.4f, adapter 1 alone %.4f%s", len(val),
             settings.batch, refs["plain_sum"], refs["adapter1_alone"],
             f"; compose draws: plain sum {refs['both_plain_sum']:.4f}" if val_both else "")
    try:
        for step in range(settings.steps + 1):
            if step % settings.eval_every == 0 or step == settings.steps:
                curve.append((step, round(val_loss(fusion, val), 5)))
                if val_both:
                    curve_both.append((step, round(val_loss(fusion, val_both), 5)))
                recent = hist[-settings.eval_every:]
                log.info("gates: step %d/%d, validation loss %.4f%s, training loss (last %d) %s, %.0f s", step,
                         settings.steps, curve[-1][1], f" (compose draws {curve_both[-1][1]:.4f})" if val_both else "",
                         len(recent), f"{sum(recent) / len(recent):.4f}" if recent else "-", time.time() - t0)
            if step == settings.steps:
                break
            d = draw_compose() if pairs and rng.random() < settings.compose_share else draw()
            pred = predict(fusion, d, d.active)
            loss = F.mse_loss(pred, d.noise)
            hist.append(float(loss.detach()))
            if settings.hinge_weight > 0 and d.other is not None:
                with torch.no_grad():
                    other = predict(fusion, d, d.active, prompt_of_other=True)
                loss = loss + settings.hinge_weight * F.relu(settings.margin - F.mse_loss(pred, other))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        fusion.remove()
    report = {"steps": settings.steps, "seconds": round(time.time() - t0, 1), "pairs_from": len(entries),
              "denoise_first20": round(sum(hist[:20]) / max(1, len(hist[:20])), 4),
              "denoise_last20": round(sum(hist[-20:]) / max(1, len(hist[-20:])), 4),
              "val_curve": curve, "val_start": curve[0][1], "val_end": curve[-1][1],
              "val_plain_sum": round(refs["plain_sum"], 5), "val_adapter1_alone": round(refs["adapter1_alone"], 5),
              "val_both_curve": curve_both, "val_both_plain_sum": round(refs["both_plain_sum"], 5),
              "settings": dataclasses.asdict(settings), "config": dataclasses.asdict(config)}
    log.info("gates: %d steps in %.0f s, validation loss %.4f -> %.4f (plain sum %.4f, adapter 1 alone %.4f)",
             settings.steps, report["seconds"], report["val_start"], report["val_end"], refs["plain_sum"],
             refs["adapter1_alone"])
    return gates, report
