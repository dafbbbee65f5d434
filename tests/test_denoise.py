"""The denoising student (`uninet_feat.denoise`): damaged inputs, clean targets, reproducible training."""
import json
import os

import numpy as np
import pytest
import torch

from _tiny import TinyBackbone, register_tiny, tiny_train_args, write_supervised_manifest, write_texture_set
from uninet_feat.denoise import Damager, parse_denoise
from uninet_feat.errors import BadInputError
from uninet_feat.model import UniNet


def _batch(n=4, size=64, seed=0):
    """A normalised batch of textured images (mean/std 0.5, as the tiny backbone's)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    imgs = [0.5 + 0.25 * np.sin(xx / 2.0 + rng.uniform(0, 6)) * np.sin(yy / 3.0 + rng.uniform(0, 6)) for _ in range(n)]
    x = torch.tensor(np.stack(imgs), dtype=torch.float32)[:, None].repeat(1, 3, 1, 1)
    return (x - 0.5) / 0.5


def _damager(p, seed=3):
    return Damager(p, "fabric", torch.full((3,), 0.5), torch.full((3,), 0.5), seed)


def test_damaged_rows_change_only_at_the_defect_and_draws_repeat():
    x = _batch()
    damaged, clean, idx = _damager(1.0)(x, epoch=2, step=5)
    assert idx.tolist() == [0, 1, 2, 3]                    # p = 1: every textured image takes an edit
    assert torch.equal(clean, x[idx])
    changed = (damaged != x).any(1)                          # (N, H, W)
    assert all(0 < int(c.sum()) < c.numel() for c in changed)   # a local edit, not the whole image
    assert torch.equal(damaged[~changed[:, None].expand_as(x)], x[~changed[:, None].expand_as(x)])   # exact elsewhere
    again, _, idx2 = _damager(1.0)(x, epoch=2, step=5)
    other, _, _ = _damager(1.0)(x, epoch=2, step=6)
    assert torch.equal(again, damaged) and torch.equal(idx2, idx)
    assert not torch.equal(other, damaged)                   # the next step draws other edits


def test_probability_sets_the_share_of_damaged_rows():
    x = _batch(n=64)
    assert _damager(0.0)(x, 0, 0)[2] is None
    counts = [len(_damager(0.5)(x, 0, s)[2]) for s in range(4)]
    assert all(18 <= c <= 46 for c in counts), counts       # binomial(64, 0.5): far inside 5 sd


def test_only_normal_rows_are_damaged():
    x = _batch()
    both, _, idx = _damager(1.0)(x, 0, 0, normal=torch.tensor([True, False, True, False]))
    assert idx.tolist() == [0, 2]                            # labelled defect rows keep their own defect
    assert torch.equal(both[[1, 3]], x[[1, 3]])
    assert torch.equal(_damager(1.0)(x, 0, 0, normal=torch.ones(4, dtype=torch.bool))[0], _damager(1.0)(x, 0, 0)[0])


def test_supervised_denoising_run_damages_only_normal_rows(tmp_path, monkeypatch):
    from uninet_feat import denoise
    from uninet_feat.config import load_config
    from uninet_feat.train import train
    register_tiny()
    data = write_texture_set(tmp_path / "sup", n_train=6, n_good=2, n_bad=6)
    write_supervised_manifest(data)
    seen, call = [], denoise.Damager.__call__

    def spy(self, x, epoch, step, rank=0, normal=None):
        out = call(self, x, epoch, step, rank, normal)
        seen.append((normal.clone(), out[2]))
        return out

    monkeypatch.setattr(denoise.Damager, "__call__", spy)
    cfg = load_config(None, {"data": str(data), "split_csv": str(data / "m.csv"), "supervised": True, "denoise": 1.0,
                             "backbone": "tiny", "weights": "random", "image_size": 64, "epochs": 2,
                             "batch_size": 4, "val_fraction": 0.0, "channels_last": False})
    train(cfg, tmp_path / "run", quiet=True)
    assert 4 <= sum(int((~n).sum()) for n, _ in seen) <= 8   # the 4 labelled defects, each epoch (less drop_last)
    for normal, idx in seen:                                  # p = 1: every normal row and no defect row
        assert (idx.tolist() if idx is not None else []) == torch.nonzero(normal).flatten().tolist()


@pytest.mark.parametrize("bad", [1.5, -0.1, "half"])
def test_bad_probability_is_refused(bad):
    with pytest.raises(BadInputError, match="denoise"):
        parse_denoise(bad)


def test_targets_come_from_the_clean_images_and_inputs_from_the_damaged():
    torch.manual_seed(0)
    model = UniNet(TinyBackbone()).eval()
    x = _batch()
    damaged, clean, idx = _damager(0.5, seed=1)(x, 0, 0)
    assert idx is not None and 0 < len(idx) < len(x)
    out = model(damaged, clean, idx)
    plain_damaged, plain_clean = model(damaged), model(x)
    keep = torch.tensor([i for i in range(len(x)) if i not in idx.tolist()])
    for k, t in enumerate(out.teachers):
        assert torch.allclose(t[idx], plain_clean.teachers[k][idx], atol=1e-5)    # targets: clean features
        assert torch.allclose(t[keep], plain_damaged.teachers[k][keep], atol=1e-5)
    for s, ref in zip(out.students, plain_damaged.students):                       # students: from the damaged
        assert torch.allclose(s, ref, atol=1e-5)


def test_clean_targets_are_differentiable_target_teacher_features_of_the_clean_images():
    """The trainable target teacher's rows idx come from ``clean`` through the graph (its parameters learn
    from them, as in a plain run), not from a detached copy or from the damaged input."""
    torch.manual_seed(0)
    model = UniNet(TinyBackbone()).eval()   # eval: BatchNorm does not couple the rows, so only idx's sources count
    x = _batch()
    damaged, clean, idx = _damager(1.0)(x, 0, 0)
    clean = clean.clone().requires_grad_(True)
    damaged = damaged.clone().requires_grad_(True)
    out = model(damaged, clean, idx)
    sum(t[idx].square().mean() for t in out.teachers[out.n_levels:]).backward()
    assert clean.grad is not None and clean.grad.abs().sum() > 0
    assert damaged.grad is None or damaged.grad.abs().sum() == 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.target.parameters())


def test_denoising_run_is_reproducible_resumable_and_differs_from_a_plain_run(tmp_path):
    from uninet_feat.checkpoint import read_checkpoint
    from uninet_feat.cli import main
    register_tiny()
    write_texture_set(tmp_path / "tex")
    args = tiny_train_args(tmp_path / "tex") + ["--epochs", "2"]
    main(args + ["--out", str(tmp_path / "a"), "--denoise", "0.5"])
    main(args + ["--out", str(tmp_path / "b"), "--denoise", "0.5"])
    main(args + ["--out", str(tmp_path / "plain")])
    main(args[:-2] + ["--epochs", "1", "--out", str(tmp_path / "c"), "--denoise", "0.5"])
    main(["train", "--out", str(tmp_path / "c"), "--resume", "--epochs", "2", "--quiet"])
    sd = {r: read_checkpoint(tmp_path / r / "model.pt")["state_dict"] for r in ("a", "b", "c", "plain")}
    for r in ("b", "c"):
        assert all(torch.equal(sd["a"][k], sd[r][k]) for k in sd["a"]), r
    assert not all(torch.equal(sd["a"][k], sd["plain"][k]) for k in sd["a"])
    cfg = read_checkpoint(tmp_path / "a" / "model.pt")["config"]
    assert cfg["denoise"] == 0.5 and cfg["denoise_kinds"] == "fabric"
    log = [json.loads(line) for line in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(np.isfinite(r["loss"]) for r in log)


def test_label_free_choices_on_the_kinds_the_student_learns_to_undo_are_warned_about(tmp_path):
    """`--denoise` with `--map-levels auto` (or select: synthetic) on the default kinds chooses on the defects the
    student is trained to remove: warned, naming the shared kinds; disjoint kinds (the magnetic-tile config's) are
    not."""
    import warnings

    from uninet_feat.cli import main
    register_tiny()
    write_texture_set(tmp_path / "tex")
    args = tiny_train_args(tmp_path / "tex") + ["--denoise", "0.5", "--map-levels", "auto"]
    with pytest.warns(UserWarning, match=r"map_levels: auto choose on synthetic defects of kinds the denoising "
                                         r"student is trained on \(broken_yarn, hole, knot"):
        main(args + ["--out", str(tmp_path / "a")])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        main(args + ["--synthetic-kinds", "texture_patch", "--out", str(tmp_path / "b")])
    assert not [w for w in seen if "denoising student is trained on" in str(w.message)]


def test_edits_drawn_ahead_in_a_thread_or_in_processes_train_the_same_model(tmp_path, monkeypatch):
    """The denoising edits may be drawn in place, a batch ahead in a thread, or batches ahead in spawned processes
    (env UNINET_EDITS; on an H200 the thread hid little of them, session 50). The batches must be the same, so the
    model is: every weight equals the in-place run's, and the edits did run elsewhere (the thread's name; none in
    this process for the processes)."""
    import threading
    from uninet_feat.checkpoint import read_checkpoint
    from uninet_feat.cli import main
    register_tiny()
    write_texture_set(tmp_path / "tex", n_train=12)
    args = tiny_train_args(tmp_path / "tex") + ["--epochs", "2", "--denoise", "0.5"]
    where, real = {}, Damager.rows

    def spy(self, x, epoch, step, *a, **k):
        where.setdefault(os.environ["UNINET_EDITS"], []).append((threading.current_thread().name, epoch, step))
        return real(self, x, epoch, step, *a, **k)
    monkeypatch.setattr(Damager, "rows", spy)
    modes = ("inplace", "thread", "processes:2")
    for mode in modes:
        monkeypatch.setenv("UNINET_EDITS", mode)
        main(args + ["--out", str(tmp_path / mode.replace(":", "_"))])
    main_thread = threading.current_thread().name
    assert {w for w, _, _ in where["inplace"]} == {main_thread}
    assert {w for w, _, _ in where["thread"]} == {"uninet-edits_0"}
    assert [s for _, *s in where["thread"]] == [s for _, *s in where["inplace"]]
    assert "processes:2" not in where   # drawn in the workers, which this spy does not reach
    sd = {m: read_checkpoint(tmp_path / m.replace(":", "_") / "model.pt")["state_dict"] for m in modes}
    for m in modes[1:]:
        assert all(torch.equal(sd["inplace"][k], sd[m][k]) for k in sd["inplace"])


class _DyingDamager(Damager):
    """Kills the worker process that draws step 1's edits (module level: a spawned worker unpickles it)."""

    def rows(self, x, epoch, step, *a, **k):
        if step == 1:
            os._exit(3)
        return super().rows(x, epoch, step, *a, **k)


