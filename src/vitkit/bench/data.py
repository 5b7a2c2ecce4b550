"""The input pipeline measured on its own, and the share of real training spent waiting for it (issue 7, "Data").

Two questions, two functions:
- `pipeline_speed`: how fast can the pipeline deliver images with no model behind it? It runs the code training
  runs: `vitkit.data.batches` (decode on loader workers, RandomResizedCrop to uint8, stack) and then, on the
  device, `DeviceAugment` (flip, RandAugment, normalise, erasing, mixup/cutmix) as the training loop calls it.
  With augmentation off it runs the evaluation path instead: decode, resize to the size, normalise.
- `training_data_wait`: how much of a real training step is spent waiting for the next batch? It runs
  `vitkit.train.train` itself for a few steps and reads back the `data_wait` the loop writes to metrics.jsonl,
  so the number is the loop's own and cannot drift from it.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from vitkit.data import Batch, batches, open_source
from vitkit.data.augment import DeviceAugment, normalize
from vitkit.data.sources import Source
from vitkit.preprocess import Preprocess
from vitkit.train import RunConfig, train
from vitkit.train.config import AugmentConfig
from vitkit.train.loop import step_seed
from vitkit.train.metrics import read_metrics


@dataclass
class PipelineSpeed:
    """What `pipeline_speed` measured over its timed batches (the warm-up batch left out)."""

    dataset: str
    img_size: tuple[int, int]
    batch_size: int
    workers: int  # loader worker processes; 0 decodes in the main process
    augment: bool  # training augmentation (crop + DeviceAugment) or the evaluation path (resize + normalise)
    batches: int  # timed batches
    images: int  # images those batches delivered (unreadable ones are left out by the loader)
    seconds: float  # wall time of the timed batches, loader and device work together
    images_per_s: float  # images / seconds
    images_per_s_per_worker: float  # per decoding process: images_per_s / max(workers, 1)
    wait_seconds: float  # time the main process waited for the next batch (see `pipeline_speed`)
    augment_seconds: float  # host-to-device copy + batched augment and normalise, synchronised
    epoch_starts: int  # epochs begun inside the timed window (the workers carry on across them)


@dataclass
class DataWait:
    """What `training_data_wait` read from the training run's metrics (the warm-up steps left out)."""

    workers: int
    batch_size: int
    steps: int  # timed optimizer steps
    seconds: float  # wall time of those steps
    wait_seconds: float  # time the loop waited for the next batch
    fraction: float  # wait_seconds / seconds, in [0, 1]
    images_per_s: float
    per_step: list[float]  # each timed step's data_wait fraction, in order


