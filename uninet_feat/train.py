"""The training loop, kept apart from the pure torch model (anomalib's split, without its wrappers).

One code path for one-class (``group`` = one category), multi-class (several or all categories in
one model) and supervised training (labelled defects and masks in the training split push the
abnormal margin). Two AdamW optimisers as in the method: student + bottleneck + DFS at ``lr``,
target teacher at ``lr_target``. Fixed schedule: by default the model after the last epoch is the
model; ``select: synthetic`` keeps instead the epoch that best separates the validation normals from
synthetic defects made from them (`selection`, no labels), saved as ``best.pt`` as it is found.
With ``denoise: P`` a share P of each batch gets synthetic defects and the student learns to give the
clean image's teacher features (`denoise`). A resumable checkpoint is written atomically after every
epoch; ``resume=True`` continues from it and reproduces the uninterrupted run (shuffling and the
denoising edits are seeded per epoch and step; under torchrun the edits per rank too, so a denoising run resumed
with another number of ranks draws other edits: docs/scaling.md).
"""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from .calibration import calibrate, parse_image_score, parse_map_levels, parse_map_norm, with_calibration_normals
from .checkpoint import checkpoint_config, epochs_trained, nonfinite_keys, read_checkpoint, save_checkpoint
from .config import DEFAULT_CONFIG, restored_global_state, save_run_config, seed_everything
from .data.dataset import check_samples
from .denoise import Damager, EditDrawer, edits_mode, parse_denoise
from .distributed import env_rank_world, init_from_env  # [distributed] torchrun support; a no-op without WORLD_SIZE
from .errors import BadInputError
from .io import atomic_write_text, folder_lock
from .optim import make_optimizers
from .positions import parse_tile_norm
from .runs import (CachedDataset, absolute_data_paths, check_split, input_sides, load_samples, make_dataset, make_model,
                   pick_device, set_threads, side_fix, split_digest, split_paths, train_val_samples)
from .selection import SyntheticValidation, parse_kinds, warn_choices_on_trained_kinds


def _progress(quiet: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeRemainingColumn(), disable=quiet, transient=False)


def train(cfg: dict, out: str | Path, resume: bool = False, quiet: bool = False, flags: tuple = ()) -> Path:
    """Train UniNet with ``cfg`` into the run folder ``out``; returns the path of ``model.pt``. The folder is
    locked while it trains (`io.folder_lock`; rank 0 of a torchrun job holds it for all ranks). ``resume=True``
    continues the run in ``out``: ``cfg`` is then the run's own config but for `RESUMABLE_KEYS` (e.g.
    ``load_config(out / "config.yaml", {"epochs": 20})``); another value of any other key is refused
    (`check_resume_changes`), as `train --resume` refuses it. The process-wide state it sets for a reproducible run
    (seeds, deterministic algorithms, thread count) is the caller's again on return (`config.restored_global_state`).
    ``flags``: the keys of ``cfg`` the caller set itself (the command's flags): on a resume, those of the pixel map and
    image score win over what `calibrate` was told since (`_kept_choices`), also when equal to the run's own."""
    rank, world = env_rank_world() or (0, 1)   # [distributed] torchrun; (0, 1) in a single process
    with restored_global_state():
        if rank != 0:
            return _train(cfg, Path(out), resume, quiet, rank, world, tuple(flags))
        with folder_lock(out):
            return _train(cfg, Path(out), resume, quiet, rank, world, tuple(flags))


