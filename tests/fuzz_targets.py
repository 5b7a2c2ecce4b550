"""Every reader of outside files, as fuzz targets shared by tests/test_fuzz.py (a bounded run in the suite) and
benchmarks/fuzz.py (a long run).

A target writes the fuzzed bytes where its reader looks and calls the reader. The property: the reader returns,
or raises one of the errors it documents (vitkit's ValueError with the file named, FileNotFoundError,
UnreadableImage). Any other exception, or a call that runs past TIME_LIMIT seconds, is a bug in the reader.

Inputs are random bytes and, mostly, valid files mutated (bits flipped, cut short, bytes inserted, deleted or
overwritten with boundary values), so that the fuzzer gets past the magic numbers into the parsers. The text
formats (JSON, YAML) also get structural mutations: one value replaced by a random one of another type or size.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import pickle
import signal
import struct
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
import yaml
from hypothesis import strategies as st
from PIL import Image
from randomized import randomized
from test_checkpoints_mindspore import entry

import vitkit
from vitkit.data import TarShards, UnreadableImage, decode, open_source
from vitkit.data.archives import read_idx
from vitkit.train import load_config
from vitkit.train.config import RECIPES
from vitkit.train.state import load_state, save_state

TIME_LIMIT = 10.0  # CPU seconds for one call on a file of a few KB: anything slower is a hang
BOUNDARY = [b"\x00", b"\xff", b"\x7f", b"\x80", b"\x00\x00\x00\x00", b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff"]
BOUNDARY += [b"\x80\x00\x00\x00", b"\xff\xff\xff\xff\xff\xff\xff\x7f", b"-1", b"99999999999"]


@dataclass
class Target:
    """A reader under fuzz: `seeds` are valid files; `call(data, folder)` reads `data` placed in `folder`."""

    name: str
    seeds: Callable[[], list[bytes]]
    call: Callable[[bytes, Path], object]
    errors: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)
    text: bool = False  # JSON or YAML: also mutate values

    def inputs(self) -> st.SearchStrategy[bytes]:
        seeds = self.seeds()
        kinds = [st.binary(max_size=512), mutated(seeds)]
        if self.text:
            kinds.append(swapped_value(seeds))
        return st.one_of(*kinds)

    def check(self, data: bytes, limit: float | None = TIME_LIMIT) -> None:
        """Run the reader on `data`; only the documented errors may come out."""
        with tempfile.TemporaryDirectory() as folder, time_limit(limit, self.name), contextlib.suppress(self.errors):
            self.call(data, Path(folder))

    def warm_up(self) -> None:
        """Read the seeds once, untimed: the first call pays for lazy imports (torch loads parts on first use)."""
        for seed in self.seeds():
            self.check(seed, limit=None)


# ---- mutations ---------------------------------------------------------------------------------------------------
@st.composite
def mutated(draw, seeds: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "flip", "cut", "insert", "delete", "overwrite", "boundary"]))
        i = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[i:]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[i : i + draw(st.integers(1, 64))]
        elif op == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[i : i + len(chunk)] = chunk
        elif op == "boundary":
            chunk = draw(st.sampled_from(BOUNDARY))
            data[i : i + len(chunk)] = chunk
    return bytes(data)


ODD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63),
    st.sampled_from([0, -1, 1, 3, 7, 2**20, 2**31, 10**12]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.integers(-5, 2**20), max_size=4),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


@st.composite
def swapped_value(draw, seeds: list[bytes]) -> bytes:
    """A JSON or YAML seed with one value, anywhere in it, replaced by a random one."""
    seed = draw(st.sampled_from(seeds))
    is_json = seed.lstrip().startswith(b"{")
    tree = json.loads(seed) if is_json else yaml.safe_load(seed)
    spots = list(_spots(tree))
    if spots:
        parent, key = draw(st.sampled_from(spots))
        parent[key] = draw(ODD_VALUES)
    text = json.dumps(tree) if is_json else yaml.safe_dump(tree)
    return text.encode()


def _spots(node) -> Iterator[tuple[object, object]]:
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, value in items:
        yield node, key
        yield from _spots(value)


@contextlib.contextmanager
def time_limit(seconds: float | None, what: str) -> Iterator[None]:
    """Raise TimeoutError in a call that uses more than `seconds` of CPU time (CPU, not wall-clock, time: a
    busy machine must not turn a slow call into a reported hang)."""
    if seconds is None:
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"{what}: one call used more than {seconds} s of CPU time")

    previous = signal.signal(signal.SIGVTALRM, expire)
    signal.setitimer(signal.ITIMER_VIRTUAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)
        signal.signal(signal.SIGVTALRM, previous)


# ---- valid files to start from -------------------------------------------------------------------------------------
def tiny_model() -> vitkit.VisionTransformer:
    cfg = vitkit.ViTConfig(img_size=(8, 8), patch_size=4, width=8, depth=1, heads=2, mlp_dim=8, num_classes=2)
    model = randomized(cfg)
    model.classes = ["cat", "dog"]
    return model


@cache
def saved(to: str, name: str) -> dict[str, bytes]:
    """The files save_pretrained writes for the tiny model, by relative path."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / name
        vitkit.save_pretrained(tiny_model(), out, to=to)
        files = [out] if out.is_file() else sorted(p for p in out.rglob("*") if p.is_file())
        return {str(p.relative_to(out) if p != out else p.name): p.read_bytes() for p in files}


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def image_seeds() -> list[bytes]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8))
    palette = rgb.convert("P")
    exif = rgb.getexif()
    exif[0x0112] = 6
    frames = [Image.new("P", (4, 3), k) for k in (1, 2)]
    return [
        encode(rgb, "PNG"),
        encode(rgb.convert("RGBA"), "PNG"),
        encode(palette, "PNG", transparency=0),
        encode(Image.fromarray(rng.integers(0, 65535, (4, 3), dtype=np.uint16)), "PNG"),
        encode(rgb, "JPEG", quality=90),
        encode(rgb, "JPEG", exif=exif.tobytes()),
        encode(rgb.convert("CMYK"), "JPEG"),
        encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        encode(rgb, "BMP"),
        encode(rgb.convert("CMYK"), "TIFF"),
        encode(Image.fromarray(rng.random((3, 4), dtype=np.float32)), "TIFF"),
        encode(rgb, "WEBP"),
        b"P5 3 1 65535\n\xff\xff\x01\x01\x00\x00",
        encode(rgb.convert("1"), "PNG"),
    ]


