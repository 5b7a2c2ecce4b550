"""MindSpore checkpoints: .ckpt files written by a small protobuf encoder in this test (no MindSpore), read back by
vitkit and compared, tensor by tensor and logit by logit, with a reference forward in MindSpore's numerics."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from vitkit.checkpoints import load_pretrained, mindspore, read_checkpoint, timm, torchvision
from vitkit.preprocess import source_preprocess

IMG, PATCH, WIDTH, HEADS, DEPTH, MLP, CLASSES = 32, 8, 32, 4, 2, 64, 10


# ---- a test-only writer of checkpoint.proto ----------------------------------------------------------------------
def varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 two's complement, as protobuf encodes negatives
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def length_delimited(number: int, payload: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def tensor_proto(dims: list[int], dtype: str, content: bytes, packed: bool = False) -> bytes:
    if packed:
        out = length_delimited(1, b"".join(varint(d) for d in dims))
    else:
        out = b"".join(varint(1 << 3 | 0) + varint(d) for d in dims)
    return out + length_delimited(2, dtype.encode()) + length_delimited(3, content)


def value(tag: str, tensor: bytes) -> bytes:
    return length_delimited(1, length_delimited(1, tag.encode()) + length_delimited(2, tensor))


NP_TYPES = {"Float32": "<f4", "Float16": "<f2", "Int32": "<i4", "Int64": "<i8"}


def entry(tag: str, array, dtype: str = "Float32", parts: int = 1, packed: bool = False) -> bytes:
    """One tensor as MindSpore writes it: `parts` consecutive Values with one tag, scalars with dims [0]."""
    if dtype == "BFloat16":
        content = (np.asarray(array, np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
    else:
        content = np.asarray(array, NP_TYPES[dtype]).tobytes()
    dims = list(np.shape(array)) or [0]
    cut = [len(content) * i // parts for i in range(parts + 1)]
    return b"".join(value(tag, tensor_proto(dims, dtype, content[a:b], packed)) for a, b in itertools.pairwise(cut))


# ---- weights and the reference forward -------------------------------------------------------------------------
def mindcv_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under mindcv's ViT names (nn.LayerNorm gamma/beta), activations O(1)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    n = (IMG // PATCH) ** 2
    sd = {
        "cls_token": rnd(1, 1, WIDTH, scale=0.5),
        "pos_embed": rnd(1, n + 1, WIDTH, scale=0.5),
        "patch_embed.proj.weight": rnd(WIDTH, 3, PATCH, PATCH, scale=1 / math.sqrt(3 * PATCH * PATCH)),
        "patch_embed.proj.bias": rnd(WIDTH, scale=0.1),
    }
    for i in range(DEPTH):
        p = f"blocks.{i}."
        sd |= {
            p + "norm1.gamma": 1 + rnd(WIDTH, scale=0.1),
            p + "norm1.beta": rnd(WIDTH, scale=0.1),
            p + "attn.qkv.weight": rnd(3 * WIDTH, WIDTH, scale=1 / math.sqrt(WIDTH)),
            p + "attn.qkv.bias": rnd(3 * WIDTH, scale=0.1),
            p + "attn.proj.weight": rnd(WIDTH, WIDTH, scale=1 / math.sqrt(WIDTH)),
            p + "attn.proj.bias": rnd(WIDTH, scale=0.1),
            p + "norm2.gamma": 1 + rnd(WIDTH, scale=0.1),
            p + "norm2.beta": rnd(WIDTH, scale=0.1),
            p + "mlp.fc1.weight": rnd(MLP, WIDTH, scale=1 / math.sqrt(WIDTH)),
            p + "mlp.fc1.bias": rnd(MLP, scale=0.1),
            p + "mlp.fc2.weight": rnd(WIDTH, MLP, scale=1 / math.sqrt(MLP)),
            p + "mlp.fc2.bias": rnd(WIDTH, scale=0.1),
        }
    sd |= {
        "norm.gamma": 1 + rnd(WIDTH, scale=0.1),
        "norm.beta": rnd(WIDTH, scale=0.1),
        "head.weight": rnd(CLASSES, WIDTH, scale=1 / math.sqrt(WIDTH)),
        "head.bias": rnd(CLASSES, scale=0.1),
    }
    return sd


def to_mindvision(sd: dict) -> dict:
    """The same weights under the MindSpore ViT tutorial's (mindvision's) names."""
    block = {
        "norm1.gamma": "0.cell.0.gamma",
        "norm1.beta": "0.cell.0.beta",
        "attn.qkv.weight": "0.cell.1.qkv.weight",
        "attn.qkv.bias": "0.cell.1.qkv.bias",
        "attn.proj.weight": "0.cell.1.out.weight",
        "attn.proj.bias": "0.cell.1.out.bias",
        "norm2.gamma": "1.cell.0.gamma",
        "norm2.beta": "1.cell.0.beta",
        "mlp.fc1.weight": "1.cell.1.dense1.weight",
        "mlp.fc1.bias": "1.cell.1.dense1.bias",
        "mlp.fc2.weight": "1.cell.1.dense2.weight",
        "mlp.fc2.bias": "1.cell.1.dense2.bias",
    }
    top = {
        "cls_token": "cls",
        "pos_embed": "pos_embedding",
        "patch_embed.proj.weight": "patch_embedding.conv.weight",
        "patch_embed.proj.bias": "patch_embedding.conv.bias",
        "norm.gamma": "norm.gamma",
        "norm.beta": "norm.beta",
        "head.weight": "dense.weight",
        "head.bias": "dense.bias",
    }
    out = {}
    for k, v in sd.items():
        if k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            out[f"transformer.layers.{i}.{block[rest]}"] = v
        else:
            out[top[k]] = v
    return out


def layer_norm(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * gamma + beta


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def mindcv_forward(sd: dict, x: torch.Tensor, eps: float = 1e-7, pre_logits: bool = False) -> torch.Tensor:
    """mindcv's VisionTransformer.construct on a state dict: MindSpore nn.LayerNorm (eps 1e-7), nn.GELU (tanh)."""
    b = x.shape[0]
    x = torch.nn.functional.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=PATCH)
    x = x.reshape(b, WIDTH, -1).permute(0, 2, 1)
    x = torch.cat([sd["cls_token"].expand(b, -1, -1), x], 1) + sd["pos_embed"]
    n, d = x.shape[1], WIDTH // HEADS
    for i in range(DEPTH):
        p = f"blocks.{i}."
        y = layer_norm(x, sd[p + "norm1.gamma"], sd[p + "norm1.beta"], eps)
        qkv = (y @ sd[p + "attn.qkv.weight"].T + sd[p + "attn.qkv.bias"]).reshape(b, n, 3, HEADS, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (b, heads, n, d)
        attn = ((q * d**-0.25) @ (k * d**-0.25).transpose(-1, -2)).softmax(-1)  # mindcv scales q and k by sqrt
        y = (attn @ v).permute(0, 2, 1, 3).reshape(b, n, WIDTH)
        x = x + y @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        y = layer_norm(x, sd[p + "norm2.gamma"], sd[p + "norm2.beta"], eps)
        y = gelu_tanh(y @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"])
        x = x + y @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
    x = layer_norm(x, sd["norm.gamma"], sd["norm.beta"], eps)[:, 0]
    if pre_logits:
        x = torch.tanh(x @ sd["pre_logits.weight"].T + sd["pre_logits.bias"])
    return x @ sd["head.weight"].T + sd["head.bias"]


def images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


def training_ckpt(sd: dict) -> bytes:
    """A training checkpoint: weights (one split in two Values, some with packed dims) amid optimizer state."""
    out = [
        entry("global_step", np.array([120]), "Int32"),
        entry("learning_rate", np.float32(0.01)),  # a scalar: dims [0]
        entry("beta1_power", np.array([0.9], np.float32)),
    ]
    for i, (tag, t) in enumerate(sd.items()):
        parts = 2 if tag == "blocks.1.mlp.fc1.weight" else 1
        out.append(entry(tag, t.numpy(), parts=parts, packed=i % 2 == 1))
    out += [
        entry("moments.blocks.0.attn.qkv.weight", np.zeros((3 * WIDTH, WIDTH), np.float32)),
        entry("adam_m.pos_embed", np.ones((1, 17, WIDTH), np.float32)),
        entry("adam_v.head.weight", np.ones((CLASSES, WIDTH), np.float32), parts=2),
        entry("accu_grads.head.bias", np.zeros(CLASSES, np.float32)),
        entry("ema.norm.gamma", np.ones(WIDTH, np.float32)),
        value("note", tensor_proto([0], "str", "trained on ImageNet".encode("utf-32-le"))),
    ]
    return b"".join(out)


def logits(path, **overrides) -> torch.Tensor:
    with torch.no_grad():
        return load_pretrained(path, heads=HEADS, **overrides)(images())


# ---- tests -----------------------------------------------------------------------------------------------------
def test_ckpt_tensors_equal_and_optimizer_state_ignored(tmp_path):
    sd = mindcv_state_dict()
    path = tmp_path / "vit_tiny.ckpt"
    path.write_bytes(training_ckpt(sd))
    raw = mindspore.read_ckpt(path)
    assert set(raw) == set(sd)  # optimizer state, scalars and strings left out
    ckpt = read_checkpoint(path)
    assert ckpt.source == "mindspore" and ckpt.defaults == {"norm_eps": 1e-7, "gelu": "tanh"}
    for tag, t in sd.items():
        name = mindspore.vitkit_name(tag)
        assert ckpt.state_dict[name].dtype == torch.float32
        assert torch.equal(ckpt.state_dict[name], t), tag
    assert "blocks.1.mlp.fc1.weight" in raw and raw["blocks.1.mlp.fc1.weight"].shape == (MLP, WIDTH)


def test_ckpt_logits_match_mindcv_forward(tmp_path):
    sd = mindcv_state_dict()
    path = tmp_path / "vit_tiny.ckpt"
    path.write_bytes(training_ckpt(sd))
    model = load_pretrained(path, heads=HEADS)
    assert (model.cfg.norm_eps, model.cfg.gelu) == (1e-7, "tanh")
    assert model.preprocess == source_preprocess("mindspore", (IMG, IMG))
    ref = mindcv_forward(sd, images())
    diff = (logits(path) - ref).abs().max().item()
    print(f"mindcv .ckpt: max |logit difference| = {diff:.3e}")
    assert ref.abs().max() > 0.5 and diff <= 1e-5
    # The numerics matter: the same weights with timm's (eps 1e-6, exact GELU) are measurably off.
    assert (logits(path, norm_eps=1e-6, gelu="exact") - ref).abs().max() > 1e-5


def test_mindvision_tutorial_names(tmp_path):
    sd = mindcv_state_dict(seed=4)
    path = tmp_path / "vit_b_16_224.ckpt"
    path.write_bytes(b"".join(entry(k, v.numpy()) for k, v in to_mindvision(sd).items()))
    diff = (logits(path) - mindcv_forward(sd, images())).abs().max().item()
    print(f"mindvision .ckpt: max |logit difference| = {diff:.3e}")
    assert diff <= 1e-5


def test_first_mindcv_vit_with_backbone_prefix_and_pre_logits(tmp_path):
    sd = mindcv_state_dict(seed=5)
    g = torch.Generator().manual_seed(6)
    sd["pre_logits.weight"] = torch.randn(48, WIDTH, generator=g) / math.sqrt(WIDTH)
    sd["pre_logits.bias"] = torch.randn(48, generator=g) * 0.1
    sd["head.weight"] = torch.randn(CLASSES, 48, generator=g) / math.sqrt(48)
    head = {
        "head.weight": "head.classifier.1.classifier.weight",
        "head.bias": "head.classifier.1.classifier.bias",
        "pre_logits.weight": "head.classifier.0.classifier.weight",
        "pre_logits.bias": "head.classifier.0.classifier.bias",
    }
    # mindcv's first ViT: mindvision's body under `backbone.` (the class token renamed to its attribute name)
    body = to_mindvision({k: v for k, v in sd.items() if k not in head})
    named = {f"backbone.{'cls_token' if k == 'cls' else k}": v for k, v in body.items()}
    named |= {head[k]: sd[k] for k in head}
    path = tmp_path / "vit_old.ckpt"
    path.write_bytes(b"".join(entry(k, v.numpy()) for k, v in named.items()))
    model = load_pretrained(path, heads=HEADS)
    assert model.cfg.representation_size == 48
    diff = (logits(path) - mindcv_forward(sd, images(), pre_logits=True)).abs().max().item()
    print(f"mindcv (backbone., pre-logits) .ckpt: max |logit difference| = {diff:.3e}")
    assert diff <= 1e-5


def test_mint_names_take_mint_numerics(tmp_path):
    sd = {k.replace(".gamma", ".weight").replace(".beta", ".bias"): v for k, v in mindcv_state_dict().items()}
    path = tmp_path / "vit_mint.ckpt"
    path.write_bytes(b"".join(entry(k, v.numpy()) for k, v in sd.items()))
    assert read_checkpoint(path).defaults == {"norm_eps": 1e-5, "gelu": "exact"}


def test_mindspore_names_in_torch_file(tmp_path):
    sd = mindcv_state_dict()
    keys = set(sd)
    assert mindspore.matches(keys) and mindspore.matches(set(to_mindvision(sd)))
    assert not torchvision.matches(keys)
    assert timm.matches(keys)  # timm-like names, which is why MindSpore is asked before timm
    torch.save(sd, tmp_path / "vit_ms.pth")
    ckpt = read_checkpoint(tmp_path / "vit_ms.pth")
    assert ckpt.source == "mindspore"
    assert torch.equal(ckpt.state_dict["blocks.0.norm1.weight"], sd["blocks.0.norm1.gamma"])


def test_float16_and_bfloat16_decode(tmp_path):
    a = np.array([[1.5, -2.25, 65504.0], [1e-3, 0.0, -0.1]], np.float32)
    path = tmp_path / "half.ckpt"
    path.write_bytes(entry("w16", a, "Float16", parts=2) + entry("wbf", a, "BFloat16") + entry("n", [3, -4], "Int64"))
    t = mindspore.read_ckpt(path)
    assert t["w16"].dtype == torch.float32 and t["w16"].shape == (2, 3)
    assert torch.equal(t["w16"], torch.from_numpy(a.astype(np.float16).astype(np.float32)))
    assert t["w16"][1, 0].item() != pytest.approx(1e-3, abs=1e-9)  # really went through float16
    # The writer keeps the upper 16 bits of each float32; bfloat16 is exactly that.
    assert torch.equal(t["wbf"], torch.from_numpy((a.view(np.uint32) & 0xFFFF0000).view(np.float32)))
    assert t["wbf"][0].tolist() == [1.5, -2.25, 65280.0]
    assert t["n"].tolist() == [3, -4] and t["n"].dtype == torch.int64


def test_truncated_file_names_file_and_tag(tmp_path):
    data = b"".join(entry(k, v.numpy()) for k, v in mindcv_state_dict().items())
    path = tmp_path / "cut.ckpt"
    path.write_bytes(data[:-100])  # head.bias takes the last 60 bytes, so this cuts into head.weight
    with pytest.raises(ValueError, match=r"cut\.ckpt.*truncated.*'head\.weight'"):
        read_checkpoint(path)


def test_garbage_file_names_file(tmp_path):
    path = tmp_path / "garbage.ckpt"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match=r"garbage\.ckpt"):
        read_checkpoint(path)
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"garbage\.ckpt.*no tensors"):
        read_checkpoint(path)