def _train(cfg: dict, out: Path, resume: bool, quiet: bool, rank: int, world: int, flags: tuple = ()) -> Path:
    ckpt_path = out / "checkpoint.pt"
    start_epoch = 0
    if resume:
        if not ckpt_path.exists():
            # a finished run whose checkpoint.pt was removed (disk space): "drop --resume" led to "already holds a
            # run", whose fix was --resume again (an audit, session 52)
            fix = ("a run cannot go on without its checkpoint.pt (model.pt holds no optimiser state): restore it, or "
                   "train a new run (a new --out)" if (out / "model.pt").exists() else
                   "drop --resume to start fresh")
            raise BadInputError("nothing to resume: no checkpoint.pt", path=out, fix=fix)
        state = read_checkpoint(ckpt_path)
        _check_resumable(ckpt_path, state)
        _check_config_edits(out, state)
        check_resume_changes(cfg, state, out)
        # model, data and options are the checkpoint's (a ``cfg`` that differs in them was refused just above);
        # ``cfg`` sets only the schedule's length (to finish or extend it) and, when given, the thread count
        was = checkpoint_config(state).get("threads")
        if was and cfg.get("threads") and int(cfg["threads"]) != int(was):
            warnings.warn(f"{out}: the run trained with {was} threads, --threads {cfg['threads']} now: the thread "
                          "count changes how floats are summed, so the resumed run will not equal an uninterrupted "
                          f"one (fix, to reproduce it: --threads {was})")
        cfg = {**checkpoint_config(state), **{k: cfg[k] for k in RESUMABLE_KEYS if cfg.get(k) is not None}}
        if cfg["epochs"] < int(state["epoch"]):
            raise BadInputError(f"the run has already trained {state['epoch']} epochs, more than epochs "
                                f"{cfg['epochs']}", path=out,
                                fix=f"drop --epochs to finish the run's own schedule, or pass --epochs >= "
                                    f"{state['epoch']}")
    elif (out / "model.pt").exists() or ckpt_path.exists():
        raise BadInputError("run folder already holds a run", path=out,
                            fix="pass --resume to continue it, or choose a new --out" if ckpt_path.exists() else
                            "choose a new --out (its checkpoint.pt is gone, so --resume cannot continue it)")
    else:   # a resumed run keeps its config as saved: an older run's split hashes `data` as it was typed
        cfg = absolute_data_paths(cfg)
    set_threads(cfg)
    pick_device(cfg.get("device"))   # a GPU that is not there: refused before any image is read
    if cfg.get("threads") is None:   # recorded: the thread count is part of what a seed reproduces (float sums)
        cfg = {**cfg, "threads": torch.get_num_threads()}
    seed_everything(cfg["seed"])
    samples = load_samples(cfg)
    fit, val = train_val_samples(samples, cfg)
    # `calibrate --normals`: kept by the new model.pt too
    given = with_calibration_normals({}, out).get("calibration_normals") if resume else None
    # the normals come without masks (`train_val_samples`): only a supervised run's defects' are read, as targets
    if cfg.get("skip_bad") and cfg.get("supervised"):   # a defect whose mask does not fit: its image label then
        from .data.dataset import drop_unusable_masks
        fit = drop_unusable_masks(fit)
    if cfg.get("supervised"):   # its masks are training targets: a picture there would teach 100 % defect
        from .data.dataset import picture_masks
        fit = picture_masks(fit, cfg.get("skip_bad", False))
    test = [s for s in samples if s.split == "test"]
    if not cfg.get("skip_bad"):   # before the model is built; the validation normals too (read only after the
        _check_before_training(fit + val, test)   # last epoch), so one error names every bad image up front
    if world > cfg["batch_size"]:   # each rank takes a slice of every global batch: an empty one crashed
        raise BadInputError(f"--batch-size {cfg['batch_size']} is the global batch, split over {world} "
                            "processes: each needs at least one image", fix=f"--batch-size {world} or more")
    if not resume and rank == 0:
        _say_split(fit, val, test, quiet)
        _mixed_kinds_note(fit + val)
        if cfg.get("supervised"):
            _supervision_notes(fit, cfg)
    # the split as it is now: a resume refuses another one (a normal added to the folder redraws the validation split)
    split, paths = split_digest(fit, val, cfg["data"]), split_paths(fit, val, cfg["data"])
    record = _kept_choices(cfg, state, out, flags) if resume else {}   # what `calibrate` was told: kept by a resume
    choices = {k: v for k, v in record.items() if k != "_over"}
    own = {**cfg, **choices}
    if resume and _final_model(out, cfg, state):   # model.pt is left as it is: indices and heads name its sha256
        if (val or given) and not _calibrated(out):   # killed between writing model.pt and calibrating it
            check_split(state, fit, val, cfg["data"], cfg.get("split_csv") or cfg["data"])
            if rank == 0:
                from .calibration import recalibrate
                recalibrate(out, quiet=quiet, map_levels=own.get("map_levels", "all"),
                            map_norm=own.get("map_norm", "none"), device=cfg.get("device"), warn_kinds=False,
                            image_score=own.get("image_score", "wdm"), tile_norm=own.get("tile_norm"),
                            synthetic_kinds=choices.get("synthetic_kinds"), choices=record)
        else:
            warnings.warn(f"{out}: the run has already trained its {cfg['epochs']} epochs and calibrated model.pt; "
                          "nothing to do, model.pt is left as it is (fix, to train longer: --resume --epochs N)")
        return out / "model.pt"
    if resume:
        check_split(state, fit, val, cfg["data"], cfg.get("split_csv") or cfg["data"])
    model = make_model(cfg, state["backbone"] if resume else None)   # resumed: the backbone as it trained
    step, least, why = input_sides(model)   # before the run folder is written; forward would refuse it later
    side = cfg["image_size"]   # the network's input: the image, or each tile, resized to image_size
    if side % step:
        raise BadInputError(f"image_size {side} must be a multiple of {step} for this backbone ({cfg['backbone']}: "
                            f"its {why})", fix=f"--image-size {side_fix(side, step, least)}")
    if model.border_pad >= side:
        raise BadInputError(f"border_pad {model.border_pad} must be smaller than the network's input (image_size "
                            f"{side}, to which {'each tile' if cfg.get('tile') else 'the image'} is resized): a "
                            "mirror reflects at most the input itself",
                            fix=f"a smaller --border-pad, or --image-size {least} or larger")
    one = cfg["batch_size"] == 1 or (len(fit) == 1 and not cfg.get("tile"))   # a batch of one image
    if one and (side + 2 * model.border_pad) // step <= 1:   # a torch traceback after the folder was written
        raise BadInputError(f"a batch of one image at image_size {side}: the bottleneck's grid is 1x1, and BatchNorm "
                            "cannot train on one value per channel", path=cfg.get("split_csv") or cfg.get("data"),
                            fix=f"--batch-size 2 or more (with 2 or more training images), or --image-size "
                                f"{2 * step} or larger")
    if resume:   # saved as the run first saved it: the resolved student_relu has the checkpoint's own key, so a
        cfg = {k: v for k, v in cfg.items() if k != "student_relu"}   # resumed model.pt equals an uninterrupted one
        if "student_relu" in state["config"]:
            cfg["student_relu"] = state["config"]["student_relu"]
    map_levels = own.get("map_levels", "all")   # the pixel map: used after the last epoch; checked now
    map_norm = parse_map_norm(own.get("map_norm", "none"))
    image_score = parse_image_score(own.get("image_score", "wdm"))
    if map_levels != "auto":
        parse_map_levels(map_levels, len(model.channels))
    parse_kinds(own.get("synthetic_kinds"))   # used by select: synthetic and the auto choices
    parse_kinds(cfg.get("denoise_kinds"), "denoise_kinds")   # denoise's training edits: P, as the backbone's inputs
    damage = (Damager(cfg["denoise"], cfg.get("denoise_kinds"), model.source.mean, model.source.std, cfg["seed"])
              if parse_denoise(cfg.get("denoise")) > 0 else None)
    parse_tile_norm(own.get("tile_norm", "none"), cfg.get("tile"))   # used after the last epoch
    warn_choices_on_trained_kinds(own, map_levels, map_norm, damage is not None, image_score)
    if "auto" in (map_levels, map_norm, image_score) and not val:
        raise BadInputError("map_levels / map_norm / image_score: auto chooses on the validation normals, but "
                            "val_fraction leaves none", path=cfg.get("split_csv") or cfg.get("data"),
                            fix="set val_fraction > 0, or map_levels: all, map_norm: none and image_score: wdm")
    if cfg.get("tile_norm", "none") != "none" and not val:   # its offsets go into calibration.json, written with them
        raise BadInputError(f"tile_norm: {cfg['tile_norm']} is calibrated after the last epoch together with the "
                            "threshold on the validation normals, but val_fraction leaves none",
                            path=cfg.get("split_csv") or cfg.get("data"),
                            fix="set val_fraction > 0, or tile_norm: none")
    if not val and not resume:
        warnings.warn("val_fraction leaves no validation normals: the run will have no threshold, so evaluate and "
                      "predict flag no image unless given --threshold VALUE (fix: --val-fraction 0.1)")
    if cfg.get("step_in_backward") and world > 1:
        raise BadInputError("--step-in-backward cannot be used with torchrun (DDP averages gradients after "
                            "they are consumed)", path=out, fix="drop --step-in-backward for distributed runs")
    # [distributed] torchrun on GPUs: cuda:LOCAL_RANK and nccl; on CPUs gloo. Before the optimisers: their
    # state lives beside the parameters (a resumed state is moved there by load_state_dict)
    device = pick_device(cfg.get("device"))
    dd = init_from_env(device="cuda" if device.type == "cuda" and world > 1 else device)
    device = dd.device if dd.enabled else device
    model = model.to(device)
    if cfg.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
    opt_s, opt_t = make_optimizers(model, cfg, in_backward=bool(cfg.get("step_in_backward")))
    if cfg.get("grad_checkpointing") and "target" not in model.set_grad_checkpointing(True) and dd.is_main:
        warnings.warn(f"--grad-checkpointing: {cfg['backbone']} offers no checkpointing of its own, so its target "
                      "teacher's activations are stored as without it (the bottleneck and student are recomputed)")
    if resume:
        try:
            model.load_state_dict(state["state_dict"])
            opt_s.load_state_dict(state["opt_student"])
            opt_t.load_state_dict(state["opt_target"])
        except (RuntimeError, ValueError, KeyError) as e:   # e.g. weights of another backbone copied in
            first = (str(e).split("\n")[1] if "\n" in str(e) else str(e)).strip()   # torch's report: one line
            raise BadInputError(f"checkpoint.pt does not match the model its own config builds ({first[:300]})",
                                path=ckpt_path, fix="restore the run's own checkpoint.pt, or start a new run "
                                                    "(a new --out)") from e
        start_epoch = int(state["epoch"])
    step = dd.wrap(model)             # None in the single-process run
    if dd.is_main:
        save_run_config(out, cfg, resumed_at=start_epoch if resume else None)
    # supervised: a defect's positions are where any of its pixels fall (as `losses.row_weights` pools them)
    ds = make_dataset(fit, cfg, model.source, mask_resize="any" if cfg.get("supervised") else "nearest")
    if cfg.get("cache_images", True):
        ds = CachedDataset(ds)
    if len(ds) < 1:
        raise BadInputError("no training images left after filtering", path=cfg["data"],
                            fix="check --group and --split-csv select normal training images, or drop --skip-bad")
    has_mask = torch.tensor([s.mask is not None for s in fit])
    log_path = out / "train_log.jsonl"
    log_lines = _resumed_log(log_path, start_epoch) if (resume and log_path.exists()) else []
    synth, best = _selection(cfg, val, model, out, log_lines, dd.is_main, start_epoch)
    last = json.loads(log_lines[-1]) if synth is not None and start_epoch == cfg["epochs"] and log_lines else {}
    if last.get("epoch") == start_epoch and "val_synthetic_score" not in last:
        # resumed with --epochs = the epochs done: a run of this length validates its last epoch, so it is scored
        # now, from checkpoint.pt's weights, as the loop would have (log line first, then best.pt)
        best, improved = _validate(synth, model, cfg, last, best, None if quiet else print)
        log_lines[-1] = json.dumps(last)
        atomic_write_text(log_path, "\n".join(log_lines) + "\n")
        if improved:
            save_checkpoint(out / "best.pt", model, cfg, epoch=start_epoch, selection=best)
    drop_last = len(ds) > cfg["batch_size"]
    steps = len(ds) // cfg["batch_size"] if drop_last else 1   # the batches an epoch really runs
    note = dropped_items_note(len(ds), cfg["batch_size"], "tiles" if cfg.get("tile") else "images")
    if note and dd.is_main:
        warnings.warn(note)
    with _progress(quiet or not dd.is_main) as prog, EditDrawer(damage, cfg, *edits_mode(device)) as draw:
        task = prog.add_task("train", total=(cfg["epochs"] - start_epoch) * steps, info="")
        for epoch in range(start_epoch, cfg["epochs"]):
            model.train()
            gen = torch.Generator().manual_seed(cfg["seed"] * 1000 + epoch)
            if dd.enabled:  # [distributed] this rank's slice of the same global batches
                loader = dd.shard_batches(ds, cfg["batch_size"], gen, drop_last=drop_last)
            else:
                loader = torch.utils.data.DataLoader(ds, batch_size=cfg["batch_size"], shuffle=True, generator=gen,
                                                     drop_last=drop_last)
            t0, meter, n, every = time.time(), _EpochMeter(), 0, _check_every(device)
            for batch, x, clean, clean_index in draw(loader, epoch, dd.rank):
                labels = batch["label"] if cfg.get("supervised") else None
                masks = batch["mask"] if cfg.get("supervised") else None
                hm = has_mask[batch["index"]] if cfg.get("supervised") else None
                if device.type != "cpu":   # edits are drawn on the CPU; everything the model sees goes over at once
                    x, clean, clean_index, labels, masks, hm = (None if t is None else t.to(device, non_blocking=True)
                                                                for t in (x, clean, clean_index, labels, masks, hm))
                if dd.enabled:  # [distributed] global-batch terms for logging, this rank's share to backward
                    terms, local_loss = dd.loss(step, x, labels, masks, hm, batch["global_batch_size"], clean,
                                                clean_index)
                else:
                    terms = model.loss(model(x, clean, clean_index), labels, masks, hm)
                    local_loss = terms["loss"]
                loss = terms["loss"]
                meter.add(terms, n)
                if n % every == every - 1:
                    _stop_if_nonfinite(meter, epoch, out, cfg)
                opt_s.zero_grad(set_to_none=True)
                opt_t.zero_grad(set_to_none=True)
                with model.backward_guard():   # BN statistics not updated twice under checkpointing
                    local_loss.backward()
                opt_s.step()
                opt_t.step()
                n += 1
                info = {} if quiet or n % every else {"info": f"epoch {epoch + 1}/{cfg['epochs']} loss "
                                                                     f"{meter.means(n)['loss']:.4f}"}
                prog.update(task, advance=1, **info)
            _stop_if_nonfinite(meter, epoch, out, cfg)
            _stop_if_weights_nonfinite(model, epoch, out, cfg)
            rec = {"epoch": epoch + 1, "seconds": round(time.time() - t0, 2), "steps": n, **meter.means(n)}
            improved = False
            if synth is not None and _validates(epoch + 1, cfg):   # a line above the bar: its info is overwritten
                best, improved = _validate(synth, model, cfg, rec, best, None if quiet else prog.console.print)
            log_lines.append(json.dumps(rec))
            if dd.is_main:  # [distributed] rank 0 writes, the others wait
                # commit order: the log, the kept epoch, checkpoint.pt, best.pt. A stop before checkpoint.pt leaves
                # an extra log line (cut on resume) and an epoch file that the replayed epoch writes again; one
                # after it, a best.pt one epoch behind, which the resume rebuilds from checkpoint.pt's weights
                # (`_selection`). Never a file ahead of checkpoint.pt, nor a kept epoch that no resume writes
                atomic_write_text(log_path, "\n".join(log_lines) + "\n")
                if cfg.get("keep_every") and (epoch + 1) % cfg["keep_every"] == 0:
                    save_checkpoint(out / "epochs" / f"epoch_{epoch + 1:03d}.pt", model, cfg, epoch=epoch + 1)
                save_checkpoint(ckpt_path, model, cfg, epoch=epoch + 1, opt_student=opt_s.state_dict(),
                                opt_target=opt_t.state_dict(), split=split, split_paths=paths)
                if improved:
                    save_checkpoint(out / "best.pt", model, cfg, epoch=epoch + 1, selection=best)
            dd.barrier()
    model_path = out / "model.pt"
    if dd.is_main:
        if synth is not None and best["epoch"]:
            kept = read_checkpoint(out / "best.pt")
            if kept.get("epoch") != best["epoch"]:   # never the weights of another epoch under the best's number
                raise BadInputError(f"best.pt holds epoch {kept.get('epoch')}, but the log's best is epoch "
                                    f"{best['epoch']}", path=out / "best.pt",
                                    fix=f"put that epoch's model there (epochs/epoch_{best['epoch']:03d}.pt when "
                                        "--keep-every kept it) and resume again, or start a new run")
            model.load_state_dict(kept["state_dict"])
            model_path = save_checkpoint(out / "model.pt", model, cfg, epoch=best["epoch"],
                                         selection={**best, "rule": RULE, "epochs_trained": cfg["epochs"]}, split=split)
        else:
            selection = None
            if synth is not None:   # every validated epoch scored NaN (non-finite maps): no epoch was chosen
                selection = {"epoch": cfg["epochs"], "score": None, "rule": "last: no finite synthetic "
                             "validation score", "epochs_trained": cfg["epochs"]}
                warnings.warn(f"select: synthetic scored no validated epoch (every score was NaN: the model's "
                              f"validation maps or scores were not finite), so model.pt is the last epoch, "
                              f"{cfg['epochs']}, as select: last (fix: look for NaN/Inf in train_log.jsonl's "
                              f"val_synthetic_* and the inputs, or lower --lr)")
            model_path = save_checkpoint(out / "model.pt", model, cfg, epoch=cfg["epochs"], split=split,
                                         **({"selection": selection} if selection else {}))
        if val or given:
            normals, cal_cfg = _calibration_set(out, cfg, val, given)
            if choices:   # the auto choices' synthetic kinds, and the record that the next calibration keeps
                cal_cfg = {**cal_cfg, "calibrate_choices": record,
                           **{k: choices[k] for k in ("synthetic_kinds",) if k in choices}}
            calibrate(model, normals, cal_cfg, out, quiet, map_levels, map_norm, tile_norm=own.get("tile_norm"),
                      image_score=image_score)
    dd.close()  # [distributed] barrier, plain BN classes back, process group destroyed
    return model_path


