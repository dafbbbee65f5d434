"""LightGBM classification heads on exported image vectors, with honest cross-validation.

``train_head`` reports metrics an inspection engineer can trust:

* stratified K-fold; every fold's model early-stops on an inner validation split carved from its
  *training* part, so the reported test fold never steers the model;
* binary threshold: F1-max on each fold's inner validation predictions (``f1_max_threshold``). Each out-of-fold
  prediction is labelled with *its own fold's* threshold, and the final head uses the mean of the
  fold thresholds - no threshold ever sees the out-of-fold labels it is scored on;
* the final model is refit on all data with n_estimators = median best iteration over folds.

Trees need no standardisation. Runs are deterministic (``deterministic=True, force_row_wise=True``,
fixed seeds), whatever ``n_jobs`` is.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import lightgbm as lgb
import numpy as np
from sklearn.metrics import (accuracy_score, classification_report, confusion_matrix, f1_score,
                             precision_recall_curve, roc_auc_score)
from sklearn.model_selection import StratifiedKFold, train_test_split
from sklearn.utils.class_weight import compute_sample_weight

from ..errors import BadInputError
from ..io import atomic_write_text
from .index import as_matrix

_FORMAT = "uninet-feat-head/1"
# Binary heads: a normal folder's name (`layouts.NORMAL_LABELS`: good, normal, ok, free) or one of these
# (case-insensitive) is the negative class; otherwise the second label in sorted order is positive. Pass
# ``positive=`` to choose explicitly.
_NEGATIVE_NAMES = {"0", "false", "negative", "pass"}
DEFAULT_PARAMS = dict(n_estimators=1000, learning_rate=0.05, num_leaves=15, min_child_samples=5,
                      reg_lambda=1.0, verbose=-1)


class Head:
    """A trained booster plus its label map (and the binary decision threshold)."""

    def __init__(self, booster: lgb.Booster, classes, threshold=None, feature_names=None, n_jobs=None, task=None):
        self.booster, self.classes = booster, [str(c) for c in classes]
        self._task = task   # as trained: a two-class head trained as multiclass predicts by argmax
        self.threshold = None if threshold is None else float(threshold)
        self.feature_names = list(feature_names or booster.feature_name())
        self.n_jobs = n_jobs
        self.source = None   # the feature store's source it was trained on (set by save / load)

    @property
    def task(self) -> str:
        return self._task or ("binary" if len(self.classes) == 2 else "multiclass")

    def predict_proba(self, X) -> np.ndarray:
        """(n, n_classes), columns in ``self.classes`` order (binary: [negative, positive])."""
        x = as_matrix(X, "feature rows", d=len(self.feature_names))
        kw = {} if self.n_jobs is None else {"num_threads": self.n_jobs}
        p = self.booster.predict(x, **kw)
        return np.stack([1 - p, p], 1) if p.ndim == 1 else p

    def predict(self, X) -> np.ndarray:
        """Label strings: binary by ``proba[:, 1] >= threshold``, multiclass by argmax."""
        p = self.predict_proba(X)
        t = 0.5 if self.threshold is None else self.threshold
        idx = (p[:, 1] >= t).astype(int) if self.task == "binary" else p.argmax(1)
        return np.asarray(self.classes, dtype=object)[idx]

    def save(self, directory, source: dict | None = None) -> Path:
        """``model.txt`` (LightGBM text, readable by any LightGBM) then ``head.json`` with its sha256.

        Both are written atomically, head.json last, so ``load`` detects a save cut in between.
        ``source``: the feature store's source (run, ``model_sha256``), recorded so that predict can refuse
        a head trained on another model's features (kept from the last ``save`` when not given).
        """
        d = Path(directory)
        text = self.booster.model_to_string()
        atomic_write_text(d / "model.txt", text)
        meta = dict(format=_FORMAT, task=self.task, classes=self.classes, threshold=self.threshold,
                    feature_names=self.feature_names, model_sha256=hashlib.sha256(text.encode()).hexdigest())
        self.source = source if source is not None else self.source
        if self.source is not None:
            meta["source"] = self.source
        atomic_write_text(d / "head.json", json.dumps(meta, indent=1))
        return d

    @classmethod
    def load(cls, directory, n_jobs=None) -> "Head":
        d = Path(directory)
        try:
            meta = json.loads((d / "head.json").read_text())
            text = (d / "model.txt").read_text()
        except FileNotFoundError as e:
            raise BadInputError(f"missing {Path(e.filename).name}", path=d,
                                fix="pass a folder written by `uninet-feat train-head --out DIR`") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadInputError("head.json is corrupt", path=d, fix="train or save the head again") from e
        if meta.get("format") != _FORMAT:
            raise BadInputError(f"unknown head format {meta.get('format')!r}", path=d / "head.json",
                                fix="train the head again with this version (`uninet-feat train-head`)")
        if hashlib.sha256(text.encode()).hexdigest() != meta.get("model_sha256"):
            raise BadInputError("model.txt does not match head.json (interrupted save or edited file)",
                                path=d, fix="save the head again")
        booster = lgb.Booster(model_str=text)
        head = cls(booster, meta["classes"], meta["threshold"], meta["feature_names"], n_jobs, meta.get("task"))
        head.source = meta.get("source")   # None: saved before sources were recorded, or not from a store
        return head


@dataclass
class HeadResult:
    """The final ``head`` plus cross-validation evidence: per-fold and pooled out-of-fold metrics."""
    head: Head
    task: str
    classes: list
    n_splits: int
    folds: list = field(default_factory=list)     # per fold: sizes, best_iteration, threshold, metrics
    oof: dict = field(default_factory=dict)       # pooled out-of-fold metrics
    oof_proba: np.ndarray | None = None           # (n, n_classes)
    fold_of: np.ndarray | None = None             # (n,) index of the fold each row was tested in
    n_estimators: int = 0
    small_classes: list = field(default_factory=list)   # fewer rows than folds: tested in fewer folds

    def summary(self) -> dict:
        """JSON-able report (no per-row arrays)."""
        return dict(task=self.task, classes=self.classes, n_splits=self.n_splits, n_estimators=self.n_estimators,
                    small_classes=self.small_classes, threshold=self.head.threshold, oof=self.oof, folds=self.folds)


def _labels(y, task, positive):
    y = np.asarray([str(v) for v in np.asarray(y).ravel()], dtype=object)
    classes = sorted(set(y))
    if len(classes) < 2:
        raise BadInputError(f"a head needs at least 2 classes, got {classes}", fix="label images of two or more "
                            "classes (with --defects-only: two or more defect types), or use --task binary with normals")
    task = task or ("binary" if len(classes) == 2 else "multiclass")
    if task not in ("binary", "multiclass"):
        raise BadInputError(f"unknown task {task!r}", fix="use binary or multiclass")
    if task == "binary":
        if len(classes) != 2:
            raise BadInputError(f"binary head needs exactly 2 classes, got {len(classes)}: {classes}",
                                fix="use task=multiclass or merge labels")
        if positive is None:
            from ..data.layouts import is_normal_label   # the data layer's names: "free" is normal there too
            neg = [c for c in classes if is_normal_label(c) or c.strip().lower() in _NEGATIVE_NAMES]
            positive = classes[0] if neg == [classes[1]] else classes[1]
        if str(positive) not in classes:
            raise BadInputError(f"positive label {positive!r} is not one of {classes}")
        classes = [c for c in classes if c != str(positive)] + [str(positive)]
    codes = np.array([classes.index(v) for v in y])
    counts = np.bincount(codes, minlength=len(classes))
    small = [f"{c} ({k})" for c, k in zip(classes, counts) if k < 2]
    if small:
        raise BadInputError(f"classes with fewer than 2 samples cannot be cross-validated: {', '.join(small)}",
                            fix="add samples of these classes or drop/merge them")
    return codes, classes, task, counts


def f1_max_threshold(y_true, score):
    """Threshold (predict positive when score >= t) maximising F1 on (y_true, score); None without both classes.

    Returned as the midpoint between the F1-max cut score and the next lower score: the same
    predictions on these rows, but a margin on both sides (inner validation sets are small).
    """
    if len(np.unique(y_true)) < 2:
        return None
    p, r, t = precision_recall_curve(y_true, score)
    f1 = 2 * p[:-1] * r[:-1] / np.maximum(p[:-1] + r[:-1], 1e-12)
    cut = float(t[int(np.argmax(f1))])
    below = np.asarray(score)[np.asarray(score) < cut]
    return (cut + float(below.max())) / 2 if below.size else cut


def accuracy_interval(n_right: int, n: int, level: float = 0.95) -> list[float]:
    """Wilson score interval of an accuracy of ``n_right`` in ``n``: with AITEX's 56 labelled defect strips an
    out-of-fold 0.50 spans about 0.37-0.63, which a reader needs beside it. It treats the rows as independent
    trials; the folds' models differ, so it is the first-order spread, not an exact one."""
    from scipy.stats import binomtest
    ci = binomtest(int(n_right), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return [float(ci.low), float(ci.high)]


def _metrics(y, proba, pred, classes):
    k = len(classes)
    out = dict(n=int(len(y)), accuracy=float(accuracy_score(y, pred)),
               accuracy_interval=accuracy_interval(int(np.sum(np.asarray(y) == np.asarray(pred))), len(y)),
               macro_f1=float(f1_score(y, pred, average="macro", zero_division=0)),   # classes seen in y or pred
               # what a reader compares with: always predicting the largest class, and the mean per-class recall
               majority_accuracy=float(np.bincount(np.asarray(y), minlength=k).max() / max(len(y), 1)),
               balanced_accuracy=float(np.mean([np.mean(np.asarray(pred)[np.asarray(y) == c] == c)
                                                for c in np.unique(y)])),
               confusion=confusion_matrix(y, pred, labels=range(k)).tolist())
    if k == 2:
        out["auroc"] = float(roc_auc_score(y, proba[:, 1])) if len(np.unique(y)) == 2 else None
    else:
        rep = classification_report(y, pred, labels=range(k), target_names=classes, output_dict=True, zero_division=0)
        out["per_class"] = {c: rep[c] for c in classes}
    return out


# LightGBM 4.7 renamed fit(eval_set=[(X, y)]) to fit(eval_X=(X,), eval_y=(y,)); support both.
_EVAL_XY = "eval_X" in inspect.signature(lgb.LGBMClassifier.fit).parameters


def _eval_kw(x, y):
    w = [compute_sample_weight("balanced", y)]
    return dict(eval_X=(x,), eval_y=(y,), eval_sample_weight=w) if _EVAL_XY else \
        dict(eval_set=[(x, y)], eval_sample_weight=w)


def _carve(tr, codes, frac, seed):
    """Stratified (fit, val) split of a training fold; classes with one row in the fold stay in fit
    so every fold model knows every class. A fold of only singletons validates on its fit rows."""
    one = np.bincount(codes[tr])[codes[tr]] < 2
    pool, n_cls = tr[~one], len(np.unique(codes[tr[~one]]))
    if pool.size == 0:
        return tr, tr
    n_val = min(max(int(round(frac * len(pool))), n_cls), len(pool) - n_cls)
    fit_i, val_i = train_test_split(pool, test_size=n_val, random_state=seed, stratify=codes[pool])
    return np.concatenate([fit_i, tr[one]]), val_i


def stratified_folds(y, n_splits: int = 5, seed: int = 0) -> list:
    """[(train_idx, test_idx)]: stratified K-fold over labels ``y`` with ``n_splits`` folds, at most the largest
    class count. A class with fewer rows than folds is tested in as many folds as it has rows (sklearn warns;
    that is intended here, so the warning is silenced and `train_head` names those classes in its report)."""
    y = np.asarray([str(v) for v in np.asarray(y).ravel()])
    n_splits = int(min(n_splits, np.unique(y, return_counts=True)[1].max()))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        return list(StratifiedKFold(n_splits, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))


def _model(params, n_estimators=None):
    p = dict(params)
    if n_estimators is not None:
        p["n_estimators"] = n_estimators
    return lgb.LGBMClassifier(**p)


def default_threads() -> int:
    """LightGBM's threads when none are given: ``OMP_NUM_THREADS`` when set, else the cores this process may use.
    Why not LightGBM's own default: it takes every core whatever ``OMP_NUM_THREADS`` says, and on 2 cores shared
    with other work that was 6-12x slower than 1 thread (a 392-row, 5-class head took 34 minutes; session 26)."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def train_head(X, y, task=None, n_splits=5, seed=0, class_weight="balanced", params=None, n_jobs=None,
               feature_names=None, positive=None, val_fraction=0.2, early_stopping_rounds=50, cv=None) -> HeadResult:
    """Cross-validate a LightGBM head on (X, y), then fit the final head on all rows.

    ``task`` None infers binary/multiclass from the label count; labels are compared as strings.
    ``n_splits`` folds (at most the largest class count). A class with fewer rows than folds is tested in
    as many folds as it has rows and named in ``small_classes``; each of its rows still trains every other
    fold's model. Why not clamp every class to the smallest one: with a handful of labels one class of 2 rows
    would make it 2-fold for all, each model training on half the data (AITEX defect types, plain features:
    LightGBM accuracy 0.357 at 2 folds, 0.464 at 5). ``cv`` may replace the stratified K-fold with an sklearn
    splitter or any iterable of (train_idx, test_idx).
    ``params`` override ``DEFAULT_PARAMS`` (LGBMClassifier keywords; n_estimators is the
    early-stopping cap).
    """
    x = as_matrix(X, "feature rows")
    n_jobs = default_threads() if n_jobs is None else n_jobs
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, int) or n_jobs < 1:
        raise BadInputError(f"threads must be an integer >= 1, got {n_jobs!r}", fix="e.g. --threads 2")
    codes, classes, task, counts = _labels(y, task, positive)
    if len(codes) != len(x):
        raise BadInputError(f"X has {len(x)} rows but y has {len(codes)} labels")
    names = list(feature_names) if feature_names is not None else [f"f{i}" for i in range(x.shape[1])]
    if len(names) != x.shape[1]:
        raise BadInputError(f"{len(names)} feature names for {x.shape[1]} columns")
    base = {**DEFAULT_PARAMS, **(params or {}), "class_weight": class_weight, "random_state": seed,
            "deterministic": True, "force_row_wise": True, "n_jobs": n_jobs}
    small = []
    if cv is None:
        if n_splits < 2:
            raise BadInputError(f"the cross-validation needs >= 2 folds, got {n_splits}", fix="e.g. --folds 5")
        cv = stratified_folds(codes, n_splits, seed)
        small = [c for c, n in zip(classes, counts) if n < len(cv)]
        if len(cv) < n_splits:
            warnings.warn(f"{n_splits} folds asked, {len(cv)} used: the largest class has {len(cv)} rows")
    if hasattr(cv, "split"):
        cv = cv.split(x, codes)
    folds, k = [], len(classes)
    oof, fold_of, thresholds, best = np.zeros((len(x), k)), np.full(len(x), -1), [], []
    for i, (tr, te) in enumerate(cv):
        tr, te = np.asarray(tr), np.asarray(te)
        fit_i, val_i = _carve(tr, codes, val_fraction, seed + i)
        if len(np.unique(codes[fit_i])) != k:
            raise BadInputError(f"fold {i}'s training part lacks some classes", fix="use a stratified cv")
        m = _model(base).fit(x[fit_i], codes[fit_i], **_eval_kw(x[val_i], codes[val_i]),
                             feature_name=names, callbacks=[lgb.early_stopping(early_stopping_rounds, verbose=False)])
        it = int(m.best_iteration_ or m.n_estimators)
        best.append(it)
        h = Head(m.booster_, classes, None, names, n_jobs)
        proba = h.predict_proba(x[te])
        info = dict(fold=i, n_train=len(fit_i), n_val=len(val_i), n_test=len(te), best_iteration=it)
        if task == "binary":
            t = f1_max_threshold(codes[val_i], h.predict_proba(x[val_i])[:, 1])
            info["threshold"] = t
            if t is not None:
                thresholds.append(t)
            pred = (proba[:, 1] >= (0.5 if t is None else t)).astype(int)
        else:
            pred = proba.argmax(1)
        info.update(_metrics(codes[te], proba, pred, classes))
        folds.append(info)
        oof[te], fold_of[te] = proba, i
    if (fold_of < 0).any():
        raise BadInputError(f"{int((fold_of < 0).sum())} rows were never in a test fold", fix="pass a cv that covers every row")
    if task == "binary":  # each row judged by its own fold's threshold
        ft = np.array([0.5 if f["threshold"] is None else f["threshold"] for f in folds])
        oof_pred = (oof[:, 1] >= ft[fold_of]).astype(int)
    else:
        oof_pred = oof.argmax(1)
    pooled = _metrics(codes, oof, oof_pred, classes)
    if pooled["balanced_accuracy"] <= 1 / k:   # a constant prediction scores exactly 1/k: accuracy alone hides it
        warnings.warn("the head is no better than chance out of fold: balanced accuracy "
                      f"{pooled['balanced_accuracy']:.3f} (chance {1 / k:.3f}), accuracy {pooled['accuracy']:.3f} "
                      f"against {pooled['majority_accuracy']:.3f} for always predicting the largest class. These "
                      "features do not separate the classes for it: more labelled rows, a trained run's features, "
                      "or fewer classes may help")
    n_est = max(1, int(np.median(best)))
    final = _model(base, n_est).fit(x, codes, feature_name=names)
    threshold = (float(np.mean(thresholds)) if thresholds else 0.5) if task == "binary" else None
    head = Head(final.booster_, classes, threshold, names, n_jobs, task)
    return HeadResult(head, task, classes, len(folds), folds, pooled, oof, fold_of, n_est, small)
