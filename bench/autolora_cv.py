"""AutoLoRA encoder settings compared by 4-fold cross-validation over the zoo's TRAINING adapters.

    OMP_NUM_THREADS=1 python bench/autolora_cv.py NAME '{"tokens": "both"}' [steps] [seeds]

The held-out adapters are never looked at, so a setting can be chosen here without touching the
held-out recall that `studio eval retrieval` reports. Prints mean recall@1/3 over the folds (8
adapters each, the other 24 train).
"""
from __future__ import annotations

import json
import sys

import torch


def main() -> None:
    from studio.autolora.encoder import EncoderConfig, adapter_factors
    from studio.autolora.functional import cosine_scores, recall_at
    from studio.autolora.retrieval import DEFAULT_ZOO, TrainSettings, encode_texts, train_encoder
    from studio.autolora.zoo import gallery, load_zoo
    from studio.loading import load_pipeline

    torch.set_num_threads(1)
    name, cfg = sys.argv[1], EncoderConfig(**json.loads(sys.argv[2]))
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else TrainSettings.steps
    seeds = [int(s) for s in (sys.argv[4] if len(sys.argv) > 4 else "0").split(",")]
    entries = [e for e in gallery(load_zoo(DEFAULT_ZOO)["adapters"]) if not e["heldout"]]
    pipe = load_pipeline("micro")
    factors = [adapter_factors(pipe, e["file"], cfg.lowrank) for e in entries]
    queries = encode_texts(pipe, [e["prompt"] for e in entries])
    folds = []
    for seed in seeds:
        for fold in range(4):
            test = [i for i in range(len(entries)) if i % 4 == fold]
            train = [i for i in range(len(entries)) if i % 4 != fold]
            enc, _ = train_encoder(pipe, [factors[i] for i in train],
                                   [entries[i]["captions"] + [entries[i]["prompt"]] for i in train], cfg,
                                   TrainSettings(steps=steps, seed=seed), names=[entries[i]["name"] for i in train])
            scores = cosine_scores(enc.center(queries[test]), enc.encode([factors[i] for i in test]))
            truth = torch.arange(len(test))
            folds.append((recall_at(scores, truth, 1), recall_at(scores, truth, 3)))
    print(json.dumps({"name": name, "cfg": json.loads(sys.argv[2]), "steps": steps, "seeds": seeds,
                      "cv_r1": round(sum(a for a, _ in folds) / len(folds), 3),
                      "cv_r3": round(sum(b for _, b in folds) / len(folds), 3), "folds": folds}), flush=True)


if __name__ == "__main__":
    main()