def test_content_length_must_match_dims(tmp_path):
    path = tmp_path / "short.ckpt"
    short = value("blocks.0.attn.qkv.weight", tensor_proto([3 * WIDTH, WIDTH], "Float32", b"\0" * 100))
    path.write_bytes(entry("cls_token", np.zeros((1, 1, WIDTH), np.float32)) + short)
    with pytest.raises(ValueError, match=r"short\.ckpt.*'blocks\.0\.attn\.qkv\.weight'.*100 bytes"):
        read_checkpoint(path)


def test_unknown_weight_is_an_error_not_skipped(tmp_path):
    sd = mindcv_state_dict()
    sd["blocks.0.ls1.gamma"] = torch.ones(WIDTH)  # LayerScale: vitkit has none, so it cannot be dropped quietly
    path = tmp_path / "ls.ckpt"
    path.write_bytes(b"".join(entry(k, v.numpy()) for k, v in sd.items()))
    with pytest.raises(ValueError, match=r"ls\.ckpt.*blocks\.0\.ls1\.gamma"):
        read_checkpoint(path)


def test_repeated_tag_apart_is_an_error(tmp_path):
    w = np.zeros(WIDTH, np.float32)
    path = tmp_path / "twice.ckpt"
    path.write_bytes(entry("norm.gamma", w) + entry("norm.beta", w) + entry("norm.gamma", w))
    with pytest.raises(ValueError, match=r"twice\.ckpt.*'norm\.gamma' appears twice"):
        read_checkpoint(path)
