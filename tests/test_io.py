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


def test_a_process_refused_the_lock_leaves_the_holders_folder(tmp_path, monkeypatch):
    """A process that made the folder and was then refused the lock (another took it in between) removed the
    holder's folder and its .lock in its cleanup: a third process then took a new lock while the holder wrote."""
    import fcntl

    import uninet_feat.io as uio
    from uninet_feat.errors import BadInputError
    from uninet_feat.io import folder_lock
    folder, held = tmp_path / "run", []
    real_open = os.open

    def holder_between(path, *args, **kw):   # after this process's exists() and mkdir, before its own flock
        if str(path).endswith(".lock") and not held:
            held.append(real_open(path, os.O_CREAT | os.O_RDWR))
            fcntl.flock(held[0], fcntl.LOCK_EX)   # its own open file: locked against ours as another process's
        return real_open(path, *args, **kw)
    monkeypatch.setattr(uio.os, "open", holder_between)
    try:
        with pytest.raises(BadInputError, match="another process is writing"):
            with folder_lock(folder):
                pass
        monkeypatch.setattr(uio.os, "open", real_open)
        assert (folder / ".lock").is_file()
        with pytest.raises(BadInputError, match="another process is writing"):   # the holder still holds it
            with folder_lock(folder):
                pass
    finally:
        for fd in held:
            os.close(fd)
    with folder_lock(folder):   # released: taken now
        pass


def test_temps_a_killed_writer_left_in_a_commands_out_are_removed(tmp_path, capsys):
    """train's folder lock removed a kill's `.NAME.WRITER.tmp` files; predict's, index's, ... --out kept them for
    ever. A live writer's (this process's) is kept."""
    import subprocess
    import sys
    from uninet_feat.cli import main
    from uninet_feat.io import _HOST
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)
    out = tmp_path / "knn"
    (out / "sub").mkdir(parents=True)
    stale = [out / f".knn.json.{_HOST}-pid{dead}.x1.tmp", out / "sub" / f".a.png.{_HOST}-pid{dead}.x2.tmp"]
    live = out / f".knn.json.{_HOST}-pid{os.getpid()}.x3.tmp"
    for p in stale + [live]:
        p.write_text("half")
    assert main(["index", "--features", str(tmp_path / "none"), "--out", str(out)]) == 2   # refused; cleaned first
    assert [p for p in stale if p.exists()] == [] and live.exists()


def test_a_file_name_that_is_not_utf8_is_written_as_its_own_bytes(tmp_path):
    """Linux file names are bytes: b"caf\\xe9.png" reaches Python as "caf\\udce9.png", which UTF-8 cannot encode:
    evaluate --csv and cluster's CSVs were a UnicodeEncodeError after all the work. Written back as its bytes; a
    UTF-8 CSV reads as before."""
    import csv
    from uninet_feat.clusters import read_path_table
    from uninet_feat.io import atomic_write_csv
    odd = os.fsdecode(b"/d/caf\xe9.png")
    atomic_write_csv(tmp_path / "s.csv", [{"path": odd, "score": 1.0}])
    assert b"/d/caf\xe9.png,1.0" in (tmp_path / "s.csv").read_bytes()
    with open(tmp_path / "s.csv", newline="", encoding="utf-8", errors="surrogateescape") as f:
        assert next(csv.DictReader(f))["path"] == odd   # the same name back
    atomic_write_csv(tmp_path / "u.csv", [{"path": "/d/défaut.png", "label": "hole"}])
    assert read_path_table(tmp_path / "u.csv", "label", "labels") == {"/d/défaut.png": "hole"}


def test_shared_locks_coexist_an_exclusive_one_waits_for_none_and_a_lockless_filesystem_warns(tmp_path, monkeypatch):
    """`extract --shard i/n` jobs share their store's folder (shared locks), and any other writer is refused while
    one of them writes, and they while it does. A filesystem that cannot lock (ENOLCK: an NFS mount without its
    lock daemon) failed every command with an OSError; it now runs the command unlocked and says so."""
    import errno
    import fcntl

    import uninet_feat.io as uio
    from uninet_feat.errors import BadInputError
    from uninet_feat.io import folder_lock
    folder = tmp_path / "store"
    with folder_lock(folder, shared=True), folder_lock(folder, shared=True):   # two jobs of one extract
        with pytest.raises(BadInputError, match="another process is writing this x folder"):
            with folder_lock(folder, "x"):
                pass
    with folder_lock(folder):
        with pytest.raises(BadInputError, match="another process is writing"):
            with folder_lock(folder, shared=True):
                pass
    # a job refused before writing leaves no empty folder, unless another job holds it too
    with pytest.raises(ValueError), folder_lock(tmp_path / "once", shared=True):
        raise ValueError
    assert not (tmp_path / "once").exists()
    real_open, other = os.open, []

    def other_job_joins(path, *args, **kw):   # another job locks the folder just after this one made it
        fd = real_open(path, *args, **kw)
        if str(path).endswith(".lock") and not other:
            other.append(real_open(path, os.O_RDWR))
            fcntl.flock(other[0], fcntl.LOCK_SH)
        return fd
    monkeypatch.setattr(uio.os, "open", other_job_joins)
    with pytest.raises(ValueError), folder_lock(tmp_path / "two", shared=True):
        raise ValueError
    monkeypatch.setattr(uio.os, "open", real_open)
    os.close(other[0])
    assert (tmp_path / "two" / ".lock").exists()

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match="cannot lock files"):
        with folder_lock(tmp_path / "nfs") as f:
            (f / "x").write_text("done")
    assert (tmp_path / "nfs" / "x").read_text() == "done"
    with pytest.warns(UserWarning), pytest.raises(ValueError):   # failed before writing: no empty folder left
        with folder_lock(tmp_path / "nfs2"):
            raise ValueError
    assert not (tmp_path / "nfs2").exists()
    monkeypatch.setattr(fcntl, "flock", lambda fd, op: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError, match="I/O error"):   # a real failure is not taken for a missing feature
        with folder_lock(tmp_path / "bad"):
            pass
