"""The training loop: one function, read top to bottom; its helpers are small and pure where they can be.

Every random draw is a function of (seed, step) or (seed, epoch, sample index): the sampler's order, the crops,
the device augmentation, dropout. A resumed run therefore needs only the step, the weights, the optimizer, the
scaler and the EMA to continue exactly as if it had never stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from ..allocator import keep_freed_memory
from ..checkpoints import load_pretrained, save_pretrained
from ..data import batches, open_source, steps_per_epoch
from ..data.augment import DeviceAugment
from ..evaluate import EvalResult, auto_precision, autocast, evaluate, write_report
from ..models import VisionTransformer, create_model
from ..sizes import parse_size
from . import distributed
from .config import RunConfig
from .distill import Teachers
from .ema import ModelEma
from .metrics import MetricsLog, read_metrics
from .optim import build_optimizer, freeze, lr_at, set_lr, warmup_steps
from .signals import StopSignal
from .skipped import SkippedImages
from .state import load_state, save_state, write_atomic

CONFIG, LAST, SKIPPED = "config.yaml", Path("checkpoints") / "last.pt", "skipped.tsv"

logger = logging.getLogger("vitkit")


def train(
    cfg: RunConfig, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False, progress: str = "bar"
) -> dict[str, Any]:
    """Train (or fine-tune) as `cfg` says, writing everything into `run_dir`; returns the final metrics.

    Under `torchrun` every rank calls this; rank 0 alone writes. `resume=True` continues the run in `run_dir`
    from its last checkpoint (a run that stopped before its first checkpoint starts over); an existing run
    directory is otherwise refused unless `overwrite=True`.

    Raises:
        ValueError: a bad config or dataset, found before the run directory is touched; or data that cannot be
            read (the first 64 images tried, or every image of a class in an epoch; see `skipped.py`).
        FileExistsError: `run_dir` holds something and neither `resume` nor `overwrite` is given.
        FloatingPointError: a NaN or infinite loss, after `train.skip_nonfinite` such steps were skipped; the last
            checkpoint written before it is intact.
    """
    run_dir = Path(run_dir)
    cfg.validate()
    keep_freed_memory()  # large activations are reused, not page-faulted in again every step
    proc, device = distributed.setup(cfg.train.device)
    if cfg.train.precision == "auto":  # the run directory's config records what runs, so a resume checks it
        precision = auto_precision(device)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision))
        if proc.main:
            logger.info("train.precision=auto: %s on %s", precision, device)
    try:
        summary = _train(cfg, run_dir, proc, device, resume, overwrite, progress)
        # Every rank returns once rank 0 has written the model: a rank that left first could see rank 0's store
        # go away under its process group while tearing it down (seen once as an abort of rank 1 in CI).
        distributed.barrier()
        return summary
    finally:
        distributed.teardown()


def run_config(run_dir: str | Path) -> RunConfig:
    """The resolved config a run directory was started with (what `--resume` continues)."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no run to resume here (the run directory has no {CONFIG})")
    try:
        d = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not readable YAML ({e})") from None
    return RunConfig.from_dict(d, str(path))


