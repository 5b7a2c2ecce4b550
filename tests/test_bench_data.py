import time

import numpy as np
import pytest
from PIL import Image

from vitkit.bench.data import pipeline_speed, training_data_wait
from vitkit.data.sources import ImageFiles
from vitkit.train import load_config
from vitkit.train.config import AugmentConfig


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """train/{ant,bee} with 16 small images each (JPEG and PNG of different sizes), val/ with 2 each."""
    root = tmp_path_factory.mktemp("tree")
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("val", 2)):
        for c in ("ant", "bee"):
            (root / split / c).mkdir(parents=True)
            for k in range(n):
                pixels = rng.integers(0, 256, (20 + k % 5, 24 + k % 3, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{k:02d}.{'png' if k % 4 == 0 else 'jpg'}")
    return root


def slow_loads(monkeypatch, seconds: float) -> None:
    """Make every image decode take at least `seconds` longer (in this process, workers=0)."""
    load = ImageFiles.load

    def slow(self, i, channels=3, draft=None):
        time.sleep(seconds)
        return load(self, i, channels, draft)

    monkeypatch.setattr(ImageFiles, "load", slow)


@pytest.mark.parametrize("workers", [0, 1])
def test_training_pipeline_counts_every_delivered_image(tree, workers):
    # 32 images in batches of 12 with drop_last: 2 batches (24 images) an epoch. Warm-up batch 0, timed 1..5.
    r = pipeline_speed(tree, img_size=16, batch_size=12, workers=workers, augment=True, num_batches=5)
    assert (r.workers, r.batches, r.images, r.img_size, r.augment) == (workers, 5, 60, (16, 16), True)
    assert r.epoch_starts == 2  # batches 2-3 are epoch 1, batches 4-5 epoch 2
    assert r.images_per_s == r.images / r.seconds
    assert r.images_per_s_per_worker == r.images_per_s  # one decoding process either way
    assert r.wait_seconds + r.augment_seconds == pytest.approx(r.seconds, rel=1e-9)


def test_evaluation_pipeline_counts_partial_batches(tree):
    # Without augmentation the last batch of an epoch is kept: 12, 12, 8 per epoch. Timed: 12, 8, 12, 12, 8.
    r = pipeline_speed(tree, img_size=(12, 20), batch_size=12, workers=0, augment=False, num_batches=5)
    assert (r.images, r.img_size, r.augment, r.epoch_starts) == (52, (12, 20), False, 1)
    assert r.images_per_s == r.images / r.seconds


def test_unreadable_images_are_not_counted(tmp_path):
    for c in ("ant", "bee"):
        (tmp_path / "train" / c).mkdir(parents=True)
        for k in range(4):
            Image.new("RGB", (10, 10), (k, 0, 0)).save(tmp_path / "train" / c / f"{k}.png")
    (tmp_path / "train" / "ant" / "0.png").write_bytes(b"")  # the first image of the evaluation order
    # 7 readable of 8, in batches of 4 in order: 3, 4 | 3, 4. Warm-up takes the first 3, the timed three 4 + 3 + 4.
    r = pipeline_speed(tmp_path, img_size=8, batch_size=4, augment=False, num_batches=3, split="train")
    assert r.images == 11


def test_other_augmentations_and_per_worker_rate(tree):
    heavy = AugmentConfig(crop_scale=(0.5, 1.0), randaugment_ops=2, mixup=0.8, cutmix=1.0, erasing=0.25)
    r = pipeline_speed(tree, img_size=16, batch_size=8, workers=2, augment=heavy, num_batches=4)
    assert (r.images, r.augment, r.epoch_starts) == (32, True, 1)
    assert r.images_per_s_per_worker == pytest.approx(r.images_per_s / 2)


def test_slow_decoding_shows_up_as_loader_wait(tree, monkeypatch):
    slow_loads(monkeypatch, 0.005)
    r = pipeline_speed(tree, img_size=16, batch_size=8, workers=0, num_batches=5)
    assert r.images == 40
    assert r.wait_seconds >= 40 * 0.005  # with workers=0 the wait is all of decode + crop
    assert r.wait_seconds > r.augment_seconds


def test_training_data_wait_is_a_fraction_and_sees_a_slow_loader(tree, monkeypatch):
    cfg = load_config(
        None,
        {
            "data.path": str(tree),
            "data.workers": 0,
            "model.img_size": 16,
            "model.overrides": {"patch_size": 8, "width": 16, "depth": 1, "heads": 2, "mlp_dim": 32},
            "train.batch_size": 8,
        },
    )
    # With workers=0 every decode happens while the loop waits, so the slept time is a floor on the wait (wall
    # time, whatever else the machine is doing; the model's share is not asserted, a busy machine inflates it).
    slow_loads(monkeypatch, 0.02)
    w = training_data_wait(cfg, steps=3, warmup=1)
    assert (w.steps, w.workers, w.batch_size, len(w.per_step)) == (3, 0, 8, 3)
    assert 0 <= w.fraction <= 1 and all(0 <= f <= 1 for f in w.per_step)
    assert w.fraction == w.wait_seconds / w.seconds
    assert 3 * 8 * 0.02 <= w.wait_seconds < w.seconds
    assert w.images_per_s == pytest.approx(3 * 8 / w.seconds)


def test_a_warm_cache_times_cropping_from_memory(tree, monkeypatch):
    loads = []
    load = ImageFiles.load
    monkeypatch.setattr(ImageFiles, "load", lambda self, i, *a, **k: loads.append(i) or load(self, i, *a, **k))
    # 32 training images in batches of 8: the 4 warm-up batches are one epoch, the 5 timed ones the next two.
    plain = pipeline_speed(tree, img_size=16, batch_size=8, num_batches=5, warmup_batches=4)
    assert (plain.images, plain.epoch_starts, len(loads)) == (40, 2, 32 + 40)
    loads.clear()
    cached = pipeline_speed(tree, img_size=16, batch_size=8, num_batches=5, warmup_batches=4, cache_bytes=2**20)
    assert (cached.images, cached.epoch_starts) == (40, 2)
    assert sorted(loads) == list(range(32))  # each image read once, in the warm-up epoch; none in the timed window
    with pytest.raises(ValueError, match="warmup_batches=0; expected >= 1 each"):
        pipeline_speed(tree, img_size=16, warmup_batches=0)
