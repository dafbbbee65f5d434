"""Which images get flagged: a threshold from the run's validation normals, never from test labels.

Three rules (`resolve_threshold`): ``--threshold VALUE`` as given; ``--max-fpr F``: the lowest threshold that
flags at most a fraction F of the validation normals; neither: the run's default, their 0.99 quantile, which
``calibrate`` wrote into ``calibration.json``. A run of several groups gets a threshold per group
(`thresholds_by_group`) once each group has `FEW_NORMALS` validation normals; with fewer than `WARN_NORMALS`
validation normals the default cannot mean "1 % false positives", and `few_normals_warning` says so.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path

import numpy as np

from .errors import BadInputError
from .io import read_json

DEFAULT_RULE = "0.99 quantile of validation-normal image scores (no test labels used)"
NO_THRESHOLD = "none: no validation-normal scores (no image is flagged)"

FEW_NORMALS = 19   # a group's own threshold (its median and spread, `thresholds_by_group`) needs this many
WARN_NORMALS = 24   # below this many validation normals a new normal passes the default threshold > 5 % of the time


def pass_chance(n: int) -> float:
    """The chance that a new normal scores above the 0.99 quantile of ``n`` validation normals like it (numpy's
    linear interpolation between order statistics, whose expected quantiles are k / (n + 1)): (0.01 n + 0.99) /
    (n + 1). 5.9 % at 19, 5.1 % at 23, 4.9 % at 24; at least 1 / (n + 1)."""
    return (0.01 * n + 0.99) / (n + 1)


_SAID: list = []   # the texts `warn_once` has said in the command running (`said_once`); empty: none running


@contextlib.contextmanager
def said_once():
    """Within the block (a command), `warn_once` says each text once. Why not the "default" warnings filter: any
    ``catch_warnings`` block in between resets its memory, and `evaluate --knn` said the few-normals warning three
    times, once per scorer's threshold (an audit, session 53). Nested blocks share the outermost one's memory."""
    fresh = not _SAID
    if fresh:
        _SAID.append(set())
    try:
        yield
    finally:
        if fresh:
            _SAID.clear()


def warn_once(text: str) -> None:
    """``warnings.warn(text)`` unless a `said_once` block running said it already (always outside one)."""
    if _SAID:
        if text in _SAID[0]:
            return
        _SAID[0].add(text)
    warnings.warn(text)


def few_normals_warning(n: int, val_fraction: float | None = None, given: str | None = None, run=None,
                        from_data: bool = False) -> None:
    """Warn that the default threshold rests on too few validation normals to mean "1 % false positives".

    Why: with n normals the 0.99 quantile is (about) their highest score, and a new normal like them scores
    above it with probability `pass_chance(n)`, at least 1/(n+1) — 50 % for one validation strip, which is what a 10 %
    split of an AITEX fabric's 14 training strips leaves (measured: fabric_03's run flagged all 6 test normals).
    ``from_data``: the normals are the data's own validation split (``val_split`` group or data), which no
    ``--val-fraction`` changes: the fix is more images there.
    ``val_fraction``: the run's held-out share, when known, so that the fix names a larger one (or more images)
    instead of one the run may already use; ``given``: the folder of normals the run is calibrated on instead
    (`calibrate --normals`), whose fix is more images there, not another split; ``run``: the run folder to name,
    where one command resolves several runs' thresholds (an ensemble's members: which of them is short of normals).
    Issued from this one place (no stacklevel) so that the "default" filter the CLI sets prints it once per command,
    not once per scorer whose threshold is resolved (`evaluate --knn` resolves three)."""
    if not 0 < n < WARN_NORMALS:
        return
    enough = f"{WARN_NORMALS} or more make it under 5 %"
    hold = f"hold out more normals (`train --val-fraction`, e.g. 0.3; {enough})"
    if given:   # `calibrate --normals`: the split and its share are not what the threshold rests on
        hold = f"put more normal images the run never saw into {given} ({enough}) and calibrate again"
    elif from_data:   # the data's validation/ folder (or `val` rows): --val-fraction draws none of them
        hold = (f"put more normal images into the data's validation split (its validation/ folder or `val` rows; "
                f"{enough}) and train again")
    elif val_fraction:
        need = math.ceil(round(100 * val_fraction * WARN_NORMALS / n, 6)) / 100   # the share that would hold them
        hold = (f"hold out more normals (`train --val-fraction {need:g}`, now {val_fraction:g}: {enough})"
                if need <= 0.5 else
                f"add normal images to train on (--val-fraction is {val_fraction:g} already; {WARN_NORMALS} validation "
                f"normals at that share need about {math.ceil(WARN_NORMALS / val_fraction)} normal images in all)")
    who = f"{run}: " if run else ""
    warn_once(f"{who}the default threshold is the 0.99 quantile of only {n} validation normal"
              f"{'s' if n > 1 else ''}, about their highest score: a new normal image scores above it "
              f"with probability {100 * pass_chance(n):.0f} % (at least 1/{n + 1}), not 1 %. Fix: {hold}, or "
              "calibrate on more normal images the run never saw (`uninet-feat calibrate --run RUN --normals "
              "DIR`), or pass --threshold VALUE")


def threshold_at_fpr(val_scores, max_fpr: float) -> float:
    """The lowest threshold with at most ``floor(max_fpr · n)`` validation normals strictly above it."""
    s = np.sort(np.asarray(val_scores, dtype=np.float64))[::-1]
    return float(s[min(int(math.floor(max_fpr * len(s) + 1e-9)), len(s) - 1)])


def check_threshold_flags(threshold: float | None, max_fpr: float | None) -> None:
    """Refuse bad ``--threshold`` / ``--max-fpr`` values before any scoring."""
    if threshold is not None and max_fpr is not None:
        raise BadInputError("give --threshold or --max-fpr, not both", fix="drop one of them")
    if threshold is not None and not math.isfinite(threshold):
        raise BadInputError(f"--threshold must be a finite number, got {threshold}",
                            fix="drop it for the run's calibrated threshold, or give a number from calibration.json")
    if max_fpr is not None and not 0.0 <= max_fpr < 1.0:
        raise BadInputError(f"--max-fpr must be in [0, 1), got {max_fpr}", fix="e.g. --max-fpr 0.05")


def resolve_threshold(run, threshold: float | None = None, max_fpr: float | None = None, cal: dict | None = None,
                      source: str = "calibration.json", scores: str = "validation normals", name_run: bool = False):
    """(threshold or None, rule) for ``run``; see the module docstring.

    ``cal``: a `calibration` dict to use instead of the run's ``calibration.json`` (e.g. that of another
    epoch's model, or another scorer's); ``source`` names it in errors, ``scores`` its values in the rule;
    ``name_run``: the few-normals warning names the run (one of several, as an ensemble's members are)."""
    check_threshold_flags(threshold, max_fpr)
    if threshold is not None:
        return float(threshold), "given (--threshold)"
    path = Path(run) / "calibration.json"
    if cal is None:
        cal = read_json(path, f"re-create it: `uninet-feat calibrate --run {run}`") if path.exists() else None
    else:
        path = source
    if max_fpr is None:
        if cal:
            few_normals_warning(int(cal.get("n_val_normals", len(cal.get("val_scores", [])))),
                                cal.get("val_fraction"), cal.get("calibration_normals"), run if name_run else None,
                                from_data=bool(cal.get("val_from_data")))
        if cal and cal.get("threshold") is not None:
            return cal["threshold"], cal.get("threshold_rule", DEFAULT_RULE)
        warnings.warn(f"{run}: no threshold, so no image is flagged (the flag is left empty): the run has no "
                      "validation-normal scores (trained with val_fraction 0, or calibration.json is missing). Fix: "
                      "pass --threshold VALUE, or retrain with --val-fraction 0.1", stacklevel=2)
        return None, NO_THRESHOLD
    if cal is None or "val_scores" not in cal:
        raise BadInputError("the run has no validation-normal scores to choose a threshold on", path=path,
                            fix=f"run `uninet-feat calibrate --run {run}` (older runs did not keep them), "
                                "or pass --threshold VALUE")
    n = len(cal["val_scores"])
    if 0 < max_fpr * n < 1:
        warnings.warn(f"--max-fpr {max_fpr}: only {n} validation normals, so the lowest false-positive rate "
                      f"they resolve is 1/{n}; the threshold is their highest score", stacklevel=2)
    return (threshold_at_fpr(cal["val_scores"], max_fpr),
            f"at most {max_fpr:g} of the {n} {scores} above it (--max-fpr)")


def group_rule(max_fpr: float | None = None, score: str | None = None) -> str:
    """The per-group rule's text; ``score``: the score it is applied to ("knn", "combined"; None: the run's WDM)."""
    what = "scores" if score is None else f"{score} scores"
    return (f"each group's validation-normal median + its standard deviation x the 0.99 quantile of all validation "
            f"normals' {what} in their group's units (no test labels used)" if max_fpr is None else
            f"each group's validation-normal median + its standard deviation x the --max-fpr {max_fpr:g} threshold "
            f"of all validation normals' {what} in their group's units")


def group_thresholds(run, threshold: float | None = None, max_fpr: float | None = None, cal: dict | None = None,
                     warn: bool = True, name_run: bool = False) -> dict | None:
    """{group: threshold} for a run trained on several groups (one model for many categories) from the validation
    normals' WDM scores in ``cal`` (default: the run's calibration.json), by `thresholds_by_group`; None for a
    one-group run, a given ``threshold``, a calibration.json written before session 28 (no ``val_groups``), or a
    group with fewer than `FEW_NORMALS` validation normals (then one pooled threshold, warned when ``warn``, naming
    the run with ``name_run``)."""
    check_threshold_flags(threshold, max_fpr)
    if threshold is not None:
        return None
    if cal is None:
        from .calibration import saved_calibration
        cal = saved_calibration(run)
    groups = (cal or {}).get("val_groups")
    if not groups or len(groups) != len(cal.get("val_scores", [])):
        return None
    return thresholds_by_group(cal["val_scores"], groups, cal.get("trained_groups") or (), max_fpr, warn,
                               run if name_run else None)


def thresholds_by_group(scores, groups, trained=(), max_fpr: float | None = None, warn: bool = True,
                        run=None) -> dict | None:
    """{group: threshold} from the validation normals' ``scores`` (any score: WDM, kNN, combined), each of group
    ``groups[i]``; ``trained``: the groups the run trained on (one without a single validation normal counts as one
    of 0: a run split by ``val_split`` data or drawn, one draw over all groups, can leave a small group none). None
    for fewer than two groups, or a group with fewer than `FEW_NORMALS` validation normals (then one pooled
    threshold, warned when ``warn``; ``run``: the run the warning names, when one command resolves several runs'
    thresholds).

    Why: one model's normal scores sit at another level in each group (the demo's plain weave near 2.1, its twill
    near 3.4), so one pooled threshold is about the highest group's top normal and passes the lower groups' defects.
    How: each validation normal's score in its group's units, z = (score - group median) / group standard deviation;
    the 0.99 quantile of all of them (or the ``max_fpr`` rule), Q; group g's threshold median_g + std_g * Q. The tail
    is read from every validation normal (a 10 % split of a few groups leaves each too few for a 0.99 quantile of its
    own: a group of 8 would put it at its highest score, passed by a new normal one time in 9); only the level and
    spread are the group's, and only with `FEW_NORMALS` of them in every group: on the demo's 7 to 9 per group the
    levels moved (6 of 10 plain test normals scored above all 9 of its validation normals). A group of equal scores
    keeps the pooled threshold."""
    names = sorted(set(groups) | set(trained))   # a trained group may have no normal here
    if len(names) < 2:
        return None
    s, g = np.asarray(scores, dtype=np.float64), np.asarray(groups)
    few = {k: int((g == k).sum()) for k in names if (g == k).sum() < FEW_NORMALS}
    if few:
        if warn:
            who = f"{run}: " if run else ""
            warn_once(f"{who}one threshold for all {len(names)} groups: a group's own needs {FEW_NORMALS} "
                      f"validation normals of it, and {', '.join(f'{k} has {v}' for k, v in few.items())}, so "
                      "the pooled one is about the highest group's top normal and may pass the other groups' "
                      "defects. Fix: hold out more normals (`train --val-fraction`), or `uninet-feat calibrate "
                      "--run RUN --normals DIR` with more normals per group (a folder laid out by group), or "
                      "predict each group with --group G --threshold T")
        return None
    level = {k: (float(np.median(s[g == k])), float(np.std(s[g == k], ddof=1))) for k in names}
    level = {k: v for k, v in level.items() if v[1] > 0}
    own = np.isin(g, list(level))
    if own.sum() < 2:
        return None
    z = np.array([(x - level[k][0]) / level[k][1] for x, k in zip(s[own], g[own])])
    q = float(np.quantile(z, 0.99)) if max_fpr is None else threshold_at_fpr(z, max_fpr)
    pooled = float(np.quantile(s, 0.99)) if max_fpr is None else threshold_at_fpr(s, max_fpr)

    def own_threshold(k) -> float:
        """median + std · q, raised to the highest of the group's own normals at or under q in z: back from z to a
        score the product can round one ulp under the normal that set q, which `score > t` then flagged (one
        normal over the --max-fpr bound, about one threshold in 6,000)."""
        sk = s[g == k]
        under = sk[(sk - level[k][0]) / level[k][1] <= q]
        return max(level[k][0] + level[k][1] * q, float(under.max(initial=-np.inf)))
    return {str(k): own_threshold(k) if k in level else pooled for k in names}


def pick_group(threshold, rule: str, by_group: dict | None, group: str | None, each_rule: str):
    """(threshold, rule, by_group) as the commands use them: with ``group``, that group's threshold in place of the
    pooled one (``by_group`` None; a group without one of its own keeps the pooled one, warned); without, ``by_group``
    maps each group to its threshold, the pooled one staying for images of no known group. ``each_rule``: the
    per-group rule's text."""
    if by_group is None:
        return threshold, rule, None
    if group is not None:
        if group in by_group:
            return by_group[group], f"{each_rule}: {group}", None
        pooled_for_unknown_groups([group], by_group, count=False)   # a misspelt --group, say
        return threshold, rule, None
    return threshold, f"{each_rule} (group_thresholds; the threshold here, all groups' normals', for images of " \
                      "no known group)", by_group


def thresholds_of(groups, pooled: float | None, by_group: dict | None) -> np.ndarray:
    """Each image's threshold: its group's (``by_group``), else ``pooled``; NaN where there is none."""
    nan = float("nan") if pooled is None else float(pooled)
    return np.array([(by_group or {}).get(g, nan) for g in groups], dtype=np.float64)


def pooled_for_unknown_groups(groups, by_group: dict | None, count: bool = True) -> int:
    """Warn (once per command: one place, no stacklevel) that images of a group without a threshold of its own in a
    run of several groups (no group: a plain folder; a misspelt --group; a group the run did not calibrate) are
    flagged at the pooled threshold, about the highest group's top normal; returns how many images that is."""
    if not by_group:
        return 0
    other = [g for g in groups if g not in by_group]
    if other:
        names = sorted({repr(g) for g in other})
        n = f" ({len(other)})" if count else ""
        warnings.warn(f"images of group {', '.join(names[:5])}{n} are flagged at the pooled threshold: "
                      f"the run's own thresholds are for groups {', '.join(sorted(by_group))}, and the pooled one is "
                      "about the highest group's top normal, so it may pass a lower group's defects. Fix: --group G "
                      "(Detector(group=G)) with the images' group, or lay the images out by group (DIR/<group>/...)")
    return len(other)


def resolve_thresholds(run, threshold: float | None = None, max_fpr: float | None = None, group: str | None = None,
                       cal: dict | None = None, source: str = "calibration.json", name_run: bool = False):
    """(threshold, rule, by_group): `resolve_threshold`'s, and for a run trained on several groups their own
    (`group_thresholds`): with ``group``, that group's threshold in place of the pooled one (``by_group`` None);
    without, ``by_group`` maps each group to its threshold, the pooled one staying for images of no known group.
    ``name_run``: the warnings name the run, as an ensemble member's do (`ensemble.load_member`), so that a command
    that resolves this run's threshold both ways (`predict --ensemble --flag-by wdm`) says each warning once."""
    path = Path(run) / "calibration.json"
    if cal is None and threshold is None and path.exists():   # read once for both (a given threshold reads none)
        cal, source = read_json(path, f"re-create it: `uninet-feat calibrate --run {run}`"), path
    by = group_thresholds(run, threshold, max_fpr, cal, name_run=name_run)
    t, rule = resolve_threshold(run, threshold, max_fpr, cal, source, name_run=name_run)   # (few normals: warned)
    return pick_group(t, rule, by, group, group_rule(max_fpr))
