import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps

from vitkit.data.augment import (
    RANDAUGMENT_OPS,
    DeviceAugment,
    autocontrast,
    brightness,
    color,
    contrast,
    equalize,
    normalize,
    posterize,
    rand_augment,
    rotate,
    sharpness,
    shear_x,
    shear_y,
    soft_targets,
    solarize,
    translate_x,
    translate_y,
)
from vitkit.train.config import AugmentConfig

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
OFF = dict(hflip=0.0, randaugment_ops=0, erasing=0.0, mixup=0.0, cutmix=0.0, label_smoothing=0.0)


def images(b: int, c: int = 3, h: int = 16, w: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, c, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def augment(b: int = 8, c: int = 3, h: int = 16, w: int = 16, seed: int = 0, classes: int = 10, **cfg):
    """Run DeviceAugment on a random batch with labels 0..B-1 (mod K); returns the input, labels and outputs."""
    x = images(b, c, h, w)
    labels = torch.arange(b) % classes
    out, targets = DeviceAugment(AugmentConfig(**{**OFF, **cfg}), MEAN[:c], STD[:c], classes)(x, labels, gen(seed))
    return x, labels, out, targets


def test_normalize_by_hand():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3).expand(1, 3, 1, 3)
    out = normalize(x, (0.5, 0.25, 0.0), (0.5, 0.25, 2.0))
    expected = [[-1.0, -0.6, 1.0], [-1.0, -0.2, 3.0], [0.0, 0.1, 0.5]]  # ((0, 0.2, 1) - mean) / std per channel
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor(expected).view(1, 3, 1, 3))
    with pytest.raises(ValueError, match="1 or 3 values"):
        normalize(x, (0.5, 0.5), (0.5, 0.5))


@pytest.mark.parametrize("s", [0.0, 0.1, 0.3])
def test_soft_targets_give_torch_label_smoothing_loss(s):
    logits = torch.randn(6, 5, generator=gen(0))
    labels = torch.tensor([0, 4, 2, 2, 1, 3])
    t = soft_targets(labels, 5, s)
    torch.testing.assert_close(t.sum(1), torch.ones(6))
    loss = -(t * logits.log_softmax(1)).sum(1).mean()
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels, label_smoothing=s))
    if s == 0:
        assert torch.equal(t, F.one_hot(labels, 5).float())


def test_everything_off_is_normalize_and_one_hot_exactly():
    x, labels, out, targets = augment(b=5, h=7, w=11)
    assert torch.equal(out, normalize(x, MEAN, STD))
    assert torch.equal(targets, F.one_hot(labels, 10).float())


def test_empty_batch():
    aug = DeviceAugment(AugmentConfig(randaugment_ops=2, erasing=0.5, mixup=0.8, cutmix=1.0), MEAN, STD, 7)
    out, targets = aug(torch.zeros(0, 3, 8, 5, dtype=torch.uint8), torch.zeros(0, dtype=torch.long), gen(0))
    assert out.shape == (0, 3, 8, 5) and out.dtype == torch.float32
    assert targets.shape == (0, 7) and targets.dtype == torch.float32


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match=r"augment\.hflip"):
        DeviceAugment(AugmentConfig(hflip=1.5), MEAN, STD, 10)
    with pytest.raises(ValueError, match="randaugment_magnitude"):
        DeviceAugment(AugmentConfig(randaugment_ops=2, randaugment_magnitude=12), MEAN, STD, 10)
    with pytest.raises(ValueError, match="uint8"):
        DeviceAugment(AugmentConfig(), MEAN, STD, 10)(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.long), gen(0))


def test_hflip():
    x, _, out, _ = augment(hflip=1.0)
    assert torch.equal(out, normalize(x.flip(-1), MEAN, STD))

    x, _, out, _ = augment(b=1000, h=4, w=6, hflip=0.5)
    same = (out == normalize(x, MEAN, STD)).flatten(1).all(1)
    flipped = (out == normalize(x.flip(-1), MEAN, STD)).flatten(1).all(1)
    assert (same ^ flipped).all()  # every image is either left alone or mirrored, never both (random pixels)
    assert 420 < flipped.sum() < 580


