"""`studio eval compose`: a subject and a style mixed (or one adapter with both), judged together.

Contract tests run the CLI on the untrained smoke model and judge of tests/test_evals.py; the
metric logic runs on its stand-in model (renders what the prompt names) and oracle judge.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from studio.errors import StudioError
from studio.evals import compose, suites
from studio.micro.world import BACKGROUNDS, COLORS
from test_evals import (  # noqa: F401 - fixtures: the smoke model and judge, tiny LoRAs
    FAST, GEN, OracleJudge, RenderPipe, _fails, _in_unit, _json, _style_effect, _subject_effect, _write_lora, loras,
    smoke, smoke_judge, smoke_pipe,
)

KEYS = {"suite", "n", "both", "subject_fidelity", "style_fidelity", "prompt_fidelity", "leakage", "base_drift",
        "drift_by_attribute", "adapters", "decor", "triggers", "leakage_content", "shape_seen", "texture_seen",
        "by_prompt"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


def _with_meta(src: Path, out: Path, meta: dict[str, str]) -> Path:
    """A copy of the LoRA folder ``src`` whose header carries ``meta`` as well."""
    from safetensors import safe_open

    out.mkdir(parents=True, exist_ok=True)
    file = src / suites.LORA_FILE
    with safe_open(str(file), framework="pt") as f:
        old = dict(f.metadata() or {})
    save_file(load_file(str(file)), str(out / suites.LORA_FILE), metadata={**old, **meta})
    return out


@pytest.fixture(scope="module")
def pair(smoke, loras, tmp_path_factory):
    """A subject LoRA (random, trigger sks), a style LoRA (random, trigger zwx, captions), a combined one."""
    root = tmp_path_factory.mktemp("compose")
    rand = _write_lora(smoke.model, root / "rand", scale=0.5)
    captions = ["a green hexagon on a lavender background", "a brown square on a gray background",
                "a orange circle on a beige background"]
    return {
        "subject": _with_meta(rand, root / "subj", {"studio.kind": "subject", "studio.trigger": "sks",
                                                    "studio.class_word": "shape"}),
        "style": _with_meta(loras.zero, root / "style", {"studio.kind": "style", "studio.trigger": "zwx",
                                                         "studio.captions": json.dumps(captions)}),
        "combined": _with_meta(rand, root / "both", {"studio.kind": "content+style", "studio.subject_trigger": "ohwx",
                                                     "studio.style_trigger": "zwx",
                                                     "studio.style_train_shapes": "circle",
                                                     "studio.style_train_colors": "red"}),
        "plain": loras.zero,  # no studio metadata at all
    }


# ----------------------------------------------------------------------------- the CLI contract


def test_compose_json_keys_breakdown_and_determinism(smoke, pair, capsys):
    argv = ["eval", "compose", "--base", smoke.model, "--judge", smoke.judge, "--adapter", f"{pair['subject']}:0.8",
            "--adapter", str(pair["style"]), "--subject", "heart", "--texture", "checkered", "--n", "14",
            "--drift-n", "4", *GEN, "--json"]
    res = _json(capsys, *argv)
    assert set(res) == KEYS and res["suite"] == "compose" and res["n"] == 14
    assert all(_in_unit(res[k]) for k in ("both", "subject_fidelity", "style_fidelity", "prompt_fidelity", "leakage"))
    assert res["both"] <= min(res["subject_fidelity"], res["style_fidelity"])
    assert isinstance(res["base_drift"], float)
    assert res["triggers"] == {"subject": "sks shape", "style": "zwx"}
    assert res["adapters"] == [f"{pair['subject']}:0.8", f"{pair['style']}:1"]
    # the style set has no dominant content (each caption another shape and colour): all of it counts
    assert res["leakage_content"]["shapes"] == ["circle", "hexagon", "square"]
    assert res["leakage_content"]["colors"] == ["brown", "green", "orange"]
    per = res["by_prompt"]
    assert len(per) == 14 and all(p.endswith(" in zwx style") and "sks shape" in p for p in per)
    assert abs(sum(r["both"] * r["n"] for r in per.values()) / 14 - res["both"]) < 1e-3
    assert sum(res["shape_seen"].values()) == 14
    assert _json(capsys, *argv) == res  # the same numbers every run
    assert _table(smoke, pair).startswith("compose suite")  # without --json: a table


def _table(smoke, pair) -> str:
    import io
    from contextlib import redirect_stdout

    from studio.cli import main

    buf = io.StringIO()
    with redirect_stdout(buf):
        code = main(["eval", "compose", "--base", smoke.model, "--judge", smoke.judge, "--adapter",
                     str(pair["combined"]), "--subject", "heart", "--texture", "zigzag", "--n", "2", "--drift-n", "0",
                     *GEN])
    assert code == 0
    return buf.getvalue()


def test_one_combined_adapter_and_explicit_tokens(smoke, pair, capsys):
    common = ["eval", "compose", "--base", smoke.model, "--judge", smoke.judge, "--subject", "star", "--texture",
              "zigzag", "--n", "3", "--drift-n", "0", *GEN, "--json"]
    res = _json(capsys, *common, "--adapter", str(pair["combined"]))
    assert res["triggers"] == {"subject": "ohwx shape", "style": "zwx"}
    assert res["leakage_content"] == {"shapes": ["circle"], "colors": ["red"],
                                      "source": "pytorch_lora_weights.safetensors metadata "
                                                "studio.style_train_shapes/colors"}
    assert res["base_drift"] is None and res["drift_by_attribute"] == {}
    # an adapter whose header says nothing: the tokens must be given
    err = _fails(capsys, *common, "--adapter", str(pair["plain"]))
    assert "--subject-token WORD and --style-token WORD" in err
    res = _json(capsys, *common, "--adapter", str(pair["plain"]), "--subject-token", "qq", "--style-token", "vv",
                "--class-word", "toy")
    assert res["triggers"] == {"subject": "qq toy", "style": "vv"} and res["leakage"] is None
    assert all(p.startswith("a qq toy on a ") or p.endswith(" qq toy in vv style") for p in res["by_prompt"])


def test_bad_input_is_one_clear_error(smoke, pair, tmp_path, capsys):
    common = ["eval", "compose", "--base", smoke.model, "--judge", smoke.judge, *GEN]
    ok = ["--adapter", str(pair["subject"]), "--adapter", str(pair["style"])]
    err = _fails(capsys, *common, *ok, "--subject", "blob", "--texture", "checkered")
    assert "--subject blob" in err and "heart" in err
    err = _fails(capsys, *common, *ok, "--subject", "heart", "--texture", "plaid")
    assert "--texture plaid" in err and "checkered" in err
    err = _fails(capsys, *common, *ok, "--subject", "heart", "--texture", "checkered", "--color", "mauve")
    assert "mauve" in err
    err = _fails(capsys, *common, "--adapter", str(pair["subject"]), "--adapter", str(tmp_path / "nope"),
                 "--subject", "heart", "--texture", "checkered")
    assert "nope" in err and "no such file" in err
    err = _fails(capsys, *common, "--adapter", "no-such-name:0.5", "--subject", "heart", "--texture", "checkered")
    assert "no-such-name" in err and "library" in err
    err = _fails(capsys, *common, "--adapter", str(pair["subject"]), "--subject", "heart", "--texture", "checkered")
    assert "which trigger names the style" in err and "--style-token" in err  # a subject alone: no style role
    err = _fails(capsys, *common, *ok, "--subject", "heart", "--texture", "checkered", "--train-images",
                 str(tmp_path / "missing"))
    assert "missing" in err and "no such folder" in err
    err = _fails(capsys, *common, *ok, "--subject", "heart", "--texture", "checkered", "--n", "0")
    assert "--n 0" in err
    # a safetensors file that is no LoRA (the judge's weights), with explicit tokens: refused at load
    err = _fails(capsys, *common, "--adapter", str(Path(smoke.judge) / "judge.safetensors"), "--subject-token", "a",
                 "--style-token", "b", "--subject", "heart", "--texture", "checkered", "--n", "2", "--drift-n", "0")
    assert "judge.safetensors" in err
    with pytest.raises(SystemExit) as exc:  # --adapter is required
        from studio.cli import main

        main([*common, "--subject", "heart", "--texture", "checkered"])
    assert exc.value.code == 2


def test_weight_zero_mix_is_the_base_model(smoke_pipe, smoke_judge, pair):
    kw = dict(subject="heart", texture="checkered", n=6, drift_n=4, settings=FAST)
    zero = compose.compose_suite(smoke_pipe, smoke_judge, [f"{pair['subject']}:0", f"{pair['style']}:0"], **kw)
    assert zero["base_drift"] == 0.0
    ref = compose.drift_reference(smoke_pipe, 4, FAST)
    full = compose.compose_suite(smoke_pipe, smoke_judge, [str(pair["subject"]), str(pair["style"])],
                                 reference=ref, **kw)
    again = compose.compose_suite(smoke_pipe, smoke_judge, [str(pair["subject"]), str(pair["style"])], **kw)
    assert full == again  # a reference made once gives the suite's own numbers
    with pytest.raises(StudioError, match="drift_n=8"):
        compose.compose_suite(smoke_pipe, smoke_judge, [str(pair["subject"]), str(pair["style"])], reference=ref,
                              **dict(kw, drift_n=8))


def test_decor_on_the_composed_prompts(smoke, smoke_pipe, pair, capsys):
    """--decor projects the composed prompts (alpha 0: the plain run's numbers), never the drift set."""
    argv = ["eval", "compose", "--base", smoke.model, "--judge", smoke.judge, "--adapter", str(pair["subject"]),
            "--adapter", str(pair["style"]), "--subject", "heart", "--texture", "checkered", "--n", "6",
            "--drift-n", "4", *GEN, "--json"]
    plain = _json(capsys, *argv)
    assert plain["decor"] is None
    zero = _json(capsys, *argv, "--decor", "solid, red", "--decor-alpha", "0")
    assert zero["decor"] == {"unwanted": ["solid", "red"], "alpha": 0.0, "rows": "words"}
    assert {k: v for k, v in zero.items() if k != "decor"} == {k: v for k, v in plain.items() if k != "decor"}
    full = _json(capsys, *argv, "--decor", "solid, red", "--decor-alpha", "1", "--decor-rows", "all")
    assert full["base_drift"] == plain["base_drift"]  # the drift set is generated without DECOR
    # and the projection reaches the composed images (the untrained judge may read them the same)
    from studio.text.decor import DecorConfig
    from studio.text.pipeline import decor_applied

    items = compose.compose_items(compose.Roles("sks", "shape", "zwx"), "heart", "checkered", n=2)
    images = []
    for decor in (None, DecorConfig("solid, red", alpha=1.0, rows="all")):
        with compose.mix_applied(smoke_pipe, [str(pair["subject"]), str(pair["style"])]), \
                decor_applied(smoke_pipe, decor):
            images.append(suites.generate(smoke_pipe, items, FAST))
    assert not torch.equal(images[0], images[1])


# ----------------------------------------------------------------------------- prompts and metric logic


def test_prompts_are_fixed_and_carry_each_trigger():
    roles = compose.Roles("sks", "shape", "zwx")
    items = compose.compose_items(roles, "heart", "checkered", color="red")
    prompts = [it.prompt for it in items]
    assert len(items) == compose.PER_PROMPT * (len(BACKGROUNDS) + len(COLORS) - 1)
    assert "a sks shape on a teal background in zwx style" in prompts and "a blue sks shape in zwx style" in prompts
    assert "a red sks shape in zwx style" not in prompts  # the subject's own colour is no property change
    assert all("sks shape" in p and p.endswith("in zwx style") for p in prompts)
    assert all(it.asked["shape"] == "heart" and it.asked["texture"] == "checkered" for it in items)
    assert all(it.asked["color"] == "red" for it in items if "background" in it.asked)
    other_seed = compose.compose_items(roles, "heart", "checkered", color="red", seed=3)
    assert [it.prompt for it in other_seed] == prompts and {it.seed for it in other_seed}.isdisjoint(
        {it.seed for it in items})
    # the compose stream does not reuse the subject/style suites' noise
    assert {it.seed for it in items}.isdisjoint({it.seed for it in suites.subject_items("sks", "shape")})


def test_style_content_dominant_or_all_named():
    assert compose.style_content(["a red circle on a white background"] * 3 + ["a blue square"]) == (
        ["circle"], ["red"], "dominant")
    varied = ["a green hexagon on a lavender background", "a brown square", "a orange circle", "a pink triangle"]
    assert compose.style_content(varied) == (["circle", "hexagon", "square", "triangle"],
                                             ["brown", "green", "orange", "pink"], "all named")


@pytest.fixture
def render_mix(monkeypatch):
    """The stand-in model plays the whole mix as one adapter (its effect)."""
    real = compose.mix_applied

    @contextlib.contextmanager
    def fake(pipe, adapters, home=None):
        if not isinstance(pipe, RenderPipe):
            with real(pipe, adapters, home):
                yield pipe
            return
        pipe.load_lora_weights(",".join(map(str, adapters)))
        try:
            yield pipe
        finally:
            pipe.unload_lora_weights()

    monkeypatch.setattr(compose, "mix_applied", fake)


def _both(prompt, attrs, seed):
    attrs, seed = _subject_effect(prompt, attrs, seed)
    return _style_effect(prompt.replace("zwx style", "sks style"), attrs, seed)


def test_metrics_tell_composing_style_winning_and_leaking_mixes_apart(render_mix, pair):
    oracle = OracleJudge()
    kw = dict(subject="heart", texture="checkered", n=28, drift_n=12, settings=FAST)
    adapters = [str(pair["subject"]), str(pair["style"])]
    good = compose.compose_suite(RenderPipe(oracle, _both), oracle, adapters, **kw)
    assert (good["both"], good["subject_fidelity"], good["style_fidelity"], good["prompt_fidelity"]) == (1, 1, 1, 1)
    assert good["base_drift"] == 0.0 and good["leakage"] == 0.0
    # the style wins: textured, but the subject's shape is gone (a style-set circle instead)
    def style_wins(p, a, s):
        a, s = _both(p, a, s)
        return dict(a, shape="circle"), s

    lost = compose.compose_suite(RenderPipe(oracle, style_wins), oracle, adapters, **kw)
    assert lost["both"] == 0.0 and lost["subject_fidelity"] == 0.0 and lost["style_fidelity"] == 1.0
    assert lost["leakage"] > 0.5  # circle is one of the style set's shapes (its captions in the header)
    assert set(lost["shape_seen"]) == {"circle"}
    # only the subject: no texture
    subject_only = compose.compose_suite(RenderPipe(oracle, _subject_effect), oracle, adapters, **kw)
    assert subject_only["both"] == 0.0 and subject_only["subject_fidelity"] == 1.0
    assert subject_only["style_fidelity"] == 0.0
    # the subject on the asked background half the time: per-prompt rows say which
    def every_other(p, a, s):
        a, s = _both(p, a, s)
        return (dict(a, shape="square") if s % 2 else a), s

    half = compose.compose_suite(RenderPipe(oracle, every_other), oracle, adapters, **kw)
    expected = np.mean([it.seed % 2 == 0 for it in compose.compose_items(
        compose.Roles("sks", "shape", "zwx"), "heart", "checkered", n=28)])
    assert half["both"] == pytest.approx(expected)
    assert half["both"] == pytest.approx(np.mean([r["both"] for r in half["by_prompt"].values()]))


def test_compose_leakage_counts_only_what_is_asked():
    items = [suites.Item("p", 0, {"shape": "heart", "texture": "checkered"}),
             suites.Item("p", 1, {"shape": "heart", "texture": "checkered", "color": "red"}),
             suites.Item("p", 2, {"shape": "heart", "texture": "checkered", "color": "green"})]
    seen = {"shape": np.array(["circle", "heart", "heart"]), "color": np.array(["green", "green", "green"])}
    # shape events: 3 (1 leak); colour events: item 1 only (asked red, saw green: a leak); item 2 asks green
    assert compose.compose_leakage(seen, items, ["circle"], ["green"]) == pytest.approx(2 / 4)
    assert compose.compose_leakage(seen, items, [], []) is None