def pipeline_speed(
    path: str | Path | None,
    *,
    img_size: int | tuple[int, int] = 224,
    batch_size: int = 64,
    workers: int = 0,
    augment: bool | AugmentConfig = True,
    num_batches: int = 10,
    warmup_batches: int = 1,
    cache_bytes: int = 0,
    split: str = "train",
    channels: int = 3,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> PipelineSpeed:
    """Images/s of the input pipeline alone: loader (decode + crop) and batched device augment + normalise.

    `warmup_batches` batches (the first also starts the workers) are delivered and augmented untimed; then
    `num_batches` batches are timed from the moment the warm-up finished until the last one is augmented on the
    device. The stream runs epoch after epoch with the same workers, as training's does (`epoch_starts` counts
    the epochs begun inside the window).

    Where the time goes: with workers=0 everything runs in this process, one after the other, so `wait_seconds`
    is exactly the decode + crop + stack time and `augment_seconds` the device part. With workers the two
    overlap: `wait_seconds` is then only the loader time the workers did not hide. Workers also decode up to
    two batches each ahead of time during the warm-up, so take `num_batches` well above 2 x workers.

    Args:
        path: a dataset, anything `vitkit.data.open_source` reads (an ImageFolder tree, CIFAR batches, shards).
        img_size: the output size, (height, width) or one side.
        batch_size: images per batch.
        workers: loader worker processes (0: decode in this process).
        augment: True for the training pipeline with the default `AugmentConfig` (RandomResizedCrop 0.08-1 and
            flips), an `AugmentConfig` for that one (a recipe's `augment` section), False for the evaluation
            pipeline (resize straight to `img_size`, normalise).
        num_batches: timed batches after the warm-up.
        warmup_batches: untimed batches first; with a cache, an epoch's worth (several with workers, each of
            which keeps what it decoded) times the pipeline cropping from memory.
        cache_bytes: `vitkit.data.batches`' cache of decoded images, per decoding process (0: none).
        split: the dataset split to read.
        channels: 3 (RGB) or 1 (grey); images of the other kind are converted.
        device: where the augmentation runs, as in training.
        seed: seeds the order, the crops and the device augmentation.
    """
    if num_batches < 1 or warmup_batches < 1:
        raise ValueError(f"num_batches={num_batches}, warmup_batches={warmup_batches}; expected >= 1 each")
    source = open_source(path, split)
    size = (img_size, img_size) if isinstance(img_size, int) else (int(img_size[0]), int(img_size[1]))
    device = torch.device(device)
    cfg = AugmentConfig() if augment is True else augment or None
    prep = Preprocess(img_size=size, mean=Preprocess().mean[:1] * channels, std=Preprocess().std[:1] * channels)
    if cfg is not None:
        device_augment = DeviceAugment(cfg, prep.mean, prep.std, max(1, len(source.classes)))
    stream = _epochs(source, cfg, prep, batch_size, channels, workers, seed, cache_bytes)

    def step(i: int, batch: Batch) -> None:
        # As the training loop: copy the uint8 batch over, then augment with a generator seeded by the step.
        images, labels = batch.images.to(device), batch.labels.to(device)
        if cfg is None:
            normalize(images, prep.mean, prep.std)
        else:
            device_augment(images, labels, torch.Generator(device).manual_seed(step_seed(seed, i, 0)))
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    try:
        for i in range(warmup_batches):
            warm = next(stream)
            step(i, warm)
        images, wait, busy = 0, 0.0, 0.0
        start = tick = time.perf_counter()
        for i in range(warmup_batches, warmup_batches + num_batches):
            batch = next(stream)
            got = time.perf_counter()
            step(i, batch)
            done = time.perf_counter()
            wait, busy, tick = wait + got - tick, busy + done - got, done
            images += len(batch.images)
    finally:
        stream.close()  # stops the loader workers now, not when garbage collected: the next measurement is alone
    seconds = tick - start
    return PipelineSpeed(
        dataset=source.name,
        img_size=size,
        batch_size=batch_size,
        workers=workers,
        augment=cfg is not None,
        batches=num_batches,
        images=images,
        seconds=seconds,
        images_per_s=images / seconds,
        images_per_s_per_worker=images / seconds / max(workers, 1),
        wait_seconds=wait,
        augment_seconds=busy,
        epoch_starts=batch.epoch - warm.epoch,
    )


def _epochs(
    source: Source,
    augment: AugmentConfig | None,
    prep: Preprocess,
    batch_size: int,
    channels: int,
    workers: int,
    seed: int,
    cache_bytes: int,
) -> Iterator[Batch]:
    """Batches for ever, one `vitkit.data.batches` stream across epochs, as the training loop's `_stream`."""
    if augment is None:  # the evaluation path, as `vitkit.evaluate` builds it
        kw = dict(train=False, preprocess=prep)
    else:
        kw = dict(train=True, crop_scale=augment.crop_scale, crop_ratio=augment.crop_ratio)
    return batches(
        source, batch_size=batch_size, img_size=prep.img_size, channels=channels, seed=seed, workers=workers,
        epochs=None, cache_bytes=cache_bytes, **kw,
    )  # fmt: skip


def training_data_wait(
    cfg: RunConfig, *, steps: int = 8, warmup: int = 1, run_dir: str | Path | None = None
) -> DataWait:
    """The fraction of real training's wall time spent waiting for the next batch.

    Runs `vitkit.train.train` for `warmup + steps` optimizer steps with a metric line per step and reads the
    loop's own `data_wait` back from metrics.jsonl. The warm-up steps (worker start-up, first allocations) are
    left out; the rest are combined weighted by their duration, so the fraction is total wait / total time.
    The run ends as any run does (a final evaluation on the val split, the model saved), after the last
    metric line, so none of that is counted. A step's duration is recovered from its images/s and the batch
    size, exact unless images of the step were unreadable.

    Take `steps` past an epoch boundary (steps per epoch + 1) to include an epoch's first batch.

    Args:
        cfg: the run (data, model, augmentation, workers, precision, batch); its step count, logging and
            evaluation interval are replaced.
        steps: timed optimizer steps.
        warmup: steps run first and not counted.
        run_dir: where the run writes (a run already there is overwritten); a temporary folder, deleted after,
            when None.
    """
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps={steps}, warmup={warmup}; expected steps >= 1 and warmup >= 0")
    t = dataclasses.replace(cfg.train, steps=warmup + steps, log_every=1, eval_every=0.0, save_every=0)
    cfg = dataclasses.replace(cfg, train=t)
    with tempfile.TemporaryDirectory(prefix="vitkit-data-wait-") as tmp:
        run = Path(run_dir) if run_dir is not None else Path(tmp) / "run"
        train(cfg, run, overwrite=run_dir is not None, progress="none")
        records = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
    timed = [r for r in records if r["step"] > warmup]
    assert len(timed) == steps, f"expected {steps} timed metric lines, found {len(timed)}"
    if any(r["images_per_s"] <= 0 for r in timed):
        raise ValueError(f"{cfg.data.path}: a timed step had no readable image; its duration is unknown")
    durations = [t.batch_size / r["images_per_s"] for r in timed]  # images / (images / s)
    waits = [r["data_wait"] * d for r, d in zip(timed, durations, strict=True)]
    seconds, wait = sum(durations), sum(waits)
    return DataWait(
        workers=cfg.data.workers,
        batch_size=t.batch_size,
        steps=steps,
        seconds=seconds,
        wait_seconds=wait,
        fraction=wait / seconds,
        images_per_s=t.batch_size * steps / seconds,
        per_step=[r["data_wait"] for r in timed],
    )
