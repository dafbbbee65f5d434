"""Crash safety with a real kill: SIGKILL a `train` / `extract` process mid-run, resume, and get exactly
what an uninterrupted run gives (the other resume tests simulate the crash in-process)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from uninet_feat.checkpoint import read_checkpoint
from uninet_feat.cli import main
from uninet_feat.featstore import FeatureStore

from _tiny import register_tiny, write_texture_set

register_tiny()
TESTS = Path(__file__).parent
# runs the CLI in a child process with the tiny test backbone registered
CHILD = ("import sys; sys.path.insert(0, {tests!r}); from _tiny import register_tiny; register_tiny(); "
         "from uninet_feat.cli import main; sys.exit(main(sys.argv[1:]))")
TRAIN = ["--backbone", "tiny", "--weights", "random", "--image-size", "64", "--batch-size", "2",
         "--seed", "3", "--threads", "1", "--quiet"]


def _start(argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", CHILD.format(tests=str(TESTS)), *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill_when(proc, ready, timeout=120.0):
    """SIGKILL ``proc`` as soon as ``ready()`` holds; fails if the process ended first (nothing was killed)."""
    t0 = time.time()
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before it could be killed: "
                                 f"{proc.stderr.read().decode()[-2000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for the kill point")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    proc.stderr.close()


@pytest.fixture(autouse=True)
def _restore_threads():
    """The in-process runs use --threads 1 like the child (same float rounding); give the rest back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_train_killed_mid_run_resumes_to_the_same_model(tmp_path):
    data = write_texture_set(tmp_path / "d", n_train=24, n_good=2, n_bad=2)
    args = ["train", "--data", str(data), *TRAIN, "--epochs", "6"]
    killed = tmp_path / "killed"
    proc = _start(args + ["--out", str(killed)])
    log = killed / "train_log.jsonl"
    # the log line of epoch 3 is written after epoch 2's checkpoint
    _kill_when(proc, lambda: log.exists() and len(log.read_text().splitlines()) >= 3)
    assert not (killed / "model.pt").exists()
    done = read_checkpoint(killed / "checkpoint.pt")["epoch"]          # what survived the kill is readable
    assert 2 <= done < 6
    assert main(args + ["--out", str(killed), "--resume"]) == 0
    assert main(args + ["--out", str(tmp_path / "straight")]) == 0
    a = read_checkpoint(killed / "model.pt")["state_dict"]
    b = read_checkpoint(tmp_path / "straight" / "model.pt")["state_dict"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    epochs = [int(line.split('"epoch": ')[1].split(",")[0]) for line in log.read_text().splitlines()]
    assert epochs == [1, 2, 3, 4, 5, 6]


def test_extract_killed_mid_run_resumes_to_the_same_store(tmp_path):
    data = write_texture_set(tmp_path / "d", n_train=40, n_good=10, n_bad=10)
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), *TRAIN, "--epochs", "1", "--out", str(run)]) == 0
    torch.set_num_threads(1)   # extract scores at the process's thread count (it has no --threads): the child's
    args = ["extract", "--data", str(data), "--run", str(run), "--patches", "--shard-size", "2", "--quiet"]
    killed = tmp_path / "killed"
    proc = _start(args + ["--out", str(killed)])
    _kill_when(proc, lambda: len(list(killed.glob("shard-*.npz"))) >= 3)
    before = {p.name: p.stat().st_mtime_ns for p in killed.glob("shard-*.npz")}
    assert not (killed / "complete").exists() and len(before) < 30
    assert main(args + ["--out", str(killed)]) == 0
    assert all(killed.joinpath(n).stat().st_mtime_ns == t for n, t in before.items())  # finished shards kept
    assert main(args + ["--out", str(tmp_path / "straight")]) == 0
    a, b = FeatureStore(killed), FeatureStore(tmp_path / "straight")
    np.testing.assert_array_equal(a.vectors, b.vectors)
    np.testing.assert_array_equal(a.array("patches"), b.array("patches"))


