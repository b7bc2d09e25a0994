"""AutoLoRA in the Generate tab: the Auto search filling the mix, gated rows, the no-match guard."""

from __future__ import annotations

import pytest

from studio import service, ui
from studio.errors import StudioError


def _found(*hits, gates=True):
    return {"hits": [{"name": n, "score": s, "match": m, "target": t} for n, s, m, t in hits],
            "source": "library /h", "threshold": 0.2, "gates": gates}


def test_auto_rows_fill_free_rows_with_matches_only():
    slots = ["heart", 0.8, 0.0, 1.0, "", 1.0, 0.0, 1.0, "", 1.0, 0.0, 1.0, "", 1.0, 0.0, 1.0]
    found = _found(("zigzag", 0.61, True, "zigzag"), ("heart", 0.44, True, "heart"), ("dots", 0.1, False, "dots"))
    values, shown, note = ui.auto_rows(found, True, slots)
    assert values[:8] == ["heart", 0.8, 0.0, 1.0, "gated:zigzag", 1.0, 0.0, 1.0]  # the user's row is kept
    assert shown == [True, True, False, False]
    assert "| `zigzag` | 0.610 | added, gated |" in note and "already in the mix" in note
    assert "below the match threshold 0.200: not added" in note
    assert ui.mix_specs(values) == ["heart:0.8", "gated:zigzag:1"]
    # without a gate file, or with the toggle off, the same search adds plain rows
    values, _, note = ui.auto_rows(_found(("zigzag", 0.61, True, "zigzag"), gates=False), True, slots)
    assert values[4] == "zigzag" and "No gate file yet" in note
    values, _, note = ui.auto_rows(_found(("zigzag", 0.61, True, "zigzag")), False, slots)
    assert values[4] == "zigzag" and "added at weight 1" in note


def test_auto_rows_when_the_mix_is_full_or_nothing_is_found():
    full = sum(([f"a{i}", 1.0, 0.0, 1.0] for i in range(ui.MIX_SLOTS)), [])
    values, shown, note = ui.auto_rows(_found(("zigzag", 0.61, True, "zigzag")), True, full)
    assert values == full and all(shown) and f"not added: the mix holds {ui.MIX_SLOTS} adapters" in note
    _, shown, note = ui.auto_rows(_found(), True, ["", 1.0, 0.0, 1.0])
    assert shown == [False] and "No adapter found." in note


def test_gated_rows_in_mix_specs():
    assert ui.mix_specs(["gated:heart", 0.5, 0.0, 1.0]) == ["gated:heart:0.5"]
    with pytest.raises(StudioError, match="gated adapter"):
        ui.mix_specs(["gated:heart", 1.0, 0.5, 1.0])  # the gates decide when: no window


def test_find_adapters_searches_the_zoo_when_the_library_is_empty():
    found = service.find_adapters("a zigzag star", 3)
    assert found["source"].startswith("zoo") and len(found["hits"]) == 3
    assert all(h["target"].endswith(".safetensors") or h["target"] for h in found["hits"])
    scores = [h["score"] for h in found["hits"]]
    assert scores == sorted(scores, reverse=True)
    assert all(h["match"] == (h["score"] >= found["threshold"]) for h in found["hits"])
    with pytest.raises(StudioError, match="empty"):
        service.find_adapters("   ", 2)


def test_a_prompt_without_any_word_the_encoder_knows_matches_nothing():
    from studio.autolora.retrieval import content_words, unknown_prompt_note, vocabulary

    assert content_words("A photo of a Blue heart, on a white background") == {"blue", "heart", "white"}
    header = {"extra": {"vocabulary": vocabulary(["a red heart", "a zigzag star on a gray background"])}}
    assert header["extra"]["vocabulary"] == ["gray", "heart", "red", "star", "zigzag"]
    assert unknown_prompt_note("a red car", header) is None  # one known word: the scores decide
    assert unknown_prompt_note("a red car", {"extra": {}}) is None  # an older encoder file: no vocabulary
    note = unknown_prompt_note("a photo of a dog in a garden", header)
    assert note and "dog, garden" in note
    # the bundled encoder carries its vocabulary: an off-topic prompt is no match, an on-topic one can be
    off = service.find_adapters("a castle on a hill at sunset", 3)
    assert off["note"] and not any(h["match"] for h in off["hits"])
    on = service.find_adapters("a zigzag star", 3)
    assert on["note"] == "" and on["hits"][0]["match"] == (on["hits"][0]["score"] >= on["threshold"])
    values, shown, text = ui.auto_rows(off, True, ["", 1.0, 0.0, 1.0])
    assert shown == [False] and "None of the prompt's words (castle, hill, sunset)" in text