def _train(
    cfg: RunConfig,
    run_dir: Path,
    proc: distributed.Dist,
    device: torch.device,
    resume: bool,
    overwrite: bool,
    progress: str,
) -> dict[str, Any]:
    t, o = cfg.train, cfg.optim
    if t.batch_size % (proc.world * t.accum_steps):
        raise ValueError(
            f"train.batch_size={t.batch_size} must divide by world size x accum_steps = {proc.world} x {t.accum_steps}"
        )
    # Everything that can refuse the data or the config runs before the run directory is touched.
    d = cfg.data
    train_src = open_source(d.path, d.train_split, val_fraction=d.val_fraction, seed=d.split_seed)
    val_src = _val_source(cfg)
    spe = steps_per_epoch(len(train_src), t.batch_size, drop_last=True)
    if spe == 0:
        raise ValueError(
            f"{train_src.name}: {len(train_src)} training images, fewer than train.batch_size={t.batch_size}"
        )
    torch.manual_seed(t.seed)  # the initial weights
    model = build_model(cfg, train_src.classes).to(device)
    freeze(model, o.freeze)
    optimizer = build_optimizer(model, o)
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")
    ema = ModelEma(model, t.ema_decay) if t.ema_decay else None
    prep = model.preprocess
    augment = DeviceAugment(cfg.augment, prep.mean, prep.std, model.cfg.num_classes)
    teachers = Teachers.load(cfg.distill, train_src.classes, model, device, t.precision)
    if teachers is not None and proc.main:  # each teacher adds a forward pass to every step
        kind = "top classes" if cfg.distill.hard else "probabilities"
        logger.info("distill: %d teacher(s), their %s weighted %g", len(teachers.models), kind, cfg.distill.weight)

    state = _prepare_run_dir(cfg, run_dir, resume, overwrite, proc)
    step, best, nonfinite = 0, -1.0, 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None:
            ema.module.load_state_dict(state["ema"])
        step, best, nonfinite = state["step"], state["best_top1"], state.get("nonfinite_skipped", 0)
    net = model
    if proc.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if t.compile:  # the training steps only: evaluation and the saved weights use `model` itself
        net = torch.compile(net)

    total = t.steps or math.ceil(t.epochs * spe)
    warmup = warmup_steps(cfg.schedule, spe)
    eval_interval = max(1, round(t.eval_every * spe)) if t.eval_every > 0 else total
    save_interval = t.save_every or eval_interval
    amp = autocast(device, t.precision)
    log = MetricsLog(run_dir, total, step, progress if proc.main else "none")
    skipped = SkippedImages(run_dir / SKIPPED, train_src, t.batch_size, t.seed, step, spe)
    interval = {"loss": 0.0, "steps": 0, "images": 0, "wait": 0.0, "augment": 0.0, "start": time.perf_counter()}

    model.train()
    last_eval, interrupted, tick = None, False, time.perf_counter()
    with StopSignal() as stop:
        for batch in itertools.islice(_stream(train_src, cfg, model, proc, spe, step), total - step):
            interval["wait"] += time.perf_counter() - tick
            skipped.train_batch(batch, proc.main)
            lr = lr_at(step, total, warmup, o.lr, cfg.schedule)
            set_lr(optimizer, lr)
            seed = step_seed(t.seed, step, proc.rank)
            torch.manual_seed(seed)  # dropout and stochastic depth
            generator = torch.Generator(device).manual_seed(seed)
            augment_start = time.perf_counter()
            x, targets = augment(batch.images.to(device), batch.labels.to(device), generator)
            interval["augment"] += time.perf_counter() - augment_start  # on a GPU: the launch only (async)
            if teachers is not None:
                targets = teachers.targets(x, targets)
            loss, images = _accumulate(net, x, targets, t.accum_steps, amp, scaler, proc.world)
            if images and math.isfinite(loss):
                _optimizer_step(model, optimizer, scaler, o.clip_grad, ema)
                interval["loss"] += loss
                interval["steps"] += 1
            else:
                nonfinite += _skip_update(step, loss, images, nonfinite, t.skip_nonfinite, run_dir / LAST)
            optimizer.zero_grad(set_to_none=True)
            step += 1
            log.step()
            interval["images"] += images

            if step % spe == 0:
                skipped.end_epoch(step, proc.main)
            if step % t.log_every == 0 or step == total:
                log.write(_train_record(step, spe, lr, interval))
            if step % eval_interval == 0 or step == total:
                last_eval = _evaluate(cfg, ema.module if ema else model, val_src, device, proc, step, spe, log)
                model.train()
                if last_eval is not None:
                    skipped.record(last_eval.skipped)
                if proc.main and last_eval is not None and last_eval.top1 > best:
                    best = last_eval.top1
                    _save_model(ema.module if ema else model, run_dir / "best")
            interrupted = stop.requested()
            if step % save_interval == 0 or step == total or interrupted:
                skipped.write(proc.main)  # before the checkpoint: a crash between the two loses no skip
                if proc.main:
                    state = {
                        "step": step, "best_top1": best, "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                        "ema": ema.module.state_dict() if ema else None, "config": cfg.to_dict(),
                        "nonfinite_skipped": nonfinite,
                    }  # fmt: skip
                    save_state(run_dir / LAST, state)
            if interrupted:
                break
            tick = time.perf_counter()
    log.close()
    if last_eval is None and step >= total and val_src is not None:
        # Resumed after its last step (stopped while writing the final model): the report is all that is left.
        last_eval = _evaluate(cfg, ema.module if ema else model, val_src, device, proc, step, spe, None)
    summary = {"step": step, "total_steps": total, "best_top1": best, "skipped": len(skipped)}
    if interrupted:
        log.message(f"stopped by a signal at step {step}; continue with: vitkit train --resume --out {run_dir}")
        return {**summary, "interrupted": True}
    if proc.main:
        _save_model(ema.module if ema else model, run_dir / "model")
        _finish_plots(run_dir, last_eval)
    if last_eval is not None:
        summary.update(top1=last_eval.top1, top5=last_eval.top5, loss=last_eval.loss)
    return summary