def test_determinism():
    full = dict(hflip=0.5, randaugment_ops=2, randaugment_magnitude=9, erasing=0.25, mixup=0.8, cutmix=1.0)
    full.update(label_smoothing=0.1)
    _, _, a, ta = augment(b=32, seed=3, **full)
    _, _, b, tb = augment(b=32, seed=3, **full)
    _, _, c, _ = augment(b=32, seed=4, **full)
    assert torch.equal(a, b) and torch.equal(ta, tb)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mixup_mixes_images_and_smoothed_targets_with_one_lam(seed):
    s, k = 0.1, 10
    x, labels, out, targets = augment(b=8, seed=seed, classes=k, mixup=0.8, label_smoothing=s)
    torch.testing.assert_close(targets.sum(1), torch.ones(8))
    lam = ((targets[0, labels[0]] - s / k) / (1 - s)).item()  # labels i and 7 - i differ, so this is lam alone
    assert 0 < lam < 1
    soft = soft_targets(labels, k, s)
    torch.testing.assert_close(targets, lam * soft + (1 - lam) * soft.flip(0))
    x = normalize(x, MEAN, STD)
    torch.testing.assert_close(out, lam * x + (1 - lam) * x.flip(0), atol=1e-5, rtol=1e-5)


def test_cutmix_pastes_the_partner_box_and_weights_by_area():
    h, w = 12, 20
    boxes = 0
    for seed in range(6):
        x, labels, out, targets = augment(b=6, h=h, w=w, seed=seed, cutmix=1.0)
        x = normalize(x, MEAN, STD)
        pasted = (out != x).any(1)  # (B,H,W); random images differ from their partner everywhere
        rows, cols = pasted[0].any(1).nonzero(), pasted[0].any(0).nonzero()
        if len(rows) == 0:
            assert torch.equal(out, x) and torch.equal(targets, F.one_hot(labels, 10).float())
            continue
        boxes += 1
        y0, y1, x0, x1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        box = torch.zeros(h, w, dtype=torch.bool)
        box[y0:y1, x0:x1] = True
        assert (pasted == box).all()  # one rectangle, the same for the whole batch
        assert torch.equal(out[:, :, box], x.flip(0)[:, :, box])
        kept = 1 - box.sum().item() / (h * w)
        torch.testing.assert_close(targets[:, labels[0]][0].item(), kept)
        torch.testing.assert_close(targets, kept * F.one_hot(labels, 10) + (1 - kept) * F.one_hot(labels.flip(0), 10))
    assert boxes >= 4


def test_both_alphas_pick_mixup_or_cutmix_per_batch():
    kinds = set()
    for seed in range(12):
        x, _, out, _ = augment(b=4, seed=seed, mixup=0.8, cutmix=1.0)
        x = normalize(x, MEAN, STD)
        kept = (out == x).all(1)
        kinds.add("cutmix" if kept.any() else "mixup")
    assert kinds == {"cutmix", "mixup"}


def test_mix_prob_zero_leaves_the_batch_alone():
    x, labels, out, targets = augment(mixup=0.8, cutmix=1.0, mix_prob=0.0)
    assert torch.equal(out, normalize(x, MEAN, STD)) and torch.equal(targets, F.one_hot(labels, 10).float())