# Steps between the host's looks at the loss on a GPU (its finiteness, the progress bar's running mean; every step
# on the CPU, where a look is free). Why: a look is a host-device sync, and one each step (the loss's finiteness,
# five float() of the terms, the bar's loss.item()) left the GPU idle while the host queued the next step.
CHECK_EVERY = 25


def _check_every(device: torch.device) -> int:
    return 1 if device.type == "cpu" else CHECK_EVERY


class _EpochMeter:
    """Running sums of an epoch's loss terms, kept where the terms are (float64, so the epoch means are the Python
    float sums of before, in the same order), and the first non-finite loss; read only when asked."""

    def __init__(self):
        self.sums, self.first, self.first_value = {}, None, None

    def add(self, terms: dict, step: int) -> None:
        for k, v in terms.items():
            v = v.detach().double() if torch.is_tensor(v) else torch.tensor(float(v), dtype=torch.float64)
            self.sums[k] = v if k not in self.sums else self.sums[k] + v.to(self.sums[k].device)
        loss = terms["loss"].detach()
        if self.first is None:
            self.first, self.first_value = torch.full_like(loss, -1, dtype=torch.int64), torch.zeros_like(loss)
        keep = ~torch.isfinite(loss) & (self.first < 0)   # the earliest bad step is kept
        self.first = torch.where(keep, step, self.first)
        self.first_value = torch.where(keep, loss, self.first_value)

    def bad(self) -> tuple[int, float] | None:
        """(step, loss) of the first non-finite loss, or None (a host-device sync)."""
        if self.first is None or int(self.first) < 0:
            return None
        return int(self.first), float(self.first_value)

    def means(self, n: int) -> dict:
        """Each term's mean over the epoch's first ``n`` steps (a host-device sync)."""
        return {k: float(v) / max(n, 1) for k, v in self.sums.items()}


