"""The one training engine: ``train(config, events=None) -> best checkpoint path``.

Run by ``dmoe train``, by the GUI fine-tune (through that command in a subprocess) and under torchrun.

- ``recipe.batch_size`` is the GLOBAL batch: under torchrun each of N processes takes batch_size / N samples of
  the same seeded permutation (DistributedSampler), so the samples of a step, the lr schedule and the loss curve
  match a single process (up to BatchNorm statistics and the batch-pooled Dice, which see one shard per process).
- Steps are optimizer iterations; the poly / cosine schedules move once per iteration.
- Deterministic: seeded permutation per epoch, augmentations reseeded per item, a private DataLoader generator
  (so building a loader never consumes the global RNG); a resumed run repeats an uninterrupted one bit for bit
  on the CPU.
- Files (rank 0 only): ``last.safetensors``, ``best.safetensors`` (by validation ES-Dice), ``resume.*``, and with
  ``recipe.ema`` the moving average of the weights, ``ema.safetensors`` (training/ema.py).
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from napari_dmoe.io.checkpoint import save_model
from napari_dmoe.model.moe import DMoE

from napari_dmoe import distributed as dist_utils
from napari_dmoe.threads import describe_current
from napari_dmoe.training import lock as run_lock
from napari_dmoe.training import resume as resume_state
from napari_dmoe.training.ema import WeightAverage
from napari_dmoe.training.events import EventWriter, ProgressBar
from napari_dmoe.training.history import RunHistory
from napari_dmoe.training.local import set_train_mode
from napari_dmoe.training.losses import moe_penalties, reset_moe_losses
from napari_dmoe.training.optim import lr_schedule, make_optimizer, resolve_recipe
from napari_dmoe.training.setup import RunParts, build_run
from napari_dmoe.training.validate import validate

__all__ = ["train", "TrainingError"]


class TrainingError(ValueError):
    """A run cannot start or continue; the message says why and what to do."""


class _Skip(Sampler):
    """The indices of ``sampler`` from position ``start`` on (resume in the middle of an epoch)."""

    def __init__(self, sampler: Sampler, start: int) -> None:
        self.sampler, self.start = sampler, start

    def __iter__(self):
        return iter(list(self.sampler)[self.start:])

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.start)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(config: Mapping[str, Any], events: str | Path | None = None, *, device: str = "auto",
          quiet: bool = False, require_resume: bool = False, command: str | None = None) -> Path:
    """Train per ``config`` (validated by ``config.load_config``); return the path of ``best.safetensors``.

    Continues automatically from ``output_dir``'s resume state when there is one (``require_resume`` makes its
    absence an error). ``events``: JSON-lines file, ``"-"`` for stdout, or None.
    """
    info = dist_utils.setup(device)
    writer = EventWriter(events if info.is_main else None)
    try:  # before anything writes to the folder
        lock = _lock_folder(config, info, command)
    except BaseException as err:
        writer.emit("error", message=" ".join(str(err).split()) or type(err).__name__, kind=type(err).__name__)
        writer.close()
        dist_utils.cleanup(info)
        raise
    if info.is_main:  # history.jsonl and progress.png in the run folder; plain lines where no terminal shows a bar
        import sys

        plain = not quiet and str(events) != "-" and not sys.stdout.isatty()
        writer.listeners.append(RunHistory(Path(config["output_dir"]).expanduser(), sys.stdout if plain else None))
    try:
        return _train(config, info, writer, quiet, require_resume, command)
    except BaseException as err:
        writer.emit("error", message=" ".join(str(err).split()) or type(err).__name__, kind=type(err).__name__)
        raise
    finally:
        if lock is not None:
            run_lock.release(lock)
        writer.close()
        dist_utils.cleanup(info)


def _lock_folder(config: Mapping[str, Any], info: dist_utils.DistInfo, command: str | None) -> Path | None:
    """One run per output folder (rank 0 holds the lock): two would interleave their checkpoints."""
    if not info.is_main:
        return None
    out = Path(config["output_dir"]).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    return run_lock.acquire(out, command)


@dataclass
class _Loop:
    """What one run holds while it steps: built once by ``_start``, read and advanced by every step, validation
    and checkpoint (instead of a dozen loose arguments to each)."""

    config: Mapping[str, Any]
    run: RunParts
    info: dist_utils.DistInfo
    writer: EventWriter
    out: Path
    recipe: Mapping[str, Any]
    model: Any  # what is called: the network, or its DDP wrapper under torchrun
    network: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    use_amp: bool
    per_rank: int
    steps_per_epoch: int
    total: int
    step: int = 0
    best: float = -math.inf
    best_step: int | None = None
    bar: Any = None
    ema: WeightAverage | None = None  # recipe.ema: the moving average of the weights
    ema_from: int = 0  # the step it started at (a resumed run that had none starts it there)

    @property
    def best_path(self) -> Path:
        return self.out / "best.safetensors"

    @property
    def last_path(self) -> Path:
        return self.out / "last.safetensors"

    @property
    def resume_scaler(self) -> Any:
        """The AMP grad scaler when AMP is on (its state is saved and restored), else None."""
        return self.scaler if self.use_amp else None


def _start(config: Mapping[str, Any], info: dist_utils.DistInfo, writer: EventWriter, require_resume: bool,
           command: str | None) -> _Loop:
    """The run's parts, optimizer and schedule, from the resume state when there is one."""
    seed_everything(int(config["seed"]))
    out = Path(config["output_dir"]).expanduser()
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    if require_resume and not resume_state.has_state(out):
        raise TrainingError(f"--resume: no resume state in {out} (expected {resume_state.SCALARS}); drop --resume "
                            "to start a new run")
    run: RunParts = build_run(config, info, command)
    network = run.network
    per_rank, steps_per_epoch, total = _sizes(config, len(run.train_items), info.world_size)
    recipe = resolve_recipe(config, total)
    network.to(info.device)
    optimizer = make_optimizer([p for p in network.parameters() if p.requires_grad], recipe)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(recipe, total))
    use_amp = bool(recipe["amp"]) and info.device.type == "cuda"  # mixed precision on CUDA only
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    for m in network.modules():
        if isinstance(m, DMoE):
            m.aux_loss_enabled = config["aux_loss"] > 0
    loop = _Loop(config, run, info, writer, out, recipe, network, network, optimizer, scheduler, scaler, use_amp,
                 per_rank, steps_per_epoch, total)
    loop.ema = WeightAverage(network, recipe["ema"]) if recipe["ema"] else None
    loop.step, loop.best, loop.best_step, extra = _resume(out, run, network, optimizer, scheduler,
                                                          loop.resume_scaler)
    if loop.ema is not None:  # its first update copies the weights: a resumed run without one starts it here
        loop.ema_from = 0 if loop.ema.load_tensors(extra) else loop.step
    if config["crossval"]["folds"]:  # how many steps (0: keep the base), chosen on every case (crossval.py)
        loop.total, factor = _crossval(config, run, info, writer, recipe, out)
        scheduler.lr_lambdas = [factor]  # the folds' schedule: s steps of it are what the folds scored at s
    loop.model, loop.network = _distributed(run, network, info)
    return loop