def _stream(train_src, cfg: RunConfig, model, proc: distributed.Dist, spe: int, step: int):
    """Training batches from optimizer step `step` on, epoch after epoch (the loop decides when to stop)."""
    a = cfg.augment
    return batches(
        train_src, batch_size=cfg.train.batch_size, img_size=model.cfg.img_size, channels=model.cfg.in_chans,
        train=True, crop_scale=a.crop_scale, crop_ratio=a.crop_ratio, seed=cfg.train.seed, epoch=step // spe,
        start=step % spe, rank=proc.rank, world=proc.world, workers=cfg.data.workers, epochs=None,
        cache_bytes=parse_size(cfg.data.cache) if cfg.data.cache is not None else 0,
    )  # fmt: skip


def build_model(cfg: RunConfig, classes: list[str]) -> VisionTransformer:
    """A fresh variant, or the `init` checkpoint of any format with a head for these classes (and its last
    `reinit_blocks` blocks re-initialised)."""
    m = cfg.model
    overrides = dict(m.overrides)
    if m.img_size is not None:
        overrides["img_size"] = m.img_size
    overrides["num_classes"] = len(classes)
    if m.init:
        model = load_pretrained(m.init, **overrides)
        try:
            model.reinit_last_blocks(m.reinit_blocks)
        except ValueError as e:
            raise ValueError(f"model.reinit_blocks={m.reinit_blocks} for {m.init}: {e}") from None
    else:
        model = create_model(m.name, **overrides)
    model.classes = list(classes)
    model.set_grad_checkpointing(m.grad_checkpointing)
    return model