def test_plain_resume_finishes_the_runs_own_schedule(tmp_path, monkeypatch):
    """`train --out RUN --resume` without --epochs continues to the run's own epoch count (not the default 10)
    and equals the uninterrupted run; --epochs extends a finished run; other changed flags are refused."""
    import uninet_feat.train as train_mod
    data = write_texture_set(tmp_path / "d", n_train=9, n_good=2, n_bad=2)
    args = ["train", "--data", str(data), *TRAIN, "--epochs", "3"]
    assert main(args + ["--out", str(tmp_path / "straight")]) == 0

    real_save, real_progress, bars = train_mod.save_checkpoint, train_mod._progress, []

    def interrupt_after_epoch_2(path, model, cfg, **kw):   # Ctrl-C right after epoch 2's checkpoint
        out = real_save(path, model, cfg, **kw)
        if Path(path).name == "checkpoint.pt" and kw.get("epoch") == 2:
            raise KeyboardInterrupt
        return out

    def visible_progress(quiet):   # keep the bar to check its total against the steps done
        p = real_progress(True)
        bars.append(p)
        return p
    monkeypatch.setattr(train_mod, "save_checkpoint", interrupt_after_epoch_2)
    monkeypatch.setattr(train_mod, "_progress", visible_progress)
    cut = tmp_path / "cut"
    assert main(args + ["--out", str(cut)]) == 130
    assert read_checkpoint(cut / "checkpoint.pt")["epoch"] == 2 and not (cut / "model.pt").exists()
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    assert main(["train", "--out", str(cut), "--resume", "--quiet"]) == 0
    ckpt = read_checkpoint(cut / "model.pt")
    assert ckpt["epoch"] == 3 and "epochs: 3\n" in (cut / "config.yaml").read_text()
    ref = read_checkpoint(tmp_path / "straight" / "model.pt")["state_dict"]
    for k in ref:
        torch.testing.assert_close(ckpt["state_dict"][k], ref[k], rtol=0, atol=1e-6, msg=k)
    steps = [json.loads(line)["steps"] for line in (cut / "train_log.jsonl").read_text().splitlines()]
    resumed_bar = bars[-1].tasks[0]
    assert resumed_bar.total == resumed_bar.completed == steps[2]   # one epoch's real batches, not ceil()s
    assert main(["train", "--out", str(cut), "--resume", "--lr", "0.5"]) == 2      # would change the model
    assert main(["train", "--out", str(cut), "--resume", "--epochs", "2"]) == 2    # fewer than trained
    assert main(["train", "--out", str(cut), "--resume", "--epochs", "4", "--quiet"]) == 0   # extend it
    assert read_checkpoint(cut / "model.pt")["epoch"] == 4 and len(steps) == 3
    assert len((cut / "train_log.jsonl").read_text().splitlines()) == 4
    # env.json keeps the environment that trained the first epochs and lists each resume (a resume wrote over it)
    env = json.loads((cut / "env.json").read_text())
    assert env["threads"] == 1 and [r["at_epoch"] for r in env["resumes"]] == [2, 3]
    assert all("torch" in r and "threads" in r for r in env["resumes"])
    # the same data spelled relative (as a --config file spells it) is the same run; other data is not
    monkeypatch.chdir(tmp_path)
    resumed = ["train", *TRAIN, "--out", "cut", "--resume", "--epochs", "5", "--quiet"]
    assert main(resumed + ["--data", "."]) == 2
    assert main(resumed + ["--data", "d"]) == 0 and read_checkpoint(cut / "model.pt")["epoch"] == 5
    # checkpoint.pt removed from the finished run (disk space): --resume said "drop --resume", and without it
    # "already holds a run ... pass --resume", a circle (an audit, session 52); both now say a new --out
    (cut / "checkpoint.pt").unlink()
    from uninet_feat.config import load_config
    from uninet_feat.errors import BadInputError
    fixes = []
    for resume in (True, False):   # refused before any model is built
        with pytest.raises(BadInputError) as e:
            train_mod.train(load_config(None, {"data": str(data)}), cut, resume=resume, quiet=True)
        fixes.append(e.value.fix)
    assert all("new --out" in f and "pass --resume" not in f and "drop --resume" not in f for f in fixes), fixes


def test_a_run_folder_takes_one_writer_and_sheds_a_killed_writes_temp_files(tmp_path, capsys):
    """Two `train --out SAME` at once interleaved their files; now the second is refused while the first holds
    the folder. A temp file that a kill left mid-write (.checkpoint.pt.XXXX.tmp, checkpoint-sized) is removed
    when the folder is next trained in; a refused new run leaves no empty folder."""
    from uninet_feat.io import folder_lock
    data = write_texture_set(tmp_path / "d", n_train=6, n_good=1, n_bad=1)
    run = tmp_path / "run"
    args = ["train", "--data", str(data), "--backbone", "tiny", "--weights", "random", "--image-size", "64",
            "--epochs", "1", "--batch-size", "2", "--quiet", "--out", str(run)]
    with folder_lock(run):   # another process training into it now
        assert main(args) == 2
    assert "another process is writing this run folder now" in capsys.readouterr().err
    assert not (run / "config.yaml").exists()
    (run / ".checkpoint.pt.k1ll3d.tmp").write_bytes(b"x" * 1000)
    # a live writer's temp file in a subfolder (a `predict --out RUN/preds` now) is kept; a dead writer's is not
    import subprocess
    import sys
    from uninet_feat import io as uio
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run / "preds").mkdir()
    live = run / "preds" / f".part-00000.npz.{uio._HOST}-pid{os.getpid()}.abc123.tmp"
    gone = run / "preds" / f".part-00001.npz.{uio._HOST}-pid{int(dead.stdout)}.abc123.tmp"
    for f in (live, gone):
        f.write_bytes(b"x")
    assert main(args) == 0
    assert not list(run.glob(".*.tmp")) and (run / "model.pt").exists()
    assert live.exists() and not gone.exists()
    assert main(args[:-2] + ["--image-size", "40", "--out", str(tmp_path / "new")]) == 2   # refused before writing
    assert not (tmp_path / "new").exists()