def _train(config: Mapping[str, Any], info: dist_utils.DistInfo, writer: EventWriter, quiet: bool,
           require_resume: bool, command: str | None) -> Path:
    loop = _start(config, info, writer, require_resume, command)
    threads = describe_current()  # chosen by the front end (napari_dmoe.threads), or by a Python caller
    batch, run = int(config["recipe"]["batch_size"]), loop.run
    writer.emit("start", step=loop.step, total_steps=loop.total, epoch=loop.step // loop.steps_per_epoch,
                world_size=info.world_size, batch_size=batch, steps_per_epoch=loop.steps_per_epoch,
                output_dir=str(loop.out), method=config["method"], routing=run.spec.routing, device=str(info.device),
                data=run.data_summary, resumed=loop.step > 0, threads=threads.threads,
                threads_reason=f"{threads.source}: {threads.reason}")
    loop.bar = ProgressBar(loop.total, loop.step, enabled=info.is_main and not quiet)
    started, done_at_start = time.perf_counter(), loop.step
    set_train_mode(loop.network, config["trainable"])  # norm layers stay in eval when their weights are frozen
    if loop.step == 0 and loop.recipe["validate_first"]:
        _validate_and_save(loop, 0)
    try:
        _epochs(loop)
    finally:
        loop.bar.close()
    if info.is_main and not loop.best_path.exists():  # no validation split: the last model is the best we know
        save_model(loop.best_path, loop.network, run.spec_for(loop.step, None))
    if info.is_main and loop.ema is not None:
        path, es = loop.ema.save(run, loop.out, loop.step, loop.ema_from, loop.info.device, loop.recipe)
        loop.writer.emit("checkpoint", step=loop.step, path=str(path), ema=True, es_dice=es)
    if config["crossval"]["folds"]:
        loop.best_step = loop.step  # cross-validation chose this step count; 0: the base model was kept
    dist_utils.barrier(info)
    elapsed = time.perf_counter() - started
    writer.emit("done", step=loop.step, best_path=str(loop.best_path),
                best_es_dice=loop.best if loop.best > -math.inf else None, best_step=loop.best_step,
                seconds=round(elapsed, 3), throughput=(loop.step - done_at_start) * batch / max(elapsed, 1e-9))
    return loop.best_path


