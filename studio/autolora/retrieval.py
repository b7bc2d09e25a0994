"""Train the weight encoder on a zoo, evaluate retrieval, and retrieve adapters for a prompt.

Training pairs each zoo adapter with its renderer captions (and its short concept prompt),
encoded by the base model's own text encoder (pooled output, frozen), under a symmetric InfoNCE
loss with a learnable temperature. Held-out adapters (20 % of the zoo) are never seen.

The metadata baseline embeds each adapter's metadata text (name, trigger, description) with the
same text encoder, the way metadata-based tools retrieve; run once with the real names and once
with random names (the case AutoLoRA exists for).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from studio.autolora.encoder import (EncoderConfig, EncoderEnsemble, Factors, WeightEncoder, adapter_factors,
                                     slots_of, stack)
from studio.autolora.functional import cosine_scores, info_nce, recall_at
from studio.errors import StudioError

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "autolora"
DEFAULT_ZOO = ASSETS / "zoo"
DEFAULT_ENCODER = ASSETS / "encoder.safetensors"
# below this cosine the best adapter is reported as no match, unless the encoder file carries its own
# calibrated threshold (``studio autolora train`` stores one: docs/autolora.md)
MATCH_THRESHOLD = 0.5


# caption words that name no concept (sentence templates, "background", "pattern"): they say nothing about
# which adapter a prompt wants
FILLER = frozenset("a an the of on in with and at to for by front picture photo image background pattern".split())


def match_threshold(header: dict[str, Any] | None) -> float:
    """The encoder's calibrated match threshold (its header), else the module default."""
    return float(((header or {}).get("extra") or {}).get("match_threshold", MATCH_THRESHOLD))


def content_words(text: str) -> set[str]:
    """The lower-case words of ``text`` that can name a concept (FILLER words left out)."""
    return {w for w in re.findall(r"[a-z]+", text.lower()) if w not in FILLER}


def vocabulary(captions: Sequence[str]) -> list[str]:
    """Every content word of the texts an encoder trains on (stored in its file: ``extra.vocabulary``)."""
    return sorted(set().union(*(content_words(c) for c in captions))) if captions else []


def unknown_prompt_note(prompt: str, header: dict[str, Any] | None) -> str | None:
    """Why no adapter can match ``prompt``, when none of its content words is a word the encoder trained on.

    Measured on micro (docs/autolora.md): off-topic prompts ("a castle on a hill at sunset") score as
    high as true matches, and the micro text encoder puts them as close to the training captions as
    on-topic ones; the encoder's scores mean nothing for words it has never seen paired with
    weights. ``None`` when some word is known, or the encoder file has no vocabulary (older files).
    """
    vocab = ((header or {}).get("extra") or {}).get("vocabulary")
    words = content_words(prompt)
    if not vocab or not words or words & set(vocab):
        return None
    return (f"none of the prompt's words ({', '.join(sorted(words))}) occurs in the captions the AutoLoRA encoder "
            f"was trained on: its scores say nothing about this prompt")


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """How the encoder trains on a zoo (seconds on a CPU)."""

    # the zoo's 96 training adapters (two replicas per concept): held-out recall@3 over encoder seeds 0-5 was
    # 0.79 on average at 600 steps and 0.92 at 1500 (docs/autolora.md, session 12)
    steps: int = 1500
    lr: float = 2e-3
    weight_decay: float = 1e-2
    seed: int = 0
    # adapters of one concept (replicas) are not each other's negatives in the InfoNCE batch
    mask_replicas: bool = False
    # encoders trained from seeds seed, seed+1, ...: more than one makes an ensemble (EncoderEnsemble). Two: held-out
    # recall@3 1.0 for seed pairs 0-1, 2-3, 3-4 and 4-5, where single seeds gave 0.75-1.0 (docs/autolora.md)
    members: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.members, bool) or not isinstance(self.members, int) or self.members < 1:
            raise StudioError(f"AutoLoRA encoder: --members {self.members}: must be a positive integer")


