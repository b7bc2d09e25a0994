"""The EfficientDM acceptance table on micro: every method at W8A8, W4A8 and W4A4 against full precision.

    python bench/quant_table.py --results DIR [--n 200] [--bits W8A8 W4A8 W4A4]
                                [--methods ptq-minmax ptq-mse qat efficientdm] [--extra efficientdm:1]

Each cell quantizes micro with `studio quantize`'s job (``run_job``, the method's defaults unless
--extra names a distillation budget), loads the exported folder onto the integer kernels and
runs `studio eval quant`'s suite against the FP model (``accuracy_drop``, ``judge_fid``). The FP
model's images are generated once and shared by every cell. Wall time is the whole job (load,
calibrate, distil, export); the process's CPU time is kept beside it because other jobs on a
shared machine stretch wall time far more than CPU time. Every cell is written to
``DIR/<cell>.json`` as it finishes, so the run resumes, and two processes with disjoint cells can
share a DIR; ``--table`` only prints the markdown table of the cells in DIR.

``--reseed 1,2,3,4 --work DIR2`` evaluates the models already exported under DIR2 (one folder per
cell, as ``--work`` keeps them) again at more noise seeds, each against the FP model at the same
seed, and prints per-seed drops and FIDs with their means (the cells in --results are seed 0):

    python bench/quant_table.py --results DIR --work DIR2 --reseed 1,2,3,4 --cells efficientdm-W4A8 ptq-minmax-W4A8
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench.quant_table")

ROWS = ("ptq-minmax", "ptq-mse", "qat", "efficientdm")
LABELS = {"fp": "FP (fp32)", "ptq-minmax": "PTQ min-max", "ptq-mse": "PTQ MSE", "qat": "QAT",
          "efficientdm": "EfficientDM"}
COLUMNS = ("W8A8", "W4A8", "W4A4")


def _bits(col: str) -> tuple[int, int]:
    w, a = col.upper().lstrip("W").split("A")
    return int(w), int(a)


def _cell_name(method: str, epochs: int | None, col: str) -> str:
    return f"{method}{'' if epochs is None else f'-e{epochs}'}-{col}"


def _write(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)  # atomic: a reader never sees half a cell


def _reference(results: Path, n: int, settings: Any, judge: Any) -> Any:
    """The FP model's side of the suite, computed once per results folder."""
    import numpy as np

    from studio.evals.suites import QuantReference, quant_reference
    from studio.loading import load_pipeline

    file = results / f"fp-reference-n{n}.npz"
    meta = results / "fp.json"
    if file.exists() and meta.exists():
        kept = json.loads(meta.read_text())
        if kept["n"] != n:
            raise SystemExit(f"{results} holds cells evaluated on {kept['n']} images, not --n {n}: use another folder")
        return QuantReference(n, settings, kept["accuracy"], np.load(file)["features"])
    t0 = time.perf_counter()
    ref = quant_reference(load_pipeline("micro", dtype="fp32"), judge, n=n, settings=settings)
    np.savez(file, features=ref.features)
    _write(meta, {"cell": "fp", "method": "fp", "accuracy": ref.accuracy, "accuracy_drop": 0.0, "judge_fid": 0.0,
                  "n": n, "eval_s": round(time.perf_counter() - t0, 1)})
    return ref


def run_cell(results: Path, method: str, epochs: int | None, col: str, ref: Any, judge: Any, n: int,
             settings: Any, work: Path) -> dict[str, Any]:
    """Quantize, export, load and evaluate one cell; the result is also written to DIR/<cell>.json."""
    from studio.evals.suites import quant_suite
    from studio.loading import load_pipeline
    from studio.quant import QuantConfig, run_job

    name = _cell_name(method, epochs, col)
    wbits, abits = _bits(col)
    cfg = QuantConfig(method=method, wbits=wbits, abits=abits, epochs=epochs)
    out = work / name
    t0, c0 = time.perf_counter(), time.process_time()
    report = run_job("micro", cfg, out)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    t1, c1 = time.perf_counter(), time.process_time()
    result = quant_suite(load_pipeline(str(out)), ref, judge, n=n, settings=settings)
    data = {"cell": name, "method": method, "epochs": cfg.resolved_epochs(), "bits": col, "n": n,
            "accuracy": result["accuracy"], "accuracy_drop": result["accuracy_drop"],
            "judge_fid": result["judge_fid"], "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            "load_avg_1min": round(os.getloadavg()[0], 2), "eval_s": round(time.perf_counter() - t1, 1),
            "eval_cpu_s": round(time.process_time() - c1, 1),
            "report": report}
    _write(results / f"{name}.json", data)
    log.warning("%s: drop %.3f fid %.3f wall %.0f s cpu %.0f s", name, data["accuracy_drop"], data["judge_fid"],
                wall, cpu)
    return data


