"""Map-style image sources: every dataset layout vitkit reads, behind one small interface.

A `Source` is a list of labelled images: `len(source)`, `source.labels` (cheap, nothing decoded),
`source.load(i)` (a decoded PIL image, or `UnreadableImage`) and `source.where(i)` (the file, for the skip log).
`open_source` looks at a path and picks the layout; the classes below can also be built directly.

Order is sorted and deterministic everywhere, so index i names the same image on every rank and every run.
"""

from __future__ import annotations

import abc
import importlib.resources
import json
import os
import posixpath
import re
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from vitkit.data.archives import read_cifar_pickle, read_idx
from vitkit.data.images import UnreadableImage, decode

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm")  # WebDataset member extensions, in preference
SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "test"), "test": ("test", "val"), "infer": ("infer",)}
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
LAYOUTS = """accepted layouts:
  None or "digits"                                  the embedded handwritten digits
  <dir>/data_batch_1.., test_batch, batches.meta    CIFAR-10 python batches
  <dir>/train, test, meta                           CIFAR-100 python batches
  <dir>/train-images-idx3-ubyte[.gz], t10k-...      MNIST / Fashion-MNIST IDX files
  <dir>/{train,val|test,infer}/<class>/<image>      image folders per split
  <dir>/<class>/<image>                             image folders; val held out by val_fraction
  <file>.tar, shards-{0000..0009}.tar               WebDataset shards
  <dir>/<split>-*.tar, <dir>/<split>/*.tar          WebDataset shards per split"""