@torch.no_grad()
def encode_texts(pipe: Any, texts: Sequence[str], batch: int = 64) -> torch.Tensor:
    """The base text encoder's pooled output for each text ``(N, D)`` (the encoder stays frozen)."""
    te, tok = pipe.text_encoder, pipe.tokenizer
    out = []
    for i in range(0, len(texts), batch):
        ids = tok(list(texts[i:i + batch]), padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(te.device)
        out.append(te(ids).pooler_output.float().cpu())
    return torch.cat(out) if out else torch.zeros(0, te.config.hidden_size)


def text_dim(pipe: Any) -> int:
    """Width of the text encoder's pooled output."""
    return int(pipe.text_encoder.config.hidden_size)


def train_encoder(pipe: Any, factors: Sequence[Factors], captions: Sequence[Sequence[str]],
                  config: EncoderConfig = EncoderConfig(), settings: TrainSettings = TrainSettings(),
                  names: Sequence[str] | None = None,
                  concepts: Sequence[str] | None = None) -> tuple[WeightEncoder, dict[str, Any]]:
    """Fit a weight encoder to (adapter, caption) pairs; returns it (eval mode) and a report.

    ``concepts`` (one key per adapter, e.g. its concept prompt) lets ``settings.mask_replicas`` keep
    adapters of one concept out of each other's negatives.
    """
    if len(factors) < 2:
        raise StudioError(f"AutoLoRA: {len(factors)} training adapter(s); contrastive training needs at least 2")
    groups = None
    if settings.mask_replicas and concepts is not None:
        keys = sorted(set(concepts))
        groups = torch.tensor([keys.index(c) for c in concepts])
    torch.manual_seed(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    enc = WeightEncoder(slots_of(pipe), text_dim(pipe), config)
    batch = stack(enc.slots, factors, name=names)
    flat = sorted({c for cs in captions for c in cs})
    text = encode_texts(pipe, flat)
    if config.center_text:
        with torch.no_grad():
            enc.text_center.copy_(text.mean(0))
    text = enc.center(text)
    pick = [torch.tensor([flat.index(c) for c in cs]) for cs in captions]
    opt = torch.optim.AdamW([p for p in enc.parameters() if p.requires_grad], lr=settings.lr,
                            weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, settings.steps)
    enc.train()
    t0 = time.time()
    losses = []
    for _ in range(settings.steps):
        idx = torch.stack([p[torch.randint(len(p), (1,), generator=gen)][0] for p in pick])
        loss = info_nce(enc(batch, generator=gen), text[idx], enc.logit_scale, groups)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():  # CLIP's clamp: a temperature below 1/100 makes the loss unstable
            enc.logit_scale.clamp_(0.0, 4.6052)
        losses.append(loss.item())
    enc.eval()
    report = {"steps": settings.steps, "seconds": round(time.time() - t0, 1), "final_loss": round(losses[-1], 4),
              "logit_scale": round(float(enc.logit_scale.exp()), 3), "adapters": len(factors)}
    log.info("AutoLoRA encoder: %d adapters, %d steps in %.1f s, loss %.3f, inverse temperature %.2f",
             len(factors), settings.steps, report["seconds"], losses[-1], report["logit_scale"])
    return enc, report


def fit_encoder(pipe: Any, factors: Sequence[Factors], captions: Sequence[Sequence[str]],
                config: EncoderConfig = EncoderConfig(), settings: TrainSettings = TrainSettings(),
                names: Sequence[str] | None = None, concepts: Sequence[str] | None = None,
                ) -> tuple[WeightEncoder | EncoderEnsemble, dict[str, Any]]:
    """:func:`train_encoder` ``settings.members`` times (seeds ``seed``, ``seed + 1``, ...); an ensemble of them
    when more than one, with one report (seconds summed, each member's loss and temperature listed)."""
    if settings.members == 1:
        return train_encoder(pipe, factors, captions, config, settings, names, concepts)
    members, reports = [], []
    for i in range(settings.members):
        enc, rep = train_encoder(pipe, factors, captions, config, dataclasses.replace(settings, seed=settings.seed + i),
                                 names, concepts)
        members.append(enc)
        reports.append(rep)
    report = {"steps": settings.steps, "members": len(members), "seeds": [settings.seed + i for i in range(len(members))],
              "seconds": round(sum(r["seconds"] for r in reports), 1),
              "final_loss": round(sum(r["final_loss"] for r in reports) / len(reports), 4),
              "member_final_loss": [r["final_loss"] for r in reports],
              "logit_scale": [r["logit_scale"] for r in reports], "adapters": len(factors)}
    return EncoderEnsemble(members), report


def metadata_text(name: str, trigger: str = "", description: str = "") -> str:
    """What a metadata-based tool embeds for an adapter: its name (words split), trigger and description."""
    words = name.replace("-", " ").replace("_", " ")
    return " ".join(w for w in (words, trigger, description) if w)


def _recalls(scores: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    return {"recall@1": round(recall_at(scores, truth, 1), 4), "recall@3": round(recall_at(scores, truth, 3), 4)}


def retrieval_suite(zoo: str | os.PathLike | None = None, *, encoder: str | os.PathLike | None = None,
                    config: EncoderConfig = EncoderConfig(), settings: TrainSettings = TrainSettings(),
                    pipe: Any = None) -> dict[str, Any]:
    """``studio eval retrieval``: recall@1/3 of the held-out zoo adapters for prompts of their concepts.

    The encoder (``settings.members`` of them) trains on the zoo's training adapters (seeded, minutes)
    unless ``encoder`` names a saved one. Queries are the held-out adapters' concept prompts; the gallery is the held-out
    adapters (``recall@k``) and, harder, the whole zoo (``full_zoo``). Printed beside: the
    metadata baseline with real and with random names.
    """
    from studio.autolora.encoder import load_encoder
    from studio.autolora.zoo import gallery_index, load_zoo

    zoo_dir = Path(zoo) if zoo else DEFAULT_ZOO
    index = load_zoo(zoo_dir)
    entries = index["adapters"]
    if pipe is None:
        from studio.loading import load_pipeline

        pipe = load_pipeline(index.get("base", "micro"))
    factors = [adapter_factors(pipe, e["file"], config.lowrank) for e in entries]
    train = [i for i, e in enumerate(entries) if not e["heldout"]]
    test = [i for i, e in enumerate(entries) if e["heldout"]]
    if not test:
        raise StudioError(f"{zoo_dir}: the zoo has no held-out adapters; build one with --n 5 or more")
    t0 = time.time()
    if encoder is not None:
        enc, _ = load_encoder(encoder)
        report = {"loaded": str(encoder)}
    else:
        enc, report = fit_encoder(pipe, [factors[i] for i in train],
                                  [e["captions"] + [e["prompt"]] for e in (entries[i] for i in train)],
                                  config, settings, names=[entries[i]["name"] for i in train],
                                  concepts=[entries[i]["prompt"] for i in train])
    vec = enc.encode(factors, [e["name"] for e in entries])
    raw_queries = encode_texts(pipe, [entries[i]["prompt"] for i in test])
    queries = enc.center(raw_queries)
    truth_test = torch.arange(len(test))
    full = gallery_index(entries)
    truth_full = torch.tensor([full.index(i) for i in test])
    result: dict[str, Any] = {"suite": "retrieval", "n": len(test), "gallery": "held-out adapters"}
    s_test = cosine_scores(queries, vec[test])
    result.update(_recalls(s_test, truth_test))
    # each held-out adapter's rank among the held-out ones (0 = first): where the misses are
    true = s_test.gather(1, truth_test[:, None])
    result["rank_by_adapter"] = {entries[i]["name"]: int((s_test[q] > true[q]).sum()) for q, i in enumerate(test)}
    s_full = cosine_scores(queries, vec[full])
    result["full_zoo"] = {**_recalls(s_full, truth_full), "gallery": len(full)}
    for label, key in (("metadata_real_names", "name"), ("metadata_random_names", "random_name")):
        meta = encode_texts(pipe, [metadata_text(e[key], e.get("trigger", "")) for e in entries])
        result[label] = {**_recalls(cosine_scores(raw_queries, meta[test]), truth_test),
                         "full_zoo": _recalls(cosine_scores(raw_queries, meta[full]), truth_full)}
    # longer queries: three renderer captions of each held-out adapter (backgrounds and all)
    cap_q = [(t, c) for t, i in enumerate(test) for c in entries[i]["captions"][:3]]
    if cap_q:
        s_cap = cosine_scores(enc.center(encode_texts(pipe, [c for _, c in cap_q])), vec[test])
        result["captions"] = {**_recalls(s_cap, torch.tensor([t for t, _ in cap_q])), "queries": len(cap_q)}
    pos = s_full.gather(1, truth_full[:, None]).squeeze(1)
    result["true_match_cosine_mean"] = round(float(pos.mean()), 4)
    result["train_adapters"] = len(train)
    result["encoder"] = report
    result["seconds"] = round(time.time() - t0, 1)
    return result


# ----------------------------------------------------------------------------- retrieving for a prompt


@dataclasses.dataclass(frozen=True)
class Hit:
    """One retrieved adapter."""

    name: str
    score: float
    path: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "score": round(self.score, 4), "path": self.path}


def rank(pipe: Any, prompt: str, names: Sequence[str], vectors: torch.Tensor, paths: Sequence[str],
         k: int, enc: WeightEncoder | None = None) -> list[Hit]:
    """The top-``k`` adapters for ``prompt`` by cosine between its pooled text vector and their vectors."""
    if not prompt.strip():
        raise StudioError("--prompt is empty; describe what the adapters should draw")
    if k < 1:
        raise StudioError(f"-k {k}: must be at least 1")
    q = encode_texts(pipe, [prompt])
    if enc is not None:
        q = enc.center(q)
    scores = cosine_scores(q, vectors)[0]
    order = sorted(range(len(names)), key=lambda i: (-float(scores[i]), names[i]))  # ties: by name, deterministic
    return [Hit(names[i], float(scores[i]), paths[i]) for i in order[:k]]


def train_on_zoo(zoo: str | os.PathLike, config: EncoderConfig = EncoderConfig(),
                 settings: TrainSettings = TrainSettings()) -> tuple[WeightEncoder, dict[str, Any], Any]:
    """Train the encoder on a zoo's training adapters (the held-out ones stay unseen): (encoder, report, pipe)."""
    from studio.autolora.zoo import load_zoo
    from studio.loading import load_pipeline

    index = load_zoo(zoo)
    pipe = load_pipeline(index.get("base", "micro"))
    train = [e for e in index["adapters"] if not e["heldout"]]
    factors = [adapter_factors(pipe, e["file"], config.lowrank) for e in train]
    enc, report = fit_encoder(pipe, factors, [e["captions"] + [e["prompt"]] for e in train], config, settings,
                              names=[e["name"] for e in train], concepts=[e["prompt"] for e in train])
    report.update(base=index.get("base", "micro"), zoo=str(zoo), heldout=[e["name"] for e in index["adapters"]
                                                                          if e["heldout"]])
    # what "matches" means for this encoder: half the mean cosine of a training adapter with its own concept
    # prompt (the scores are cosines in the text space; their scale depends on the training)
    pos = cosine_scores(enc.center(encode_texts(pipe, [e["prompt"] for e in train])), enc.encode(factors)).diagonal()
    report["match_threshold"] = round(0.5 * float(pos.mean()), 4)
    report["vocabulary"] = vocabulary([c for e in train for c in e["captions"] + [e["prompt"]]])
    return enc, report, pipe


def open_encoder(path: str | os.PathLike | None = None) -> tuple[WeightEncoder, Any, dict[str, Any]]:
    """The encoder (default: the bundled one), its base pipeline, and its header; refuses a base mismatch."""
    from studio.autolora.encoder import load_encoder
    from studio.generation import model_hash
    from studio.loading import load_pipeline

    enc, header = load_encoder(path or DEFAULT_ENCODER)
    base = header["extra"].get("base", "micro")
    pipe = load_pipeline(base)
    if header["base_hash"] and header["base_hash"] != model_hash(pipe):
        raise StudioError(f"{path or DEFAULT_ENCODER}: the encoder was trained for another base model (hash "
                          f"{header['base_hash']}, {base} is {model_hash(pipe)}); retrain it with "
                          f"`studio autolora train`")
    return enc, pipe, header


def _adapter_vector(enc: WeightEncoder, pipe: Any, file: str | os.PathLike, name: str) -> torch.Tensor:
    from studio.adapters.core import read_metadata
    from studio.generation import model_hash

    meta = read_metadata(file)
    have = meta.get("studio.base_hash")
    if have and have != model_hash(pipe):
        raise StudioError(f"adapter {name}: trained on another base model (hash {have}); the encoder reads "
                          f"adapters of its own base")
    return enc.encode([adapter_factors(pipe, file, enc.config.lowrank)], [name])[0]


def embed_library(*, encoder: str | os.PathLike | None = None, force: bool = False, names: Sequence[str] | None = None,
                  opened: tuple | None = None) -> tuple[int, list[tuple[str, str]]]:
    """Store the retrieval vector of library adapters that lack one (all with ``force``).

    Adapters of another base family, or whose layers the encoder does not know, are skipped with
    the reason (returned and logged). Returns (number embedded, [(name, reason)]).
    """
    from studio.adapters.core import adapter_file
    from studio.library import Library

    lib = Library()
    records = [r for r in lib.list() if names is None or r.name in names]
    if not records:
        return 0, []
    enc, pipe, header = opened or open_encoder(encoder)
    source = header.get("id", "")
    # missing, or made by another encoder (an older bundled one, another file): vectors of two encoders
    # live in different spaces and would rank at random against each other
    stored = {r.name: lib.embedding_with_source(r.name) for r in records}
    todo = [r for r in records if force or stored[r.name][0] is None or stored[r.name][1] != source]
    if not todo:
        return 0, []
    family = getattr(getattr(pipe, "studio_source", None), "family", None)
    done, skipped = 0, []
    for r in todo:
        if r.family and family and r.family != family:
            skipped.append((r.name, f"made for {r.family}, the encoder's base is {family}"))
            continue
        try:
            vec = _adapter_vector(enc, pipe, adapter_file(lib.adapters_dir / r.name), r.name)
        except StudioError as exc:
            skipped.append((r.name, str(exc)))
            continue
        lib.set_embedding(r.name, vec.numpy(), source=source)
        done += 1
    for name, why in skipped:
        log.warning("AutoLoRA: %s has no retrieval vector: %s", name, why)
    return done, skipped


def retrieve(prompt: str, k: int = 3, *, library: bool = False, zoo: str | os.PathLike | None = None,
             encoder: str | os.PathLike | None = None) -> tuple[list[Hit], str, Any]:
    """Top-``k`` adapters for ``prompt``: (hits, where they came from, the base pipeline).

    From the library (vectors computed for adapters that lack one), or from ``zoo``; an empty
    library falls back to the bundled zoo with a note unless ``library`` insists.
    """
    import numpy as np

    from studio.library import Library

    if not prompt.strip():
        raise StudioError("--prompt is empty; describe what the adapters should draw")
    if k < 1:
        raise StudioError(f"-k {k}: must be at least 1")
    opened = open_encoder(encoder)
    enc, pipe, header = opened
    pipe.studio_match_threshold = match_threshold(header)  # the caller reports matches with it
    pipe.studio_match_note = unknown_prompt_note(prompt, header)  # set: nothing matches, whatever the scores
    if zoo is None:
        lib = Library()
        if lib.names():
            embed_library(opened=opened)
            names, vecs, paths = [], [], []
            for r in lib.list():
                v, made_by = lib.embedding_with_source(r.name)
                if v is not None and v.shape == (enc.text_dim,) and made_by == header.get("id", ""):
                    names.append(r.name)
                    vecs.append(torch.from_numpy(np.asarray(v, dtype=np.float32)))
                    paths.append(str(lib.adapters_dir / r.name))
            if names:
                return rank(pipe, prompt, names, torch.stack(vecs), paths, k, enc), f"library {lib.home}", pipe
            why = f"the library at {lib.home} has no adapter the AutoLoRA encoder can read (see the notes above)"
        else:
            why = f"the library at {lib.home} is empty"
        if library:
            raise StudioError(f"{why}; add adapters of the encoder's base model (`studio library add`, `studio train`) "
                              f"or search a zoo with --zoo DIR")
        log.warning("%s: searching the bundled adapter zoo %s (--library to insist)", why, DEFAULT_ZOO)
        zoo = DEFAULT_ZOO
    from studio.autolora.zoo import gallery, load_zoo

    index = load_zoo(zoo)
    entries = gallery(index["adapters"])
    if not entries:
        raise StudioError(f"{zoo}: the zoo has no adapters")
    vecs = enc.encode([adapter_factors(pipe, e["file"], enc.config.lowrank) for e in entries],
                      [e["name"] for e in entries])
    return (rank(pipe, prompt, [e["name"] for e in entries], vecs, [e["file"] for e in entries], k, enc),
            f"zoo {zoo}", pipe)


def embed_on_add(names: Sequence[str]) -> None:
    """Give newly added library adapters their retrieval vector, when the bundled encoder reads them.

    Cheap for adapters of other bases: only adapters whose header names the encoder's base model
    (its hash) load the encoder; others get theirs at the first search (or are skipped there with a
    note). Never fails the add: a problem is a warning.
    """
    from safetensors import safe_open

    from studio.adapters.core import adapter_file, read_metadata
    from studio.library import Library

    if not DEFAULT_ENCODER.is_file():
        return
    try:
        with safe_open(str(DEFAULT_ENCODER), framework="pt") as fh:
            base_hash = (fh.metadata() or {}).get("studio.base_hash", "")
        lib = Library()
        ours = [n for n in names if read_metadata(adapter_file(lib.adapters_dir / n)).get("studio.base_hash")
                == base_hash and base_hash]
        if ours:
            done, skipped = embed_library(names=ours, force=True)
            log.info("AutoLoRA: %d retrieval vector(s) stored", done)
    except (StudioError, OSError) as exc:
        log.warning("AutoLoRA: no retrieval vector stored on add (%s); `studio autolora embed` retries", exc)


def is_match(pipe: Any, hit: Hit) -> bool:
    """Whether a hit of :func:`retrieve` is a match: above the encoder's threshold, for a prompt it can read."""
    return not getattr(pipe, "studio_match_note", None) and hit.score >= pipe.studio_match_threshold


def auto_adapters(prompt: str, k: int) -> list[str]:
    """``studio generate --auto K``: adapter specs retrieved for the prompt (only those that match)."""
    hits, source, pipe = retrieve(prompt, k)
    keep = [h for h in hits if is_match(pipe, h)]
    if pipe.studio_match_note:
        log.warning("--auto: %s", pipe.studio_match_note)
    for h in hits:
        log.warning("--auto: %s %s (score %.3f, %s)", "using" if h in keep else "not using (no match)", h.name,
                    h.score, source)
    if not keep:
        log.warning("--auto: no adapter matches %r well; generating without adapters", prompt)
    return [h.name if source.startswith("library") else h.path for h in keep]
