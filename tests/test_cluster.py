"""`uninet-feat cluster` and `train-head --labels`: candidate defect types without labels, then named ones."""
import csv
from pathlib import Path
import json

import numpy as np
import pytest

from tests._tiny import register_tiny, tiny_train_args, write_texture_set
from uninet_feat.downstream.cluster import cluster_vectors, label_agreement
from uninet_feat.errors import BadInputError


def _blobs(sizes=(30, 20, 10), d=40, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 6, (len(sizes), d))
    X = np.concatenate([c + rng.normal(0, 1, (n, d)) for c, n in zip(centres, sizes)])
    y = np.concatenate([[f"t{i}"] * n for i, n in enumerate(sizes)])
    perm = rng.permutation(len(X))
    return X[perm], y[perm]


def test_auto_k_finds_separated_types_numbered_by_size_with_exemplars_nearest_the_centre():
    X, y = _blobs()
    res = cluster_vectors(X, seed=3)
    assert res.k == 3 and max(res.silhouettes, key=res.silhouettes.get) == 3
    assert set(res.silhouettes) == set(range(2, 11))
    assert [len(e) for e in res.exemplars] == [30, 20, 10]   # cluster 0 = the largest
    for c, ex in enumerate(res.exemplars):
        assert set(np.flatnonzero(res.labels == c)) == set(ex)
        assert res.distance[ex[0]] == res.distance[ex].min()   # the exemplar first
        assert np.all(np.diff(res.distance[ex]) >= 0)
    agree = label_agreement(res, y)
    assert agree["ari"] == pytest.approx(1.0) and agree["purity"] == 1.0 and agree["exemplar_named_accuracy"] == 1.0
    assert agree["majority_label_accuracy"] == pytest.approx(0.5)
    again = cluster_vectors(X, seed=3)
    assert np.array_equal(again.labels, res.labels)   # a seed gives the same clusters


def test_agreement_figures_against_a_hand_count():
    X, _ = _blobs((6, 6), d=5)
    res = cluster_vectors(X, k=2)
    truth = np.where(res.labels == 0, "a", "b")
    truth[res.exemplars[0][-1]] = "b"   # one of cluster 0's rows, not its exemplar, carries the other label
    agree = label_agreement(res, truth)
    assert agree["purity"] == pytest.approx(11 / 12)
    assert agree["exemplar_named_accuracy"] == pytest.approx(11 / 12)
    assert 0 < agree["random_k_labelled_accuracy"] <= 1 and agree["n_labels"] == 2


def test_bad_inputs_are_named():
    X, _ = _blobs((10, 10), d=4)
    with pytest.raises(BadInputError, match="at least 4"):
        cluster_vectors(X[:3])
    Xn = X.copy()
    Xn[5, 1] = np.nan
    with pytest.raises(BadInputError, match="row 5"):
        cluster_vectors(Xn)
    with pytest.raises(BadInputError, match="k must be from 2 to 19"):
        cluster_vectors(X, k=20)
    with pytest.raises(BadInputError, match="same in all rows"):
        cluster_vectors(np.ones((8, 3)))


def _two_kinds(root):
    """A texture set whose defects are of two kinds: thin horizontal streaks and small square spots."""
    from PIL import Image
    data = write_texture_set(root / "data", n_train=8, n_good=4, n_bad=0)
    rng = np.random.default_rng(1)
    for kind in ("streak", "spot"):
        for i in range(6):
            a = np.asarray(Image.open(data / "test/good/000.png"), dtype=np.float64) / 255
            a = np.roll(a, int(rng.integers(0, 64)), axis=1).copy()
            y, x = int(rng.integers(8, 48)), int(rng.integers(8, 40))
            if kind == "streak":
                a[y:y + 2, 4:60] = 0.0
            else:
                a[y:y + 8, x:x + 8] = 1.0
            (data / "test" / kind).mkdir(parents=True, exist_ok=True)
            Image.fromarray((a * 255).astype("uint8")).save(data / "test" / kind / f"{i:03d}.png")
    return data


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from uninet_feat.cli import main
    register_tiny()
    root = tmp_path_factory.mktemp("cluster")
    data = _two_kinds(root)
    assert main(tiny_train_args(data) + ["--out", str(root / "run"), "--val-fraction", "0.25"]) == 0
    assert main(["extract", "--run", str(root / "run"), "--data", str(data), "--out", str(root / "f"),
                 "--quiet"]) == 0
    return root


def test_cluster_writes_rows_labels_and_a_sheet_and_named_labels_train_a_head(store, tmp_path):
    from uninet_feat.cli import main
    out = tmp_path / "c"
    assert main(["cluster", "--features", str(store / "f"), "--out", str(out)]) == 0
    summary = json.loads((out / "clusters.json").read_text())
    rows = list(csv.DictReader(open(out / "clusters.csv")))
    assert summary["rows"] == "every image not labelled normal" and summary["n_images"] == len(rows) == 12
    assert sorted({r["label"] for r in rows}) == ["spot", "streak"]   # the normals are left out
    assert sum(summary["sizes"]) == 12 and len(summary["sizes"]) == summary["k"]
    assert summary["n_columns"] == (8 + 16 + 32) + 8 + 2   # the tiny backbone's spotdiff channels, shape, place
    assert set(summary["agreement_with_labels"]) >= {"ari", "nmi", "purity", "exemplar_named_accuracy"}
    assert (out / "config.yaml").exists() and "cluster" in (out / "config.yaml").read_text()
    for c in range(summary["k"]):
        mine = [r for r in rows if int(r["cluster"]) == c]
        assert [int(r["rank"]) for r in mine] == list(range(len(mine)))
        assert min(float(r["distance"]) for r in mine) == float(mine[0]["distance"])
    labels = list(csv.DictReader(open(out / "labels.csv")))
    assert [(r["path"], r["label"]) for r in labels] == [(r["path"], f"cluster_{r['cluster']}") for r in rows]
    sheet = (out / "sheet.html").read_text()
    assert sheet.count("<h2>") == summary["k"] and sheet.count("data:image/png;base64,") == 12

    # the engineer names the types: here, each image by its true kind; one image's label blanked (left out)
    named = [{"path": r["path"], "label": r["label"] if i else ""} for i, r in enumerate(rows)]
    with open(tmp_path / "named.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label"])
        w.writeheader()
        w.writerows(named)
    head = tmp_path / "head"
    assert main(["train-head", "--features", str(store / "f"), "--task", "multiclass", "--labels",
                 str(tmp_path / "named.csv"), "--folds", "2", "--out", str(head)]) == 0
    rep = json.loads((head / "cv_report.json").read_text())
    assert rep["n_rows"] == 11 and sorted(rep["classes"]) == ["spot", "streak"] and rep["defects_only"] is True