class Source(abc.ABC):
    """A list of labelled images. `classes[label]` names a label; label -1 means unlabelled (an infer split)."""

    classes: list[str]
    name: str
    _labels: np.ndarray  # int64 (N,), set by each subclass

    def __len__(self) -> int:
        return len(self._labels)

    @property
    def labels(self) -> np.ndarray:
        """All labels, int64 (N,), without decoding anything."""
        return self._labels

    @abc.abstractmethod
    def load(self, i: int, channels: int = 3, draft: tuple[int, int] | None = None) -> Image.Image:
        """Image i as "RGB" (channels=3) or "L" (channels=1); raises UnreadableImage. See `images.decode`."""

    @abc.abstractmethod
    def where(self, i: int) -> str:
        """Where image i lives, for messages: a path, "shard.tar:member" or "file[row]"."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self)} images, {len(self.classes)} classes)"


class ImageFiles(Source):
    """Image files on disk (an ImageFolder tree), decoded on demand."""

    def __init__(self, paths: Sequence[str | Path], labels: Sequence[int], classes: list[str], name: str) -> None:
        self.paths = [str(p) for p in paths]
        self._labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(self.paths) != len(self._labels):
            raise ValueError(f"{name}: {len(self.paths)} paths but {len(self._labels)} labels")
        self.classes, self.name = list(classes), name

    def load(self, i: int, channels: int = 3, draft: tuple[int, int] | None = None) -> Image.Image:
        return decode(Path(self.paths[i]), self.paths[i], channels, draft)

    def where(self, i: int) -> str:
        return self.paths[i]


class ArrayImages(Source):
    """Images held in memory as one uint8 array (N, H, W) or (N, H, W, C) with C = 1 or 3.

    `parts` lists the (file, rows) the array was concatenated from, so `where` can say "data_batch_2[17]".
    """

    def __init__(
        self,
        array: np.ndarray,
        labels: Sequence[int],
        classes: list[str],
        name: str,
        parts: Sequence[tuple[str, int]] | None = None,
    ) -> None:
        if array.dtype != np.uint8 or array.ndim not in (3, 4) or (array.ndim == 4 and array.shape[3] not in (1, 3)):
            raise ValueError(
                f"{name}: expected uint8 (N, H, W) or (N, H, W, 1|3) images, got {array.dtype} {array.shape}"
            )
        self.array = array[..., 0] if array.ndim == 4 and array.shape[3] == 1 else array
        self._labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(self.array) != len(self._labels):
            raise ValueError(f"{name}: {len(self.array)} images but {len(self._labels)} labels")
        self.classes, self.name = list(classes), name
        self.parts = list(parts) if parts is not None else [(name, len(self.array))]
        self._starts = np.cumsum([0] + [rows for _, rows in self.parts])
        assert self._starts[-1] == len(self.array), (self.parts, len(self.array))

    def load(self, i: int, channels: int = 3, draft: tuple[int, int] | None = None) -> Image.Image:
        mode = "L" if channels == 1 else "RGB"
        image = Image.fromarray(self.array[i])
        return image if image.mode == mode else image.convert(mode)

    def where(self, i: int) -> str:
        part = int(np.searchsorted(self._starts, i, side="right")) - 1
        return f"{self.parts[part][0]}[{i - self._starts[part]}]"


class TarShards(Source):
    """WebDataset tar shards, indexed once so any sample can be read directly.

    A sample is the group of members sharing a key (the member path up to the first dot of its name): an image
    (.jpg .jpeg .png .webp .bmp .ppm) and a label, from `cls`/`cls.txt` (an integer) or `json` ({"label": k}).
    Class names come from `classes` or a classes.txt beside the shards (or one folder up), else "0".."K-1".
    """

    def __init__(self, shards: Sequence[str | Path], classes: list[str] | None = None, name: str | None = None):
        self.shards = [str(s) for s in shards]
        if not self.shards:
            raise ValueError(f"{name}: no shards")
        self.name = name or (self.shards[0] if len(self.shards) == 1 else f"{self.shards[0]} .. {self.shards[-1]}")
        shard, offset, size, member, labels = [], [], [], [], []
        for s, path in enumerate(self.shards):
            for info, label in _index_shard(path):
                shard.append(s), offset.append(info.offset_data), size.append(info.size), member.append(info.name)
                labels.append(label)
        if not labels:
            raise ValueError(f"{self.name}: the shards hold no samples")
        self._shard, self._offset, self._size = (np.asarray(a, dtype=np.int64) for a in (shard, offset, size))
        self._member, self._labels = member, np.asarray(labels, dtype=np.int64)
        if classes is None:
            here = Path(self.shards[0]).parent
            txt = next((p for p in (here / "classes.txt", here.parent / "classes.txt") if p.is_file()), None)
            classes = _read_classes_txt(txt) if txt else [str(k) for k in range(int(self._labels.max()) + 1)]
        self.classes = list(classes)
        _check_labels(self._labels, self.classes, self.name)

    def load(self, i: int, channels: int = 3, draft: tuple[int, int] | None = None) -> Image.Image:
        try:
            with open(self.shards[self._shard[i]], "rb") as f:
                f.seek(int(self._offset[i]))
                data = f.read(int(self._size[i]))
        except OSError as e:
            raise UnreadableImage(self.where(i), f"cannot read the shard ({e})") from None
        return decode(data, self.where(i), channels, draft)

    def where(self, i: int) -> str:
        return f"{self.shards[self._shard[i]]}:{self._member[i]}"


def _index_shard(path: str) -> list[tuple[tarfile.TarInfo, int]]:
    """(image member, label) per sample of one uncompressed tar shard, in member order."""
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                folder, base = posixpath.split(info.name)
                if info.isfile() and not base.startswith("."):
                    stem, _, ext = base.partition(".")
                    groups.setdefault(posixpath.join(folder, stem), {})[ext.lower()] = info
            samples = []
            for key, members in groups.items():
                image = next((members[e] for e in TAR_IMAGE_EXTENSIONS if e in members), None)
                if image is None:
                    raise ValueError(f"{path}: sample {key!r} has no image member ({', '.join(TAR_IMAGE_EXTENSIONS)})")
                samples.append((image, _tar_label(tar, members, f"{path}: sample {key!r}")))
    except (tarfile.TarError, OSError) as e:
        raise ValueError(f"{path}: not a readable uncompressed tar shard ({e})") from None
    return samples


def _tar_label(tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo], where: str) -> int:
    for ext in ("cls", "cls.txt", "json"):
        if ext in members:
            text = tar.extractfile(members[ext]).read().decode("utf-8", "replace")
            try:
                value = json.loads(text)["label"] if ext == "json" else text.strip()
                return int(value)
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{where}: bad label in its .{ext} member: {text[:80]!r}") from None
    raise ValueError(f'{where} has no label member (.cls, .cls.txt or .json with "label"); it has {sorted(members)}')


def expand_braces(pattern: str) -> list[str]:
    """ "shard-{0000..0002}.tar" -> [shard-0000.tar, shard-0001.tar, shard-0002.tar]; "{a,b}" lists too."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    lo_hi = re.fullmatch(r"(\d+)\.\.(\d+)", m.group(1))
    if lo_hi:
        lo, hi = lo_hi.groups()
        width = max(len(lo), len(hi)) if lo.startswith("0") or hi.startswith("0") else 0  # braceexpand's rule
        items = [str(k).zfill(width) for k in range(int(lo), int(hi) + 1)]
    else:
        items = m.group(1).split(",")
    return [out for item in items for out in expand_braces(pattern[: m.start()] + item + pattern[m.end() :])]


