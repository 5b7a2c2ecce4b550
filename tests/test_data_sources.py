import gzip
import io
import os
import pickle
import struct
import tarfile
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from vitkit.data import ArrayImages, ImageFiles, TarShards, UnreadableImage, decode, open_source
from vitkit.data.sources import expand_braces


def encode(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def noise(h: int, w: int, seed: int, channels: int = 3) -> np.ndarray:
    shape = (h, w, channels) if channels == 3 else (h, w)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


# ---- image folders ----


def make_tree(root, classes: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """root/<class>/<k>.png of noise; returns {path: pixels}."""
    made = {}
    for c, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(count):
            x = noise(5 + c, 6 + k, seed + 100 * c + k)
            Image.fromarray(x).save(root / name / f"{k}.png")
            made[str(root / name / f"{k}.png")] = x
    return made


def test_image_folder_with_split_folders(tmp_path):
    train = make_tree(tmp_path / "train", {"bee": 2, "ant": 3})
    val = make_tree(tmp_path / "val", {"bee": 1}, seed=7)  # a class missing from val keeps train's label
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "ant" / ".DS_Store").write_bytes(b"\0\1")
    (tmp_path / "train" / "ant" / "._0.png").write_bytes(b"AppleDouble")  # macOS resource fork: hidden, skipped
    (tmp_path / "infer").mkdir()
    Image.fromarray(noise(4, 4, 9)).save(tmp_path / "infer" / "loose.JPG", quality=95)

    src = open_source(tmp_path, "train")
    assert isinstance(src, ImageFiles) and src.classes == ["ant", "bee"]  # sorted folder names
    assert len(src) == 5 and src.labels.dtype == np.int64
    assert src.labels.tolist() == [0, 0, 0, 1, 1]
    assert [src.where(i) for i in range(5)] == sorted(train)  # sorted, deterministic order
    for i in range(5):
        np.testing.assert_array_equal(pixels(src.load(i)), train[src.where(i)])
    assert src.load(0, channels=1).mode == "L"

    for split in ("val", "test"):  # "test" is an alias of val
        v = open_source(tmp_path, split)
        assert v.classes == ["ant", "bee"] and v.labels.tolist() == [1]
        np.testing.assert_array_equal(pixels(v.load(0)), next(iter(val.values())))

    infer = open_source(tmp_path, "infer")
    assert infer.classes == ["ant", "bee"] and infer.labels.tolist() == [-1]
    assert infer.where(0).endswith("loose.JPG")  # extensions match case-insensitively


def test_image_folder_errors_name_the_folder(tmp_path):
    make_tree(tmp_path / "train", {"ant": 1})
    make_tree(tmp_path / "val", {"cow": 1})
    with pytest.raises(ValueError, match=r"val/cow: class folder not in the train split's classes \['ant'\]"):
        open_source(tmp_path, "val")
    with pytest.raises(ValueError, match="no infer folder"):
        open_source(tmp_path, "infer")
    (tmp_path / "train" / "empty").mkdir()
    with pytest.raises(ValueError, match=r"train/empty: class folder holds no images"):
        open_source(tmp_path, "train")
    with pytest.raises(ValueError, match="split='dev'"):
        open_source(tmp_path, "dev")


def test_class_folders_without_splits_are_split_by_seeded_strata(tmp_path):
    made = make_tree(tmp_path, {"a": 10, "b": 20, "c": 3})
    train = open_source(tmp_path, "train", val_fraction=0.2, seed=1)
    val = open_source(tmp_path, "val", val_fraction=0.2, seed=1)
    assert train.classes == val.classes == ["a", "b", "c"]
    t, v = {train.where(i) for i in range(len(train))}, {val.where(i) for i in range(len(val))}
    assert not t & v and t | v == set(made)
    assert np.bincount(val.labels).tolist() == [2, 4, 1]  # round(n * 0.2) per class, at least one
    assert [val.where(i) for i in range(len(val))] == sorted(v)
    again = open_source(tmp_path, "val", val_fraction=0.2, seed=1)
    assert [again.where(i) for i in range(len(again))] == [val.where(i) for i in range(len(val))]
    other = open_source(tmp_path, "val", val_fraction=0.2, seed=2)
    assert {other.where(i) for i in range(len(other))} != v
    with pytest.raises(ValueError, match=r"val_fraction=0\.0 leaves no images"):
        open_source(tmp_path, "val", val_fraction=0.0)


# ---- the embedded digits ----


def test_digits_split_is_stratified_disjoint_and_scaled():
    import importlib.resources

    with importlib.resources.files("vitkit.data").joinpath("digits.npz").open("rb") as f, np.load(f) as npz:
        raw, raw_labels = npz["images"], npz["labels"]
    train, val = open_source(None, "train"), open_source("digits", "val")
    assert isinstance(train, ArrayImages) and train.classes == [str(k) for k in range(10)]
    assert len(train) + len(val) == 1797 and len(val) == 179  # round(n_c * 0.1) summed over classes
    counts = np.bincount(val.labels, minlength=10)
    np.testing.assert_array_equal(counts, np.round(np.bincount(raw_labels) * 0.1))
    # Recover each image's row in the raw file: the union is the whole set, with no image in both splits.
    scale = np.array([round(v * 255 / 16) for v in range(17)], dtype=np.uint8)
    assert scale[8] == 128 and scale[16] == 255 and scale[1] == 16
    expected = {scale[img].tobytes(): int(y) for img, y in zip(raw, raw_labels, strict=True)}
    seen = []
    for src in (train, val):
        for i in range(len(src)):
            image = src.load(i)
            assert image.mode == "RGB" and image.size == (8, 8)
            key = pixels(src.load(i, channels=1)).tobytes()
            assert expected[key] == src.labels[i]
            seen.append(key)
    assert len(seen) == 1797 and set(seen) == set(expected)  # (every digit image in the file is distinct)
    assert set(np.unique(train.array)) <= set(scale.tolist())
    other = open_source(None, "val", seed=1)
    assert not np.array_equal(other.array, val.array)
    np.testing.assert_array_equal(open_source(None, "val").array, val.array)


# ---- CIFAR ----


def cifar_rows(x: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) -> (N, 3072) rows of R, G and B planes, as the CIFAR files store them."""
    return x.transpose(0, 3, 1, 2).reshape(len(x), 3072)


def test_cifar10_python_batches(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    names = [f"class{k}" for k in range(10)]
    x = [noise(32, 32 * n, s).reshape(32, n, 32, 3).transpose(1, 0, 2, 3) for s, n in ((1, 3), (2, 2), (3, 4))]
    y = [[1, 2, 3], [9, 0], [5, 5, 6, 7]]
    # Python 2's cPickle wrote bytes keys; protocol 2 also writes bytes through _codecs.encode.
    for name, xs, ys in (("data_batch_1", x[0], y[0]), ("data_batch_2", x[1], y[1]), ("test_batch", x[2], y[2])):
        batch = {b"data": cifar_rows(xs), b"labels": ys, b"batch_label": b"whatever"}
        (root / name).write_bytes(pickle.dumps(batch, protocol=2))
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [n.encode() for n in names]}, protocol=2))

    train = open_source(tmp_path, "train")  # the folder the archive unpacks to is found inside
    assert isinstance(train, ArrayImages) and train.classes == names
    assert train.array.shape == (5, 32, 32, 3)
    np.testing.assert_array_equal(train.array, np.concatenate([x[0], x[1]]))
    assert train.labels.tolist() == [1, 2, 3, 9, 0]
    np.testing.assert_array_equal(pixels(train.load(4)), x[1][1])  # (H, W, C): pixel (r, c) is x[r, c]
    assert train.where(4) == f"{root}/data_batch_2[1]"
    test = open_source(root, "test")
    np.testing.assert_array_equal(test.array, x[2])
    assert test.labels.tolist() == [5, 5, 6, 7] and test.where(0) == f"{root}/test_batch[0]"


def test_cifar100_uses_fine_labels(tmp_path):
    names = [f"fine{k}" for k in range(100)]
    x_train, x_test = noise(32, 64, 4).reshape(32, 2, 32, 3).transpose(1, 0, 2, 3), noise(32, 32, 5)[None]
    for name, xs, fine in (("train", x_train, [42, 99]), ("test", x_test, [7])):
        batch = {"data": cifar_rows(xs), "fine_labels": fine, "coarse_labels": [0] * len(fine)}
        (tmp_path / name).write_bytes(pickle.dumps(batch))
    (tmp_path / "meta").write_bytes(pickle.dumps({"fine_label_names": names, "coarse_label_names": ["x"] * 20}))
    train, val = open_source(tmp_path, "train"), open_source(tmp_path, "val")
    assert train.classes == names and train.labels.tolist() == [42, 99] and val.labels.tolist() == [7]
    np.testing.assert_array_equal(train.array, x_train)
    np.testing.assert_array_equal(val.array, x_test)


class RunsACommand:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class RunsPython:
    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return exec, (self.code,)


@pytest.mark.parametrize("where", ["data_batch_1", "batches.meta"])
@pytest.mark.parametrize("payload", [RunsACommand, RunsPython])
def test_a_malicious_cifar_pickle_is_refused_without_running(tmp_path, where, payload):
    marker = tmp_path / "pwned"
    command = f"touch {marker}" if payload is RunsACommand else f"open({str(marker)!r}, 'w').close()"
    batch = {"data": cifar_rows(noise(32, 32, 0)[None]), "labels": [0]}
    meta = {"label_names": ["a"]}
    if where == "batches.meta":
        meta["label_names"] = payload(command)
    else:
        batch["data"] = payload(command)
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps(batch))
    (tmp_path / "batches.meta").write_bytes(pickle.dumps(meta))
    with pytest.raises(ValueError, match=rf"{where}: refused to unpickle (posix\.system|builtins\.exec)"):
        open_source(tmp_path, "train")
    assert not marker.exists()


# ---- MNIST / Fashion-MNIST IDX ----


def idx_bytes(array: np.ndarray) -> bytes:
    return b"\0\0\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


@pytest.mark.parametrize("gz", [True, False])
def test_idx_files(tmp_path, gz):
    root = tmp_path / "Fashion_MNIST"
    root.mkdir()
    arrays = {
        "train-images-idx3-ubyte": noise(28, 28 * 3, 1, 1).reshape(28, 3, 28).transpose(1, 0, 2).copy(),
        "train-labels-idx1-ubyte": np.array([9, 0, 3], np.uint8),
        "t10k-images-idx3-ubyte": noise(28, 28, 2, 1)[None],
        "t10k-labels-idx1-ubyte": np.array([4], np.uint8),
    }
    for name, array in arrays.items():
        data = idx_bytes(array)
        (root / (name + ".gz" if gz else name)).write_bytes(gzip.compress(data) if gz else data)
    train = open_source(root, "train")
    fashion = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    assert train.classes == fashion  # the folder name says "fashion"
    np.testing.assert_array_equal(train.array, arrays["train-images-idx3-ubyte"])
    assert train.labels.tolist() == [9, 0, 3]
    image = train.load(1)
    assert image.mode == "RGB" and image.size == (28, 28)
    np.testing.assert_array_equal(pixels(image)[..., 1], arrays["train-images-idx3-ubyte"][1])
    test = open_source(root, "test")
    np.testing.assert_array_equal(test.array, arrays["t10k-images-idx3-ubyte"])
    assert test.labels.tolist() == [4]

    plain = tmp_path / "mnist"
    root.rename(plain)
    assert open_source(plain).classes == [str(k) for k in range(10)]
    (plain / "classes.txt").write_text("\n".join(f"digit {k}" for k in range(10)) + "\n")
    assert open_source(plain).classes[3] == "digit 3"


def test_idx_errors(tmp_path):
    good = idx_bytes(np.zeros((2, 4, 4), np.uint8))
    (tmp_path / "train-images-idx3-ubyte").write_bytes(good[:-1])
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(2, np.uint8)))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: 47 bytes, but its header .* needs 48"):
        open_source(tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x01\x02" + good[2:])
    with pytest.raises(ValueError, match="not an IDX file"):
        open_source(tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((3, 4, 4), np.uint8)))
    with pytest.raises(ValueError, match="expected 3 uint8 labels"):
        open_source(tmp_path)


# ---- WebDataset tar shards ----


def write_shard(path, samples: list[tuple[str, bytes, str, bytes]]) -> None:
    """samples: (key, image bytes, label extension, label bytes)."""
    with tarfile.open(path, "w") as tar:
        for key, image, label_ext, label in samples:
            for name, data in ((f"{key}.png", image), (f"{key}.{label_ext}", label)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_tar_shards(tmp_path):
    xs = [noise(6, 5 + k, k) for k in range(5)]
    png = [encode(Image.fromarray(x)) for x in xs]
    write_shard(
        tmp_path / "train-0000.tar", [("s/a0", png[0], "cls", b"2\n"), ("s/a1", png[1], "json", b'{"label": 0}')]
    )
    write_shard(tmp_path / "train-0001.tar", [("b0", png[2], "cls.txt", b"1"), ("v1.0/b1", png[3], "cls", b"1")])
    write_shard(tmp_path / "val-0000.tar", [("c0", png[4], "cls", b"0")])

    for path in (tmp_path, f"{tmp_path}/train-{{0000..0001}}.tar"):
        src = open_source(path, "train")
        assert isinstance(src, TarShards) and src.classes == ["0", "1", "2"]
        assert src.labels.tolist() == [2, 0, 1, 1]
        assert src.where(0) == f"{tmp_path}/train-0000.tar:s/a0.png"
        assert src.where(3) == f"{tmp_path}/train-0001.tar:v1.0/b1.png"  # key: up to the first dot of the name
        for i in (3, 1, 0, 2):  # random access
            np.testing.assert_array_equal(pixels(src.load(i)), xs[i])
    (tmp_path / "classes.txt").write_text("cat\ndog\nemu\n")
    val = open_source(tmp_path, "test")
    assert val.classes == ["cat", "dog", "emu"] and val.labels.tolist() == [0]
    np.testing.assert_array_equal(pixels(open_source(tmp_path / "val-0000.tar").load(0)), xs[4])

    (tmp_path / "val").mkdir()  # <split>/*.tar
    (tmp_path / "val-0000.tar").rename(tmp_path / "val" / "0000.tar")
    assert open_source(tmp_path, "val").classes == ["cat", "dog", "emu"]  # classes.txt one folder up
    with pytest.raises(ValueError, match=r"no shards for split 'infer'"):
        open_source(tmp_path, "infer")


def test_tar_shard_errors_name_shard_and_key(tmp_path):
    png = encode(Image.new("RGB", (2, 2)))
    write_shard(tmp_path / "a.tar", [("k0", png, "txt", b"1")])
    with pytest.raises(ValueError, match=r"a\.tar: sample 'k0' has no label member"):
        open_source(tmp_path / "a.tar")
    write_shard(tmp_path / "b.tar", [("k1", png, "json", b'{"lbl": 1}')])
    with pytest.raises(ValueError, match=r"b\.tar: sample 'k1': bad label"):
        open_source(tmp_path / "b.tar")
    with tarfile.open(tmp_path / "c.tar", "w") as tar:
        info = tarfile.TarInfo("k2.cls")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"1"))
    with pytest.raises(ValueError, match=r"c\.tar: sample 'k2' has no image member"):
        open_source(tmp_path / "c.tar")
    with pytest.raises(FileNotFoundError, match=r"d-1\.tar"):
        open_source(tmp_path / "d-{0..1}.tar")


def test_expand_braces():
    assert expand_braces("s-{0008..0011}.tar") == ["s-0008.tar", "s-0009.tar", "s-0010.tar", "s-0011.tar"]
    assert expand_braces("{a,b}-{1..2}.tar") == ["a-1.tar", "a-2.tar", "b-1.tar", "b-2.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_unknown_layouts(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"not a dataset layout vitkit knows\n.*accepted layouts"):
        open_source(tmp_path)
    with pytest.raises(ValueError, match="not a dataset layout"):
        open_source(tmp_path / "readme.txt")
    with pytest.raises(FileNotFoundError, match="no such file"):
        open_source(tmp_path / "nowhere")


# ---- decoding ----


def png_claiming(w: int, h: int) -> bytes:
    """A tiny PNG whose header claims w x h pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def test_bad_files_raise_unreadable_image_with_the_path(tmp_path):
    jpeg = encode(Image.fromarray(noise(64, 64, 0)), "JPEG")
    png = encode(Image.fromarray(noise(64, 64, 0)))
    bad = {
        "empty.jpg": (b"", "empty file"),
        "cut.jpg": (jpeg[: len(jpeg) // 2], "cannot decode"),
        "cut.png": (png[: len(png) // 2], "cannot decode"),
        "page.jpg": (b"<!DOCTYPE html><html><body>404</body></html>", "HTML"),
        "notes.png": (b"just some text\n", "text file"),
        "huge.png": (png_claiming(9000, 8000), "72000000 pixels is over the limit of 64000000"),
        "giga.png": (png_claiming(100_000, 100_000), "decompression-bomb"),
        "flat.png": (png_claiming(0, 5), "PNG file with a corrupt or unsupported header"),
    }
    for name, (data, reason) in bad.items():
        path = tmp_path / name
        path.write_bytes(data)
        start = time.perf_counter()
        with pytest.raises(UnreadableImage, match=reason) as e:
            decode(path, str(path))
        assert time.perf_counter() - start < 0.5  # bombs are refused from the header, without allocating
        assert e.value.where == str(path) and str(e.value).startswith(f"{path}: ")
        assert isinstance(e.value, ValueError)
    with pytest.raises(UnreadableImage, match="cannot read the file"):
        decode(tmp_path / "missing.png", "missing.png")
    error = pickle.loads(pickle.dumps(UnreadableImage("x.jpg", "why")))  # crosses worker processes
    assert (error.where, error.reason) == ("x.jpg", "why")


def palette_image() -> Image.Image:
    image = Image.new("P", (3, 1))
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    image.putdata([0, 1, 2])
    return image


def exif_rotated() -> bytes:
    x = np.zeros((20, 40, 3), np.uint8)
    x[:, :20] = (255, 0, 0)  # left half red, right half blue
    x[:, 20:] = (0, 0, 255)
    image = Image.fromarray(x)
    exif = image.getexif()
    exif[0x0112] = 6  # stored 40x20; displayed rotated 90 degrees clockwise
    return encode(image, "JPEG", quality=95, exif=exif.tobytes())


def animated_gif() -> bytes:
    frames = [Image.new("P", (4, 4), k) for k in (1, 2)]
    for f in frames:
        f.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:])


MODES = {  # name: (file bytes, expected RGB pixels of the first row)
    "1": (encode(Image.frombytes("1", (3, 1), bytes([0b01000000]))), [[0] * 3, [255] * 3, [0] * 3]),
    "L": (encode(Image.fromarray(np.array([[0, 7, 255]], np.uint8))), [[0] * 3, [7] * 3, [255] * 3]),
    "LA": (
        encode(Image.fromarray(np.array([[[200, 128], [10, 255], [99, 0]]], np.uint8), "LA")),
        [[100] * 3, [10] * 3, [0] * 3],
    ),
    "P": (encode(palette_image()), [[255, 0, 0], [0, 255, 0], [0, 0, 255]]),
    "P+transparency": (encode(palette_image(), transparency=1), [[255, 0, 0], [0, 0, 0], [0, 0, 255]]),
    "GIF+transparency": (encode(palette_image(), "GIF", transparency=0), [[0, 0, 0], [0, 255, 0], [0, 0, 255]]),
    "RGBA": (
        encode(Image.fromarray(np.array([[[200, 100, 50, 128], [1, 2, 3, 255], [9, 9, 9, 0]]], np.uint8))),
        [[100, 50, 25], [1, 2, 3], [0, 0, 0]],
    ),
    "RGB+tRNS": (
        encode(Image.fromarray(np.array([[[9, 9, 9], [1, 2, 3], [9, 9, 9]]], np.uint8)), transparency=(9, 9, 9)),
        [[0, 0, 0], [1, 2, 3], [0, 0, 0]],
    ),
    "CMYK": (
        encode(Image.fromarray(np.array([[[0, 255, 0, 0], [0, 0, 0, 255], [0, 0, 0, 0]]], np.uint8), "CMYK"), "TIFF"),
        [[255, 0, 255], [0, 0, 0], [255, 255, 255]],
    ),
    "I;16": (encode(Image.fromarray(np.array([[65535, 257, 128 * 257]], np.uint16))), [[255] * 3, [1] * 3, [128] * 3]),
    "I": (b"P5 3 1 65535\n\xff\xff\x01\x01\x00\x00", [[255] * 3, [1] * 3, [0] * 3]),  # PGM > 8 bits opens as I
    "I32": (encode(Image.fromarray(np.array([[70000, 771, -5]], np.int32)), "TIFF"), [[255] * 3, [3] * 3, [0] * 3]),
    "F in [0, 1]": (
        encode(Image.fromarray(np.array([[1.0, 0.5, 0.0]], np.float32)), "TIFF"),
        [[255] * 3, [128] * 3, [0] * 3],
    ),
    "F in [0, 255]": (
        encode(Image.fromarray(np.array([[300.0, 128.4, -3.0]], np.float32)), "TIFF"),
        [[255] * 3, [128] * 3, [0] * 3],
    ),
    "YCbCr": (encode(Image.new("YCbCr", (3, 1), (128, 128, 128)), "TIFF"), [[128] * 3] * 3),
    "animated GIF": (animated_gif(), [[255, 0, 0]] * 3),  # the first frame
}


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_decodes_to_8bit_rgb_and_grey(mode):
    data, expected = MODES[mode]
    rgb = decode(data, mode)
    assert rgb.mode == "RGB"
    np.testing.assert_array_equal(pixels(rgb)[0, :3], np.array(expected, np.uint8))
    grey = decode(data, mode, channels=1)
    assert grey.mode == "L" and grey.size == rgb.size
    np.testing.assert_array_equal(pixels(grey), pixels(rgb.convert("L")))


def test_exif_orientation_draft_and_tiny_images():
    rotated = decode(exif_rotated(), "exif.jpg")
    assert rotated.size == (20, 40)  # width, height after the rotation
    x = pixels(rotated).astype(int)
    assert x[5, 10, 0] > 240 and x[5, 10, 2] < 15  # the left (red) half is now on top
    assert x[35, 10, 2] > 240 and x[35, 10, 0] < 15
    # draft: JPEGs decode downscaled by a power of two, never below the size asked for.
    big = encode(Image.fromarray(noise(200, 400, 0)), "JPEG")
    assert decode(big, "big.jpg", draft=(50, 20)).size == (50, 25)  # 1/8
    assert decode(big, "big.jpg", draft=(120, 20)).size == (200, 100)  # 1/2: 1/4 would be 100 wide
    assert decode(big, "big.jpg").size == (400, 200)
    assert decode(encode(Image.new("RGB", (400, 200)), "PNG"), "p.png", draft=(50, 20)).size == (400, 200)
    assert decode(exif_rotated(), "exif.jpg", draft=(5, 10)).size == (5, 10)  # asked for in displayed orientation
    assert pixels(decode(encode(Image.new("RGB", (1, 1), (1, 2, 3))), "one.png")).tolist() == [[[1, 2, 3]]]
    assert decode(encode(Image.new("L", (1, 7), 5)), "column.png").size == (1, 7)