def test_cluster_takes_predicts_flagged_images(store, tmp_path):
    from uninet_feat.cli import main
    items = json.loads((store / "f" / "manifest.json").read_text())["items"]
    paths = sorted({it["path"] for it in items})
    flagged = paths[::2]   # as if predict flagged every other image, normals among them
    with open(tmp_path / "predictions.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "wdm_score", "flagged"])
        w.writeheader()
        w.writerows({"path": p, "wdm_score": 1.0, "flagged": p in flagged} for p in paths)
    out = tmp_path / "c"
    assert main(["cluster", "--features", str(store / "f"), "--flagged", str(tmp_path / "predictions.csv"),
                 "--k", "2", "--no-sheet", "--out", str(out)]) == 0
    got = sorted(r["path"] for r in csv.DictReader(open(out / "clusters.csv")))
    assert got == flagged and not (out / "sheet.html").exists()
    assert json.loads((out / "clusters.json").read_text())["k_rule"] == "given (--k)"


def test_cluster_and_labels_errors_name_the_fix(store, tmp_path, capsys):
    from uninet_feat.cli import main

    def refused(argv, text):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert text in err and "fix:" in err, err

    with open(tmp_path / "none.csv", "w", newline="") as f:
        f.write("path,flagged\n/elsewhere/a.png,True\n")
    refused(["cluster", "--features", str(store / "f"), "--flagged", str(tmp_path / "none.csv"),
             "--out", str(tmp_path / "c")], "none of the 1 flagged images is in the feature store")
    with open(tmp_path / "nothing.csv", "w", newline="") as f:   # it said "0 image(s) to cluster" (session 53)
        f.write("path,flagged\n/elsewhere/a.png,False\n/elsewhere/b.png,False\n")
    refused(["cluster", "--features", str(store / "f"), "--flagged", str(tmp_path / "nothing.csv"),
             "--out", str(tmp_path / "c")], "the predictions CSV flags no image (of 2 rows)")
    with open(tmp_path / "bad.csv", "w", newline="") as f:
        f.write("file,label\na.png,x\n")
    refused(["train-head", "--features", str(store / "f"), "--labels", str(tmp_path / "bad.csv"),
             "--task", "multiclass", "--out", str(tmp_path / "h")], "needs columns path and label")
    with open(tmp_path / "other.csv", "w", newline="") as f:
        f.write("path,label\n/elsewhere/a.png,hole\n")
    refused(["train-head", "--features", str(store / "f"), "--labels", str(tmp_path / "other.csv"),
             "--task", "multiclass", "--out", str(tmp_path / "h")], "are not in the feature store")


def test_plain_features_have_no_descriptors(tmp_path, capsys):
    from uninet_feat.cli import main
    register_tiny()
    data = write_texture_set(tmp_path / "d", n_train=4, n_good=2, n_bad=4)
    assert main(["extract", "--data", str(data), "--backbone", "tiny", "--weights", "random", "--image-size", "64",
                 "--out", str(tmp_path / "p"), "--quiet"]) == 0
    assert main(["cluster", "--features", str(tmp_path / "p"), "--out", str(tmp_path / "c")]) == 2
    assert "no defect descriptors" in capsys.readouterr().err
    assert main(["cluster", "--features", str(tmp_path / "p"), "--columns", "all", "--k", "2", "--no-sheet",
                 "--out", str(tmp_path / "c")]) == 0


def test_descriptors_are_spot_differences_and_a_schema_2_store_falls_back_with_a_warning():
    from uninet_feat.clusters import cluster_matrix, descriptor_columns
    from uninet_feat.export import vector_names
    from uninet_feat.featstore import head_columns
    names = head_columns(vector_names((4, 6), adapted=True))
    picked = [names[j] for j in descriptor_columns(names)]
    assert picked[:10] == [f"top_l1_spotdiff_{i}" for i in range(4)] + [f"top_l2_spotdiff_{i}" for i in range(6)]
    assert len(picked) == 10 + 8 + 2 and not any(n.startswith("mean_") or "mapattn" in n for n in picked)
    old = [n for n in names if "spotdiff" not in n]   # a schema-2 store
    with pytest.warns(UserWarning, match="predate the spot differences"):
        got = [old[j] for j in descriptor_columns(old)]
    assert got[:4] == [f"top_l1_mapattn_{i}" for i in range(4)] and len(got) == 20
    X = np.arange(3 * len(names), dtype=float).reshape(3, -1)
    M, blocks = cluster_matrix(X, names, "descriptors")
    assert M.shape == (3, 20) and blocks[0] == "top_l1_spotdiff" and blocks[-1] == "top_place"
    assert set(blocks[10:18]) == {"top_shape"}


def test_a_new_batch_flat_folder_extracts_and_clusters_what_predict_flagged(store, tmp_path, monkeypatch):
    """The flow of a line without labels: predict a folder of images (no label folders), extract the same folder
    (read as predict reads it: unlabelled), cluster the flagged ones by predict's own CSV (relative paths)."""
    import shutil
    from uninet_feat.cli import main
    batch = tmp_path / "batch"
    batch.mkdir()
    for kind in ("spot", "streak", "good"):
        for p in sorted((store / "data" / "test" / kind).glob("*.png"))[:4]:
            shutil.copy(p, batch / f"{kind}_{p.name}")
    monkeypatch.chdir(tmp_path)   # relative paths, as a user types them
    assert main(["predict", "--run", str(store / "run"), "--data", "batch", "--no-overlays", "--out", "p0",
                 "--quiet"]) == 0
    scores = sorted(float(r["wdm_score"]) for r in csv.DictReader(open("p0/predictions.csv")))
    cut = (scores[5] + scores[6]) / 2   # flags the top half
    assert main(["predict", "--run", str(store / "run"), "--data", "batch", "--no-overlays", "--threshold", str(cut),
                 "--out", "p1", "--quiet"]) == 0
    flagged = sorted(str((tmp_path / r["path"]).resolve()) for r in csv.DictReader(open("p1/predictions.csv"))
                     if r["flagged"] == "True")
    assert len(flagged) == 6
    assert main(["extract", "--run", str(store / "run"), "--data", "batch", "--out", "f", "--quiet"]) == 0
    items = json.loads((tmp_path / "f" / "manifest.json").read_text())["items"]
    assert len(items) == 12 and {it["label"] for it in items} == {""}   # unlabelled, as predict reads them
    assert main(["cluster", "--features", "f", "--flagged", "p1/predictions.csv", "--k", "2", "--out", "c"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "c" / "clusters.csv")))
    assert sorted(r["path"] for r in rows) == flagged
    assert "agreement_with_labels" not in json.loads((tmp_path / "c" / "clusters.json").read_text())