# ---- CIFAR python batches ----


def _text(x: object) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def _cifar(root: Path, split: str) -> ArrayImages:
    """CIFAR-10 (data_batch_N, test_batch, batches.meta) or CIFAR-100 (train, test, meta; fine labels)."""
    if split == "infer":
        raise ValueError(f"{root}: CIFAR has train and test batches, no infer split")
    if (root / "batches.meta").is_file() or (root / "data_batch_1").is_file():
        meta, names_key, labels_key = root / "batches.meta", "label_names", "labels"
        numbered = [p for p in root.iterdir() if re.fullmatch(r"data_batch_\d+", p.name)]
        files = sorted(numbered, key=lambda p: int(p.name[11:])) if split == "train" else [root / "test_batch"]
    else:
        meta, names_key, labels_key = root / "meta", "fine_label_names", "fine_labels"
        files = [root / ("train" if split == "train" else "test")]
    if not meta.is_file():
        raise FileNotFoundError(f"{meta}: missing (it holds the class names)")
    names = read_cifar_pickle(meta).get(names_key)
    if names is None:
        raise ValueError(f"{meta}: no {names_key!r} list of class names")
    classes = [_text(n) for n in names]
    images, labels, parts = [], [], []
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing CIFAR batch")
        batch = read_cifar_pickle(f)
        data, y = batch.get("data"), batch.get(labels_key)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            found = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise ValueError(f"{f}: 'data' should be uint8 (N, 3072), found {found}")
        if not isinstance(y, list | np.ndarray) or len(y) != len(data):
            raise ValueError(f"{f}: {labels_key!r} should be a list of {len(data)} labels, found {type(y).__name__}")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # rows are the R, G, B planes in turn
        labels.append(np.asarray(y, dtype=np.int64))
        parts.append((str(f), len(data)))
    array = np.ascontiguousarray(np.concatenate(images))  # (N, 32, 32, 3)
    labels = np.concatenate(labels)
    _check_labels(labels, classes, str(root))
    return ArrayImages(array, labels, classes, str(root), parts)


# ---- MNIST / Fashion-MNIST IDX files ----


def _idx_file(root: Path, prefix: str, kind: str) -> Path:
    names = [f"{prefix}-{kind}-{n}" for n in ("idx3-ubyte", "idx1-ubyte")] + [f"{prefix}-{kind}.idx3-ubyte"]
    names += [f"{prefix}-{kind}.idx1-ubyte"]
    for name in names:
        for path in (root / name, root / f"{name}.gz"):
            if path.is_file():
                return path
    raise FileNotFoundError(f"{root}: no {prefix}-{kind}-idx?-ubyte[.gz] file")


