import itertools
import os

import numpy as np
import pytest
import torch
from PIL import Image

from vitkit.data import ArrayImages, Batch, batches, epoch_order, open_source, steps_per_epoch
from vitkit.data.loader import random_resized_crop_box
from vitkit.preprocess import Preprocess, resize_crop


def array_source(n: int = 10, h: int = 24, w: int = 32, seed: int = 0) -> ArrayImages:
    x = np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    return ArrayImages(x, np.arange(n) % 3, ["a", "b", "c"], "noise")


def collect(**kw) -> list[Batch]:
    return list(batches(**kw))


def test_steps_and_order():
    assert steps_per_epoch(10, 4, drop_last=True) == 2
    assert steps_per_epoch(10, 4, drop_last=False) == 3
    assert steps_per_epoch(8, 4, drop_last=False) == 2 and steps_per_epoch(3, 4, drop_last=True) == 0
    np.testing.assert_array_equal(epoch_order(5, 0, 0, shuffle=False), np.arange(5))
    order = epoch_order(50, seed=3, epoch=1, shuffle=True)
    assert order.dtype == np.int64 and sorted(order.tolist()) == list(range(50))
    np.testing.assert_array_equal(order, epoch_order(50, 3, 1, True))
    assert not np.array_equal(order, epoch_order(50, 3, 2, True))
    assert not np.array_equal(order, epoch_order(50, 4, 1, True))


def test_eval_batches_resize_exactly_as_pil():
    src = array_source()
    out = collect(source=src, batch_size=4, img_size=(12, 20), channels=3, train=False)
    assert [len(b.labels) for b in out] == [4, 4, 2]  # eval keeps the last, partial batch
    images = torch.cat([b.images for b in out])
    assert images.dtype == torch.uint8 and images.shape == (10, 3, 12, 20)
    assert torch.cat([b.indices for b in out]).tolist() == list(range(10))  # eval keeps the order
    assert torch.cat([b.labels for b in out]).tolist() == (np.arange(10) % 3).tolist()
    for i in range(10):
        expected = Image.fromarray(src.array[i]).resize((20, 12), Image.Resampling.BILINEAR)
        np.testing.assert_array_equal(images[i].permute(1, 2, 0).numpy(), np.asarray(expected))

    # Same size and no preprocess: the pixels come through untouched.
    same = collect(source=src, batch_size=10, img_size=(24, 32), channels=3, train=False)[0]
    np.testing.assert_array_equal(same.images.permute(0, 2, 3, 1).numpy(), src.array)

    # With the checkpoint's preprocessing: its resize and centre crop, at the size and channels asked for.
    prep = Preprocess((16, 16), resize="shorter", crop_pct=0.875, interpolation="bicubic")
    grey = collect(source=src, batch_size=5, img_size=(8, 8), channels=1, train=False, preprocess=prep)
    assert grey[0].images.shape == (5, 1, 8, 8)
    for i in range(5):
        image = Image.fromarray(src.array[i]).convert("L")
        expected = resize_crop(image, Preprocess((8, 8), (0.5,), (0.5,), "shorter", 0.875, "bicubic"))
        np.testing.assert_array_equal(grey[0].images[i, 0].numpy(), np.asarray(expected))


def test_a_constant_image_stays_constant_and_grey_sources_expand():
    x = np.full((3, 9, 7), 77, np.uint8)  # grey (N, H, W)
    src = ArrayImages(x, [0, 1, 0], ["u", "v"], "grey")
    out = collect(source=src, batch_size=3, img_size=(5, 4), channels=3, train=True, drop_last=False)
    assert out[0].images.shape == (3, 3, 5, 4) and (out[0].images == 77).all()


def test_random_resized_crop_box_follows_torchvision():
    rng = np.random.default_rng(0)
    assert random_resized_crop_box(10, 10, (1.0, 1.0), (1.0, 1.0), rng) == (0, 0, 10, 10)
    # A 10x20 image cannot hold a square of its full area: every draw fails, and the fallback is the centre
    # crop at the aspect clamped into the ratio range.
    assert random_resized_crop_box(10, 20, (1.0, 1.0), (1.0, 1.0), rng) == (0, 5, 10, 10)
    assert random_resized_crop_box(40, 10, (1.0, 1.0), (0.5, 2.0), rng) == (10, 0, 20, 10)
    for _ in range(100):
        top, left, h, w = random_resized_crop_box(30, 50, (0.08, 1.0), (3 / 4, 4 / 3), rng)
        assert top >= 0 and left >= 0 and top + h <= 30 and left + w <= 50
        assert 0.08 * 1500 * 0.8 <= h * w <= 1500