def test_extract_batch_reads_storage_folders_as_predict_does(store, tmp_path, capsys):
    """Images filed by day (batch/day1/*.png) are a training layout's label folders to extract without --batch
    (label day1, a defect type), and unlabelled images with it; --batch takes no --split-csv."""
    import shutil
    from uninet_feat.cli import main
    for day in ("day1", "day2"):
        (tmp_path / "batch" / day).mkdir(parents=True)
        for p in sorted((store / "data" / "test" / "spot").glob("*.png"))[:2]:
            shutil.copy(p, tmp_path / "batch" / day / p.name)
    assert main(["extract", "--run", str(store / "run"), "--data", str(tmp_path / "batch"), "--batch",
                 "--out", str(tmp_path / "f"), "--quiet"]) == 0
    items = json.loads((tmp_path / "f" / "manifest.json").read_text())["items"]
    assert len(items) == 4 and {it["label"] for it in items} == {""}
    assert main(["extract", "--run", str(store / "run"), "--data", str(tmp_path / "batch"), "--out",
                 str(tmp_path / "g"), "--quiet"]) == 0
    assert {it["label"] for it in json.loads((tmp_path / "g" / "manifest.json").read_text())["items"]} == \
        {"day1", "day2"}
    assert main(["extract", "--run", str(store / "run"), "--data", str(tmp_path / "batch"), "--batch",
                 "--split-csv", "x.csv", "--out", str(tmp_path / "h"), "--quiet"]) == 2
    assert "takes no --split-csv" in capsys.readouterr().err


def _named_labels(store, tmp_path):
    """labels.csv of the store's defect images, each named by its true kind."""
    items = json.loads((store / "f" / "manifest.json").read_text())["items"]
    return [(it["path"], it["label"]) for it in items if not it["is_normal"]]


def test_labels_csv_saved_by_a_spreadsheet_is_read(store, tmp_path):
    """Excel's "CSV UTF-8" starts with a BOM, a header may be capitalised and carry extra columns; the same file
    in cp1252 (Excel's plain "CSV") is named, not a traceback."""
    from uninet_feat.cli import main
    rows = _named_labels(store, tmp_path)
    text = "Path , Label,notes\r\n" + "".join(f"{p},{lab},seen on line 2\r\n" for p, lab in rows)
    (tmp_path / "bom.csv").write_bytes(text.encode("utf-8-sig"))
    assert main(["train-head", "--features", str(store / "f"), "--task", "multiclass", "--labels",
                 str(tmp_path / "bom.csv"), "--folds", "2", "--out", str(tmp_path / "h")]) == 0
    rep = json.loads((tmp_path / "h" / "cv_report.json").read_text())
    assert rep["n_rows"] == len(rows) and sorted(rep["classes"]) == ["spot", "streak"]
    (tmp_path / "cp.csv").write_bytes(("path,label\n" + "".join(f"{p},défaut_{lab}\n" for p, lab in rows))
                                      .encode("cp1252"))
    with pytest.raises(BadInputError, match="not UTF-8") as e:
        from uninet_feat.clusters import read_path_table
        read_path_table(tmp_path / "cp.csv", "label", "labels CSV")
    assert "cp.csv" in str(e.value) and "CSV UTF-8" in str(e.value)


def test_a_path_listed_twice_with_two_labels_is_refused(store, tmp_path, capsys):
    from uninet_feat.cli import main
    rows = _named_labels(store, tmp_path)
    p0 = rows[0][0]
    lines = [f"{p},{lab}" for p, lab in rows] + [f"{p0},hole"]
    (tmp_path / "twice.csv").write_text("path,label\n" + "\n".join(lines) + "\n")
    assert main(["train-head", "--features", str(store / "f"), "--task", "multiclass", "--labels",
                 str(tmp_path / "twice.csv"), "--folds", "2", "--out", str(tmp_path / "h")]) == 2
    err = capsys.readouterr().err
    assert f"line {len(rows) + 2}" in err and "line 2" in err and "fix:" in err, err
    same = [f"{p},{lab}" for p, lab in rows] + [f"{p0},{rows[0][1]}"]   # the same label twice: harmless
    (tmp_path / "same.csv").write_text("path,label\n" + "\n".join(same) + "\n")
    assert main(["train-head", "--features", str(store / "f"), "--task", "multiclass", "--labels",
                 str(tmp_path / "same.csv"), "--folds", "2", "--out", str(tmp_path / "h2")]) == 0