def test_erasing_fills_one_rectangle_with_noise():
    h, w = 24, 32
    x, _, out, _ = augment(b=64, h=h, w=w, erasing=1.0)
    x = normalize(x, MEAN, STD)
    fractions, noise = [], []
    for a, b in zip(x, out, strict=True):
        erased = (a != b).any(0)
        rows, cols = erased.any(1).nonzero(), erased.any(0).nonzero()
        eh, ew = len(rows), len(cols)
        assert rows.max() - rows.min() + 1 == eh and cols.max() - cols.min() + 1 == ew
        assert erased.sum() == eh * ew and (a != b)[:, erased].all()  # a full rectangle, every channel replaced
        # The area fraction is drawn from [0.02, 1/3] and the sides are rounded to whole pixels (as timm).
        slack = 0.5 * (eh + ew) + 0.75
        assert 0.02 * h * w - slack <= eh * ew <= h * w / 3 + slack
        fractions.append(eh * ew / (h * w))
        noise.append(b[:, erased].flatten())
    assert min(fractions) < 0.1 and max(fractions) > 0.2
    noise = torch.cat(noise)
    assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1) < 0.05  # per-pixel standard normal


# ---- the RandAugment ops against PIL -----------------------------------------------------------------------------


def pil_pair(c: int, lo: int = 0, hi: int = 256, seed: int = 0) -> tuple[Image.Image, torch.Tensor]:
    a = np.random.default_rng(seed).integers(lo, hi, (23, 31, c), dtype=np.uint8)
    return Image.fromarray(a[..., 0] if c == 1 else a), torch.from_numpy(a).permute(2, 0, 1)[None].float()


def as_tensor(im: Image.Image) -> torch.Tensor:
    a = np.asarray(im, dtype=np.float32)
    return torch.from_numpy(a.reshape(*a.shape[:2], -1)).permute(2, 0, 1)[None]


LEVELS = [(0, 256), (40, 200), (100, 108)]  # full range, part of it, a nearly flat image


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("lo,hi", LEVELS)
def test_point_ops_equal_pil(c, lo, hi):
    im, x = pil_pair(c, lo, hi)
    for threshold in (0, 77, 128.5, 255):
        assert torch.equal(solarize(x, threshold), as_tensor(ImageOps.solarize(im, threshold)))
    for bits in range(1, 9):
        assert torch.equal(posterize(x, bits), as_tensor(ImageOps.posterize(im, bits)))
    assert torch.equal(autocontrast(x), as_tensor(ImageOps.autocontrast(im)))
    # PIL's equalize table is integer arithmetic on the histogram, reproduced exactly (no tolerance needed).
    assert torch.equal(equalize(x), as_tensor(ImageOps.equalize(im)))


def test_point_ops_leave_a_flat_image_alone():
    x = torch.full((2, 3, 5, 4), 90.0)
    assert torch.equal(autocontrast(x), x) and torch.equal(equalize(x), x)


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("lo,hi", LEVELS)
def test_enhance_ops_equal_pil(c, lo, hi):
    # ImageEnhance blends with a degenerate image and truncates; the degenerate images (luminance with PIL's
    # fixed-point weights, the rounded mean luminance, the SMOOTH filter) are reproduced, so levels agree exactly.
    im, x = pil_pair(c, lo, hi, seed=1)
    ops = {"Brightness": brightness, "Color": color, "Contrast": contrast, "Sharpness": sharpness}
    for name, op in ops.items():
        for factor in (0.1, 0.55, 1.0, 1.37, 1.9):
            expected = as_tensor(getattr(ImageEnhance, name)(im).enhance(factor))
            assert torch.equal(op(x, factor), expected), (name, factor)


@pytest.mark.parametrize("c", [1, 3])
def test_geometric_ops_match_pil(c):
    im, x = pil_pair(c)
    fill = 128 if c == 1 else (128,) * 3
    for angle in (17.0, -29.5, 4.0):
        ours = rotate(x, angle)
        theirs = as_tensor(im.rotate(angle, resample=Image.NEAREST, fillcolor=fill))
        # Coordinates in float32 here, float64 in PIL: a pixel whose source lies within ~1e-5 of a pixel edge
        # may land on the neighbour.
        assert (ours == theirs).float().mean() > 0.995
        assert (ours == 128).all(1).any()  # the corners are filled with grey
    for s in (0.3, -0.17):
        data = (1, s, 0, 0, 1, 0)
        theirs = im.transform(im.size, Image.AFFINE, data, Image.NEAREST, fillcolor=fill)
        assert torch.equal(shear_x(x, s), as_tensor(theirs))
        theirs = im.transform(im.size, Image.AFFINE, (1, 0, 0, s, 1, 0), Image.NEAREST, fillcolor=fill)
        assert torch.equal(shear_y(x, s), as_tensor(theirs))
    for px in (5, -9):
        theirs = im.transform(im.size, Image.AFFINE, (1, 0, -px, 0, 1, 0), Image.NEAREST, fillcolor=fill)
        assert torch.equal(translate_x(x, px), as_tensor(theirs))
        theirs = im.transform(im.size, Image.AFFINE, (1, 0, 0, 0, 1, -px), Image.NEAREST, fillcolor=fill)
        assert torch.equal(translate_y(x, px), as_tensor(theirs))