def _decode(data: bytes, folder: Path) -> None:
    decode(data, "fuzz.img")
    decode(data, "fuzz.img", channels=1, draft=(2, 2))


def _load_file(name: str) -> Callable[[bytes, Path], object]:
    def call(data: bytes, folder: Path) -> object:
        (folder / name).write_bytes(data)
        return vitkit.load_pretrained(folder / name)

    return call


def _load_dir(to: str, fuzzed: str) -> Callable[[bytes, Path], object]:
    """A model directory with one of its files replaced by the fuzzed bytes."""

    def call(data: bytes, folder: Path) -> object:
        for rel, content in saved(to, "m").items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(data if rel == fuzzed else content)
        return vitkit.load_pretrained(folder)

    return call


def _state_seed() -> list[bytes]:
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 3, 8, 8)).sum().backward()
    optimizer.step()
    state = {"step": 3, "best_top1": 0.5, "model": model.state_dict(), "optimizer": optimizer.state_dict()}
    state |= {"scaler": {}, "ema": None, "config": {"train": {"steps": 3}}}
    with tempfile.TemporaryDirectory() as folder:
        save_state(Path(folder) / "last.pt", state)
        return [(Path(folder) / "last.pt").read_bytes()]


def _load_state(data: bytes, folder: Path) -> None:
    (folder / "last.pt").write_bytes(data)
    load_state(folder / "last.pt")


def _mindspore_seed() -> list[bytes]:
    sd = tiny_model().state_dict()
    return [b"".join(entry(k, v.numpy()) for k, v in sd.items())]


def _recipe_seeds() -> list[bytes]:
    return [p.read_bytes() for p in sorted(RECIPES.glob("*.yaml"))[:4]]


