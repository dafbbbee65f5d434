"""Atomic writes leave files with the permissions a plain open() would, not mkstemp's 0600."""
import os
import stat

import pytest

from uninet_feat.io import atomic_write_bytes, atomic_write_text

from _tiny import register_tiny, write_texture_set

register_tiny()


@pytest.fixture
def umask():
    """Set a umask for the test and restore the caller's afterwards."""
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


def _mode(p):
    return stat.S_IMODE(os.stat(p).st_mode)


@pytest.mark.parametrize("mask,expected", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_new_file_gets_0666_minus_umask(tmp_path, umask, mask, expected):
    umask(mask)
    assert _mode(atomic_write_text(tmp_path / "a.json", "{}")) == expected
    assert _mode(atomic_write_bytes(tmp_path / "sub" / "b.bin", b"x")) == expected


def test_rewrite_keeps_the_existing_files_mode(tmp_path, umask):
    p = tmp_path / "kept.txt"
    p.write_text("old")
    os.chmod(p, 0o640)
    atomic_write_text(p, "new")
    assert p.read_text() == "new" and _mode(p) == 0o640


def test_run_outputs_are_readable_by_others_under_umask_022(tmp_path, umask):
    """model.pt, checkpoint.pt, config.yaml, the log, calibration.json and a feature shard: all 0644."""
    from uninet_feat.config import load_config
    from uninet_feat.train import train
    from uninet_feat.workflows import extract_cmd
    data = write_texture_set(tmp_path / "d", n_train=6, n_good=2, n_bad=2)
    run = tmp_path / "run"
    train(load_config(None, {"data": str(data), "backbone": "tiny", "weights": "random", "image_size": 64,
                             "batch_size": 4, "epochs": 1, "val_fraction": 0.3, "threads": 1}), run, quiet=True)
    extract_cmd(str(data), tmp_path / "feat", run=str(run), quiet=True)
    files = [p for d in (run, tmp_path / "feat") for p in d.rglob("*") if p.is_file()]
    assert {"model.pt", "checkpoint.pt", "config.yaml", "calibration.json", "shard-00000.npz"} <= {p.name for p in files}
    assert {p.name: oct(_mode(p)) for p in files if _mode(p) != 0o644} == {}


def test_text_outputs_are_utf8_with_their_own_line_ends_under_any_locale(tmp_path, monkeypatch):
    """Text outputs were written in the locale's encoding: under a non-UTF-8 one (Windows' cp1252, a C locale) the
    HTML report ("·", "≤") died with UnicodeEncodeError after all the scoring, and predictions.csv on an image name
    outside it; Windows' newline translation also made the CSV writer's \\r\\n into \\r\\r\\n."""
    import subprocess
    import sys
    code = ("import sys; from uninet_feat.io import atomic_write_csv; from uninet_feat.report import write_report\n"
            "atomic_write_csv(sys.argv[1], [{'path': '/d/d\\u00e9faut_\\u7f3a\\u9677.png', 'wdm_score': 1.0}])\n"
            "write_report(sys.argv[2], {'aupro': 0.5}, [{'path': '/d/a.png', 'label': 'good', 'score': 0.1}])\n")
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": "utf-8"}
    r = subprocess.run([sys.executable, "-X", "utf8=0", "-c", code, str(tmp_path / "p.csv"), str(tmp_path / "r.html")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "défaut_缺陷" in (tmp_path / "p.csv").read_bytes().decode("utf-8")
    assert "≤" in (tmp_path / "r.html").read_text(encoding="utf-8")
    import _pyio   # open() as on Windows: "\n" written as os.linesep
    import uninet_feat.io as uio
    from uninet_feat.io import atomic_write_csv
    monkeypatch.setattr(os, "linesep", "\r\n")
    monkeypatch.setattr(uio, "open", _pyio.open, raising=False)
    atomic_write_csv(tmp_path / "w.csv", [{"path": "a.png", "wdm_score": 1.0}])
    assert (tmp_path / "w.csv").read_bytes() == b"path,wdm_score\r\na.png,1.0\r\n"
    atomic_write_text(tmp_path / "w.json", '{\n "a": 1\n}')
    assert (tmp_path / "w.json").read_bytes() == b'{\n "a": 1\n}'