# Below this temperature the fix texts name it: L_SC's logits are cos / T, so at a tiny T they and their gradients
# overflow whatever the inputs and --lr (an audit, session 52: -T 1e-40 was told to check its images or lower --lr).
SMALL_TEMPERATURE = 1e-3


def _lower(cfg: dict) -> str:
    """What to lower or raise so that the loss stays finite, for the fix texts."""
    t = float(cfg.get("temperature", 2.0))
    return f"raise -T (temperature {t:g} divides L_SC's similarities, which then overflow)" \
        if t < SMALL_TEMPERATURE else "lower --lr"


def _stop_if_nonfinite(meter: _EpochMeter, epoch: int, out: Path, cfg: dict) -> None:
    bad = meter.bad()
    if bad is not None:   # raised before this epoch's checkpoint: the last one saved is the last good epoch
        raise BadInputError(f"loss became {bad[1]} at epoch {epoch + 1} (step {bad[0] + 1})", path=out,
                            fix=f"check the inputs for NaN/Inf or {_lower(cfg)}")


def _stop_if_weights_nonfinite(model, epoch: int, out: Path, cfg: dict) -> None:
    """Refuse an epoch whose weights or BatchNorm statistics are not finite, before it is saved: a NaN gradient under
    a finite loss (the epoch's last step) left every loss looking fine, checkpoint.pt took the NaN weights, and
    --resume continued from them. One host-device sync an epoch."""
    bad = nonfinite_keys(model.state_dict())   # the tensors checkpoint.pt would take
    if not bad:
        return
    what = f"weights became non-finite in epoch {epoch + 1} while its losses stayed finite ({len(bad)} tensors, e.g. " \
           f"{bad[0]}): a NaN/Inf gradient; the epoch was not saved"
    if (out / "checkpoint.pt").exists():
        raise BadInputError(f"{what}, the run's last finished epoch is in its checkpoint.pt", path=out,
                            fix="check the inputs for NaN/Inf (once mended, --resume goes on from that epoch), or "
                                f"train a new run and {_lower(cfg)} (a resume keeps the run's settings)")
    # the first epoch: no checkpoint.pt to resume from (the advice to --resume met "nothing to resume"; an audit,
    # session 52)
    raise BadInputError(f"{what}, and no epoch was finished before it", path=out,
                        fix=f"check the inputs for NaN/Inf, or {_lower(cfg)}; then run the command again (nothing "
                            "was saved to --resume from)")


