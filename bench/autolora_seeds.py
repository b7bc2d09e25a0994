"""AutoLoRA retrieval across encoder training seeds, and seed ensembles, on the bundled zoo.

    OMP_NUM_THREADS=1 python bench/autolora_seeds.py [--seeds 0,1,2,3,4,5] [--steps N] [--zoo DIR]

For each seed: the encoder trains as `studio eval retrieval --seed S` does (same config and
settings) and prints recall@1/3 among the held-out adapters, recall@3 among the whole zoo and for
caption queries (a zoo with replicas: they train the encoder, the whole-zoo gallery lists one
adapter per concept). After each seed past the first, the ensemble of the seeds so far (the mean of
their L2-normalized adapter vectors) is scored the same way.
"""

from __future__ import annotations

import argparse
import json

import torch


def main() -> None:
    from studio.autolora.encoder import EncoderConfig, adapter_factors
    from studio.autolora.functional import cosine_scores, recall_at
    from studio.autolora.retrieval import DEFAULT_ZOO, TrainSettings, encode_texts, train_encoder
    from studio.autolora.zoo import gallery_index, load_zoo
    from studio.loading import load_pipeline

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2,3,4,5")
    ap.add_argument("--steps", type=int, default=TrainSettings.steps)
    ap.add_argument("--zoo", default=None, help="zoo folder (default: the bundled one)")
    ap.add_argument("--mask-replicas", type=int, choices=(0, 1), default=int(TrainSettings.mask_replicas),
                    help="1: a concept's replicas are not each other's InfoNCE negatives")
    args = ap.parse_args()
    entries = load_zoo(args.zoo or DEFAULT_ZOO)["adapters"]
    pipe = load_pipeline("micro")
    cfg = EncoderConfig()
    factors = [adapter_factors(pipe, e["file"], cfg.lowrank) for e in entries]
    train = [i for i, e in enumerate(entries) if not e["heldout"]]
    test = [i for i, e in enumerate(entries) if e["heldout"]]
    full = gallery_index(entries)
    queries = encode_texts(pipe, [entries[i]["prompt"] for i in test])
    cap = [(t, c) for t, i in enumerate(test) for c in entries[i]["captions"][:3]]
    cap_q, cap_t = encode_texts(pipe, [c for _, c in cap]), torch.tensor([t for t, _ in cap])
    truth = torch.arange(len(test))

    def scores(vecs: torch.Tensor, q: torch.Tensor) -> dict[str, float]:
        held = cosine_scores(q, vecs[test])
        return {"recall@1": recall_at(held, truth, 1), "recall@3": recall_at(held, truth, 3),
                "full_zoo_r@3": recall_at(cosine_scores(q, vecs[full]), torch.tensor([full.index(i) for i in test]), 3),
                "captions_r@3": round(recall_at(cosine_scores(cap_q, vecs[test]), cap_t, 3), 3)}

    members = []
    for seed in (int(s) for s in args.seeds.split(",")):
        enc, _ = train_encoder(pipe, [factors[i] for i in train],
                               [entries[i]["captions"] + [entries[i]["prompt"]] for i in train], cfg,
                               TrainSettings(steps=args.steps, seed=seed, mask_replicas=bool(args.mask_replicas)),
                               names=[entries[i]["name"] for i in train], concepts=[entries[i]["prompt"] for i in train])
        v = enc.encode(factors)
        members.append(v / v.norm(dim=1, keepdim=True))
        print(json.dumps({"seed": seed, **scores(v, enc.center(queries))}), flush=True)
        if len(members) > 1:  # the default config does not center texts, so the raw queries are the ones scored
            print(json.dumps({"ensemble_of": len(members), **scores(torch.stack(members).mean(0), queries)}),
                  flush=True)


if __name__ == "__main__":
    main()