def test_ops_take_one_parameter_per_image():
    _, x = pil_pair(3)
    batch = torch.cat([x, x])
    out = rotate(batch, torch.tensor([10.0, -20.0]))
    assert torch.equal(out[:1], rotate(x, 10.0)) and torch.equal(out[1:], rotate(x, -20.0))
    out = posterize(batch, torch.tensor([2, 6]))
    assert torch.equal(out[:1], posterize(x, 2)) and torch.equal(out[1:], posterize(x, 6))


@pytest.mark.parametrize("shape", [(4, 1, 9, 14), (4, 3, 14, 9)])
def test_every_op_runs_on_grey_and_non_square_images(shape):
    x = images(*shape).float()
    m = torch.tensor([0.9, -0.9, 0.5, -0.2])
    for name, (op, signed) in RANDAUGMENT_OPS.items():
        out = op(x, m if signed else m.abs())
        assert out.shape == x.shape and out.dtype == torch.float32, name
        assert torch.equal(out, out.round()) and out.min() >= 0 and out.max() <= 255, name
    if shape[1] == 1:
        assert torch.equal(color(x, m), x)  # a grey image has no colour to change (as PIL's Color on mode L)


def test_rand_augment_applies_one_drawn_op_per_image():
    x = images(56, h=12, w=10).float()
    out = rand_augment(x, 1, 9, gen(0))
    m = torch.full((56,), 0.9)
    candidates = torch.stack(
        [op(x, s * m) for op, signed in RANDAUGMENT_OPS.values() for s in ((1, -1) if signed else (1,))]
    )
    matches = (candidates == out).flatten(2).all(2)  # (candidates, B)
    assert matches.any(0).all()  # each image is its input under one of the ops, at the magnitude, either sign
    assert (~matches[0]).sum() > 40  # and most are changed (candidate 0 is Identity)


def test_device_augment_on_grey_non_square_images():
    full = dict(hflip=0.5, randaugment_ops=3, randaugment_magnitude=10, erasing=0.5, mixup=0.8, cutmix=1.0)
    for seed in range(3):
        _, _, out, targets = augment(b=6, c=1, h=10, w=17, seed=seed, label_smoothing=0.1, **full)
        assert out.shape == (6, 1, 10, 17) and out.dtype == torch.float32 and torch.isfinite(out).all()
        torch.testing.assert_close(targets.sum(1), torch.ones(6))


def test_magnitude_ten_reaches_the_torchvision_extremes():
    x = images(2, h=8, w=11).float()
    plus, minus = torch.tensor([1.0, 1.0]), torch.tensor([1.0, -1.0])
    assert torch.equal(RANDAUGMENT_OPS["Posterize"][0](x, plus), posterize(x, 4))
    assert torch.equal(RANDAUGMENT_OPS["Solarize"][0](x, plus), 255 - x)
    assert torch.equal(RANDAUGMENT_OPS["Rotate"][0](x, minus), rotate(x, torch.tensor([30.0, -30.0])))
    shift = math.trunc(150 / 331 * 11)  # 4 pixels
    assert torch.equal(RANDAUGMENT_OPS["TranslateX"][0](x, minus), translate_x(x, torch.tensor([shift, -shift])))