def _supervision_notes(fit, cfg: dict) -> None:
    """Say what makes --supervised do less than asked: defect masks with no defect pixel (those images train as
    normal ones), and a temperature at which the abnormal margin relu(p_ii - margin/2) cannot act: p_ii is at
    most e^(1/T) / (e^(1/T) + HW - 1), below 0.5 at T >= 1 for any level of 4 or more positions."""
    from .data.images import load_mask
    empty = [s.path for s in fit if not s.is_normal and s.mask is not None and not load_mask(s.mask).any()]
    if empty:
        warnings.warn(f"{len(empty)} defective training image(s) have a mask with no defect pixel (e.g. {empty[0]}): "
                      "they train as normal images (fix: correct the masks, or leave the mask cell empty to "
                      "supervise them by their image label)")
    if float(cfg["temperature"]) >= 1:
        warnings.warn(f"--supervised at temperature {cfg['temperature']:g}: the abnormal margin cannot act "
                      "(p_ii stays below 0.5 at any level of 4 or more positions), so defect rows only leave the "
                      "cosine and contrastive terms; the method's supervised recipe uses T = 0.1 (fix: -T 0.1)")


def _check_before_training(used, test) -> None:
    """Refuse unreadable training / validation images (`check_samples`), naming in the same error the test images
    that evaluate would refuse too: else those came up one run later, after the training ones were fixed."""
    try:
        check_samples(used)
    except BadInputError as e:
        try:
            check_samples(test)
        except BadInputError as t:
            raise BadInputError(f"{e.reason}\nand among the test images, which evaluate would refuse: {t.reason}",
                                fix=e.fix) from e
        raise


def _mixed_kinds_note(normals) -> None:
    """Warn when the training normals mix grey and colour files (headers only): a second camera, or a converted
    batch, that the model then learns as two kinds of normal; the fewer kind is named."""
    from .data.images import colour_kinds
    kinds = colour_kinds(s.path for s in normals if s.is_normal)
    if kinds["grey"] and kinds["colour"]:
        few = min(kinds, key=lambda k: len(kinds[k]))
        more = "colour" if few == "grey" else "grey"
        names = kinds[few]
        warnings.warn(f"the training normals mix grey and colour files: {len(names)} {few} "
                      f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}) among {len(kinds[more])} {more}; "
                      f"the model learns both as normal, and the {few} images' scores are not those of the {more} "
                      "ones. Fix: train on one kind (convert the others, or move them to a run of their own), unless "
                      "the line really has both", stacklevel=3)


