"""The AutoLoRA zoo's plan: replicas of training concepts, resuming from a published zoo, galleries."""

from __future__ import annotations

import tomllib
from pathlib import Path

import torch
from safetensors.torch import save_file

from studio.autolora import zoo


def _fake_batch(calls: list[list[dict]]):
    """Stands in for ``studio batch``: writes a tiny adapter file for each job (training is tested elsewhere)."""

    def run_batch(args) -> int:
        jobs = [tomllib.loads(Path(j).read_text()) for j in args.jobs]
        calls.append(jobs)
        for job in jobs:
            out = Path(job["out"])
            out.mkdir(parents=True, exist_ok=True)
            save_file({"w": torch.full((2,), float(job["seed"]))}, str(out / "pytorch_lora_weights.safetensors"))
        return 0

    return run_batch


def test_replicas_train_the_training_concepts_again_and_stay_out_of_galleries(tmp_path, monkeypatch):
    import studio.trainers.cli as batch_cli

    calls: list[list[dict]] = []
    monkeypatch.setattr(batch_cli, "run_batch", _fake_batch(calls))
    index = zoo.build_zoo(tmp_path / "z", 5, replicas=2)
    names = [e["name"] for e in index["adapters"]]
    held = [e["name"] for e in index["adapters"] if e["heldout"]]
    assert held == [zoo.CONCEPTS[4].name]  # replicas are never held out, and the held-out concept has none
    assert len(names) == len(set(names)) == 5 + 2 * 4
    assert f"{zoo.CONCEPTS[0].name}-r2" in names and f"{zoo.CONCEPTS[4].name}-r1" not in names
    assert [e["name"] for e in zoo.gallery(index["adapters"])] == [c.name for c in zoo.CONCEPTS[:5]]
    seeds = [j["seed"] for j in calls[0]]
    assert len(set(seeds)) == len(seeds)  # every adapter its own init
    # each replica learns from its own renders, with its captions in the index
    first, rep = (tmp_path / "z" / ".work" / "images" / n for n in (names[0], f"{names[0]}-r1"))
    assert sorted(p.name for p in first.glob("*.png")) and \
        [p.read_bytes() for p in sorted(first.glob("*.png"))] != [p.read_bytes() for p in sorted(rep.glob("*.png"))]
    assert all(e["captions"] for e in index["adapters"])

    # a published zoo grows in place: what it lists is kept, only the new adapters train
    again = zoo.build_zoo(tmp_path / "z", 5, replicas=3)
    assert [j["name"] for j in calls[1]] == [f"{c.name}-r3" for c in zoo.CONCEPTS[:4]]
    assert [e["name"] for e in again["adapters"]][: len(names)] == names
    assert zoo.load_zoo(tmp_path / "z")["adapters"][-1]["replica"] == 3