def _epochs(loop: _Loop) -> None:
    """Step until ``loop.total``, validating and checkpointing on the recipe's schedule."""
    recipe, seed = loop.recipe, int(loop.config["seed"])
    val_every = recipe["val_every"] or loop.steps_per_epoch
    ckpt_every = recipe["checkpoint_every"] or val_every
    batch = int(loop.config["recipe"]["batch_size"])
    sampler = DistributedSampler(loop.run.train_items, num_replicas=loop.info.world_size, rank=loop.info.rank,
                                 shuffle=True, seed=seed, drop_last=True)
    avg_step = None
    while loop.step < loop.total:
        epoch, offset = divmod(loop.step, loop.steps_per_epoch)
        sampler.set_epoch(epoch)
        loop.run.train_items.epoch = epoch
        loader = DataLoader(loop.run.train_items, batch_size=loop.per_rank,
                            sampler=_Skip(sampler, offset * loop.per_rank), num_workers=recipe["num_workers"],
                            drop_last=True, generator=torch.Generator().manual_seed(seed + epoch),
                            pin_memory=loop.info.device.type == "cuda")
        t0 = time.perf_counter()
        for data in loader:
            lr = loop.optimizer.param_groups[0]["lr"]  # the lr this step used
            loss = _step(loop, data)
            loop.scheduler.step()
            if loop.ema is not None:
                loop.ema.update(loop.network)
            loop.step += 1
            dt = time.perf_counter() - t0  # wall time of the step, data loading included
            avg_step = dt if avg_step is None else 0.9 * avg_step + 0.1 * dt
            loop.writer.emit("step", step=loop.step, total_steps=loop.total, epoch=epoch, loss=loss, lr=lr,
                             throughput=batch / max(dt, 1e-9), eta_s=avg_step * (loop.total - loop.step))
            loop.bar.update(loss=loss, lr=lr)
            if loop.step % val_every == 0 or loop.step == loop.total:
                _validate_and_save(loop, epoch)
            if loop.step % ckpt_every == 0 or loop.step == loop.total:
                _checkpoint(loop, epoch)
            if loop.step >= loop.total:
                break
            t0 = time.perf_counter()  # validation and checkpoints are not counted in the throughput


def _crossval(config: Mapping[str, Any], run: RunParts, info: dist_utils.DistInfo, writer: EventWriter,
              recipe: Mapping[str, Any], out: Path) -> tuple[int, Any]:
    """(steps of the final run, its lr schedule): ``crossval.select_steps``, or its saved record on resume."""
    import json

    from napari_dmoe.io.files import atomic_write_text
    from napari_dmoe.training.crossval import select_steps

    if info.enabled:
        raise TrainingError("crossval.folds: cross-validation runs in one process; start it without torchrun")
    saved = out / "selection.json"
    if saved.is_file() and resume_state.has_state(out):
        record = json.loads(saved.read_text(encoding="utf-8"))
    else:
        record = select_steps(config, run, info, recipe, writer.emit)
        atomic_write_text(saved, json.dumps(record, indent=1))
    writer.emit("selection", **record)
    run.provenance["selection"] = record
    seed_everything(int(config["seed"]))  # the final run does not depend on how much randomness the folds drew
    return int(record["steps"]), lr_schedule(recipe, int(record["horizon"]))


def _sizes(config: Mapping[str, Any], n_train: int, world: int) -> tuple[int, int, int]:
    """(batch per process, steps per epoch, total steps); refuses batches the data or processes cannot fill."""
    recipe = config["recipe"]
    batch = int(recipe["batch_size"])
    if batch % world:
        raise TrainingError(f"recipe.batch_size={batch} must be divisible by the {world} processes (it is the "
                            "global batch, split across processes)")
    steps_per_epoch = n_train // batch
    if steps_per_epoch < 1:
        raise TrainingError(f"the training split has {n_train} items, fewer than recipe.batch_size={batch}; "
                            "lower the batch size or add data")
    return batch // world, steps_per_epoch, recipe["steps"] or recipe["epochs"] * steps_per_epoch


def _resume(out: Path, run: RunParts, network: torch.nn.Module, optimizer: Any, scheduler: Any,
            scaler: Any) -> tuple[int, float, int | None, dict]:
    """(step, best ES-Dice, best step, extra tensors) of the resume state in ``out`` (loaded into the objects),
    else a fresh start. ``scaler``: the AMP grad scaler when AMP is on, else None."""
    if not resume_state.has_state(out):
        return 0, -math.inf, None, {}
    if resume_state.peek(out).get("run") != run.identity:
        raise TrainingError(f"{out} holds a run with a different data/model/method config; choose another "
                            "output_dir (or delete its resume.json/resume.safetensors to start over)")
    meta = resume_state.load_state(out, network, optimizer)
    scheduler.load_state_dict(meta["scheduler"])
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    return int(meta["step"]), float(meta["best"]), meta.get("best_step"), meta["extra"]


