"""A CLIP BPE tokenizer built offline from the micro world's vocabulary plus ordinary words.

CLIP's tokenizer is byte-level BPE with an end-of-word suffix ``</w>``. We train merges on a
small corpus with the ``tokenizers`` library so that every world word is one token, then write
the ``vocab.json`` + ``merges.txt`` pair that ``CLIPTokenizer.from_pretrained`` reads.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import CLIPTokenizer

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MAX_LENGTH = 77


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def build_vocab(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and ranked merges in which every word of ``words`` is a single token."""
    byte_chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for tok in byte_chars + [c + "</w>" for c in byte_chars]:
        vocab.setdefault(tok, len(vocab))
    merges: list[tuple[str, str]] = []
    # Merges are ranked: BPE always applies the lowest-ranked pair present. Building each word
    # as a left-to-right chain is only safe when no earlier chain steals a pair from it, so we
    # greedily re-tokenize each word with the merges so far and extend from what BPE produces.
    for word in sorted(set(words), key=lambda w: (len(w), w)):
        while True:
            toks = _apply(list(word[:-1]) + [word[-1] + "</w>"], merges)
            if len(toks) == 1:
                break
            a, b = toks[0], toks[1]
            merges.append((a, b))
            vocab.setdefault(a + b, len(vocab))
    vocab.setdefault(BOS, len(vocab))
    vocab.setdefault(EOS, len(vocab))
    return vocab, merges


def _apply(tokens: list[str], merges: list[tuple[str, str]]) -> list[str]:
    ranks = {m: i for i, m in enumerate(merges)}
    while len(tokens) > 1:
        pairs = [(ranks.get((tokens[i], tokens[i + 1]), 1 << 30), i) for i in range(len(tokens) - 1)]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        tokens = tokens[:i] + [tokens[i] + tokens[i + 1]] + tokens[i + 2 :]
    return tokens


def write_tokenizer(folder: str | Path, words: list[str]) -> CLIPTokenizer:
    """Write a CLIP tokenizer for ``words`` into ``folder`` and return it loaded back."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab([w.lower() for w in words])
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH,
                    "bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS,
                    "do_lower_case": True}, indent=2)
    )
    return load_tokenizer(folder)


def load_tokenizer(folder: str | Path) -> CLIPTokenizer:
    """Load a CLIP tokenizer from a local folder, never touching the network."""
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True, model_max_length=MAX_LENGTH)
