"""The official JAX and big_vision `.npz` checkpoints (vitkit.checkpoints.jax_npz).

The parity tests run `reference_logits`, an independent float64 numpy transcription of the official Flax model
(google-research/vision_transformer `models_vit.py` and `models_resnet.py`), on random arrays in their JAX
layouts, and compare vitkit's float32 logits with it.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

import vitkit
from vitkit import VisionTransformer, ViTConfig
from vitkit.checkpoints import jax_npz

TOL = 1e-5  # float32 vitkit against the float64 reference
POS = "Transformer/posembed_input/pos_embedding"
TINY = dict(width=32, heads=4, depth=2, mlp=64, patch=8, img=32, classes=5)


# ---- random official-layout arrays --------------------------------------------------------------------------------
def official_arrays(
    seed: int = 0,
    *,
    width: int = 32,
    heads: int = 4,
    depth: int = 2,
    mlp: int = 64,
    patch: int = 8,
    img: int = 32,
    classes: int = 5,
    pool: str = "token",
    rep: int | None = None,
    hybrid: tuple[int, ...] | None = None,
    stem_width: int = 32,
    in_chans: int = 3,
) -> dict[str, np.ndarray]:
    """A random model in the layout of the released files (pre-Linen names), scaled so activations stay O(1)."""
    rng = np.random.default_rng(seed)
    a: dict[str, np.ndarray] = {}

    def normal(*shape: int, std: float = 1.0) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def norm(prefix: str, c: int) -> None:
        a[f"{prefix}/scale"] = 1 + normal(c, std=0.1)
        a[f"{prefix}/bias"] = normal(c, std=0.1)

    cin, stride = in_chans, 1
    if hybrid is not None:
        a["conv_root/kernel"] = normal(7, 7, in_chans, stem_width)
        norm("gn_root", stem_width)
        cin, stride = stem_width, 4
        for s, units in enumerate(hybrid, 1):
            w = stem_width * 2 ** (s - 1)
            for u in range(1, units + 1):
                p = f"block{s}/unit{u}"
                if u == 1:
                    a[f"{p}/conv_proj/kernel"] = normal(1, 1, cin, 4 * w)
                    norm(f"{p}/gn_proj", 4 * w)
                a[f"{p}/conv1/kernel"] = normal(1, 1, cin, w)
                norm(f"{p}/gn1", w)
                a[f"{p}/conv2/kernel"] = normal(3, 3, w, w)
                norm(f"{p}/gn2", w)
                a[f"{p}/conv3/kernel"] = normal(1, 1, w, 4 * w)
                norm(f"{p}/gn3", 4 * w)
                cin = 4 * w
            stride *= 2 if s > 1 else 1
    a["embedding/kernel"] = normal(patch, patch, cin, width, std=(patch * patch * cin) ** -0.5)
    a["embedding/bias"] = normal(width, std=0.1)
    grid = img // (patch * stride)
    if pool == "token":
        a["cls"] = normal(1, 1, width, std=0.5)
    a[POS] = normal(1, grid * grid + (pool == "token"), width, std=0.5)
    hd = width // heads
    for i in range(depth):
        b = f"Transformer/encoderblock_{i}"
        norm(f"{b}/LayerNorm_0", width)
        for n in ("query", "key", "value"):
            a[f"{b}/MultiHeadDotProductAttention_1/{n}/kernel"] = normal(width, heads, hd, std=width**-0.5)
            a[f"{b}/MultiHeadDotProductAttention_1/{n}/bias"] = normal(heads, hd, std=0.1)
        a[f"{b}/MultiHeadDotProductAttention_1/out/kernel"] = normal(heads, hd, width, std=width**-0.5)
        a[f"{b}/MultiHeadDotProductAttention_1/out/bias"] = normal(width, std=0.1)
        norm(f"{b}/LayerNorm_2", width)
        a[f"{b}/MlpBlock_3/Dense_0/kernel"] = normal(width, mlp, std=width**-0.5)
        a[f"{b}/MlpBlock_3/Dense_0/bias"] = normal(mlp, std=0.1)
        a[f"{b}/MlpBlock_3/Dense_1/kernel"] = normal(mlp, width, std=mlp**-0.5)
        a[f"{b}/MlpBlock_3/Dense_1/bias"] = normal(width, std=0.1)
    norm("Transformer/encoder_norm", width)
    features = width
    if rep:
        a["pre_logits/kernel"] = normal(width, rep, std=width**-0.5)
        a["pre_logits/bias"] = normal(rep, std=0.1)
        features = rep
    if classes:
        a["head/kernel"] = normal(features, classes, std=features**-0.5)
        a["head/bias"] = normal(classes, std=0.1)
    return a


# ---- the reference: the official Flax model, transcribed to numpy on JAX layouts ---------------------------------
def gelu_tanh(x: np.ndarray) -> np.ndarray:  # jax.nn.gelu(approximate=True), flax's nn.gelu default
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def layer_norm(x: np.ndarray, w: dict, prefix: str) -> np.ndarray:  # flax nn.LayerNorm, eps 1e-6
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * w[f"{prefix}/scale"] + w[f"{prefix}/bias"]


def same_pad(size: int, k: int, s: int) -> tuple[int, int]:  # TF/Flax "SAME": the odd pixel at the end
    total = max((math.ceil(size / s) - 1) * s + k - size, 0)
    return total // 2, total - total // 2


def conv(x: np.ndarray, kernel: np.ndarray, stride: int, padding: str, value: float = 0.0) -> np.ndarray:
    """NHWC input, HWIO kernel (flax nn.Conv)."""
    k = kernel.shape[0]
    if padding == "SAME":
        pads = ((0, 0), same_pad(x.shape[1], k, stride), same_pad(x.shape[2], k, stride), (0, 0))
        x = np.pad(x, pads, constant_values=value)
    windows = sliding_window_view(x, (k, k), axis=(1, 2))[:, ::stride, ::stride]  # (B, H', W', C, k, k)
    return np.einsum("bhwcij,ijco->bhwo", windows, kernel)


def std_conv(x: np.ndarray, kernel: np.ndarray, stride: int) -> np.ndarray:
    """models_resnet.StdConv: kernel standardised over (H, W, in) as (w - mean) / (std + 1e-5), "SAME"."""
    kernel = kernel - kernel.mean(axis=(0, 1, 2))
    kernel = kernel / (kernel.std(axis=(0, 1, 2)) + 1e-5)
    return conv(x, kernel, stride, "SAME")


def group_norm(x: np.ndarray, w: dict, prefix: str, groups: int = 32) -> np.ndarray:  # flax nn.GroupNorm
    b, h, wd, c = x.shape
    g = x.reshape(b, h, wd, groups, c // groups)
    mean, var = g.mean(axis=(1, 2, 4), keepdims=True), g.var(axis=(1, 2, 4), keepdims=True)
    x = ((g - mean) / np.sqrt(var + 1e-6)).reshape(b, h, wd, c)
    return x * w[f"{prefix}/scale"].reshape(-1) + w[f"{prefix}/bias"].reshape(-1)


def max_pool_same(x: np.ndarray) -> np.ndarray:  # nn.max_pool(window 3, stride 2, "SAME")
    pads = ((0, 0), same_pad(x.shape[1], 3, 2), same_pad(x.shape[2], 3, 2), (0, 0))
    x = np.pad(x, pads, constant_values=-np.inf)
    return sliding_window_view(x, (3, 3), axis=(1, 2))[:, ::2, ::2].max(axis=(-2, -1))


def attention(x: np.ndarray, w: dict, p: str) -> np.ndarray:
    """nn.MultiHeadDotProductAttention: DenseGeneral kernels (D, heads, head_dim), out kernel (heads, head_dim, D)."""
    q, k, v = (
        np.einsum("btd,dhk->bthk", x, w[f"{p}/{n}/kernel"]) + w[f"{p}/{n}/bias"] for n in ("query", "key", "value")
    )
    logits = np.einsum("bqhk,bthk->bhqt", q / math.sqrt(q.shape[-1]), k)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bhqt,bthk->bqhk", probs, v)
    return np.einsum("bqhk,hkd->bqd", out, w[f"{p}/out/kernel"]) + w[f"{p}/out/bias"]


def reference_logits(
    arrays: dict, images: torch.Tensor, pool: str = "token", hybrid: tuple | None = None
) -> np.ndarray:
    """models_vit.VisionTransformer.__call__ in float64; images (B, C, H, W) as vitkit takes them."""
    w = {k: np.asarray(v, np.float64) for k, v in arrays.items()}
    x = images.permute(0, 2, 3, 1).double().numpy()  # NHWC
    relu = lambda t: np.maximum(t, 0)  # noqa: E731
    if hybrid is not None:
        x = max_pool_same(relu(group_norm(std_conv(x, w["conv_root/kernel"], 2), w, "gn_root")))
        for s, units in enumerate(hybrid, 1):
            for u in range(1, units + 1):
                p, stride = f"block{s}/unit{u}/", 2 if (s > 1 and u == 1) else 1
                residual = x
                if u == 1:
                    residual = group_norm(std_conv(x, w[p + "conv_proj/kernel"], stride), w, p + "gn_proj")
                y = relu(group_norm(std_conv(x, w[p + "conv1/kernel"], 1), w, p + "gn1"))
                y = relu(group_norm(std_conv(y, w[p + "conv2/kernel"], stride), w, p + "gn2"))
                y = group_norm(std_conv(y, w[p + "conv3/kernel"], 1), w, p + "gn3")
                x = relu(residual + y)
    patch = w["embedding/kernel"].shape[0]
    x = conv(x, w["embedding/kernel"], patch, "VALID") + w["embedding/bias"]
    b, h, wd, d = x.shape
    x = x.reshape(b, h * wd, d)
    if pool == "token":
        x = np.concatenate([np.tile(w["cls"], (b, 1, 1)), x], axis=1)
    x = x + w[POS]
    depth = len({k.split("/")[1] for k in w if k.startswith("Transformer/encoderblock_")})
    for i in range(depth):
        p = f"Transformer/encoderblock_{i}/"
        x = x + attention(layer_norm(x, w, p + "LayerNorm_0"), w, p + "MultiHeadDotProductAttention_1")
        y = layer_norm(x, w, p + "LayerNorm_2")
        y = gelu_tanh(y @ w[p + "MlpBlock_3/Dense_0/kernel"] + w[p + "MlpBlock_3/Dense_0/bias"])
        x = x + y @ w[p + "MlpBlock_3/Dense_1/kernel"] + w[p + "MlpBlock_3/Dense_1/bias"]
    x = layer_norm(x, w, "Transformer/encoder_norm")
    x = x[:, 0] if pool == "token" else x.mean(axis=1)
    if "pre_logits/kernel" in w:
        x = np.tanh(x @ w["pre_logits/kernel"] + w["pre_logits/bias"])
    return x @ w["head/kernel"] + w["head/bias"]


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
    """big_vision's `posemb_sincos_2d` (MoCo v3), (1, h*w, width)."""
    y, x = np.mgrid[:h, :w]
    omega = 1.0 / temperature ** (np.arange(width // 4) / (width // 4 - 1))
    y, x = np.outer(y.flatten(), omega), np.outer(x.flatten(), omega)
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)[None]


def zoom_linear(grid: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """scipy.ndimage.zoom(grid, (H'/H, W'/W, 1), order=1), as the official code resizes position embeddings:
    linear along each axis with the corner pixel centres aligned (grid_mode=False)."""
    for axis, new in enumerate(shape):
        old = grid.shape[axis]
        coords = np.arange(new) * (old - 1) / (new - 1)
        lo = np.minimum(np.floor(coords).astype(int), old - 2)
        frac = (coords - lo).reshape([-1 if a == axis else 1 for a in range(grid.ndim)])
        grid = np.take(grid, lo, axis) * (1 - frac) + np.take(grid, lo + 1, axis) * frac
    return grid


# ---- file variants -----------------------------------------------------------------------------------------------
def save(path: Path, arrays: dict) -> Path:
    np.savez(path, **arrays)
    return path


def to_bfloat16(arrays: dict) -> tuple[dict, dict]:
    """(arrays as JAX saves bfloat16: void |V2, the values they hold as float32), rounding to nearest even."""
    stored, values = {}, {}
    for k, a in arrays.items():
        u = a.astype(np.float32).view(np.uint32)
        bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
        stored[k] = bits.view(np.dtype("V2"))
        values[k] = (bits.astype(np.uint32) << 16).view(np.float32)
    return stored, values


LINEN = {"MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0", "LayerNorm_2": "LayerNorm_1"}
LINEN["MlpBlock_3"] = "MlpBlock_0"


def to_big_vision(arrays: dict, stacked: bool = False, pos: str | None = "pos_embedding") -> dict:
    """The same weights as big_vision stores them: `params/`, Linen numbering, optionally depth-stacked blocks,
    the position embedding at `pos` without the class-token row (None: dropped, for sin-cos models)."""
    out = {}
    for k, v in arrays.items():
        if k == POS:
            if pos is not None:
                out["params/" + pos] = v[:, 1:] if "cls" in arrays else v
            continue
        for old, new in LINEN.items():
            k = k.replace(f"/{old}/", f"/{new}/")
        out["params/" + k] = v
    if stacked:
        blocks = sorted(k for k in out if k.startswith("params/Transformer/encoderblock_"))
        subs = sorted({k.split("/", 3)[3] for k in blocks})
        depth = len({k.split("/")[2] for k in blocks})
        for sub in subs:
            out[f"params/Transformer/encoderblock/{sub}"] = np.stack(
                [out.pop(f"params/Transformer/encoderblock_{i}/{sub}") for i in range(depth)]
            )
    out["opt/1/0/mu/embedding/kernel"] = np.zeros(3, np.float32)  # optax state beside the params: ignored
    return out


def images(h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(seed))


def logits(model: VisionTransformer, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(x).double().numpy()


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


# ---- parity with the official model ------------------------------------------------------------------------------
def _gn_4d(a: dict) -> dict:
    """Old files: GroupNorm scale/bias stored (1, 1, 1, C)."""
    gn = re.compile(r"(.*/)?gn(\d|_root|_proj)/(scale|bias)$")
    return {k: v.reshape(1, 1, 1, -1) if gn.match(k) else v for k, v in a.items()}


def _training_checkpoint(a: dict) -> dict:
    """The official code's training checkpoints: `opt/target/` plus the Flax optimizer's state."""
    out = {"opt/target/" + k: v for k, v in a.items()}
    out["opt/state/step"] = np.array(1000)
    out["opt/state/param_states/embedding/kernel/momentum"] = np.zeros_like(a["embedding/kernel"])
    return out


OFFICIAL_CASES = {
    "token": (dict(TINY), None),
    "gap": (dict(TINY, pool="gap"), None),
    "pre_logits": (dict(TINY, rep=16), None),
    "hybrid": (dict(TINY, img=64, patch=1, hybrid=(1, 1)), None),
    "hybrid_gn_1x1x1xC": (dict(TINY, img=64, patch=1, hybrid=(1, 1)), _gn_4d),
    "hybrid_root_only": (dict(TINY, img=32, patch=2, hybrid=()), None),
    "opt_target_prefix": (dict(TINY), _training_checkpoint),
    "grey_input": (dict(TINY, in_chans=1), None),
}


@pytest.mark.parametrize("case", OFFICIAL_CASES)
def test_official_npz_matches_reference(tmp_path: Path, case: str) -> None:
    kw, stored = OFFICIAL_CASES[case]
    a = official_arrays(**kw)
    path = save(tmp_path / f"{case}.npz", stored(a) if stored else a)
    model = vitkit.load_pretrained(path)
    assert model.cfg.gelu == "tanh" and model.cfg.norm_eps == 1e-6 and model.cfg.heads == 4
    x = images(kw["img"], kw["img"]) if kw.get("in_chans", 3) == 3 else images(kw["img"], kw["img"])[:, :1]
    diff = max_diff(logits(model, x), reference_logits(a, x, kw.get("pool", "token"), kw.get("hybrid")))
    print(f"official {case}: max abs diff {diff:.2e}")
    assert diff <= TOL


def test_bfloat16_file(tmp_path: Path) -> None:
    stored, values = to_bfloat16(official_arrays(**TINY))
    path = save(tmp_path / "bf16.npz", stored)
    assert np.load(path)["embedding/kernel"].dtype == np.dtype("V2")
    ckpt = jax_npz.read(path)
    assert all(t.dtype == torch.float32 for t in ckpt.state_dict.values())
    x = images()
    diff = max_diff(logits(vitkit.load_pretrained(path), x), reference_logits(values, x))
    print(f"official bfloat16: max abs diff {diff:.2e}")
    assert diff <= TOL


def test_what_the_file_determines(tmp_path: Path) -> None:
    path = save(tmp_path / "m.npz", official_arrays(**TINY, rep=16))
    ckpt = jax_npz.read(path)
    assert ckpt.source == "official-npz"
    assert ckpt.determined == {"heads": 4}
    assert ckpt.defaults == {"norm_eps": 1e-6, "gelu": "tanh", "stem_numerics": "official", "pos_interp": "bilinear"}
    cfg = vitkit.load_pretrained(path).cfg
    assert (cfg.width, cfg.depth, cfg.mlp_dim, cfg.patch_size, cfg.img_size) == (32, 2, 64, 8, (32, 32))
    assert (cfg.num_classes, cfg.representation_size, cfg.pool, cfg.class_token) == (5, 16, "token", True)
    assert vitkit.load_pretrained(path).preprocess.mean == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="heads=4"):
        vitkit.load_pretrained(path, heads=2)


# ---- big_vision ----------------------------------------------------------------------------------------------------
BIG_VISION_CASES = {
    # name: (pool, stacked, where the position embedding is, sin-cos)
    "linen_token": ("token", False, "pos_embedding", False),
    "stacked_token": ("token", True, "pos_embedding", False),
    "stacked_gap": ("gap", True, "pos_embedding", False),
    "sincos_gap": ("gap", False, None, True),
    "sincos_token_stacked": ("token", True, None, True),
}


@pytest.mark.parametrize("case", BIG_VISION_CASES)
def test_big_vision_matches_reference(tmp_path: Path, case: str) -> None:
    pool, stacked, pos, sincos = BIG_VISION_CASES[case]
    a = official_arrays(**TINY, pool=pool, seed=1)
    if pool == "token":
        a[POS][:, 0] = 0  # big_vision adds no position embedding to the class token
    if sincos:
        a[POS][:, -16:] = posemb_sincos_2d(4, 4, 32)
    official = save(tmp_path / "official.npz", a)
    path = save(tmp_path / "bv.npz", to_big_vision(a, stacked, pos))
    ckpt = jax_npz.read(path)
    assert ckpt.source == "big_vision" and ckpt.determined == {"heads": 4}
    model = vitkit.load_pretrained(path, img_size=(32, 32))
    assert model.cfg.pos_embed == ("sincos" if sincos else "learn")
    assert model.cfg.pool == pool and not model.cfg.fc_norm
    x = images()
    got = logits(model, x)
    diff = max_diff(got, reference_logits(a, x, pool))
    same = max_diff(got, logits(vitkit.load_pretrained(official), x))
    print(f"big_vision {case}: max abs diff {diff:.2e} to the reference, {same:.2e} to the official file")
    assert diff <= TOL and same <= TOL


def test_old_big_vision_pos_embedding_with_class_token_row(tmp_path: Path) -> None:
    """big_vision before 2022: `Transformer/pos_embedding` with a class-token row (1 + N rows)."""
    a = official_arrays(**TINY, seed=2)
    bv = to_big_vision(a, pos=None)
    bv["params/Transformer/pos_embedding"] = a[POS]
    path = save(tmp_path / "old_bv.npz", bv)
    x = images()
    diff = max_diff(logits(vitkit.load_pretrained(path), x), reference_logits(a, x))
    print(f"big_vision old pos embedding: max abs diff {diff:.2e}")
    assert diff <= TOL


def test_map_head_is_refused(tmp_path: Path) -> None:
    bv = to_big_vision(official_arrays(**TINY, pool="gap"))
    bv["params/MAPHead_0/probe"] = np.zeros((1, 1, 32), np.float32)
    path = save(tmp_path / "map.npz", bv)
    with pytest.raises(ValueError, match="MAP head") as e:
        vitkit.load_pretrained(path)
    assert "map.npz" in str(e.value)


# ---- position-embedding resampling as the official code does it --------------------------------------------------
@pytest.mark.parametrize("size", [(48, 48), (32, 64)])
def test_resampling_is_the_official_zoom(tmp_path: Path, size: tuple[int, int]) -> None:
    """The official layout stores a square grid; a new (also non-square) size resamples it bilinearly with the
    corners aligned, as scipy.ndimage.zoom(order=1) in the official fine-tuning code."""
    a = official_arrays(**TINY)
    path = save(tmp_path / "m.npz", a)
    model = vitkit.load_pretrained(path, img_size=size, pos_interp="bilinear")
    grid = (size[0] // 8, size[1] // 8)
    resized = dict(a)
    zoomed = zoom_linear(a[POS][0, 1:].reshape(4, 4, -1).astype(np.float64), grid)
    resized[POS] = np.concatenate([a[POS][:, :1], zoomed.reshape(1, grid[0] * grid[1], -1)], axis=1)
    pos_diff = max_diff(model.pos_embed.detach().double().numpy(), resized[POS])
    x = images(*size)
    diff = max_diff(logits(model, x), reference_logits(resized, x))
    print(f"resample to {size}: pos_embed max abs diff {pos_diff:.2e}, logits {diff:.2e}")
    assert pos_diff <= 1e-6 and diff <= TOL


def test_resampling_equals_scipy_zoom(tmp_path: Path) -> None:
    ndimage = pytest.importorskip("scipy.ndimage")
    a = official_arrays(**TINY)
    path = save(tmp_path / "m.npz", a)
    grid = a[POS][0, 1:].reshape(4, 4, -1)
    for size in ((56, 56), (32, 64)):
        model = vitkit.load_pretrained(path, img_size=size, pos_interp="bilinear")
        new = (size[0] // 8, size[1] // 8)
        expected = ndimage.zoom(grid, (new[0] / 4, new[1] / 4, 1), order=1)
        got = model.pos_embed[0, 1:].detach().numpy().reshape(*new, -1)
        diff = max_diff(got, expected)
        print(f"scipy zoom to {new}: max abs diff {diff:.2e}")
        assert diff <= 1e-6


# ---- writing -------------------------------------------------------------------------------------------------------
def random_model(**changes) -> VisionTransformer:
    """A tiny model with official numerics and every parameter random (the default head is zero)."""
    fields = dict(
        img_size=32,
        patch_size=8,
        width=32,
        depth=2,
        heads=4,
        mlp_dim=64,
        num_classes=5,
        gelu="tanh",
        pos_interp="bilinear",
    )
    model = VisionTransformer(ViTConfig(**{**fields, **changes}))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


ROUND_TRIPS = {
    "token": {},
    "gap": dict(pool="gap", class_token=False),
    "pre_logits": dict(representation_size=16),
    "no_head": dict(num_classes=0),
    "hybrid": dict(img_size=64, patch_size=1, hybrid=(1, 1), stem_width=32),
}


@pytest.mark.parametrize("case", ROUND_TRIPS)
def test_write_read_round_trip(tmp_path: Path, case: str) -> None:
    model = random_model(**ROUND_TRIPS[case])
    path = tmp_path / "m.npz"
    jax_npz.write(model, path)
    assert all(np.load(path)[k].dtype == np.float32 for k in np.load(path).files)
    ckpt = jax_npz.read(path)
    own = model.state_dict()
    assert sorted(ckpt.state_dict) == sorted(own)
    assert all(torch.equal(ckpt.state_dict[k], own[k]) for k in own)
    back = vitkit.load_pretrained(path)
    assert back.cfg == model.cfg
    x = images(*model.cfg.img_size)
    assert np.array_equal(logits(back, x), logits(model, x))


def test_written_file_is_the_official_model(tmp_path: Path) -> None:
    """What `write` produces runs in the reference exactly as the model it came from."""
    model = random_model(img_size=64, patch_size=1, hybrid=(1, 1), stem_width=32)
    path = tmp_path / "m.npz"
    jax_npz.write(model, path)
    a = dict(np.load(path))
    assert "Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel" in a
    x = images(64, 64)
    diff = max_diff(logits(model, x), reference_logits(a, x, hybrid=(1, 1)))
    print(f"written hybrid vs reference: max abs diff {diff:.2e}")
    assert diff <= TOL


def test_convert_vitkit_to_npz_and_back(tmp_path: Path) -> None:
    model = random_model(representation_size=16)
    vitkit.save_pretrained(model, tmp_path / "native")
    vitkit.convert(tmp_path / "native", tmp_path / "m.npz", to="npz")
    vitkit.convert(tmp_path / "m.npz", tmp_path / "back")
    back = vitkit.load_pretrained(tmp_path / "back")
    assert back.cfg == model.cfg
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())
    x = images()
    assert np.array_equal(logits(back, x), logits(model, x))


def test_write_warns_about_numerics_it_cannot_record(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = random_model(gelu="exact")
    path = tmp_path / "m.npz"
    jax_npz.write(model, path)
    assert "gelu" in caplog.text
    assert vitkit.load_pretrained(path).cfg.gelu == "tanh"
    x = images()
    assert np.array_equal(logits(vitkit.load_pretrained(path, gelu="exact"), x), logits(model, x))


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        (dict(pos_embed="sincos"), "pos_embed"),
        (dict(pool="gap", class_token=False, fc_norm=True), "fc_norm"),
        (dict(pool="gap", class_token=True), "class_token"),
        (dict(qkv_bias=False), "qkv_bias"),
        (dict(img_size=(32, 64)), "img_size"),
    ],
)
def test_write_refuses_what_the_layout_cannot_express(tmp_path: Path, changes: dict, field: str) -> None:
    path = tmp_path / "m.npz"
    with pytest.raises(ValueError, match=re.escape(f"ViTConfig.{field}=")):
        jax_npz.write(random_model(**changes), path)
    assert not path.exists()


# ---- errors for people ---------------------------------------------------------------------------------------------
def test_truncated_file(tmp_path: Path) -> None:
    path = save(tmp_path / "cut.npz", official_arrays(**TINY))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError) as e:
        vitkit.load_pretrained(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize(
    "key",
    ["Transformer/encoderblock_1/MlpBlock_3/Dense_0/bias", POS, "head/bias", "block2/unit1/gn_proj/scale"],
)
def test_missing_key(tmp_path: Path, key: str) -> None:
    a = official_arrays(**dict(TINY, img=64, patch=1, hybrid=(1, 1)))
    del a[key]
    path = save(tmp_path / "missing.npz", a)
    with pytest.raises(ValueError) as e:
        vitkit.load_pretrained(path)
    assert str(path) in str(e.value)
    assert key in str(e.value)


@pytest.mark.parametrize(
    ("key", "shape"),
    [
        ("Transformer/encoderblock_1/MlpBlock_3/Dense_1/kernel", (64, 31)),
        ("Transformer/encoderblock_0/MultiHeadDotProductAttention_1/key/kernel", (32, 4, 7)),
        ("Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel", (32, 2, 16)),
        ("Transformer/encoderblock_0/LayerNorm_2/scale", (33,)),
        ("head/bias", (6,)),
        ("embedding/kernel", (8, 8, 3, 31)),
        ("embedding/kernel", (192, 32)),
        (POS, (1, 16, 32)),
        ("Transformer/encoder_norm/scale", (1, 32)),
    ],
)
def test_wrong_shape(tmp_path: Path, key: str, shape: tuple[int, ...]) -> None:
    a = official_arrays(**TINY)
    a[key] = np.zeros(shape, np.float32)
    path = save(tmp_path / "bad.npz", a)
    with pytest.raises(ValueError) as e:
        vitkit.load_pretrained(path)
    assert str(path) in str(e.value)
    assert key in str(e.value) and str(shape) in str(e.value)


def test_wrong_stacked_depth(tmp_path: Path) -> None:
    bv = to_big_vision(official_arrays(**TINY), stacked=True)
    key = "params/Transformer/encoderblock/MlpBlock_0/Dense_0/bias"
    bv[key] = bv[key][:1]
    path = save(tmp_path / "stack.npz", bv)
    with pytest.raises(ValueError) as e:
        vitkit.load_pretrained(path)
    assert str(path) in str(e.value)
    assert key in str(e.value)


def test_unknown_keys_are_named(tmp_path: Path) -> None:
    a = official_arrays(**TINY)
    a["Transformer/encoderblock_0/Adapter_4/kernel"] = np.zeros((2, 2), np.float32)
    a["step"] = np.array(3)
    path = save(tmp_path / "extra.npz", a)
    with pytest.raises(ValueError) as e:
        vitkit.load_pretrained(path)
    assert str(path) in str(e.value)
    assert "Adapter_4/kernel" in str(e.value) and "'step'" in str(e.value)


def test_not_a_vit_file(tmp_path: Path) -> None:
    path = save(tmp_path / "other.npz", {"weights": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="embedding/kernel"):
        vitkit.load_pretrained(path)