def test_train_crops_depend_only_on_seed_epoch_and_index():
    src = array_source(n=12)
    kw = dict(source=src, img_size=(8, 8), channels=3, train=True, seed=5)

    def by_index(batch_list: list[Batch]) -> dict[int, np.ndarray]:
        return {int(i): b.images[k].numpy() for b in batch_list for k, i in enumerate(b.indices)}

    a = collect(batch_size=4, epoch=0, **kw)
    assert len(a) == 3 and sorted(int(i) for b in a for i in b.indices) == list(range(12))
    assert torch.cat([b.indices for b in a]).tolist() == epoch_order(12, 5, 0, True).tolist()
    b = collect(batch_size=6, epoch=0, **kw)  # other batch positions: the same crop of each image
    assert all(np.array_equal(x, by_index(b)[i]) for i, x in by_index(a).items())
    # The crop is the RandomResizedCrop drawn from default_rng([seed, epoch, index]).
    for i, x in by_index(a).items():
        box = random_resized_crop_box(24, 32, (0.08, 1.0), (3 / 4, 4 / 3), np.random.default_rng([5, 0, i]))
        top, left, h, w = box
        expected = Image.fromarray(src.array[i]).resize(
            (8, 8), Image.Resampling.BILINEAR, (left, top, left + w, top + h)
        )
        np.testing.assert_array_equal(x, np.asarray(expected).transpose(2, 0, 1))
    c = collect(batch_size=4, epoch=1, **kw)
    assert sum(np.array_equal(x, by_index(c)[i]) for i, x in by_index(a).items()) <= 1


def test_workers_give_identical_batches(tmp_path):
    for k in range(6):
        (tmp_path / f"c{k % 2}").mkdir(exist_ok=True)
        pixels = np.random.default_rng(k).integers(0, 256, (20 + k, 30, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"c{k % 2}" / f"{k}.jpg", quality=90)
    (tmp_path / "c0" / "bad.jpg").write_bytes(b"")
    src = open_source(tmp_path, "train", val_fraction=0.0)
    kw = dict(source=src, batch_size=4, img_size=(16, 16), channels=3, train=True, seed=1, drop_last=False)
    serial, parallel = collect(workers=0, **kw), collect(workers=2, **kw)
    assert len(serial) == len(parallel) == 2
    for s, p in zip(serial, parallel, strict=True):
        assert torch.equal(s.images, p.images) and torch.equal(s.labels, p.labels)
        assert torch.equal(s.indices, p.indices) and s.skipped == p.skipped
    assert sum(len(b.skipped) for b in parallel) == 1


def test_ranks_split_each_global_batch():
    src = array_source(n=11)
    kw = dict(source=src, batch_size=4, img_size=(8, 8), channels=3, train=True, seed=2, epoch=3)
    single = collect(**kw)
    ranks = [collect(rank=r, world=2, **kw) for r in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 2  # drop_last in training: 11 // 4
    for step, whole in enumerate(single):
        parts = [ranks[r][step] for r in range(2)]
        assert [len(p.indices) for p in parts] == [2, 2]
        assert torch.equal(torch.cat([p.indices for p in parts]), whole.indices)
        assert torch.equal(torch.cat([p.images for p in parts]), whole.images)
        assert torch.equal(torch.cat([p.labels for p in parts]), whole.labels)
    # Evaluation keeps the partial last batch; the ranks still add up to it.
    ev = dict(source=src, batch_size=4, img_size=(8, 8), channels=3, train=False)
    whole = collect(**ev)[-1]
    assert whole.indices.tolist() == [8, 9, 10]
    assert [collect(rank=r, world=2, **ev)[-1].indices.tolist() for r in range(2)] == [[8, 9], [10]]
    with pytest.raises(ValueError, match="batch_size=5 is not a positive multiple of world=2"):
        batches(src, batch_size=5, img_size=(8, 8), channels=3, train=True, world=2)


def test_start_resumes_at_the_right_batch():
    src = array_source(n=20)
    kw = dict(source=src, batch_size=4, img_size=(8, 8), channels=3, train=True, seed=9, epoch=2)
    full, resumed = collect(**kw), collect(start=3, **kw)
    assert len(full) == 5 and len(resumed) == 2
    for a, b in zip(full[3:], resumed, strict=True):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.images, b.images)
    assert collect(start=5, **kw) == []


class PidRecordingImages(ArrayImages):
    """Writes the id of the process that decodes each image to `log`."""

    def __init__(self, log, *args):
        super().__init__(*args)
        self.log = log

    def load(self, i, channels=3, draft=None):
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return super().load(i, channels, draft)


@pytest.mark.parametrize("workers", [0, 2])
def test_one_stream_over_epochs_equals_epoch_by_epoch_with_the_same_workers(tmp_path, workers):
    base = array_source(n=10)
    src = PidRecordingImages(tmp_path / "pids", base.array, base.labels, base.classes, base.name)
    kw = dict(source=src, batch_size=4, img_size=(8, 8), channels=3, train=True, seed=5, workers=workers)
    stream = collect(epoch=2, start=1, epochs=3, **kw)  # 2 steps per epoch: 1 + 2 + 2 batches
    (tmp_path / "pids").unlink()
    by_epoch = collect(epoch=2, start=1, **kw) + collect(epoch=3, **kw) + collect(epoch=4, **kw)
    assert [b.epoch for b in stream] == [b.epoch for b in by_epoch] == [2, 3, 3, 4, 4]
    for a, b in zip(stream, by_epoch, strict=True):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.images, b.images)
    assert not torch.equal(stream[1].indices, stream[3].indices)  # each epoch has its own order
    # Without end: the same batches first, and the same decoding processes throughout.
    (tmp_path / "pids").unlink()
    endless = list(itertools.islice(batches(epoch=2, start=1, epochs=None, **kw), 5))
    assert all(torch.equal(a.images, b.images) for a, b in zip(endless, stream, strict=True))
    pids = set((tmp_path / "pids").read_text().split())
    assert len(pids) == max(workers, 1) and (workers > 0) != (str(os.getpid()) in pids)
    with pytest.raises(ValueError, match="epochs=0; expected >= 1 or None"):
        batches(epochs=0, **kw)
    with pytest.raises(ValueError, match="noise: 10 images, fewer than one batch of 12"):
        batches(**{**kw, "batch_size": 12}, epochs=None)