def _say_split(fit, val, test, quiet: bool) -> None:
    """The split in one line, and a warning now for test images that evaluate would refuse after training."""
    if not quiet:
        n_def = sum(not s.is_normal for s in test)
        print(f"{len(fit)} training images, {len(val)} validation normals (threshold, label-free choices), "
              f"{len(test)} test images ({n_def} with defects) left for evaluate")
        labels: dict = {}
        for s in test:
            labels.setdefault(s.label, [0, 0])
            labels[s.label][0] += 1
            labels[s.label][1] += s.mask is not None and not s.is_normal
        if labels:   # what was read, before the wait: an MVTec user checks the labels and masks first
            print("test labels: " + ", ".join(f"{k} {n}" + (f" ({m} with a mask)" if m != n and m else "")
                                              for k, (n, m) in sorted(labels.items()))
                  + f"; masks for {sum(m for _, m in labels.values())} of {n_def} defect images")
        groups = sorted({s.group for s in fit} - {""})
        if len(groups) > 1:
            print(f"one model over {len(groups)} groups ({', '.join(groups[:6])}{', ...' if len(groups) > 6 else ''})"
                  "; --group G trains one of them")
    unseen = sorted({s.group for s in test} - {s.group for s in fit} - {s.group for s in val} - {""})
    if unseen and {s.group for s in fit} - {""}:   # a group of few normals whose drawn split put them all in test
        n = {g: (sum(s.group == g and s.is_normal for s in test), sum(s.group == g for s in test)) for g in unseen}
        warnings.warn(f"{len(unseen)} group(s) have test images but no training or validation normal, so the model "
                      "never sees their normal images and evaluate scores them against the other groups': "
                      + ", ".join(f"{g} ({a} normal and {b - a} defective test images)" for g, (a, b) in n.items())
                      + ". Fix: give each group normals to train on (a split CSV with `train` rows, or a train/good "
                        "folder; a drawn split sends about a fifth of a group's normals to test), or leave the group "
                        "out of this data")
    from .normals import same_files
    copies = same_files([s.path for s in test], [s.path for s in [*fit, *val]])
    if copies:   # a split of paths cannot see a file filed twice (an audit, session 52)
        warnings.warn(f"{len(copies)} test image(s) are byte copies of training or validation images (e.g. "
                      f"{copies[0]}): evaluate's figures on them are optimistic (a trained image scores like the "
                      "normals it learnt). Fix: remove the copies from the test images (or from training)")
    try:
        check_samples(test)
    except BadInputError as e:   # training does not read them: say it now, not after the last epoch
        warnings.warn(f"evaluate will refuse test images of this data (training goes on without them):\n{e}")


def _final_model(out: Path, cfg: dict, state: dict) -> bool:
    """Whether a resumed run's model.pt is already its final model: checkpoint and model.pt at the schedule's
    end, and the calibration options the run's own (new ones ask for a new calibration: train again).
    Then `train --resume`, e.g. retried by a pipeline, leaves model.pt untouched: torch.save never writes the
    same bytes twice, and every index or head built from model.pt names its sha256."""
    if int(state["epoch"]) != cfg["epochs"] or not (out / "model.pt").is_file():
        return False
    model = read_checkpoint(out / "model.pt")
    # model.pt's own: checkpoint.pt is not saved again when only these change (no epoch trains), and a run older
    # than a key saved none (its default)
    if any(cfg.get(k, DEFAULT_CONFIG[k]) != model["config"].get(k, DEFAULT_CONFIG[k])
           for k in ("map_levels", "map_norm", "image_score")):
        return False
    # a model.pt of a shorter schedule: killed before the longer one's was written
    return epochs_trained(model) == cfg["epochs"]


# what a resumable checkpoint.pt holds; a model file (model.pt, best.pt, a kept epoch) lacks the optimiser states
RESUME_STATE = ("epoch", "opt_student", "opt_target", "state_dict", "config")


def _check_resumable(path: Path, state: dict) -> None:
    """Refuse a model file copied in as checkpoint.pt before anything is built (it was a KeyError later)."""
    missing = [k for k in RESUME_STATE if k not in state]
    if missing:
        raise BadInputError(f"a model file, not a resumable checkpoint: it lacks {', '.join(missing)}", path=path,
                            fix="start a new run (a new --out; --weights refuses a model file too), or restore the "
                                "run's own checkpoint.pt")


def _check_config_edits(out: Path, state: dict) -> None:
    """Refuse a config.yaml edited since checkpoint.pt was written: a resume trains on checkpoint.pt's options
    (only `RESUMABLE_KEYS` come from the command) and then writes them over the edit, so it was silently undone.
    A key either file lacks (an older run) is not compared; an unreadable config.yaml is written anew."""
    from .io import read_yaml
    try:
        saved = read_yaml(out / "config.yaml", "") if (out / "config.yaml").is_file() else None
    except BadInputError:
        return
    if not isinstance(saved, dict):
        return
    was = state["config"]
    changed = sorted(k for k in saved.keys() & was.keys() if k not in RESUMABLE_KEYS and saved[k] != was[k])
    if changed:
        raise BadInputError(f"{', '.join(changed)} in config.yaml differ{'s' * (len(changed) == 1)} from the run's "
                            f"checkpoint.pt ({', '.join(f'{k}={was[k]!r}' for k in changed)}), which a resume trains "
                            "with: config.yaml was edited (the edit would be ignored and then written over), or "
                            "checkpoint.pt is another run's, copied in", path=out / "config.yaml",
                            fix="undo the edit to continue the run (a resume changes only "
                                f"{', '.join(RESUMABLE_KEYS)}); or put the run's own checkpoint.pt back; or train a "
                                "new run with a new --out")


