"""What a command leaves beside its outputs (config.yaml, env.json, model.pt's bytes) says how they were made: a
killed command's records are its own, a sharded store's re-runs as the store, a retrained run is the same file."""
import hashlib
import json

import pytest
import yaml

from uninet_feat.cli import main

from _tiny import register_tiny, tiny_train_args, write_texture_set

register_tiny()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("rec")
    data = write_texture_set(root / "d", n_train=8, n_good=2, n_bad=2, size=32)
    assert main(tiny_train_args(data) + ["--image-size", "32", "--val-fraction", "0.3", "--out",
                                         str(root / "run")]) == 0
    return data, root / "run"


def test_a_predict_stopped_after_its_first_output_leaves_its_own_records_and_a_refused_one_the_old(run, tmp_path,
                                                                                                   monkeypatch):
    """config.yaml and env.json were written after the command returned: a predict stopped while writing overlays
    left its new predictions.csv beside the previous predict's config.yaml (another --data and threshold)."""
    data, r = run
    out = tmp_path / "p"
    assert main(["predict", "--run", str(r), "--data", str(data / "test" / "good"), "--out", str(out), "--quiet",
                 "--threshold", "1e9"]) == 0

    def stopped(*a, **k):
        raise KeyboardInterrupt("killed")
    monkeypatch.setattr("uninet_feat.predict._write_overlays", stopped)
    assert main(["predict", "--run", str(r), "--data", str(data / "test"), "--out", str(out), "--quiet",
                 "--threshold", "0"]) == 130   # stopped (Ctrl-C's code)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["threshold"] == 0 and cfg["data"] == str((data / "test").resolve())
    assert (out / "predictions.csv").is_file()   # its own rows; no summary.json, the mark of a finished predict
    assert not (out / "summary.json").exists()    # (written before the overlays until session 53)
    before = (out / "config.yaml").read_text()   # refused before any output: the folder's records stay
    assert main(["predict", "--run", str(r), "--data", str(tmp_path / "none"), "--out", str(out), "--quiet"]) == 2
    assert (out / "config.yaml").read_text() == before


def test_a_sharded_stores_record_is_the_stores_and_an_index_states_its_bank(run, tmp_path):
    """Each `extract --shard i/n` job wrote its own shard into the store's config.yaml, so `--config` of it re-ran
    one job's shards (an incomplete store); index recorded coreset and k as null."""
    data, r = run
    feats = tmp_path / "f"
    for shard in ("1/2", "0/2"):
        assert main(["extract", "--run", str(r), "--data", str(data), "--patches", "--shard", shard,
                     "--shard-size", "3", "--out", str(feats), "--quiet"]) == 0
    assert yaml.safe_load((feats / "config.yaml").read_text())["shard"] == "0/1"
    again = tmp_path / "g"
    assert main(["extract", "--config", str(feats / "config.yaml"), "--out", str(again)]) == 0
    assert (again / "complete").exists() or json.loads((again / "manifest.json").read_text()).get("complete")
    assert sorted(p.name for p in again.glob("shard-*")) == sorted(p.name for p in feats.glob("shard-*"))
    assert main(["index", "--features", str(feats), "--out", str(tmp_path / "k")]) == 0
    cfg = yaml.safe_load((tmp_path / "k" / "config.yaml").read_text())
    knn = json.loads((tmp_path / "k" / "knn.json").read_text())
    assert (cfg["coreset"], cfg["k"]) == (knn["coreset_ratio"], knn["k"]) == (0.1, 1)
    env = json.loads((tmp_path / "k" / "env.json").read_text())   # the libraries behind the results, by version
    assert {"faiss-cpu", "lightgbm", "scikit-learn", "Pillow"} <= set(env["packages"])


def test_a_run_trained_again_from_its_config_is_the_same_model_file(run, tmp_path):
    """The same weights and config gave another model.pt: the first run's config shared string objects (pickled as
    back-references) and kept its own key order, so an index or head of the first run refused the second."""
    data, r = run
    again = tmp_path / "again"
    assert main(["train", "--config", str(r / "config.yaml"), "--out", str(again), "--quiet"]) == 0

    def sha(p):
        return hashlib.sha256(p.read_bytes()).hexdigest()
    assert sha(again / "model.pt") == sha(r / "model.pt")


def test_a_command_writes_its_records_once(run, tmp_path, monkeypatch):
    """The records came first (before the first output) and were written again when the command returned: twice the
    package-version lookups of env.json per command. Once now; a command that wrote nothing there still gets them."""
    import uninet_feat.cli as cli
    data, r = run
    calls = []
    real = cli._save_command_config
    monkeypatch.setattr(cli, "_save_command_config", lambda args: (calls.append(args.command), real(args)))
    out = tmp_path / "p"
    assert main(["predict", "--run", str(r), "--data", str(data / "test" / "good"), "--out", str(out), "--quiet"]) == 0
    assert calls == ["predict"] and (out / "config.yaml").is_file() and (out / "env.json").is_file()
    monkeypatch.setattr(cli, "_dispatch", lambda args: 0)   # a command that returns without writing anything there
    empty = tmp_path / "e"
    assert main(["predict", "--run", str(r), "--data", str(data / "test" / "good"), "--out", str(empty), "--quiet"]) == 0
    assert calls == ["predict", "predict"] and yaml.safe_load((empty / "config.yaml").read_text())["command"] == "predict"


def test_a_command_stopped_while_its_environment_is_read_leaves_the_earlier_records_whole(run, tmp_path,
                                                                                          monkeypatch):
    """config.yaml was written, then the environment read (importing timm: ~2 s in a command that never loaded it),
    then env.json: a kill in between left this command's config.yaml beside the earlier outputs and env.json (an
    audit, session 53). The environment is now read first and the two files written back to back."""
    data, r = run
    out = tmp_path / "p"
    assert main(["predict", "--run", str(r), "--data", str(data / "test" / "good"), "--out", str(out), "--quiet",
                 "--threshold", "1e9"]) == 0
    before = {n: (out / n).read_text() for n in ("config.yaml", "env.json")}

    def stopped(*a, **k):
        raise KeyboardInterrupt("killed")
    monkeypatch.setattr("uninet_feat.config.environment", stopped)
    assert main(["predict", "--run", str(r), "--data", str(data / "test"), "--out", str(out), "--quiet",
                 "--threshold", "0"]) == 130
    assert {n: (out / n).read_text() for n in ("config.yaml", "env.json")} == before
