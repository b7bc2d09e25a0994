"""Can AutoLoRA's scores tell an off-topic prompt from a true match? (bundled encoder and zoo)

    OMP_NUM_THREADS=1 python bench/autolora_nomatch.py

Prints, for the bundled encoder on the bundled zoo's 40 adapters: the cosine of each adapter with
its own concept prompt (training and held-out adapters apart), the best cosine of off-topic
prompts, the same as z-scores over the zoo, and each prompt's nearest training caption in the
base text encoder's pooled space. docs/autolora.md ("No invented match") quotes it.
"""

from __future__ import annotations

import torch

OFF_TOPIC = ["a photo of a dog in a garden", "a castle on a hill at sunset", "portrait of an old man", "a bowl of fruit",
             "a red car", "the quick brown fox", "a cat"]
ON_TOPIC_EXTRA = ["a checkered heart on a blue background", "a zigzag star", "a green square with dots",
                  "a striped circle"]


def _fmt(values: torch.Tensor, digits: int = 3) -> str:
    return ", ".join(f"{float(v):.{digits}f}" for v in values)


def main() -> None:
    from studio.autolora.encoder import adapter_factors
    from studio.autolora.functional import cosine_scores
    from studio.autolora.retrieval import DEFAULT_ZOO, encode_texts, match_threshold, open_encoder, unknown_prompt_note
    from studio.autolora.zoo import gallery, load_zoo

    enc, pipe, header = open_encoder()
    entries = gallery(load_zoo(DEFAULT_ZOO)["adapters"])
    vecs = enc.encode([adapter_factors(pipe, e["file"], enc.config.lowrank) for e in entries])
    held = torch.tensor([e["heldout"] for e in entries])
    s_on = cosine_scores(enc.center(encode_texts(pipe, [e["prompt"] for e in entries])), vecs)
    s_off = cosine_scores(enc.center(encode_texts(pipe, OFF_TOPIC)), vecs)

    def z(s: torch.Tensor) -> torch.Tensor:
        return (s - s.mean(1, keepdim=True)) / s.std(1, keepdim=True)

    pos, zpos = s_on.diagonal(), z(s_on).diagonal()
    print(f"match threshold in the encoder file: {match_threshold(header):.3f}")
    print(f"true match cosine: training adapters mean {pos[~held].mean():.3f} min {pos[~held].min():.3f}; "
          f"held-out mean {pos[held].mean():.3f} min {pos[held].min():.3f}")
    print(f"off-topic best cosine: {_fmt(s_off.max(1).values)}")
    print(f"true match z-score: training mean {zpos[~held].mean():.2f} min {zpos[~held].min():.2f}; "
          f"held-out mean {zpos[held].mean():.2f} min {zpos[held].min():.2f}")
    print(f"off-topic best z-score: {_fmt(z(s_off).max(1).values, 2)}")
    captions = sorted({c for e in entries if not e["heldout"] for c in e["captions"] + [e["prompt"]]})
    text = encode_texts(pipe, captions)
    on = [e["prompt"] for e in entries if e["heldout"]] + ON_TOPIC_EXTRA
    print(f"nearest training caption, on-topic prompts: {_fmt(cosine_scores(encode_texts(pipe, on), text).max(1).values)}")
    print(f"nearest training caption, off-topic prompts: "
          f"{_fmt(cosine_scores(encode_texts(pipe, OFF_TOPIC), text).max(1).values)}")
    for p in OFF_TOPIC:
        print(f"  {p!r}: {'no match (no word the encoder knows)' if unknown_prompt_note(p, header) else 'scored'}")


if __name__ == "__main__":
    main()