def _idx(root: Path, split: str) -> ArrayImages:
    if split == "infer":
        raise ValueError(f"{root}: IDX datasets have train and t10k files, no infer split")
    prefix = "train" if split == "train" else "t10k"
    images_file, labels_file = _idx_file(root, prefix, "images"), _idx_file(root, prefix, "labels")
    images, labels = read_idx(images_file), read_idx(labels_file)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(f"{images_file}: expected uint8 (N, H, W) images, found {images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.shape != images.shape[:1]:
        raise ValueError(f"{labels_file}: expected {len(images)} uint8 labels, found {labels.dtype} {labels.shape}")
    if (root / "classes.txt").is_file():
        classes = _read_classes_txt(root / "classes.txt")
    elif "fashion" in root.resolve().name.lower():
        classes = list(FASHION_MNIST_CLASSES)
    else:
        classes = [str(k) for k in range(max(10, int(labels.max(initial=0)) + 1))]
    _check_labels(labels, classes, str(labels_file))
    return ArrayImages(images, labels, classes, str(images_file))


# ---- image folders ----


def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_under(folder: Path) -> list[str]:
    """Every image file under folder, recursively, sorted; hidden files and folders (.DS_Store, ._x.jpg) skipped."""
    found = []
    for parent, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.join(parent, f) for f in files if _is_image(f)]
    return sorted(found)


def _class_images(folder: Path, classes: list[str]) -> tuple[list[str], list[int]]:
    """The images of folder/<class>/..., labelled by their class's index in `classes`."""
    paths, labels = [], []
    for sub in _subfolders(folder):
        if sub.name not in classes:
            raise ValueError(f"{sub}: class folder not in the train split's classes {classes}")
        found = _images_under(sub)
        if not found:
            raise ValueError(f"{sub}: class folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        paths += found
        labels += [classes.index(sub.name)] * len(found)
    return paths, labels


def _split_tree(root: Path, split: str) -> ImageFiles:
    """root/{train,val|test,infer}/<class>/<image>; infer/ may also hold images directly (label -1)."""
    folder = next((root / n for n in SPLIT_FOLDERS[split] if (root / n).is_dir()), None)
    if folder is None:
        found = [p.name for p in _subfolders(root)]
        raise ValueError(f"{root}: no {' or '.join(SPLIT_FOLDERS[split])} folder for split {split!r}; found {found}")
    # Classes come from train/ so that a label means the same class in every split.
    classes = [p.name for p in _subfolders(root / "train" if (root / "train").is_dir() else folder)]
    loose = sorted(str(p) for p in folder.iterdir() if p.is_file() and _is_image(p.name))
    if loose and split != "infer":
        raise ValueError(f"{folder}: images directly in a {split} folder; expected {folder}/<class>/<image>")
    paths, labels = _class_images(folder, classes)
    paths, labels = loose + paths, [-1] * len(loose) + labels
    if not paths:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) in the {split} split")
    return ImageFiles(paths, labels, classes, str(folder))


def _class_tree(root: Path, split: str, val_fraction: float, seed: int) -> ImageFiles:
    """root/<class>/<image> with no split folders: val is a seeded, class-stratified val_fraction."""
    if split == "infer":
        raise ValueError(f"{root}: a tree of class folders has no infer split")
    classes = [p.name for p in _subfolders(root)]
    paths, labels = _class_images(root, classes)
    keep = _split_indices(np.asarray(labels), split, val_fraction, seed, str(root))
    return ImageFiles([paths[i] for i in keep], np.asarray(labels)[keep], classes, f"{root} ({split})")


# ---- the embedded digits ----


def _digits(split: str, val_fraction: float, seed: int) -> ArrayImages:
    """The 1,797 8x8 UCI handwritten digits shipped with scikit-learn; pixel values 0..16 -> round(v * 255 / 16)."""
    if split == "infer":
        raise ValueError("the embedded digits have no infer split")
    with importlib.resources.files("vitkit.data").joinpath("digits.npz").open("rb") as f, np.load(f) as npz:
        images, labels = npz["images"], npz["labels"].astype(np.int64)
    scale = np.array([round(v * 255 / 16) for v in range(17)], dtype=np.uint8)
    keep = _split_indices(labels, split, val_fraction, seed, "digits")
    return ArrayImages(scale[images[keep]], labels[keep], [str(k) for k in range(10)], f"digits ({split})")


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) sorted indices; each class gives round(n * val_fraction) of its n images to val, at least one
    when val_fraction > 0 and never all of them, chosen by a generator seeded with `seed`."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction}; expected a fraction in [0, 1)")
    rng = np.random.default_rng(seed)
    val = [np.empty(0, dtype=np.int64)]
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n_val = round(len(members) * val_fraction)
        if val_fraction > 0 and len(members) > 1:
            n_val = min(max(n_val, 1), len(members) - 1)
        val.append(rng.permutation(members)[:n_val])
    val = np.sort(np.concatenate(val))
    return np.setdiff1d(np.arange(len(labels)), val), val