@pytest.mark.parametrize("pause", [0.0, 3.0], ids=["noticed-at-a-result", "noticed-at-the-next-hand-out"])
def test_a_dead_edit_worker_stops_training_with_a_message_not_a_pool_traceback(pause):
    """The pool notices a dead worker at a waited result, or, when the loader is slow, already at the next submit:
    both give the message (CI once met the second as a bare BrokenProcessPool)."""
    import time
    from uninet_feat.denoise import EditDrawer
    damage = _DyingDamager(1.0, "fabric", (0.5,) * 3, (0.5,) * 3, seed=0)

    def batches():
        for i in range(3):
            if i == 2:
                time.sleep(pause)   # a slow loader: the worker of step 1 is dead before step 2 is handed out
            yield {"image": torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)), "label": torch.zeros(2)}
    got = []
    with pytest.raises(BadInputError, match="worker process drawing the denoising edits stopped.*--resume") as e:
        with EditDrawer(damage, {}, "processes", 1) as draw:
            for item in draw(batches(), 0):
                got.append(item)
    assert "__name__" not in str(e.value)   # pytest's own entry point is not a user script to blame
    assert len(got) <= 1   # no batch from the dead step on


_UNGUARDED = """import sys
sys.path.insert(0, {tests!r})
from _tiny import register_tiny
register_tiny()
from uninet_feat.config import load_config
from uninet_feat.train import train
train(load_config(None, {{"data": {data!r}, "backbone": "tiny", "weights": "random", "image_size": 64, "epochs": 1,
                         "batch_size": 2, "denoise": 1.0, "threads": 1}}), {out!r}, quiet=True)
"""