# what a key an older run's config lacks meant when it trained, where that is known: (a key not here is not compared)
# no mean/std of its own: the backbone's, so a resume asked with --mean/--std would train on without them
_MEANT_WHEN_ABSENT = {"mean": None, "std": None}


def check_resume_changes(cfg: dict, state: dict, out: Path) -> None:
    """Refuse a resume asked with settings it cannot honour. A resume trains on checkpoint.pt's options and takes
    only `RESUMABLE_KEYS` from ``cfg``, so a library caller's `train(cfg, out, resume=True)` with another backbone,
    image_size or width silently trained the old run on. One check for it and `train --resume` (whose flags reach
    ``cfg`` on top of the run's own config.yaml): ``cfg`` against the run config that checkpoint.pt saved, data
    paths absolute on both sides (a relative spelling of the same folder is the same run); a key either lacks (an
    older run) is not compared; student_relu may be the saved value or its resolved one (a run without config.yaml
    is resumed from checkpoint.pt's resolved config)."""
    from .checkpoint import checkpoint_config
    from .config import _plain
    given = absolute_data_paths(cfg)
    was = {**{k: v for k, v in _MEANT_WHEN_ABSENT.items() if k in given}, **absolute_data_paths(state["config"])}
    resolved = checkpoint_config(state)
    changed = sorted(k for k in given.keys() & was.keys() if k not in RESUMABLE_KEYS
                     and _plain(given[k]) not in (_plain(was[k]), _plain(resolved.get(k))))
    if changed:
        raise BadInputError(f"{', '.join(changed)} cannot change when a run is resumed (it was trained with "
                            f"{', '.join(f'{k}={was[k]!r}' for k in changed)}; asked: "
                            f"{', '.join(f'{k}={given[k]!r}' for k in changed)})", path=out / "checkpoint.pt",
                            fix="drop those flags to continue the run (from Python, resume with the run's own "
                                f"config: load_config('{out / 'config.yaml'}', {{'epochs': N}})); a resume changes only "
                                f"{', '.join(RESUMABLE_KEYS)}. Or train a new run with a new --out")


def _kept_choices(cfg: dict, state: dict, out: Path, flags: tuple = ()) -> dict:
    """The choices `calibrate` was told for a resumed run (`calibration.calibrate_choices`), which its final
    calibration makes again rather than config.yaml's; less those this resume's command sets itself (``flags``:
    `train --resume --map-levels all`, also when all is the run's own) and those whose config value changed since
    `calibrate` was told them (a resume with --map-levels 2, killed before it calibrated, then retried without it:
    config.yaml's 2, not the older 3; a review, session 53)."""
    from .calibration import calibrate_choices, current_choices
    told = calibrate_choices(out, anchors=True)
    choices = current_choices(told, cfg)
    for k in ("map_levels", "map_norm", "image_score"):   # the choices `train --resume` also takes (RESUMABLE_KEYS)
        if k in choices and (k in flags or cfg.get(k, DEFAULT_CONFIG[k]) != state["config"].get(k, DEFAULT_CONFIG[k])):
            del choices[k]
    over = {k: v for k, v in (told.get("_over") or {}).items() if k in choices}
    return {**choices, "_over": over} if choices else {}   # the record to keep, anchored as it was


def _calibration_set(out: Path, cfg: dict, val: list, given: str | None) -> tuple:
    """(normals, cfg) the final model is calibrated on: the run's given normals when it had them (a resumed
    run keeps them, as `calibrate` does until `--normals split`), else its validation split; the split, warned,
    when the given ones are gone."""
    if given:
        from .normals import given_normals
        try:
            return given_normals(given, cfg), {**cfg, "calibration_normals": given}
        except BadInputError as e:
            warnings.warn(f"{out}: calibrated on its held-out validation split, not on the normals it was "
                          f"calibrated on before ({e}). Fix: `uninet-feat calibrate --run {out} --normals DIR`")
            if not val:
                raise
    return val, cfg


def _calibrated(out: Path) -> bool:
    """Whether calibration.json was written for the run's current model.pt (an unreadable one was not)."""
    from .calibration import saved_calibration
    from .featstore import file_sha256
    cal = saved_calibration(out)
    return cal is not None and cal.get("model_sha256") == file_sha256(out / "model.pt")


def dropped_items_note(n: int, batch_size: int, what: str = "images") -> str | None:
    """The warning for a batch size at which every epoch leaves a quarter or more of the ``n`` training items
    out (the last, incomplete batch is dropped whenever there is more than one batch), with the batch sizes
    nearest ``batch_size`` that divide ``n`` (at least 2: BatchNorm needs two); None when little is left out.
    The batching itself stays as it is: changing it would change the training of existing runs."""
    left = n % batch_size if n > batch_size else 0
    if not left or left * 4 < n:
        return None
    divisors = [d for d in range(2, n + 1) if n % d == 0]
    below = [d for d in divisors if d < batch_size][-1:]
    sizes = " or ".join(str(d) for d in below + [next(d for d in divisors if d > batch_size)])
    steps = n // batch_size
    return (f"{n} training {what} at batch size {batch_size}: each epoch runs {steps} step{'s' * (steps > 1)} "
            f"and leaves {left} out (a different {'one' if left == 1 else left} each epoch); use --batch-size {sizes} "
            "to use them all")


# what `train --resume` takes from the config it is given; everything else comes from the checkpoint
RESUMABLE_KEYS = ("epochs", "threads", "map_levels", "map_norm", "image_score", "device", "grad_checkpointing", "step_in_backward",
                  "cache_images")   # map_*: only the calibration after the last epoch; device: a run may go on on