def test_every_command_writing_a_folder_takes_it_alone_and_extract_jobs_share_theirs(tmp_path, capsys):
    """Only `train` locked its folder: two `train-head --out SAME` (a retried pipeline step) mixed one head with
    the other's CV report, and `calibrate` rewrote calibration.json of a run still training. Now the folder a
    command writes is locked against other processes: an exclusive lock for index / train-head / predict / ...
    and calibrate's run, a shared one for extract, whose `--shard i/n` jobs write one store together."""
    from uninet_feat.io import folder_lock
    data = write_texture_set(tmp_path / "d", n_train=6, n_good=2, n_bad=2)
    run, feats, head = tmp_path / "run", tmp_path / "feats", tmp_path / "head"
    assert main(["train", "--data", str(data), *TRAIN, "--epochs", "1", "--out", str(run)]) == 0
    cal = (run / "calibration.json").read_bytes()
    with folder_lock(run):   # `train --resume` training it now
        assert main(["calibrate", "--run", str(run), "--quiet"]) == 2
    assert "another process is writing this run folder now" in capsys.readouterr().err
    assert (run / "calibration.json").read_bytes() == cal
    extract = ["extract", "--data", str(data), "--run", str(run), "--out", str(feats), "--quiet"]
    with folder_lock(feats):   # another command (an index, a predict) writing there now
        assert main(extract) == 2
    assert "another process is writing this feature store folder now" in capsys.readouterr().err
    assert not (feats / "manifest.json").exists()
    with folder_lock(feats, shared=True):   # another job of the same sharded extract: both write the store
        assert main(extract) == 0
    assert (feats / "complete").exists()
    th = ["train-head", "--features", str(feats), "--folds", "2", "--threads", "1", "--out", str(head)]
    for shared in (False, True):   # the same step started again while the first still runs; an extract's job
        with folder_lock(head, shared=shared):
            assert main(th) == 2
        assert "another process is writing this train-head output folder now" in capsys.readouterr().err
        assert not (head / "cv_report.json").exists()
    assert main(th) == 0 and (head / "cv_report.json").exists()   # the lock is gone with its holder


