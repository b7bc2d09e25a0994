"""`studio autolora zoo|train|retrieve|embed` and `studio eval retrieval`.

Retrieval searches the adapter library (every adapter of the encoder's base gets its vector,
stored in the library's ``embedding`` column, when added or at the first search); with an
empty library it searches the bundled zoo (``assets/autolora/zoo``) and says so; ``--library``
insists on the library. Scores are cosines between the prompt's pooled text vector and the
adapters' weight vectors; below the match threshold the answer says that nothing matches well.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    from studio.autolora.zoo import CONCEPTS
    from studio.cli import add_group

    asub = add_group(sub, "autolora", "action", "ACTION",
                     help="AutoLoRA: find adapters for a prompt from their weights (docs/autolora.md)",
                     description="AutoLoRA: a weight encoder maps each adapter into the text encoder's space, "
                                 "so adapters can be retrieved for a prompt even without names or descriptions.")
    z = asub.add_parser("zoo", help="train a zoo of small adapters of micro-world concepts (through studio batch)")
    z.add_argument("--n", type=int, default=30, help=f"number of adapters, 1-{len(CONCEPTS)} (default 30; every "
                                                     f"5th is held out of encoder training)")
    z.add_argument("--out", required=True, metavar="DIR", help="the zoo folder (re-running continues it)")
    z.add_argument("--steps", type=int, default=100, help="training steps per adapter (default 100)")
    z.add_argument("--rank", type=int, default=4, help="adapter rank (default 4)")
    z.add_argument("--replicas", type=int, default=0,
                   help="train each training concept this many more times (other renders and inits): more encoder "
                        "training data; retrieval still lists one adapter per concept (default 0)")
    z.add_argument("--full-precision", action="store_true", help="keep fp32 files (default: fp16, the zoo is small)")
    z.add_argument("--cluster", default=None, metavar="ADDRESS", help="run the jobs on a Ray cluster (studio batch "
                                                                     "--cluster)")
    z.set_defaults(func=run_zoo)

    t = asub.add_parser("train", help="train the weight encoder on a zoo's training adapters")
    t.add_argument("--zoo", default=None, metavar="DIR", help="zoo folder (default: the bundled assets/autolora/zoo)")
    t.add_argument("--out", default=None, metavar="FILE", help="encoder file (default: assets/autolora/encoder"
                                                               ".safetensors)")
    _train_args(t)
    t.set_defaults(func=run_train)

    r = asub.add_parser("retrieve", help="the adapters whose weights best match a prompt, with scores")
    r.add_argument("--prompt", required=True, help="what the adapters should draw")
    r.add_argument("-k", type=int, default=3, help="how many (default 3)")
    r.add_argument("--json", action="store_true", help="one JSON object on stdout")
    where = r.add_mutually_exclusive_group()
    where.add_argument("--library", action="store_true", help="search the library only (an empty one is an error)")
    where.add_argument("--zoo", default=None, metavar="DIR", help="search a zoo folder instead of the library")
    r.add_argument("--encoder", default=None, metavar="FILE", help="encoder file (default: the bundled one)")
    r.set_defaults(func=run_retrieve)

    g = asub.add_parser("gates", help="train the gated-fusion gates of a base model on pairs of zoo adapters")
    g.add_argument("--zoo", default=None, metavar="DIR", help="zoo folder (default: the bundled one); its held-out "
                                                               "adapters are left out")
    g.add_argument("--out", default=None, metavar="FILE", help="gate file (default: assets/autolora/gates"
                                                               ".safetensors)")
    from studio.autolora.gates import GateTrainSettings

    gd = GateTrainSettings()
    g.add_argument("--steps", type=int, default=gd.steps, help=f"training steps (default {gd.steps})")
    g.add_argument("--batch", type=int, default=gd.batch, help=f"images per step (default {gd.batch})")
    g.add_argument("--lr", type=float, default=gd.lr, help=f"Adam learning rate of the gates (default {gd.lr:g})")
    g.add_argument("--hinge-weight", type=float, default=gd.hinge_weight,
                   help=f"weight of the hinge term (default {gd.hinge_weight:g}; 0: denoising only)")
    g.add_argument("--margin", type=float, default=gd.margin, help=f"the hinge's margin (default {gd.margin:g})")
    g.add_argument("--eval-every", type=int, default=gd.eval_every,
                   help=f"validation loss every this many steps (default {gd.eval_every})")
    g.add_argument("--compose-share", type=float, default=gd.compose_share,
                   help="share of steps on a (subject, style) zoo pair rendered together under both prompts "
                        "(not the paper's; default 0)")
    g.add_argument("--timestep", action="store_true", help="gates also read the denoising fraction")
    g.add_argument("--half", action="store_true", help="write fp16 values (half the file; the loader reads both)")
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=run_gates)

    e = asub.add_parser("embed", help="(re)compute the retrieval vector of every library adapter")
    e.add_argument("--encoder", default=None, metavar="FILE", help="encoder file (default: the bundled one)")
    e.set_defaults(func=run_embed)


def _train_args(p: argparse.ArgumentParser) -> None:
    from studio.autolora.retrieval import TrainSettings

    d = TrainSettings()
    p.add_argument("--steps", type=int, default=d.steps, help=f"encoder training steps (default {d.steps})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"training seed (default {d.seed})")
    p.add_argument("--members", type=int, default=d.members,
                   help=f"encoders to train, from seeds SEED, SEED+1, ...; more than one makes an ensemble whose adapter "
                        f"vectors are the mean of the members' unit vectors (default {d.members})")
    p.add_argument("--fixed-temperature", action="store_true",
                   help="keep the InfoNCE temperature at the reference's fixed 1/0.07 instead of learning it")
    p.add_argument("--probes", type=int, default=None, help="probe vectors per layer (default 1, the paper's)")
    p.add_argument("--tokens", default=None, choices=["probe", "gram", "both"],
                   help="token kind: probe (the paper's x A^T B^T), gram (B A A^T B^T y), both (default: gram)")


def _config(args: argparse.Namespace):
    import dataclasses

    from studio.autolora.encoder import EncoderConfig
    from studio.autolora.retrieval import TrainSettings

    cfg = EncoderConfig()
    if args.fixed_temperature:
        cfg = dataclasses.replace(cfg, learn_temperature=False)
    if args.probes:
        cfg = dataclasses.replace(cfg, probes=args.probes)
    if args.tokens:
        cfg = dataclasses.replace(cfg, tokens=args.tokens)
    return cfg, TrainSettings(steps=args.steps, seed=args.seed, members=args.members)


def add_eval_parser(esub: argparse._SubParsersAction) -> None:
    """``studio eval retrieval`` (registered by :mod:`studio.evals.cli`)."""
    p = esub.add_parser("retrieval", help="AutoLoRA: recall@1/3 of held-out zoo adapters from their weights, beside "
                                          "the metadata baseline",
                        description="Trains the weight encoder(s) on the zoo's training adapters (seeded, about two "
                                    "minutes per member on two cores) and retrieves each held-out adapter for a prompt "
                                    "of its concept.")
    p.add_argument("--json", action="store_true", help="print one JSON object (the last line of stdout)")
    p.add_argument("--zoo", default=None, metavar="DIR", help="zoo folder (default: the bundled assets/autolora/zoo)")
    p.add_argument("--encoder", default=None, metavar="FILE",
                   help="evaluate a saved encoder instead of training one (it must not have seen the held-out ones)")
    _train_args(p)
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from studio.autolora.retrieval import retrieval_suite
    from studio.evals.cli import _emit

    cfg, settings = _config(args)
    return _emit(retrieval_suite(args.zoo, encoder=args.encoder, config=cfg, settings=settings), args.json)


def run_zoo(args: argparse.Namespace) -> int:
    from studio.autolora.zoo import ZooSettings, build_zoo, planned

    index = build_zoo(args.out, args.n, ZooSettings(steps=args.steps, rank=args.rank),
                      half=not args.full_precision, cluster=args.cluster, replicas=args.replicas)
    held = sum(e["heldout"] for e in index["adapters"])
    extra = sum(bool(e.get("replica")) for e in index["adapters"])
    print(f"{args.out}: {len(index['adapters'])} adapters ({held} held out of encoder training"
          + (f", {extra} replicas" if extra else "") + ")")
    return 0 if len(index["adapters"]) == len(planned(args.n, args.replicas)) else 1


def run_train(args: argparse.Namespace) -> int:
    from studio.autolora.encoder import save_encoder
    from studio.autolora.retrieval import DEFAULT_ENCODER, DEFAULT_ZOO, train_on_zoo

    cfg, settings = _config(args)
    enc, report, pipe = train_on_zoo(args.zoo or DEFAULT_ZOO, cfg, settings)
    from studio.generation import model_hash

    out = save_encoder(enc, args.out or DEFAULT_ENCODER, base_hash=model_hash(pipe), extra=report)
    print(f"{out}: encoder trained on {report['adapters']} adapters ({report['seconds']} s, loss "
          f"{report['final_loss']})")
    return 0


def run_retrieve(args: argparse.Namespace) -> int:
    from studio.autolora.retrieval import is_match, retrieve

    hits, source, pipe = retrieve(args.prompt, args.k, library=args.library, zoo=args.zoo, encoder=args.encoder)
    threshold = pipe.studio_match_threshold
    match = bool(hits) and is_match(pipe, hits[0])
    note = None if match else (pipe.studio_match_note or f"no adapter matches this prompt well (best score "
                                                         f"{hits[0].score:.3f} < {threshold:.3f})")
    if note:
        note += "; the list is the nearest, not a match"
    if args.json:
        sys.stdout.write(json.dumps({"prompt": args.prompt, "source": source, "k": args.k, "match": match,
                                     "threshold": round(threshold, 4), "note": note,
                                     "adapters": [h.to_dict() for h in hits]}) + "\n")
    else:
        print(f"top {len(hits)} for {args.prompt!r} from {source}:")
        for h in hits:
            print(f"  {h.score:7.3f}  {h.name}")
        if note:
            print(note)
    return 0


def run_embed(args: argparse.Namespace) -> int:
    from studio.autolora.retrieval import embed_library

    done, skipped = embed_library(encoder=args.encoder, force=True)
    print(f"{done} adapter(s) embedded, {len(skipped)} skipped")
    for name, why in skipped:
        print(f"  skipped {name}: {why}")
    return 0


def run_gates(args: argparse.Namespace) -> int:
    from studio.autolora.gates import DEFAULT_GATES, GateConfig, GateTrainSettings, save_gates, train_gates
    from studio.autolora.retrieval import DEFAULT_ZOO
    from studio.autolora.zoo import gallery, load_zoo
    from studio.generation import model_hash
    from studio.loading import load_pipeline

    index = load_zoo(args.zoo or DEFAULT_ZOO)
    pipe = load_pipeline(index.get("base", "micro"))
    entries = [e for e in gallery(index["adapters"]) if not e["heldout"]]
    settings = GateTrainSettings(steps=args.steps, batch=args.batch, lr=args.lr, hinge_weight=args.hinge_weight,
                                 margin=args.margin, eval_every=args.eval_every, seed=args.seed,
                                 compose_share=args.compose_share)
    gates, report = train_gates(pipe, entries, GateConfig(timestep=args.timestep), settings)
    out = save_gates(gates, args.out or DEFAULT_GATES, base_hash=model_hash(pipe), extra=report, half=args.half)
    print(f"{out}: gates trained in {report['seconds']} s (validation denoising loss {report['val_start']} -> "
          f"{report['val_end']}; plain sum {report['val_plain_sum']}, adapter 1 alone {report['val_adapter1_alone']})")
    return 0