# another machine (floats are summed otherwise there, as with another thread count); the last three save memory and
# train the same model (optimiser states move between the two step modes: `optim`)

RULE = "best mean of image and pixel AUROC: validation normals vs synthetic defects made from them"


def _selection(cfg: dict, val, model, out: Path, log_lines: list[str], is_main: bool, done: int = 0):
    """(SyntheticValidation or None, best so far) — on a resume the best comes back from the log, and best.pt is
    checked against it: ``model`` holds checkpoint.pt's weights, those of epoch ``done``."""
    if cfg.get("select", "last") == "last":
        return None, None
    if cfg["select"] != "synthetic":
        raise BadInputError(f"unknown select {cfg['select']!r}", fix="use select: last or select: synthetic")
    if int(cfg.get("val_every", 1)) < 1:
        raise BadInputError(f"val_every must be >= 1, got {cfg['val_every']}", fix="e.g. val_every: 1")
    if not val:
        raise BadInputError("select: synthetic needs validation normals, but val_fraction is 0",
                            path=cfg.get("split_csv") or cfg.get("data"), fix="set val_fraction > 0 or select: last")
    best = {"epoch": 0, "score": float("-inf")}
    for line in log_lines:   # only the epochs this schedule validates: a resume that changed --epochs equals a new
        rec = json.loads(line)   # run of that length (the old last epoch was scored, a longer run never scores it)
        if _validates(rec["epoch"], cfg) and rec.get("val_synthetic_score", float("nan")) > best["score"]:
            best = {"epoch": rec["epoch"], "score": rec["val_synthetic_score"]}
    if best["epoch"]:
        _check_best(out, model, cfg, best, done, is_main)
    if not is_main:   # [distributed] rank 0 validates and writes; the others only train
        return None, best
    return SyntheticValidation.from_config(make_dataset(val, cfg, model.source), cfg), best


def _resumed_log(log_path: Path, start_epoch: int) -> list[str]:
    """The log's lines of the epochs a resume keeps, each checked to be an epoch's JSON record: a damaged line was
    a JSONDecodeError traceback (a `select: synthetic` run reads its validation scores from them)."""
    try:
        lines = log_path.read_text(encoding="utf-8").splitlines()[:start_epoch]
    except (OSError, UnicodeDecodeError) as e:
        raise BadInputError(f"cannot read the training log ({e})", path=log_path,
                            fix="restore train_log.jsonl, or train a new run with a new --out") from None
    for i, line in enumerate(lines):
        try:
            ok = isinstance(json.loads(line).get("epoch"), int)
        except (ValueError, AttributeError):
            ok = False
        if not ok:
            raise BadInputError(f"line {i + 1} is not an epoch's record (a damaged or edited log)", path=log_path,
                                fix="restore train_log.jsonl, or train a new run with a new --out")
    return lines


def _validates(epoch: int, cfg: dict) -> bool:
    """Whether ``select: synthetic`` scores ``epoch``: every ``val_every``-th and the schedule's last."""
    return epoch % int(cfg.get("val_every", 1)) == 0 or epoch == cfg["epochs"]


def _validate(synth, model, cfg: dict, rec: dict, best: dict, say=None) -> tuple[dict, bool]:
    """Score the model of epoch ``rec["epoch"]`` into its log record ``rec``: (best so far, whether it is this
    epoch). Strict: ties keep the earlier epoch; NaN never wins. ``say``: where the line goes (None: nowhere)."""
    v = synth.score(model, cfg["eval_batch_size"], bool(cfg.get("channels_last")))
    rec.update({f"val_synthetic_{k}": x for k, x in v.items()})
    improved = v["score"] > best["score"]
    if improved:
        best = {"epoch": rec["epoch"], "score": v["score"]}
    if say is not None:
        say(f"epoch {rec['epoch']}: synthetic validation {v['score']:.4f} (image {v['image_auroc']:.4f}, pixel "
            f"{v['pixel_auroc']:.4f}; best epoch {best['epoch']})")
    return best, improved


def _check_best(out: Path, model, cfg: dict, best: dict, done: int, is_main: bool) -> None:
    """best.pt is written after checkpoint.pt: a stop between the two leaves the earlier best (or none) while the
    log and checkpoint.pt name epoch ``done`` the best, so it is rebuilt from checkpoint.pt's weights (``model``).
    A best.pt ahead of checkpoint.pt (earlier versions wrote it first) is written again when its epoch is
    replayed; the end of training refuses it if none is."""
    path = out / "best.pt"
    held = read_checkpoint(path).get("epoch") if path.exists() else None
    if held == best["epoch"]:
        return
    if best["epoch"] == done:
        if is_main:
            save_checkpoint(path, model, cfg, epoch=done, selection=best)
    elif held is None:
        raise BadInputError("the log names a best epoch but best.pt is missing", path=out,
                            fix="restore best.pt, or start a new run")
    elif held < done:
        raise BadInputError(f"best.pt holds epoch {held}, but the log's best is epoch {best['epoch']}", path=path,
                            fix=f"put that epoch's model there (epochs/epoch_{best['epoch']:03d}.pt when --keep-every "
                                "kept it) and resume again, or start a new run")
    elif held == done and not _validates(held, cfg) and is_main:   # the old last epoch of an extended run
        warnings.warn(f"{path}: best.pt holds epoch {held}, which a {cfg['epochs']}-epoch run at val_every "
                      f"{cfg['val_every']} does not score, so it is no longer a candidate; the best this schedule "
                      f"scored is epoch {best['epoch']}, whose weights are not kept: unless a later epoch scores above "
                      f"it, the run stops after its last epoch without a new model.pt (fix: put "
                      f"epochs/epoch_{best['epoch']:03d}.pt at best.pt when --keep-every kept it, or train a new run "
                      "with a new --out)")