def test_flagged_paths_through_a_symlinked_folder_match_the_store(store, tmp_path):
    """predict run on the batch through a link (/data -> /mnt/disk/data, a mounted share) writes other absolute
    paths than extract run on the real folder: the same files, matched by where they really are."""
    from uninet_feat.cli import main
    items = json.loads((store / "f" / "manifest.json").read_text())["items"]
    paths = sorted({it["path"] for it in items})
    data = store / "data"
    (tmp_path / "link").symlink_to(data, target_is_directory=True)
    flagged = paths[::2]
    with open(tmp_path / "predictions.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "flagged"])
        w.writeheader()
        w.writerows({"path": str(tmp_path / "link" / Path(p).relative_to(data)), "flagged": p in flagged}
                    for p in paths)
    out = tmp_path / "c"
    assert main(["cluster", "--features", str(store / "f"), "--flagged", str(tmp_path / "predictions.csv"),
                 "--k", "2", "--no-sheet", "--out", str(out)]) == 0
    got = sorted(r["path"] for r in csv.DictReader(open(out / "clusters.csv")))
    assert got == flagged   # the store's own paths
    rows = _named_labels(store, tmp_path)
    named = [{"path": str(tmp_path / "link" / Path(p).relative_to(data)), "label": lab} for p, lab in rows]
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label"])
        w.writeheader()
        w.writerows(named)
    assert main(["train-head", "--features", str(store / "f"), "--task", "multiclass", "--labels",
                 str(tmp_path / "labels.csv"), "--folds", "2", "--out", str(tmp_path / "h")]) == 0


def test_named_defect_types_with_the_default_binary_task_are_refused(store, tmp_path, capsys):
    """`train-head --labels types.csv` without --task (binary: normal vs defect) on two named defect types made a
    'binary' head of spot vs streak that was not a defect-type head, so predict gave every normal image a defect
    type."""
    from uninet_feat.cli import main
    rows = _named_labels(store, tmp_path)
    (tmp_path / "types.csv").write_text("path,label\n" + "".join(f"{p},{lab}\n" for p, lab in rows))
    assert main(["train-head", "--features", str(store / "f"), "--labels", str(tmp_path / "types.csv"),
                 "--folds", "2", "--out", str(tmp_path / "h")]) == 2
    err = capsys.readouterr().err
    assert "no normal" in err and "--task multiclass" in err, err
    items = json.loads((store / "f" / "manifest.json").read_text())["items"]
    both = [(it["path"], "good" if it["is_normal"] else "defect") for it in items]   # normal vs defect: binary
    (tmp_path / "nd.csv").write_text("path,label\n" + "".join(f"{p},{lab}\n" for p, lab in both))
    assert main(["train-head", "--features", str(store / "f"), "--labels", str(tmp_path / "nd.csv"),
                 "--folds", "2", "--out", str(tmp_path / "hb")]) == 0
    rep = json.loads((tmp_path / "hb" / "cv_report.json").read_text())
    assert rep["task"] == "binary" and rep["defects_only"] is False


def test_defects_only_leaves_out_the_rows_labels_name_normal(store, tmp_path):
    from uninet_feat.cli import main
    items = json.loads((store / "f" / "manifest.json").read_text())["items"]
    rows = [(it["path"], "good" if it["is_normal"] else it["label"]) for it in items]
    (tmp_path / "all.csv").write_text("path,label\n" + "".join(f"{p},{lab}\n" for p, lab in rows))
    assert main(["train-head", "--features", str(store / "f"), "--task", "multiclass", "--defects-only",
                 "--labels", str(tmp_path / "all.csv"), "--folds", "2", "--out", str(tmp_path / "h")]) == 0
    rep = json.loads((tmp_path / "h" / "cv_report.json").read_text())
    assert sorted(rep["classes"]) == ["spot", "streak"] and rep["n_rows"] == 12
    # one normal row among named defect types (below min_class): dropped, said, and the head stays defects-only, so
    # predict types flagged images alone (it typed every image; an audit, session 52)
    defects = [(p, lab) for p, lab in rows if lab != "good"]
    normal = next(p for p, lab in rows if lab == "good")
    (tmp_path / "one_good.csv").write_text("path,label\n" + "".join(f"{p},{lab}\n" for p, lab in defects)
                                           + f"{normal},good\n")
    with pytest.warns(UserWarning, match=r"left out of the head: good \(1\)"):
        assert main(["train-head", "--features", str(store / "f"), "--task", "multiclass",
                     "--labels", str(tmp_path / "one_good.csv"), "--folds", "2", "--out", str(tmp_path / "h1")]) == 0
    rep = json.loads((tmp_path / "h1" / "cv_report.json").read_text())
    assert rep["dropped_rare_classes"] == ["good"] and rep["defects_only"] is True
    assert json.loads((tmp_path / "h1" / "head.json").read_text())["source"]["defects_only"] is True
    import os   # `--head .` from inside the head's folder: its columns were named `_prediction` (an empty name)
    here = os.getcwd()
    try:
        os.chdir(tmp_path / "h1")
        assert main(["predict", "--run", str(store / "run"), "--data", str(store / "data"), "--head", ".",
                     "--no-overlays", "--quiet", "--out", str(tmp_path / "p")]) == 0
    finally:
        os.chdir(here)
    head_cols = [c for c in open(tmp_path / "p" / "predictions.csv").readline().strip().split(",") if "prediction" in c]
    assert head_cols == ["h1_prediction"]


def test_fewer_distinct_images_than_k_is_named_not_an_index_error():
    """Duplicate images (one file copied under two names) give identical rows: k-means then leaves a cluster empty,
    which crashed the renumbering with an IndexError; auto never picks such a k."""
    import warnings
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 5))
    X = a[[0, 0, 0, 0, 1, 1, 1, 1, 2, 2]]   # 3 distinct rows
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(BadInputError, match="3 distinct"):
            cluster_vectors(X, k=4)
        res = cluster_vectors(X)
    assert res.k == 3 and max(res.silhouettes) <= 3 and [len(e) for e in res.exemplars] == [4, 4, 2]
    assert res.labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]


def test_the_sheet_shows_a_16_bit_image_and_a_strips_top_tile(tmp_path):
    """A 16-bit grey image (an industrial camera's) was converted by PIL's RGB conversion, which clips at 255: an
    all-white thumbnail. A tiled strip's thumbnail is its top tile, the hot region's box drawn in it."""
    import base64
    import io
    from PIL import Image
    from uninet_feat.clusters import _thumb
    ramp = np.tile(np.linspace(0, 65535, 256), (64, 1)).astype(np.uint16)   # dark left, bright right
    Image.fromarray(ramp).save(tmp_path / "g16.png")

    def decoded(uri):
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"))

    a = decoded(_thumb({"path": str(tmp_path / "g16.png")}, None, {}))
    assert a.shape[1] == 180 and a[:, :20].mean() < 40 and a[:, -20:].mean() > 215   # the ramp, not white
    strip = np.zeros((64, 1024, 3), np.uint8)
    strip[:, 512:576] = 200   # the top tile (x 512..575) is bright, the rest dark
    Image.fromarray(strip).save(tmp_path / "strip.png")
    spot = {"hot_cy": 0.5, "hot_cx": 0.5, "hot_bbox_h": 0.25, "hot_bbox_w": 0.25}
    t = decoded(_thumb({"path": str(tmp_path / "strip.png")}, (0, 512, 64, 64), spot))
    assert t.shape[:2] == (64, 64) and (t.astype(int) == [90, 200, 255]).all(-1).any()   # the box is drawn
    plain = t[(t.astype(int) != [90, 200, 255]).any(-1)]
    assert plain.mean() > 150   # inside the bright tile