def step_seed(seed: int, step: int, rank: int) -> int:
    """A well-mixed seed for one step on one rank."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy against soft targets (mixup, cutmix and label smoothing live in the targets)."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def _accumulate(net, x, targets, accum_steps: int, amp, scaler, world: int) -> tuple[float, int]:
    """Forward and backward over `accum_steps` micro-batches; the gradient is that of the whole batch's mean loss.

    Returns (the loss, the step's images), both over all ranks, so that every rank decides alike whether to take
    the step. With no readable image on any rank nothing runs.
    """
    images = len(x)
    if world > 1:
        images = int(_all_sum(torch.tensor(float(len(x)), device=x.device)).item())
    if images == 0:
        return math.nan, 0
    total = torch.zeros((), device=x.device)
    # tensor_split, unlike chunk, always gives accum_steps parts (some empty when images were skipped), so every
    # rank runs as many backward passes and DDP's all-reduce lands on the same one.
    chunks = list(zip(x.tensor_split(accum_steps), targets.tensor_split(accum_steps), strict=True))
    for i, (xi, ti) in enumerate(chunks):
        last = i == len(chunks) - 1
        sync = net.no_sync() if world > 1 and not last else contextlib.nullcontext()  # one all-reduce per step
        with sync:
            with amp:
                logits = net(xi)
                # An empty part still runs, with a zero loss: DDP expects every rank's backward pass.
                loss = soft_cross_entropy(logits, ti) * (len(xi) / len(x)) if len(xi) else logits.sum() * 0.0
            scaler.scale(loss).backward()
        total += loss.detach()
    if world > 1:
        total = _all_sum(total) / world  # DDP averages the ranks' gradients alike
    return total.item(), images


def _optimizer_step(model, optimizer, scaler, clip_grad: float | None, ema: ModelEma | None) -> None:
    if clip_grad:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    scaler.step(optimizer)
    scaler.update()
    if ema is not None:
        ema.update(model)


def _skip_update(step: int, loss: float, images: int, nonfinite: int, allowed: int, last: Path) -> int:
    """Warn about a step left without update; 1 if it counts against train.skip_nonfinite, else 0.

    Raises:
        FloatingPointError: the loss is NaN or infinite and `allowed` such steps were skipped already.
    """
    if images == 0:
        logger.warning("step %d: not one image of the batch could be read; no update", step)
        return 0
    if nonfinite >= allowed:
        raise FloatingPointError(
            f"step {step}: the training loss is {loss}; stopped after {nonfinite} skipped step(s) "
            f"(train.skip_nonfinite={allowed}). The last good checkpoint is {last} "
            "(lower optim.lr, add optim.clip_grad, or use train.precision=fp32)"
        )
    logger.warning(
        "step %d: the training loss is %s; skipped the update (%d of train.skip_nonfinite=%d)",
        step, loss, nonfinite + 1, allowed,
    )  # fmt: skip
    return 1


def _all_sum(t: torch.Tensor) -> torch.Tensor:
    torch.distributed.all_reduce(t)
    return t


def _train_record(step: int, spe: int, lr: float, interval: dict) -> dict[str, Any]:
    now = time.perf_counter()
    elapsed = now - interval["start"]
    record = {
        "kind": "train", "step": step, "epoch": step / spe, "lr": lr,
        "loss": interval["loss"] / interval["steps"] if interval["steps"] else math.nan,  # NaN: every update skipped
        "images_per_s": interval["images"] / elapsed, "data_wait": interval["wait"] / elapsed,
        "augment": interval["augment"] / elapsed,  # share of time in batched augmentation and normalisation
    }  # fmt: skip
    interval.update(loss=0.0, steps=0, images=0, wait=0.0, augment=0.0, start=now)
    return record


def _evaluate(cfg, model, val_src, device, proc, step, spe, log) -> EvalResult | None:
    if val_src is None:
        return None
    t = cfg.train
    res = evaluate(
        model, val_src, batch_size=t.batch_size, workers=cfg.data.workers, device=device, precision=t.precision,
        flip=t.eval_flip, rank=proc.rank, world=proc.world,
    )  # fmt: skip
    if log is not None:
        record = {"kind": "eval", "step": step, "epoch": step / spe, "loss": res.loss, "top1": res.top1}
        log.write({**record, "top5": res.top5})
    return res


def _val_source(cfg: RunConfig):
    d = cfg.data
    try:
        return open_source(d.path, d.val_split, val_fraction=d.val_fraction, seed=d.split_seed)
    except ValueError:
        if d.val_fraction == 0:  # a tree with no val split and nothing held out: train without evaluation
            return None
        raise


def _prepare_run_dir(cfg: RunConfig, run_dir: Path, resume: bool, overwrite: bool, proc: distributed.Dist):
    """The training state to continue from (or None), after making sure nothing the user had is overwritten.

    Every rank checks before rank 0 changes anything, so all ranks see the same directory and fail alike.
    """
    if resume and not (run_dir / LAST).is_file():
        if not (run_dir / CONFIG).is_file():
            raise FileNotFoundError(f"{run_dir / LAST}: no checkpoint to resume from")
        if run_config(run_dir) != cfg:
            raise ValueError(f"{run_dir}: the config differs from the one the run was started with; resume with it")
        logger.warning("%s: the run stopped before its first checkpoint; starting it over", run_dir)
        resume, overwrite = False, True
    if resume:
        state = load_state(run_dir / LAST)
        stored = RunConfig.from_dict(state["config"], str(run_dir / LAST))
        if stored != cfg:
            raise ValueError(f"{run_dir}: the config differs from the one the run was started with; resume with it")
    elif run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{run_dir}: the run directory exists and is not empty; resume it (--resume), choose another "
                "--out, or pass --overwrite to start over"
            )
        if not (run_dir / CONFIG).is_file():
            raise FileExistsError(f"{run_dir}: not a vitkit run directory (no {CONFIG}); refusing to delete it")
    distributed.barrier()
    if proc.main and resume:  # metrics written after the checkpoint are written again by the resumed run
        for leftover in [*run_dir.glob(".*.tmp-*"), *(run_dir / LAST).parent.glob(".*.tmp-*")]:
            leftover.unlink()  # the temporary file of a write that a crash cut short (see state.write_atomic)
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file():
            kept = [r for r in read_metrics(metrics) if r["step"] <= state["step"]]
            write_atomic(metrics, "".join(f"{json.dumps(r)}\n" for r in kept).encode())
    elif proc.main:
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        write_atomic(run_dir / CONFIG, yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
    distributed.barrier()
    return state if resume else None


def _save_model(model: VisionTransformer, path: Path) -> None:
    """Replace a vitkit model directory so that a crash leaves either the old or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, tmp)
    old = path.with_name(f".{path.name}.old")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def _finish_plots(run_dir: Path, last_eval) -> None:
    from ..plots import training_curves

    training_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
    if last_eval is not None:
        write_report(last_eval, run_dir / "eval")