def test_a_script_that_calls_train_unguarded_is_named_when_its_edit_workers_fail(tmp_path):
    """With UNINET_EDITS=processes each worker is spawned and imports the user's script first: unguarded, its
    train(...) ran again in the worker, which failed, and the message blamed memory. It now names the script and the
    `if __name__ == "__main__":` guard."""
    import subprocess
    import sys
    from pathlib import Path
    data = write_texture_set(tmp_path / "d", n_train=6, n_good=1, n_bad=1)
    script = tmp_path / "my_training.py"
    script.write_text(_UNGUARDED.format(tests=str(Path(__file__).parent), data=str(data), out=str(tmp_path / "run")))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "UNINET_EDITS": "processes:1", "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "worker process drawing the denoising edits stopped" in last and str(script) in last, last
    assert 'if __name__ == "__main__":' in last, last
    guarded = tmp_path / "guarded.py"   # the same script with the guard trains
    body = _UNGUARDED.format(tests=str(Path(__file__).parent), data=str(data), out=str(tmp_path / "run2"))
    head, call = body.split("train(load_config", 1)
    guarded.write_text(head + 'if __name__ == "__main__":\n    train(load_config' + call.replace("\n ", "\n     "))
    r = subprocess.run([sys.executable, str(guarded)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "UNINET_EDITS": "processes:1", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "run2" / "model.pt").exists()


def test_edits_mode_reads_the_environment_and_names_a_bad_value(monkeypatch):
    from uninet_feat.denoise import edits_mode
    monkeypatch.delenv("UNINET_EDITS", raising=False)
    assert edits_mode("cpu") == ("inplace", 0) and edits_mode(torch.device("cuda", 0)) == ("thread", 0)
    monkeypatch.setenv("UNINET_EDITS", "processes:3")
    assert edits_mode("cpu") == ("processes", 3)
    monkeypatch.setenv("UNINET_EDITS", "Processes")
    monkeypatch.setattr(os, "cpu_count", lambda: 34)
    assert edits_mode("cpu") == ("processes", 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")   # torchrun's 4 processes on this machine share the 32 cores
    assert edits_mode("cpu") == ("processes", 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert edits_mode("cpu") == ("processes", 4)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert edits_mode("cpu") == ("processes", 1)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    for bad in ("threads", "processes:0", "thread:2", "processes:x"):
        monkeypatch.setenv("UNINET_EDITS", bad)
        with pytest.raises(BadInputError, match="UNINET_EDITS"):
            edits_mode("cpu")
