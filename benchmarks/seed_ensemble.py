"""A config trained with several seeds per group, each group's runs scored as one `uninet-feat ensemble`.

    python -m benchmarks.seed_ensemble --config configs/aitex.yaml --data ../shared/data \
        --split-csv ../shared/data/splits/aitex.csv --groups fabric_00 fabric_01 fabric_03 fabric_04 \
        --seeds 3 4 5 --out runs/aitex_seeds

This is the AITEX recipe (docs/results.md, session 19): on test sets of 6 normal and 7-31 defective strips the
seed alone moves a fabric's strip AUROC by up to 0.43, and averaging seeds removes that variance. Each run is
``OUT/<group>_s<seed>`` (`train --config CONFIG --group G --seed S`); a finished run (model.pt and
calibration.json) is kept, a killed one is resumed, so the command can be re-run until it completes. Then per
group `ensemble.evaluate_ensemble` (``OUT/<group>_ensemble.json`` / ``.csv``), and ``OUT/summary.json``: each
group's ensemble image AUROC, each run's own, and their means over groups. About 14 min per AITEX run on 2
CPU cores (12 runs for four fabrics and three seeds).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import uninet_feat  # noqa: F401
from uninet_feat.cli import main as cli
from uninet_feat.ensemble import evaluate_ensemble
from uninet_feat.io import atomic_write_text


def train_seeds(config, group, seeds, out: Path, overrides=()) -> list[Path]:
    """The run folders of ``group`` for ``seeds``, each trained, or resumed with the same flags: `train --resume`
    finishes a killed run, leaves a finished one as it is, trains one further for a longer ``--epochs`` and refuses
    one whose other settings differ. A finished run was reused whatever ``overrides`` said now (`--train-args
    --image-size 32` scored the 64-px runs without a word; an audit, session 53); one that lost its checkpoint.pt
    cannot be checked so, and is kept as it is."""
    runs = []
    for seed in seeds:
        run = out / f"{group}_s{seed}"
        finished = (run / "model.pt").exists() and (run / "calibration.json").exists()
        if not finished or (run / "checkpoint.pt").exists():
            args = ["train", "--config", str(config), "--group", group, "--seed", str(seed), "--out", str(run),
                    "--quiet", *overrides] + (["--resume"] if (run / "checkpoint.pt").exists() else [])
            if cli(args) != 0:
                raise SystemExit(f"training {run} failed (its message is above); re-run to resume it, or give "
                                 "another --out for other settings")
        runs.append(run)
    return runs


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--groups", nargs="+", required=True)
    ap.add_argument("--seeds", nargs="+", type=int, default=[3, 4, 5])
    ap.add_argument("--data")
    ap.add_argument("--split-csv", dest="split_csv")
    ap.add_argument("--out", required=True)
    ap.add_argument("--train-args", nargs=argparse.REMAINDER, default=[],
                    help="further `train` flags for every run (last on the line), e.g. --epochs 2")
    a = ap.parse_args(argv)
    if len(a.seeds) < 2:
        ap.error("an ensemble needs at least two --seeds")
    if len(set(a.seeds)) != len(a.seeds):   # one run twice: refused by the ensemble after every training
        ap.error(f"--seeds {' '.join(map(str, a.seeds))} names a seed twice")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    where = [*(["--data", a.data] if a.data else []), *(["--split-csv", a.split_csv] if a.split_csv else [])]
    summary = {"config": str(a.config), "seeds": a.seeds, "train_args": a.train_args, "groups": {}}
    from uninet_feat.errors import BadInputError
    for g in a.groups:
        runs = train_seeds(a.config, g, a.seeds, out, where + a.train_args)
        try:
            rep = evaluate_ensemble(runs, a.data, a.split_csv, json_path=out / f"{g}_ensemble.json",
                                    csv_path=out / f"{g}_ensemble.csv", quiet=True)
        except BadInputError as e:   # said as the CLI says it, not as a traceback
            raise SystemExit(f"error: {e}") from e
        summary["groups"][g] = {"ensemble": rep["image_auroc"],
                                "runs": [rep["per_run_image_auroc"][str(r)] for r in runs],
                                "at_threshold": rep["at_threshold"]}
        print(f"{g}: ensemble {rep['image_auroc']:.3f}; runs " +
              " / ".join(f"{v:.3f}" for v in summary["groups"][g]["runs"]), flush=True)
    per = summary["groups"].values()
    summary["mean_ensemble"] = float(np.mean([v["ensemble"] for v in per]))
    summary["mean_per_seed"] = [float(np.mean([v["runs"][k] for v in per])) for k in range(len(a.seeds))]
    print(f"mean over {len(a.groups)} groups: ensemble {summary['mean_ensemble']:.3f}; each seed alone " +
          " / ".join(f"{v:.3f}" for v in summary["mean_per_seed"]))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
