import numpy as np
import pytest
import torch
from PIL import Image

from vitkit.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess, resize_crop, source_preprocess


def gradient(h: int, w: int) -> Image.Image:
    x = np.tile(np.arange(w, dtype=np.uint8), (h, 1))
    return Image.fromarray(np.stack([x, x, x], -1))


def test_squash_resizes_straight_and_normalises_to_minus_one_one():
    prep = Preprocess((4, 6))
    white = Image.new("RGB", (13, 7), (255, 255, 255))
    black = Image.new("RGB", (13, 7), (0, 0, 0))
    assert prep(white).shape == (3, 4, 6)
    torch.testing.assert_close(prep(white), torch.ones(3, 4, 6))
    torch.testing.assert_close(prep(black), -torch.ones(3, 4, 6))


def test_shorter_side_then_centre_crop():
    prep = Preprocess((224, 224), resize="shorter", crop_pct=0.875)
    out = resize_crop(gradient(300, 600), prep)
    assert out.size == (224, 224)
    # Shorter side 300 -> 256 (224 / 0.875), width 600 -> 512, crop columns 144..367 of the resized image,
    # which are source columns about 169..430: the crop's left pixel is near column 169 of the gradient.
    left = np.asarray(out)[112, 0, 0]
    assert abs(int(left) - 169 % 256) <= 2


def test_torchvision_record_and_grey_models():
    prep = source_preprocess("torchvision", (224, 224))
    assert prep.mean == IMAGENET_MEAN and prep.std == IMAGENET_STD and prep.crop_pct == pytest.approx(0.875)
    grey = source_preprocess("vitkit", (8, 8), in_chans=1)
    x = grey(Image.new("RGB", (8, 8), (255, 0, 0)))
    assert x.shape == (1, 8, 8)  # colour converted to luminance (0.299 * 255 for pure red)
    torch.testing.assert_close(x, torch.full((1, 8, 8), (76 / 255 - 0.5) / 0.5))


def test_bad_records_are_refused():
    with pytest.raises(ValueError, match="crop_pct"):
        Preprocess(crop_pct=0)
    with pytest.raises(ValueError, match="unknown preprocessing field"):
        Preprocess.from_dict({"img_size": [2, 2], "colour": "blue"})
    assert Preprocess.from_dict(Preprocess((5, 7)).to_dict()) == Preprocess((5, 7))