@pytest.mark.parametrize("workers", [0, 2])
def test_the_cache_decodes_each_image_once_and_changes_no_pixel(tmp_path, workers):
    base = array_source(n=10)  # 24 x 32 RGB: 2,304 bytes of pixels per image
    src = PidRecordingImages(tmp_path / "pids", base.array, base.labels, base.classes, base.name)
    kw = dict(source=src, batch_size=4, img_size=(8, 8), channels=3, train=True, seed=5, epochs=3, workers=workers)
    plain = collect(**kw)
    assert len((tmp_path / "pids").read_text().split()) == 3 * 8  # 2 batches of 4 per epoch, each image decoded
    (tmp_path / "pids").unlink()
    cached = collect(cache_bytes=2**20, **kw)
    for a, b in zip(plain, cached, strict=True):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.images, b.images)
    seen = {i for b in plain for i in b.indices.tolist()}
    loads = (tmp_path / "pids").read_text().split()
    if workers == 0:
        assert len(loads) == len(seen)  # each image read once, then cropped from memory in every later epoch
    else:  # each process keeps what it decoded: at most one read per image and process
        assert len(seen) <= len(loads) <= workers * len(seen) < 3 * 8
    # A budget of three images: the first three decoded stay, the others are read each time they come.
    (tmp_path / "pids").unlink()
    small = collect(cache_bytes=3 * 2304, **{**kw, "workers": 0})
    assert all(torch.equal(a.images, b.images) for a, b in zip(plain, small, strict=True))
    order = [i for b in plain for i in b.indices.tolist()]
    kept = list(dict.fromkeys(order))[:3]
    expected = len(order) - sum(order.count(i) - 1 for i in kept)
    assert len((tmp_path / "pids").read_text().split()) == expected
    with pytest.raises(ValueError, match="cache_bytes=-1: expected >= 0"):
        batches(cache_bytes=-1, **kw)


def test_unreadable_images_are_skipped_and_reported(tmp_path):
    (tmp_path / "val" / "ant").mkdir(parents=True)
    (tmp_path / "val" / "bee").mkdir(parents=True)
    Image.new("RGB", (6, 6), (10, 20, 30)).save(tmp_path / "val" / "ant" / "a.png")
    (tmp_path / "val" / "ant" / "b.jpg").write_bytes(b"<html><body>Not Found</body></html>")
    Image.new("L", (4, 8), 200).save(tmp_path / "val" / "bee" / "c.png")
    (tmp_path / "val" / "bee" / "d.png").write_bytes(b"")
    (tmp_path / "val" / "bee" / "e.png").write_bytes(b"")
    src = open_source(tmp_path, "val")
    out = collect(source=src, batch_size=2, img_size=(3, 3), channels=3, train=False)
    assert [b.indices.tolist() for b in out] == [[0], [2], []]  # the all-bad batch is still yielded
    assert [b.labels.tolist() for b in out] == [[0], [1], []]
    assert out[2].images.shape == (0, 3, 3, 3) and out[2].images.dtype == torch.uint8
    assert (out[0].images == torch.tensor([10, 20, 30], dtype=torch.uint8).view(1, 3, 1, 1)).all()
    assert (out[1].images == 200).all()
    skipped = [s for b in out for s in b.skipped]
    assert [where for where, _ in skipped] == [
        str(tmp_path / "val" / p) for p in ("ant/b.jpg", "bee/d.png", "bee/e.png")
    ]
    assert "HTML" in skipped[0][1] and skipped[1][1] == "empty file (0 bytes)"
