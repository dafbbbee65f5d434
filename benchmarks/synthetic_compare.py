"""Runs side by side on one synthetic validation set: the label-free check behind adopting an option.

    python -m benchmarks.synthetic_compare --runs RUN_A RUN_B [--seed 31] [--kinds texture_patch] [--json F]

Each run's pixel map is chosen again as `calibration.choose_pixel_map` chooses it (the run's own ``map_levels``
and ``map_norm``, those `calibrate` was told since training first), on the synthetic defects that ``--seed`` draws on the runs' validation normals; the row gives
that map, its pixel AUROC and the set's image AUROC (the run's image score). The runs must share their validation
normals, so that they are scored on the same images. A fresh ``--seed`` (not the runs' own) keeps the check apart
from the set each run's recorded choice was made on. No test image or label is read: this is how session 31
decided ``border_pad: 16`` for magnetic tile (docs/results.md), with a rule written down before the figures.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import uninet_feat  # noqa: F401
from uninet_feat.calibration import _label, calibrate_choices, choose_pixel_map, load_run
from uninet_feat.normals import validation_normals
from uninet_feat.errors import BadInputError
from uninet_feat.runs import make_dataset, set_threads
from uninet_feat.selection import SyntheticValidation


def compare(runs, seed: int | None = None, kinds=None, threads: int | None = None) -> dict:
    """{"rows": [one per run], "seed", "kinds", "normals" (the validation normals' paths)}; each row: run, chosen map, its synthetic pixel AUROC, image
    AUROC, every candidate's pixel AUROC, and the set's size."""
    rows, first = [], None
    for run in runs:
        model, _, own = load_run(run)
        # what `calibrate` was told since training (calibration.json's record) over the training config's: the map
        # chosen again as the run's own choice was made (it took config.yaml's; an audit, session 53)
        told = calibrate_choices(run)
        own = {**own, **{k: told[k] for k in ("map_levels", "map_norm", "synthetic_kinds") if k in told}}
        val = validation_normals(own)   # the run's own held-out split: it is drawn with the run's seed
        cfg = dict(own, **({"seed": seed} if seed is not None else {}),   # the set's seed alone moves
                   **({"synthetic_kinds": kinds} if kinds else {}), **({"threads": threads} if threads else {}))
        set_threads(cfg)
        names = [str(s.path) for s in val]
        if first is None:
            first = (run, names)
        elif names != first[1]:
            raise BadInputError(f"{run} holds other validation normals than {first[0]}, so the two would be scored "
                                "on different synthetic images", path=run,
                                fix="compare runs trained on the same data, split, seed and val_fraction")
        choice = choose_pixel_map(model, val, cfg, cfg.get("map_levels") or "all", cfg.get("map_norm") or "none")
        chosen = _label((tuple(choice["levels"] or range(1, len(model.channels) + 1)), choice["norm"]))
        sv = SyntheticValidation.from_config(make_dataset(val, cfg, model.source), cfg)
        rows.append({"run": str(run), "chosen_map": chosen, "pixel_auroc": choice["synthetic_pixel_auroc"][chosen],
                     "image_auroc": sv.score(model, cfg.get("eval_batch_size", 8))["image_auroc"],
                     "candidates": choice["synthetic_pixel_auroc"], "n_images": len(sv), "skipped": sv.skipped})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "candidates"}), flush=True)
    return {"rows": rows, "seed": seed, "kinds": kinds, "normals": first[1] if first else []}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", nargs="+", required=True, type=Path)
    ap.add_argument("--seed", type=int, help="the synthetic set's seed (default: each run's own)")
    ap.add_argument("--kinds", help="synthetic defect kinds (default: each run's synthetic_kinds)")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    try:
        res = compare(args.runs, args.seed, args.kinds, args.threads)
    except BadInputError as e:
        print(f"error: {e}")
        return 2
    if args.json:
        from uninet_feat.io import atomic_write_text
        atomic_write_text(args.json, json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