def table(results: Path) -> str:
    """The markdown table of the cells in ``results`` (rows: FP, then each method and budget)."""
    cells = {}
    for f in sorted(results.glob("*.json")):
        d = json.loads(f.read_text())
        cells[d["cell"]] = d
    fp = cells.pop("fp", None)
    rows: dict[str, dict[str, dict[str, Any]]] = {LABELS[m]: {} for m in ROWS}  # every row, run or not
    for d in cells.values():
        default = d["cell"] == _cell_name(d["method"], None, d["bits"])
        label = LABELS[d["method"]] + ("" if default else f" ({d['epochs']} epoch{'s' if d['epochs'] != 1 else ''})")
        rows.setdefault(label, {})[d["bits"]] = d
    order = [LABELS[m] for m in ROWS]
    labels = sorted(rows, key=lambda k: (next((i for i, o in enumerate(order) if k.startswith(o)), 99), k))
    head = "| method | " + " | ".join(f"{c} drop / FID / wall s (cpu s)" for c in COLUMNS) + " |"
    lines = [head, "|---" * (len(COLUMNS) + 1) + "|"]
    if fp is not None:
        joint = fp["accuracy"]["joint"]
        lines.append(f"| {LABELS['fp']} (joint accuracy {joint:.3f}) | " +
                     " | ".join("0 / 0 / -" for _ in COLUMNS) + " |")
    for label in labels:
        cols = []
        for c in COLUMNS:
            d = rows[label].get(c)
            cols.append("not run" if d is None else
                        f"{d['accuracy_drop']:+.3f} / {d['judge_fid']:.2f} / {d['wall_s']:.0f} ({d['cpu_s']:.0f})")
        lines.append(f"| {label} | " + " | ".join(cols) + " |")
    n = fp["n"] if fp else "?"
    lines.append(f"\n(eval: {n} images per model; drop = FP joint accuracy - the model's)")
    return "\n".join(lines)


def reseed(results: Path, work: Path, cells: list[str], seeds: list[int], n: int, judge: Any) -> str:
    """Re-evaluate exported cells at more noise seeds; a markdown table of drop / FID per seed and the means."""
    from studio.evals.suites import GenSettings, quant_reference, quant_suite
    from studio.loading import load_pipeline

    out = results / "seeds"
    out.mkdir(exist_ok=True)
    for seed in seeds:
        settings = GenSettings(seed=seed)
        ref = None  # the FP side at this seed, only when a cell still needs it
        for cell in cells:
            f = out / f"{cell}-seed{seed}.json"
            if f.exists():
                continue
            if not (work / cell).is_dir():
                raise SystemExit(f"{work / cell}: no exported model; run the table with --work {work} first")
            ref = ref or quant_reference(load_pipeline("micro", dtype="fp32"), judge, n=n, settings=settings)
            r = quant_suite(load_pipeline(str(work / cell)), ref, judge, n=n, settings=settings)
            _write(f, {"cell": cell, "seed": seed, "n": n, "fp_joint": ref.accuracy["joint"],
                       "accuracy_drop": r["accuracy_drop"], "judge_fid": r["judge_fid"]})
    lines = ["| cell | " + " | ".join(f"seed {s}" for s in [0, *seeds]) + " | mean drop | mean FID |",
             "|---" * (len(seeds) + 4) + "|"]
    for cell in cells:
        got = [json.loads((results / f"{cell}.json").read_text())] if (results / f"{cell}.json").exists() else [None]
        got += [json.loads((out / f"{cell}-seed{s}.json").read_text()) for s in seeds]
        have = [d for d in got if d is not None]
        cols = ["-" if d is None else f"{d['accuracy_drop']:+.3f} / {d['judge_fid']:.2f}" for d in got]
        lines.append(f"| {cell} | " + " | ".join(cols) + f" | {sum(d['accuracy_drop'] for d in have) / len(have):+.4f}"
                     f" | {sum(d['judge_fid'] for d in have) / len(have):.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", required=True, metavar="DIR", help="folder of per-cell JSON results (resumable)")
    ap.add_argument("--n", type=int, default=200, help="eval images per model (default 200, the suite's)")
    ap.add_argument("--bits", nargs="+", default=list(COLUMNS), choices=COLUMNS)
    ap.add_argument("--methods", nargs="+", default=list(ROWS), choices=ROWS)
    ap.add_argument("--extra", nargs="*", default=[], metavar="METHOD:EPOCHS",
                    help="extra rows with another distillation budget, e.g. efficientdm:1")
    ap.add_argument("--work", default=None, metavar="DIR", help="where the exported models go (default: a temp dir)")
    ap.add_argument("--table", action="store_true", help="only print the table of the cells already in --results")
    ap.add_argument("--reseed", default="", metavar="SEEDS",
                    help="re-evaluate the models exported under --work at these noise seeds (e.g. 1,2,3,4)")
    ap.add_argument("--cells", nargs="*", default=[], help="with --reseed: the cells, e.g. efficientdm-W4A8")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    if args.table:
        sys.stdout.write(table(results) + "\n")
        return 0

    from studio.evals.suites import GenSettings
    from studio.machine import describe
    from studio.micro.judge import load_judge

    sys.stdout.write(describe() + "\n")
    judge, settings = load_judge(None), GenSettings()
    if args.reseed:
        if not args.work or not args.cells:
            raise SystemExit("--reseed needs --work (the exported models) and --cells")
        seeds = [int(x) for x in args.reseed.split(",") if x.strip()]
        sys.stdout.write(reseed(results, Path(args.work), args.cells, seeds, args.n, judge) + "\n")
        return 0
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="quant-table-"))
    torch.manual_seed(0)
    ref = _reference(results, args.n, settings, judge)
    cells = [(m, None, c) for c in args.bits for m in args.methods]
    for spec in args.extra:
        m, _, e = spec.partition(":")
        cells += [(m, int(e), c) for c in args.bits]
    for method, epochs, col in cells:
        name = _cell_name(method, epochs, col)
        if (results / f"{name}.json").exists():
            continue
        run_cell(results, method, epochs, col, ref, judge, args.n, settings, work)
    sys.stdout.write(table(results) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