def test_a_rerun_keeps_named_labels_and_leaves_no_stale_sheet(store, tmp_path, capsys):
    """Clustering again into the same --out (another --k) overwrote the labels.csv the engineer had named, and with
    --no-sheet left the previous run's sheet.html beside the new clusters.csv, showing other clusters."""
    from uninet_feat.cli import main
    out = tmp_path / "c"
    base = ["cluster", "--features", str(store / "f"), "--out", str(out)]
    assert main(base + ["--k", "2"]) == 0
    assert (out / "sheet.html").exists()
    assert main(base + ["--k", "3", "--no-sheet"]) == 0   # labels.csv untouched by a person: rewritten
    assert not (out / "sheet.html").exists()
    assert {r["label"] for r in csv.DictReader(open(out / "labels.csv"))} == {"cluster_0", "cluster_1", "cluster_2"}
    text = (out / "labels.csv").read_text().replace("cluster_0", "hole")   # named
    (out / "labels.csv").write_text(text)
    capsys.readouterr()
    assert main(base + ["--k", "2"]) == 2
    err = capsys.readouterr().err
    assert "labels.csv" in err and "named" in err and "fix:" in err, err
    assert (out / "labels.csv").read_text() == text


def test_cluster_flags_are_checked_by_the_parser(store, tmp_path, capsys):
    """--columns offered 'contrast', which cluster then refused as unknown; --k three was a ValueError traceback."""
    from uninet_feat.cli import build_parser, main
    help_text = build_parser()._subparsers._group_actions[0].choices["cluster"].format_help()
    assert "contrast" not in help_text
    for bad in (["--columns", "contrast"], ["--k", "three"], ["--k", "1"]):
        with pytest.raises(SystemExit) as e:
            main(["cluster", "--features", str(store / "f"), "--out", str(tmp_path / "c")] + bad)
        assert e.value.code == 2
    assert main(["cluster", "--features", str(store / "f"), "--k", "AUTO", "--no-sheet",
                 "--out", str(tmp_path / "c")]) == 0


def test_group_clusters_one_products_images_and_several_groups_are_warned(store, tmp_path, capsys):
    import shutil
    from uninet_feat.cli import main
    f = tmp_path / "f"
    shutil.copytree(store / "f", f)
    m = json.loads((f / "manifest.json").read_text())
    for it in m["items"]:
        it["group"] = "a" if it["label"] == "spot" or "000" in it["path"] else "b"
    (f / "manifest.json").write_text(json.dumps(m))
    with pytest.warns(UserWarning, match="of 2 groups"):
        assert main(["cluster", "--features", str(f), "--k", "2", "--no-sheet", "--out", str(tmp_path / "all")]) == 0
    assert main(["cluster", "--features", str(f), "--group", "a", "--k", "2", "--no-sheet",
                 "--out", str(tmp_path / "a")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "a" / "clusters.csv")))
    want = {it["path"] for it in m["items"] if it["group"] == "a" and not it["is_normal"]}
    assert {r["path"] for r in rows} == want and {r["group"] for r in rows} == {"a"} and len(want) >= 6
    assert json.loads((tmp_path / "a" / "clusters.json").read_text())["settings"]["group"] == "a"
    assert main(["cluster", "--features", str(f), "--group", "z", "--out", str(tmp_path / "z")]) == 2
    assert "none of the 12 images to cluster is of group 'z'" in capsys.readouterr().err


def test_extract_batch_leaves_out_a_predict_output_folder_inside_the_batch(store, tmp_path):
    """predict --out inside the batch folder writes overlays and masks there; extracting the batch afterwards must
    not take them for images of the batch (predict leaves out its own --out alike)."""
    import shutil
    from uninet_feat.cli import main
    batch = tmp_path / "batch"
    batch.mkdir()
    for p in sorted((store / "data" / "test" / "spot").glob("*.png"))[:4]:
        shutil.copy(p, batch / p.name)
    assert main(["predict", "--run", str(store / "run"), "--data", str(batch), "--threshold=-1e9", "--save-maps",
                 "--out", str(batch / "pred"), "--quiet"]) == 0
    assert len(list((batch / "pred").rglob("*.png"))) >= 4   # overlays and masks now lie in the batch folder
    with pytest.warns(UserWarning, match="predict output folder"):
        assert main(["extract", "--run", str(store / "run"), "--data", str(batch), "--batch", "--out",
                     str(tmp_path / "f"), "--quiet"]) == 0
    items = json.loads((tmp_path / "f" / "manifest.json").read_text())["items"]
    assert sorted(Path(it["path"]).name for it in items) == sorted(p.name for p in batch.glob("*.png"))


def test_labels_that_differ_only_in_case_are_warned(store, tmp_path):
    from uninet_feat.workflows import train_head_cmd
    items = json.loads((store / "f" / "manifest.json").read_text())["items"]
    rows = [it for it in items if not it["is_normal"]]
    with open(tmp_path / "named.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label"])
        w.writeheader()
        streaks = [it["path"] for it in rows if it["label"] == "streak"]
        for it in rows:   # two streaks named "Streak" by a second engineer
            w.writerow({"path": it["path"], "label": "Streak" if it["path"] in streaks[:2] else it["label"]})
    with pytest.warns(UserWarning, match="differ only in case or spaces"):
        rep = train_head_cmd(store / "f", tmp_path / "h", task="multiclass", folds=2, labels=tmp_path / "named.csv",
                             min_class=1)
    assert "spot" in rep["classes"]