def _distributed(run: RunParts, network: torch.nn.Module, info: dist_utils.DistInfo) -> tuple[Any, Any]:
    """(the module to call, the network) for this process: DDP-wrapped under torchrun, the network otherwise."""
    if not info.enabled:
        return network, network
    from torch.nn.parallel import DistributedDataParallel as DDP

    if info.device.type == "cuda":  # batch statistics over the global batch (SyncBatchNorm is CUDA-only)
        network = torch.nn.SyncBatchNorm.convert_sync_batchnorm(network)
        run.network = network
    # Experts no token chose this step get no gradient: DDP must be told to expect unused parameters.
    model = DDP(network, device_ids=[info.device.index] if info.device.type == "cuda" else None,
                find_unused_parameters=run.spec.routing != "none")
    return model, network


def _checkpoint(loop: _Loop, epoch: int) -> None:
    """last.safetensors and the resume state (rank 0), then every process waits for them."""
    if loop.info.is_main:
        _save_last(loop)
        resume_state.save_state(loop.out, loop.network, loop.optimizer, {
            "step": loop.step, "epoch": epoch, "best": loop.best, "best_step": loop.best_step,
            "run": loop.run.identity, "scheduler": loop.scheduler.state_dict(),
            "scaler": loop.resume_scaler.state_dict() if loop.resume_scaler is not None else None},
            extra=loop.ema.state_tensors() if loop.ema is not None else None)
        loop.writer.emit("checkpoint", step=loop.step, epoch=epoch, path=str(loop.last_path),
                         resume=str(loop.out / resume_state.SCALARS))
    dist_utils.barrier(loop.info)


def _step(loop: _Loop, data: Mapping[str, Any]) -> float:
    """One optimizer step on ``data``; returns the loss averaged over the processes."""
    run, info, network, optimizer, scaler = loop.run, loop.info, loop.network, loop.optimizer, loop.scaler
    x = data["image"].to(info.device, non_blocking=True)
    y = data["label"].to(info.device, non_blocking=True)
    groups = data["attr"].to(info.device)
    if not bool(torch.isfinite(x).all()):  # else the loss turns NaN and the message would blame the lr
        bad = [str(i) for i, ok in zip(data["id"], torch.isfinite(x).flatten(1).all(1).tolist()) if not ok]
        raise TrainingError(f"training image(s) {', '.join(bad[:5])} hold NaN or infinite values after "
                            "normalisation (an all-NaN or damaged image?); fix or remove them from the data")
    optimizer.zero_grad(set_to_none=True)
    reset_moe_losses(network)  # also drops the terms left by validation forwards
    with torch.autocast("cuda", dtype=torch.float16, enabled=loop.use_amp):
        logits = loop.model(x, run.train_router(groups, loop.step, info.rank))
    penalties = moe_penalties(network, loop.config["aux_loss"], loop.config["router_smoothing"])
    loss = run.loss(logits.float(), y, groups) + penalties
    if not torch.isfinite(loss):
        raise TrainingError(f"the loss became {float(loss)}; lower recipe.lr or set recipe.grad_clip")
    scaler.scale(loss).backward()
    if loop.recipe["grad_clip"]:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(network.parameters(), loop.recipe["grad_clip"])
    scaler.step(optimizer)
    scaler.update()
    return dist_utils.mean_over_ranks(loss, info)


def _validate_and_save(loop: _Loop, epoch: int) -> None:
    """Validate (rank 0) and keep ``best.safetensors`` when the ES-Dice beats the best so far."""
    run, info, network = loop.run, loop.info, loop.network
    if info.is_main and run.val_items is not None and len(run.val_items):
        metrics = validate(network, run.val_items, run.spec, info.device, run.to_router,
                           overlap=loop.recipe["sw_overlap"], amp=bool(loop.recipe["amp"]))
        set_train_mode(network, run.identity["trainable"])
        es = metrics["es_dice"]
        loop.writer.emit("val", step=loop.step, epoch=epoch, **metrics)
        loop.bar.write(f"step {loop.step}: val ES-Dice {es:.4f}, Dice {metrics['dice']:.4f}")
        if es is not None and es > loop.best:
            loop.best, loop.best_step = es, loop.step
            save_model(loop.best_path, network, run.spec_for(loop.step, metrics))
            loop.writer.emit("checkpoint", step=loop.step, epoch=epoch, path=str(loop.best_path), best=True,
                             es_dice=es)
    dist_utils.barrier(info)


def _save_last(loop: _Loop) -> None:
    best = loop.best if loop.best > -math.inf else None
    save_model(loop.last_path, loop.network, loop.run.spec_for(loop.step, None, best=best, best_step=loop.best_step))