def _load_recipe(data: bytes, folder: Path) -> None:
    (folder / "r.yaml").write_bytes(data)
    load_config(folder / "r.yaml")


def _idx_seeds() -> list[bytes]:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = b"\0\0\x08\x03" + struct.pack(">3I", *images.shape) + images.tobytes()
    labels = b"\0\0\x08\x01" + struct.pack(">I", 2) + bytes([0, 1])
    return [raw, labels, gzip.compress(raw), gzip.compress(labels)]


def _read_idx(data: bytes, folder: Path) -> None:
    for name in ("train-images-idx3-ubyte", "train-images-idx3-ubyte.gz"):  # each read, whatever the other did
        (folder / name).write_bytes(data)
        with contextlib.suppress(ValueError):
            read_idx(folder / name)


def _cifar_batch(protocol: int) -> bytes:
    data = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    return pickle.dumps({b"batch_label": b"fuzz", b"labels": [0, 1], b"data": data}, protocol=protocol)


def _cifar_meta(protocol: int) -> bytes:
    return pickle.dumps({"label_names": ["cat", "dog"], "num_vis": 3072}, protocol=protocol)


def _cifar_seeds() -> list[bytes]:
    return [_cifar_batch(2), _cifar_batch(4), _cifar_meta(2), _cifar_meta(4)]


def _open_cifar(data: bytes, folder: Path) -> None:
    """The fuzzed bytes as a batch beside a valid meta file, then as the meta file beside a valid batch."""
    cases = [("data_batch_1", "batches.meta", _cifar_meta(4)), ("batches.meta", "data_batch_1", _cifar_batch(4))]
    for fuzzed, other, valid in cases:
        (folder / fuzzed).write_bytes(data)
        (folder / other).write_bytes(valid)
        with contextlib.suppress(ValueError, FileNotFoundError):
            open_source(folder, "train").load(0)


def _tar_seeds() -> list[bytes]:
    rgb = Image.fromarray(np.full((4, 5, 3), 99, np.uint8))
    members = {
        "s/000.png": encode(rgb, "PNG"),
        "s/000.cls": b"1",
        "s/001.jpg": encode(rgb, "JPEG"),
        "s/001.json": b'{"label": 0}',
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return [buf.getvalue()]


def _read_tar(data: bytes, folder: Path) -> None:
    (folder / "shard.tar").write_bytes(data)
    source = TarShards([folder / "shard.tar"], classes=["cat", "dog"])
    for i in range(len(source)):
        with contextlib.suppress(UnreadableImage):
            source.load(i, 3, draft=(2, 2))


TARGETS = [
    Target("image (decode)", image_seeds, _decode, errors=(UnreadableImage,)),
    Target("official .npz", lambda: list(saved("npz", "m.npz").values()), _load_file("m.npz")),
    Target("safetensors (timm)", lambda: list(saved("timm", "m.safetensors").values()), _load_file("m.safetensors")),
    Target("safetensors (vitkit)", lambda: [saved("vitkit", "m")["model.safetensors"]], _load_file("m.safetensors")),
    Target("torch .pth", lambda: list(saved("timm", "m.pth").values()), _load_file("m.pth")),
    Target("training state last.pt", _state_seed, _load_state),
    Target("MindSpore .ckpt", _mindspore_seed, _load_file("m.ckpt")),
    Target("vitkit.json", lambda: [saved("vitkit", "m")["vitkit.json"]], _load_dir("vitkit", "vitkit.json"), text=True),
    Target("HF config.json", lambda: [saved("hf", "m")["config.json"]], _load_dir("hf", "config.json"), text=True),
    Target(
        "HF preprocessor_config.json",
        lambda: [saved("hf", "m")["preprocessor_config.json"]],
        _load_dir("hf", "preprocessor_config.json"),
        text=True,
    ),
    Target("recipe YAML", _recipe_seeds, _load_recipe, text=True),
    Target("IDX (raw and .gz)", _idx_seeds, _read_idx),
    Target("CIFAR pickles", _cifar_seeds, _open_cifar),
    Target("WebDataset tar", _tar_seeds, _read_tar),
]