def test_a_resume_refuses_a_data_folder_whose_split_changed(tmp_path, capsys):
    """The validation split is drawn from the sorted training normals, so an image added to train/good redrew it on
    resume: a normal the first epochs trained on became a validation normal (threshold, selection). A resume now
    compares the split with the one checkpoint.pt saved and refuses another, naming the images; a checkpoint from
    before the split was saved is resumed as it is."""
    import shutil
    data = write_texture_set(tmp_path / "d", n_train=10, n_good=1, n_bad=1)
    run = tmp_path / "run"
    args = ["train", "--data", str(data), *TRAIN, "--val-fraction", "0.3", "--epochs", "1", "--out", str(run)]
    assert main(args) == 0
    saved = read_checkpoint(run / "checkpoint.pt")
    assert saved["split"] == read_checkpoint(run / "model.pt")["split"]   # plain str/int: weights_only reads it
    assert saved["split"]["n_fit"] == 7 and len(saved["split_paths"]["val"]) == 3
    good = data / "train" / "good"
    shutil.copy(good / "001.png", good / "new.png")
    (good / "009.png").rename(tmp_path / "009.png")
    assert main(["train", "--out", str(run), "--resume", "--epochs", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "added 1 (train/good/new.png)" in err and "removed 1 (train/good/009.png)" in err
    assert "restore the data folder as it was, or train a new run with a new --out" in err
    assert read_checkpoint(run / "checkpoint.pt")["epoch"] == 1
    old = {k: v for k, v in saved.items() if k not in ("split", "split_paths")}   # a run from before: not compared
    torch.save(old, run / "checkpoint.pt")
    assert main(["train", "--out", str(run), "--resume", "--epochs", "2", "--quiet"]) == 0
    assert read_checkpoint(run / "model.pt")["epoch"] == 2


def test_a_resume_may_change_the_memory_options_that_train_the_same_model(tmp_path):
    """grad_checkpointing, step_in_backward and cache_images save memory and train the same model (AdamW's state
    moves between the per-parameter and the plain optimisers), so a resume takes them, either way, and gives a
    model equal tensor for tensor to an uninterrupted plain run; they were refused."""
    from uninet_feat.config import load_config
    from uninet_feat.train import train
    data = write_texture_set(tmp_path / "d", n_train=8, n_good=1, n_bad=1, size=32)

    def cfg(epochs, **kw):
        return load_config(None, {"data": str(data), "backbone": "tiny", "weights": "random", "image_size": 32,
                                  "epochs": epochs, "batch_size": 3, "seed": 3, "threads": 1, "val_fraction": 0.25,
                                  "channels_last": False, **kw})
    lean = {"grad_checkpointing": True, "step_in_backward": True, "cache_images": False}
    plain = {k: not v for k, v in lean.items()}
    train(cfg(3), tmp_path / "plain", quiet=True)
    ref = read_checkpoint(tmp_path / "plain" / "model.pt")["state_dict"]
    for i, (first, then) in enumerate(((lean, plain), (plain, lean))):
        run = tmp_path / f"run{i}"
        train(cfg(2, **first), run, quiet=True)
        train(cfg(3, **then), run, resume=True, quiet=True)
        got = read_checkpoint(run / "model.pt")
        assert all(torch.equal(got["state_dict"][k], ref[k]) for k in ref)
        assert {k: got["config"][k] for k in lean} == then   # saved: a new run of its config.yaml is the same


def test_a_resume_names_a_damaged_training_log(tmp_path, capsys):
    """A `select: synthetic` run reads its validation scores back from train_log.jsonl on a resume: a damaged line
    was a JSONDecodeError traceback. It is named, with the fix; the log and checkpoint are left as they were."""
    data = write_texture_set(tmp_path / "d", n_train=9, n_good=2, n_bad=2)
    run = tmp_path / "run"
    args = ["train", "--data", str(data), *TRAIN, "--select", "synthetic", "--out", str(run)]
    assert main(args + ["--epochs", "1"]) == 0
    (run / "train_log.jsonl").write_text('{"epoch": 1, "seco\n')
    capsys.readouterr()
    assert main(args + ["--epochs", "2", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "train_log.jsonl: line 1 is not an epoch's record" in err and "restore train_log.jsonl" in err
    assert read_checkpoint(run / "checkpoint.pt")["epoch"] == 1


def _train_with_edit_workers(tmp_path):
    """`train` with its denoising edits in 2 spawned worker processes, in a process group of its own (as a terminal
    or a scheduler starts it), once its first epoch is written: (process, run folder)."""
    data = write_texture_set(tmp_path / "d", n_train=24, n_good=2, n_bad=2)
    out = tmp_path / "r"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "UNINET_EDITS": "processes:2"}
    proc = subprocess.Popen([sys.executable, "-c", CHILD.format(tests=str(TESTS)), "train", "--data", str(data), *TRAIN,
                             "--epochs", "200", "--denoise", "1.0", "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    log, t0 = out / "train_log.jsonl", time.time()
    while not (log.exists() and log.read_text().count("\n") >= 2):   # workers up, a checkpoint written
        if proc.poll() is not None or time.time() - t0 > 120:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"no epoch: {proc.communicate()[1].decode()[-2000:]}")
        time.sleep(0.05)
    return proc, out


def test_ctrl_c_with_edits_in_worker_processes_prints_the_resume_message_not_worker_tracebacks(tmp_path):
    """A terminal's Ctrl-C sends SIGINT to the whole process group, the spawned edit workers too
    (UNINET_EDITS=processes): each printed a KeyboardInterrupt traceback around `train`'s one-line message."""
    proc, out = _train_with_edit_workers(tmp_path)
    try:
        os.killpg(proc.pid, signal.SIGINT)
        err = proc.communicate(timeout=60)[1].decode()
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    assert proc.returncode == 130, err[-2000:]
    assert "--resume" in err and "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert read_checkpoint(out / "checkpoint.pt")["epoch"] >= 1


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_train_killed_alone_takes_its_edit_workers_with_it(tmp_path, sig):
    """A scheduler's SIGTERM (or a SIGKILL) to `train` alone skips the pool's shutdown: its spawned edit workers
    then waited for ever for a batch, 280 MB each, holding train's stderr open, so a wrapper reading it hung."""
    proc, out = _train_with_edit_workers(tmp_path)
    os.kill(proc.pid, sig)   # the main process only, not its group
    try:
        proc.communicate(timeout=30)   # stderr reaches EOF only when no worker holds it
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError("the edit workers outlived train by 30 s")
    assert proc.returncode == -sig
    assert read_checkpoint(out / "checkpoint.pt")["epoch"] >= 1   # what was finished is kept
