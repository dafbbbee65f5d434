"""Where the model runs: `--device` / ``device`` (auto = a CUDA GPU when torch sees one), and inputs that follow
the model. No GPU here: device choice is tested with torch's CUDA queries replaced, and device-following code on
torch's "meta" device, where a tensor made on the CPU beside the model's raises as it would beside a GPU's."""
import pytest
import torch

from uninet_feat.cli import main
from uninet_feat.config import load_config
from uninet_feat.errors import BadInputError
from uninet_feat.runs import eval_batches, pick_device

from _tiny import TinyBackbone, register_tiny, tiny_train_args, write_texture_set


def _gpus(monkeypatch, n):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


def test_auto_is_a_gpu_only_when_torch_sees_one_and_a_missing_one_is_refused(monkeypatch):
    _gpus(monkeypatch, 0)
    assert pick_device("auto") == torch.device("cpu") and pick_device("CPU") == torch.device("cpu")
    for asked in ("cuda", "cuda:0"):
        with pytest.raises(BadInputError, match="sees no CUDA GPU") as e:
            pick_device(asked)
        assert "--device cpu" in str(e.value)
    with pytest.raises(BadInputError, match="not one this tool runs on"):
        pick_device("mps")
    with pytest.raises(BadInputError, match="not one this tool runs on"):
        pick_device("gpu")
    _gpus(monkeypatch, 2)
    assert pick_device("auto") == torch.device("cuda")
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(BadInputError, match="sees 2 CUDA GPU") as e:
        pick_device("cuda:2")
    assert "cuda:1" in str(e.value)


def test_a_config_names_its_device_in_one_of_the_known_forms(tmp_path):
    assert load_config(None, {"device": "cuda:1"})["device"] == "cuda:1"   # a GPU is checked where it is used
    assert load_config(None)["device"] == "auto"
    bad = tmp_path / "c.yaml"
    bad.write_text("device: gpu\n")
    with pytest.raises(BadInputError, match="device must be auto, cpu, cuda or cuda:N"):
        load_config(bad)


def test_a_gpu_asked_for_where_there_is_none_stops_every_command_before_any_work(tmp_path, capsys, monkeypatch):
    _gpus(monkeypatch, 0)
    register_tiny()
    data = write_texture_set(tmp_path / "data", n_train=4, n_good=1, n_bad=1)
    out = tmp_path / "run"
    (data / "train" / "good" / "zz.png").write_bytes(b"\x89PNG truncated")   # found only after the device check
    assert main(tiny_train_args(data) + ["--out", str(out), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "sees no CUDA GPU" in err and "zz.png" not in err
    (data / "train" / "good" / "zz.png").unlink()
    assert not (out / "checkpoint.pt").exists() and not (out / "model.pt").exists()
    for cmd in (["evaluate", "--run", str(tmp_path / "no_run")], ["predict", "--run", str(tmp_path / "no_run"),
                "--data", str(data), "--out", str(tmp_path / "p")]):
        assert main(cmd + ["--device", "cuda:0"]) == 2
        err = capsys.readouterr().err
        assert "sees no CUDA GPU" in err and "no_run" not in err   # the device is checked first


def test_a_run_resumes_on_another_device(tmp_path, capsys):
    register_tiny()
    data = write_texture_set(tmp_path / "data", n_train=6, n_good=1, n_bad=1)
    out = tmp_path / "run"
    assert main(tiny_train_args(data) + ["--out", str(out)]) == 0
    assert "device: auto" in (out / "config.yaml").read_text()
    assert main(tiny_train_args(data) + ["--out", str(out), "--resume", "--epochs", "2", "--device", "cpu"]) == 0
    assert "cannot change" not in capsys.readouterr().err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 2


def test_scoring_inputs_go_to_the_models_device_and_the_batch_stays_on_the_cpu(tmp_path):
    from uninet_feat.data.layouts import discover
    from uninet_feat.data.dataset import ImageDataset
    data = write_texture_set(tmp_path / "data", n_train=3, n_good=1, n_bad=1)
    ds = ImageDataset(discover(data)[:3], image_size=32)
    for batch, x in eval_batches(ds, {"eval_batch_size": 2, "channels_last": True}, torch.device("meta")):
        assert x.device.type == "meta" and batch["image"].device.type == "cpu"
        assert x.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dfs", ["off", "learned"])
def test_the_models_maps_scores_and_features_stay_on_its_device(dfs, monkeypatch):
    """A tensor made on the CPU inside scoring (e.g. a coordinate grid without ``device=``) fails beside a model on
    another device: caught here on "meta" (it was, in `descriptors.hot_region_shape`)."""
    from uninet_feat.export import uninet_features
    from uninet_feat.model import UniNet
    monkeypatch.setenv("UNINET_KERNELS", "torch")   # the torch paths of the fused kernels (Triton: CUDA tensors)
    model = UniNet(TinyBackbone(), dfs=dfs, mem="multiscale").to("meta").eval()
    x = torch.randn(2, 3, 64, 64, device="meta")
    out = model(x)
    assert {t.device.type for t in out.teachers + out.students} == {"meta"}
    pix, score = model.predict(x)
    assert pix.device.type == score.device.type == "meta" and tuple(pix.shape) == (2, 64, 64)
    r = uninet_features(model, x, patches=True)
    assert {k for k, v in r.items() if torch.is_tensor(v) and v.device.type != "meta"} == set()
    assert r["vectors"].shape[0] == 2


def test_the_knn_index_goes_where_the_model_is_and_index_takes_a_device(monkeypatch, tmp_path):
    """faiss-gpu put every kNN index on all GPUs (load's default, auto), whatever --device the command had."""
    import faiss
    import numpy as np
    from uninet_feat import workflows
    from uninet_feat.downstream import KNNScorer
    from uninet_feat.scorers import knn_setup
    KNNScorer(coreset_ratio=1.0, device="cpu").fit(np.random.default_rng(0).standard_normal((50, 8))
                                                    .astype("f4")).save(tmp_path / "knn")
    moved = []
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2)   # a faiss-gpu build, torch's model on the CPU
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", lambda idx, *a, **k: moved.append("all") or idx)
    monkeypatch.setattr(faiss, "index_cpu_to_gpus_list", lambda idx, gpus, *a, **k: moved.extend(gpus) or idx)

    class Ex:
        device = torch.device("cpu")
    from uninet_feat import scorers
    monkeypatch.setattr(scorers, "check_built_from", lambda *a: None)   # an index of adapted patches, taken as ex's
    scorer, _ = knn_setup(tmp_path / "knn", Ex())
    assert moved == [] and scorer.index.ntotal == 50
    Ex.device = torch.device("cuda", 1)   # a model on the second GPU: its index there, not on both
    knn_setup(tmp_path / "knn", Ex())
    assert moved == [1]
    seen = {}
    monkeypatch.setattr(workflows, "index_cmd", lambda *a, **k: seen.update(k) or {"index": "x"})
    assert main(["index", "--features", str(tmp_path), "--out", str(tmp_path / "i"), "--device", "cpu"]) == 0
    assert seen["device"] == "cpu"