def _split_indices(labels: np.ndarray, split: str, val_fraction: float, seed: int, where: str) -> np.ndarray:
    train, val = stratified_split(labels, val_fraction, seed)
    if split != "train" and not len(val):
        raise ValueError(f"{where}: val_fraction={val_fraction} leaves no images for the {split} split")
    return train if split == "train" else val


# ---- shared checks ----


def _read_classes_txt(path: Path) -> list[str]:
    classes = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not classes:
        raise ValueError(f"{path}: no class names (one per line)")
    return classes


def _check_labels(labels: np.ndarray, classes: list[str], where: str) -> None:
    if len(labels) and (labels.min() < -1 or labels.max() >= len(classes)):
        raise ValueError(f"{where}: labels span {labels.min()}..{labels.max()} but there are {len(classes)} classes")


# ---- layout detection ----


def open_source(path: str | Path | None, split: str = "train", *, val_fraction: float = 0.1, seed: int = 0) -> Source:
    """Open a dataset, detecting its layout (see LAYOUTS above; DataConfig.path is passed here).

    Args:
        path: None or "digits" for the embedded digits; a folder, a .tar shard or a brace pattern of shards.
        split: "train", "val" (alias "test") or "infer".
        val_fraction, seed: how val is held out of layouts that have no val split of their own (the digits and a
            plain tree of class folders): the same seed gives the same, class-stratified, disjoint split.
    """
    if split not in SPLIT_FOLDERS:
        raise ValueError(f"split={split!r}; expected one of {sorted(SPLIT_FOLDERS)}")
    if path is None or str(path) == "digits":
        return _digits(split, val_fraction, seed)
    text = str(path)
    if re.search(r"\{[^{}]*\}", text) or text.endswith(".tar"):
        shards = expand_braces(text)
        missing = [s for s in shards if not Path(s).is_file()]
        if missing:
            raise FileNotFoundError(f"{text}: no such shard file(s) {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        return TarShards(shards, name=text)
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such file or directory")
    if root.is_dir():
        for name in ("cifar-10-batches-py", "cifar-100-python"):  # the folder the CIFAR archives unpack to
            if (root / name).is_dir():
                root = root / name
        if any((root / n).is_file() for n in ("batches.meta", "data_batch_1")) or (
            (root / "meta").is_file() and (root / "train").is_file()
        ):
            return _cifar(root, split)
        if any(re.search(r"[-.]idx[13]-ubyte(\.gz)?$", p.name) for p in root.iterdir()):
            return _idx(root, split)
        shards = _split_shards(root, split)
        if shards is not None:
            return TarShards(shards, name=f"{root} ({split})")
        if any((root / n).is_dir() for n in ("train", "val", "test", "infer")):
            return _split_tree(root, split)
        if _subfolders(root):
            return _class_tree(root, split, val_fraction, seed)
    raise ValueError(f"{root}: not a dataset layout vitkit knows\n{LAYOUTS}")


def _split_shards(root: Path, split: str) -> list[Path] | None:
    """The split's shards of a WebDataset folder (<split>-*.tar or <split>/*.tar); None if root holds no shards."""
    holders = [root] + [root / n for n in ("train", "val", "test", "infer") if (root / n).is_dir()]
    if not any(p.suffix == ".tar" and p.is_file() for h in holders for p in h.iterdir()):
        return None
    for name in SPLIT_FOLDERS[split]:
        shards = sorted(root.glob(f"{name}-*.tar")) or sorted(root.glob(f"{name}/*.tar"))
        if shards:
            return shards
    looked = ", ".join(f"{n}-*.tar, {n}/*.tar" for n in SPLIT_FOLDERS[split])
    raise ValueError(f"{root}: no shards for split {split!r} (looked for {looked})")