def test_images_with_nan_features_are_left_out_named_not_the_whole_run_stopped(store, tmp_path, capsys):
    """One image whose vector holds NaN (a damaged file, a NaN in the model) stopped `cluster` for every image; it
    is left out with a warning naming it, and listed in clusters.json. All of them non-finite: refused."""
    import shutil
    from uninet_feat import featstore
    from uninet_feat.cli import main
    f = tmp_path / "f"
    shutil.copytree(store / "f", f)
    m = json.loads((f / "manifest.json").read_text())
    size = m["settings"]["shard_size"]
    defects = [j for j, it in enumerate(m["items"]) if not it["is_normal"]]

    def poison(rows, value):
        for i in sorted({j // size for j in rows}):
            with np.load(f / featstore.shard_name(i)) as z:
                arrays = {k: z[k] for k in z.files}
            for j in rows:
                if j // size == i:
                    arrays["vectors"][j % size, 5:] = value
            featstore.write_shard(f, i, arrays)

    bad = [m["items"][j]["path"] for j in defects[:2]]
    poison(defects[:1], np.nan)
    poison(defects[1:2], np.inf)
    with pytest.warns(UserWarning, match=r"2 of 12 images to cluster have NaN or infinite") as got:
        assert main(["cluster", "--features", str(f), "--k", "2", "--no-sheet", "--out", str(tmp_path / "c")]) == 0
    said = next(str(w.message) for w in got if "NaN or infinite" in str(w.message))
    assert all(p in said for p in bad) and "re-extract" in said, said
    summary = json.loads((tmp_path / "c" / "clusters.json").read_text())
    assert summary["left_out_nonfinite"] == bad and summary["n_images"] == 10
    rows = list(csv.DictReader(open(tmp_path / "c" / "clusters.csv")))
    assert len(rows) == 10 and not set(bad) & {r["path"] for r in rows}
    poison(defects, np.nan)
    capsys.readouterr()
    assert main(["cluster", "--features", str(f), "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "every one of the 12 images to cluster" in err and "fix:" in err, err


def _cluster_flagged_as(store, tmp_path, spell, warned):
    """Cluster every other image of ``store`` from a predictions.csv whose paths are written ``spell(path)`` (as
    another machine wrote them): (the flagged paths, the warnings that say ``warned``)."""
    import warnings
    from uninet_feat.cli import main
    items = json.loads((store / "f" / "manifest.json").read_text())["items"]
    paths = sorted({it["path"] for it in items})
    flagged = paths[::2]
    with open(tmp_path / "predictions.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "flagged"])
        w.writeheader()
        w.writerows({"path": spell(p), "flagged": p in flagged} for p in paths)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main(["cluster", "--features", str(store / "f"), "--flagged", str(tmp_path / "predictions.csv"),
                     "--k", "2", "--no-sheet", "--out", str(tmp_path / "c")]) == 0
    return flagged, [str(w.message) for w in seen if warned in str(w.message)]


def test_a_csv_written_on_windows_with_backslash_paths_matches_the_store(store, tmp_path, monkeypatch):
    """A predictions or labels CSV saved on Windows holds `data\\test\\spot\\000.png`, which names no folder here:
    none of its paths matched the store's. Such a path is matched with its backslashes read as /, said once."""
    from uninet_feat.cli import main
    monkeypatch.chdir(store)   # the CSV's paths are relative to the working folder

    def win(p):
        return str(Path(p).relative_to(store)).replace("/", "\\")

    flagged, said = _cluster_flagged_as(store, tmp_path, win, "backslashes read as /")
    assert len(said) == 1 and f"{len(flagged)} path(s) in {tmp_path / 'predictions.csv'}" in said[0], said
    assert sorted(r["path"] for r in csv.DictReader(open(tmp_path / "c" / "clusters.csv"))) == flagged
    rows = _named_labels(store, tmp_path)
    twice = [(win(p), lab) for p, lab in rows] + [(rows[0][0], "hole")]   # one image by both spellings
    (tmp_path / "labels.csv").write_text("path,label\n" + "".join(f"{p},{lab}\n" for p, lab in twice[:-1]))
    with pytest.warns(UserWarning, match="backslashes read as /"):
        assert main(["train-head", "--features", str(store / "f"), "--task", "multiclass", "--labels",
                     str(tmp_path / "labels.csv"), "--folds", "2", "--out", str(tmp_path / "h")]) == 0
    assert json.loads((tmp_path / "h" / "cv_report.json").read_text())["n_rows"] == len(rows)
    (tmp_path / "twice.csv").write_text("path,label\n" + "".join(f"{p},{lab}\n" for p, lab in twice))
    from uninet_feat.clusters import read_path_table
    with pytest.raises(BadInputError, match=f"line {len(twice) + 1}: .* and .* on line 2"):
        read_path_table(tmp_path / "twice.csv", "label", "labels CSV")


def test_windows_absolute_paths_match_the_store_by_their_path_below_its_folder(store, tmp_path, capsys):
    """predict run on Windows writes `C:\\lines\\data\\test\\spot\\000.png`: on Linux that was read as a file name
    below the working folder and matched nothing, so `cluster --flagged` found none of the flagged images. Such a
    path is matched by its path below the store's folder (`test/spot/000.png`), said once; one that still matches
    nothing is refused by `train-head --labels` naming the Windows path and the fix (relative paths)."""
    from uninet_feat.cli import main

    def win(p):
        return "C:\\lines\\" + str(Path(p).relative_to(store)).replace("/", "\\")

    flagged, said = _cluster_flagged_as(store, tmp_path, win, "Windows absolute path")
    assert len(said) == 1 and f"{len(flagged)} Windows absolute path(s)" in said[0], said
    assert f"below the feature store's folder {store / 'data'}" in said[0]
    assert sorted(r["path"] for r in csv.DictReader(open(tmp_path / "c" / "clusters.csv"))) == flagged
    rows = _named_labels(store, tmp_path)
    (tmp_path / "labels.csv").write_text("path,label\n" + "".join(f"{win(p)},{lab}\n" for p, lab in rows))
    assert main(["train-head", "--features", str(store / "f"), "--task", "multiclass", "--labels",
                 str(tmp_path / "labels.csv"), "--folds", "2", "--out", str(tmp_path / "h")]) == 0
    assert json.loads((tmp_path / "h" / "cv_report.json").read_text())["n_rows"] == len(rows)
    gone = "C:\\lines\\data\\test\\spot\\999.png"   # an image the store does not hold
    (tmp_path / "gone.csv").write_text("path,label\n" + "".join(f"{win(p)},{lab}\n" for p, lab in rows)
                                       + f"{gone},spot\n")
    capsys.readouterr()
    assert main(["train-head", "--features", str(store / "f"), "--task", "multiclass", "--labels",
                 str(tmp_path / "gone.csv"), "--folds", "2", "--out", str(tmp_path / "h2")]) == 2
    err = capsys.readouterr().err
    assert gone in err and "Windows absolute paths" in err and "relative to the data folder" in err, err


def test_a_file_whose_name_holds_a_backslash_is_not_taken_for_another_file(tmp_path, monkeypatch):
    """On Linux `a\\b.png` can be a file of its own beside `a/b.png`. Reading backslashes as / is for a path that
    names no file here (a CSV written on Windows); it merged two files listed in one CSV (refused as one image
    listed twice with two labels, or one of them silently dropped) and matched an existing file outside the store
    to another image of it."""
    import warnings
    from uninet_feat.clusters import read_path_table, store_rows
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "b.png").write_bytes(b"x")
    (tmp_path / "a\\b.png").write_bytes(b"y")   # another file, its name holding a backslash
    (tmp_path / "two.csv").write_text("path,label\na\\b.png,spot\na/b.png,hole\n")
    table = read_path_table(tmp_path / "two.csv", "label", "labels CSV")
    assert table == {str(tmp_path / "a\\b.png"): "spot", str(tmp_path / "a" / "b.png"): "hole"}
    recs = [{"path": str(tmp_path / "a" / "b.png")}]   # a store of a/b.png alone
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert store_rows([str(tmp_path / "a\\b.png")], recs) == ({}, [str(tmp_path / "a\\b.png")])
    with pytest.warns(UserWarning, match="backslashes read as /"):   # a path naming no file here still matches
        assert store_rows([str(tmp_path / "c\\..\\a\\b.png")], recs)[0] == {str(tmp_path / "c\\..\\a\\b.png"): 0}


def test_windows_absolute_paths_in_a_tie_of_folders_match_the_same_images_in_every_process():
    """Two Windows paths matched below two folders, one inside the other (``C:\\lines\\batch`` by ``day1/a.png``,
    ``C:\\lines\\batch\\day3`` by ``a.png``): no folder holds most, and the one kept was the first of a set of
    strings, so it changed with the process's hash seed (half the time day3\\a.png was taken for the store's a.png
    and day1\\a.png was dropped). The outer folder wins a tie: its paths match more of the store's path."""
    import os
    import subprocess
    import sys
    code = ("from uninet_feat.clusters import _by_path_below_root as f; "
            "print(sorted(f([r'C:\\lines\\batch\\day1\\a.png', r'C:\\lines\\batch\\day3\\a.png'], "
            "[{'path': '/d/batch/day1/a.png'}, {'path': '/d/batch/a.png'}])[0].items()))")
    root = str(Path(__file__).resolve().parents[1])
    seen = set()
    for seed in range(8):
        env = {**os.environ, "PYTHONHASHSEED": str(seed), "PYTHONPATH": root}
        seen.add(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                check=True).stdout.strip())
    assert seen == {"[('C:\\\\lines\\\\batch\\\\day1\\\\a.png', 0)]"}, seen


def test_a_cluster_run_killed_while_its_sheet_is_made_leaves_no_old_sheet_beside_new_labels(store, tmp_path,
                                                                                          monkeypatch):
    from uninet_feat import clusters
    from uninet_feat.cli import main
    out = tmp_path / "c"
    assert main(["cluster", "--features", str(store / "f"), "--out", str(out), "--k", "2"]) == 0
    assert (out / "sheet.html").exists() and (out / "clusters.json").exists()

    def killed(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(clusters, "contact_sheet", killed)
    assert main(["cluster", "--features", str(store / "f"), "--out", str(out), "--k", "3"]) == 130   # Ctrl-C
    labels = {r["label"] for r in csv.DictReader(open(out / "labels.csv"))}
    assert labels == {"cluster_0", "cluster_1", "cluster_2"}   # the new run's
    assert not (out / "sheet.html").exists()   # the 2-cluster sheet would have named them
    assert json.loads((out / "clusters.json").read_text())["k"] == 3


def test_fewer_distinct_points_after_the_pca_than_k_is_named_and_a_1d_input_is_told_apart():
    """Rows distinct in X but one point in the PCA space (k-means' space) left a cluster empty: IndexError. A 1-D
    input was called too few images ("5 image(s) to cluster; at least 4 are needed")."""
    c1, c3 = np.array([0, 0, 0, 0, 1, 1, 1, 1.]), np.array([0, 1, 2, 3, 0, 1, 2, 3.]) * 1e-3
    X = np.stack([c1, c1, c1, c1, c3], 1)   # the first component is c1's two values; c3's is dropped
    with pytest.raises(BadInputError, match="only 2 distinct points in the 1-dimensional PCA space"):
        cluster_vectors(X, k=3, n_components=1)
    assert cluster_vectors(X, k=3).k == 3   # kept with the second component
    assert cluster_vectors(X, n_components=1).k == 2
    with pytest.raises(BadInputError, match=r"2-D array .* shape \(5,\)"):
        cluster_vectors(np.arange(5.0))


def _drawn_box(rec, box, spot, *tile):
    """(thumbnail shape, the rows and columns where the box changed it: y0, y1, x0, x1)."""
    import base64
    import io
    from PIL import Image
    from uninet_feat.clusters import _thumb

    def decoded(uri):
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB")).astype(int)
    t, plain = decoded(_thumb(rec, box, spot, *tile)), decoded(_thumb(rec, box, {}, *tile))
    drawn = np.argwhere(np.abs(t - plain).max(-1) > 30)
    return t.shape[:2], drawn[:, 0].min(), drawn[:, 0].max(), drawn[:, 1].min(), drawn[:, 1].max()


def test_the_sheets_box_is_on_the_hot_spot_of_a_padded_tile(tmp_path):
    """A tile of an image smaller than the tile runs past the image (padded); extract measures the hot region on
    the image's part of the tile (`Extractor._unpadded_shapes`, since 200b549), so its fractions are of that part,
    but the sheet scaled them by the whole tile: the box fell below a 100 px tall strip, or was not drawn."""
    from PIL import Image
    strip = np.full((100, 600, 3), 128, np.uint8)
    strip[60:68, 380:388] = 255   # the spot, centre y 64, x 384
    Image.fromarray(strip).save(tmp_path / "strip.png")
    spot = {"hot_cy": 64 / 100, "hot_cx": 128 / 256, "hot_bbox_h": 8 / 100, "hot_bbox_w": 8 / 256}
    (h, w), y0, y1, x0, x1 = _drawn_box({"path": str(tmp_path / "strip.png")}, (0, 256, 256, 256), spot)
    s = w / 256   # the thumbnail's scale (the cropped 100 x 256 tile fitted into 180 px)
    assert (h, w) == (70, 180) and y0 <= 64 * s <= y1 and x0 <= 128 * s <= x1 and y1 - y0 < 10
    # one tile (image_table names no top tile) past a 100 x 200 image: the fractions are of the image, its part
    Image.fromarray(strip[:, 300:500]).save(tmp_path / "one.png")   # the spot at y 64, x 84
    spot = {"hot_cy": 64 / 100, "hot_cx": 84 / 200, "hot_bbox_h": 8 / 100, "hot_bbox_w": 8 / 200}
    (h, w), y0, y1, x0, x1 = _drawn_box({"path": str(tmp_path / "one.png")}, None, spot, 256)
    s = w / 200
    assert y0 <= 64 * s <= y1 and x0 <= 84 * s <= x1 and y1 - y0 < 10


def test_a_rerun_refuses_a_labels_csv_with_rows_deleted_or_clusters_merged(store, tmp_path, capsys):
    """Only a label other than cluster_N counted as named: rows deleted, or two clusters merged by renaming
    cluster_1 to cluster_0 (the sheet's own advice), were overwritten by the next run into the same --out."""
    from uninet_feat.cli import main
    out = tmp_path / "c"
    base = ["cluster", "--features", str(store / "f"), "--out", str(out), "--k", "3"]
    assert main(base) == 0
    written = (out / "labels.csv").read_text()
    lines = written.splitlines(keepends=True)
    for text in ("".join(lines[:-2]), written.replace(",cluster_1", ",cluster_0")):   # rows deleted; merged
        (out / "labels.csv").write_text(text)
        capsys.readouterr()
        assert main(base) == 2
        err = capsys.readouterr().err
        assert "labels.csv" in err and "edited" in err and "fix:" in err, err
        assert (out / "labels.csv").read_text() == text
    (out / "labels.csv").write_text(written)
    assert main(base) == 0                                   # as the last run wrote it: rewritten
    (out / "clusters.csv").unlink()                          # a run killed before clusters.csv: cluster_N only
    assert main(base) == 0 and (out / "clusters.csv").exists()


def test_a_path_that_ends_in_a_space_is_read_back_as_written(tmp_path, monkeypatch):
    """CSV values were stripped, path too: labels.csv naming "end.png " (a legal file name) matched no image."""
    from uninet_feat.clusters import read_path_table
    from uninet_feat.io import atomic_write_csv
    paths = [str(tmp_path / n) for n in ("end.png ", " lead.png", "plain.png")]
    for p in paths:
        open(p, "wb").close()
    atomic_write_csv(tmp_path / "labels.csv", [{"path": p, "label": f" cluster_{i} "} for i, p in enumerate(paths)])
    assert read_path_table(tmp_path / "labels.csv", "label", "labels CSV") == {
        p: f"cluster_{i}" for i, p in enumerate(paths)}                      # labels stripped, paths as written
    monkeypatch.chdir(tmp_path)
    (tmp_path / "typed.csv").write_text("path , label\nplain.png ,hole\n")   # a space typed before the comma
    assert read_path_table(tmp_path / "typed.csv", "label", "labels CSV") == {paths[2]: "hole"}


def test_the_sheet_shows_a_file_name_that_is_not_utf8_with_its_odd_byte_escaped(tmp_path):
    """A file name of bytes that are not UTF-8 (b"caf\\xe9.png", legal on Linux) stopped writing sheet.html with a
    UnicodeEncodeError."""
    import os
    from types import SimpleNamespace
    from uninet_feat.clusters import contact_sheet
    recs = [{"path": os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9.png"), "label": os.fsdecode(b"d\xe9faut"),
             "score": 0.5}]
    sheet = contact_sheet(recs, SimpleNamespace(k=1, exemplars=[[0]]), [], np.zeros((1, 0)))
    assert "caf\\xe9.png · d\\xe9faut" in sheet.encode("utf-8").decode("utf-8")


def test_a_csv_the_toolkit_wrote_with_a_file_name_not_utf8_reads_back(tmp_path, monkeypatch):
    """predict and cluster write a Linux file name's own bytes (b"caf\\xe9.png"); reading that CSV back was the
    "saved in another encoding" error, so cluster refused its own untouched labels.csv as edited on every re-run
    and `--flagged` / `--labels` refused the toolkit's own files. Such bytes are taken where they name a file here;
    elsewhere (a label, a path of no file) the CSV is still one saved in another encoding."""
    import os
    from uninet_feat.clusters import _keep_named_labels, read_path_table
    from uninet_feat.io import atomic_write_csv
    monkeypatch.chdir(tmp_path)
    odd = os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9.png")
    Path(odd).write_bytes(b"x")
    atomic_write_csv(tmp_path / "types" / "clusters.csv", [{"path": odd, "cluster": 1}, {"path": "a.png", "cluster": 0}])
    atomic_write_csv(tmp_path / "types" / "labels.csv", [{"path": odd, "label": "cluster_1"},
                                                         {"path": "a.png", "label": "cluster_0"}])
    assert read_path_table(tmp_path / "types" / "labels.csv", "label", "labels CSV") == {
        odd: "cluster_1", str(tmp_path / "a.png"): "cluster_0"}
    _keep_named_labels(tmp_path / "types" / "labels.csv")   # untouched: no refusal
    for rows, where in (([{"path": odd, "label": "d\udce9faut"}], "a label"),
                        ([{"path": odd + "x", "label": "hole"}], "a path of no file")):
        atomic_write_csv(tmp_path / "bad.csv", [{"path": "a.png", "label": "ok"}] + rows)
        with pytest.raises(BadInputError, match=r"line 3 is not UTF-8 \(byte 0xe9\)"):
            read_path_table(tmp_path / "bad.csv", "label", "labels CSV")


def test_the_same_images_in_a_store_of_another_order_give_the_same_clusters(store, tmp_path):
    """k-means++ starts and the renumbering's ties follow the rows' order, which is the store's (a CSV manifest's
    row order, a merged store's): the same images under one seed gave other clusters (an audit, session 53). The
    rows are clustered in path order."""
    import shutil
    from uninet_feat.cli import main
    src = store / "f"
    f = tmp_path / "f"
    shutil.copytree(src, f)
    m = json.loads((f / "manifest.json").read_text())   # the same store, its rows reversed in one shard
    n = len(m["items"])
    order = np.arange(n)[::-1]
    m["items"] = [m["items"][i] for i in order]
    m["n_shards"], m["settings"]["shard_size"] = 1, n
    for q in f.glob("shard-*.npz"):
        q.unlink()
    from uninet_feat import featstore
    with np.load(src / featstore.shard_name(0)) as z:
        keys = [k for k in z.files if k != featstore.SHARD_FP]
    cols = {k: np.concatenate([np.load(q)[k] for q in sorted(src.glob("shard-*.npz"))])[order] for k in keys}
    featstore.write_shard(f, 0, cols, fingerprint=m["fingerprint"])
    (f / "manifest.json").write_text(json.dumps(m))
    got = {}
    for name, feats in (("a", src), ("b", f)):
        assert main(["cluster", "--features", str(feats), "--k", "3", "--no-sheet", "--out", str(tmp_path / name)]) == 0
        got[name] = {r["path"]: r["cluster"] for r in csv.DictReader(open(tmp_path / name / "clusters.csv"))}
    assert got["a"] == got["b"] and len(got["a"]) == 12
