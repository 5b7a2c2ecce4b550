import math

import pytest
import torch
import torch.nn.functional as F
from randomized import randomized

import vitkit
from vitkit.models import ViTConfig, count_macs, count_params, create_model
from vitkit.models.posembed import resample_pos_embed, sincos_2d
from vitkit.models.resnet import StdConv2dSame, _same_pad

# Exact parameter counts at 224x224, 3 channels, 1000 classes, class token, no pre-logits.
# Entries marked "ref" are REFERENCE.md section 1 (the official configs); hybrids marked "timm" agree with the
# sizes timm publishes for the same models (36.4M, 329.0M, 6.3M, 101.4M); the rest follow the closed form in
# `vit_param_formula` below, which is checked against every plain entry.
GOLDEN = {
    "vit_ti8": 5_719_720,
    "vit_ti14": 5_694_376,
    "vit_ti16": 5_717_416,  # ref
    "vit_ti32": 6_131_560,
    "vit_s8": 22_055_272,
    "vit_s14": 22_004_584,
    "vit_s16": 22_050_664,  # ref
    "vit_s32": 22_878_952,  # ref
    "vit_b8": 86_576_872,  # ref
    "vit_b14": 86_475_496,
    "vit_b16": 86_567_656,  # ref
    "vit_b32": 88_224_232,  # ref
    "vit_l8": 304_338_920,
    "vit_l14": 304_203_752,
    "vit_l16": 304_326_632,  # ref
    "vit_l32": 306_535_400,  # ref
    "vit_h8": 632_214_760,
    "vit_h14": 632_045_800,  # ref
    "vit_h16": 632_199_400,
    "vit_h32": 634_960_360,
    "r50_vit_b16": 98_659_112,  # ref
    "r50_vit_l32": 328_994_856,  # timm
    "r26_vit_s32": 36_431_912,  # timm
    "r26_vit_b32": 101_383_976,  # timm
    "r_vit_ti16": 6_337_704,  # timm
}


def vit_param_formula(width: int, mlp: int, depth: int, patch: int, tokens: int, classes: int = 1000) -> int:
    """Parameters of a plain ViT counted by hand: embedding, class token, position embeddings, blocks
    (2 LayerNorms, qkv, out projection, 2 MLP layers), final norm, head."""
    block = 2 * 2 * width + (3 * width * width + 3 * width) + (width * width + width)
    block += (width * mlp + mlp) + (mlp * width + width)
    embed = patch * patch * 3 * width + width
    return embed + width + (tokens + 1) * width + depth * block + 2 * width + width * classes + classes


def meta_model(name: str, **kw) -> vitkit.VisionTransformer:
    with torch.device("meta"):
        return create_model(name, **kw)


def test_golden_table_covers_every_named_variant():
    assert sorted(GOLDEN) == sorted(vitkit.list_models())


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_parameter_count(name):
    model = meta_model(name)
    assert count_params(model) == GOLDEN[name]
    cfg = model.cfg
    if cfg.hybrid is None:
        tokens = cfg.grid[0] * cfg.grid[1]
        assert GOLDEN[name] == vit_param_formula(cfg.width, cfg.mlp_dim, cfg.depth, cfg.patch_size, tokens)


@pytest.mark.parametrize(
    ("name", "overrides", "expected"),
    [
        ("vit_b16", {"img_size": 384}, 86_859_496),
        ("vit_b16", {"num_classes": 21843, "representation_size": 768}, 103_186_515),
        ("vit_b16", {"num_classes": 0}, 85_798_656),
        ("r50_vit_b16", {"img_size": 384}, 98_950_952),
    ],
)
def test_parameter_count_reference_options(name, overrides, expected):
    assert count_params(meta_model(name, **overrides)) == expected


def test_macs_match_reference():
    # REFERENCE.md: B/16 17.58 G, B/32 4.41 G, Ti/16 1.26 G, R50+B/16 at 384 67.4 G. We count matrix products,
    # convolutions and attention; the reference also counts some elementwise ops (norms, GELU, softmax), worth
    # up to 0.5% on the smallest model.
    for name, ref in [("vit_b16", 17.58e9), ("vit_b32", 4.41e9), ("vit_ti16", 1.26e9), ("R50+ViT-B/16-384", 67.4e9)]:
        cfg = vitkit.models.resolve_config(name)
        assert count_macs(cfg) == pytest.approx(ref, rel=0.01)


@pytest.mark.parametrize(
    "alias",
    ["vit_b16", "ViT-B/16", "ViT-B_16", "vit_base_patch16_224", "VIT-B/16"],
)
def test_aliases(alias):
    assert vitkit.models.resolve_config(alias) == vitkit.models.resolve_config("vit_b16")


@pytest.mark.parametrize("alias", ["R50+ViT-B/16", "R50+ViT-B_16", "vit_base_r50_s16_224", "r50_vit_b16"])
def test_hybrid_aliases(alias):
    cfg = vitkit.models.resolve_config(alias)
    assert cfg.hybrid == (3, 4, 9) and cfg.stride == 16 and cfg.width == 768


def test_resolution_suffix_and_unknown_names():
    assert vitkit.models.resolve_config("vit_base_patch16_384").img_size == (384, 384)
    assert vitkit.models.resolve_config("vit_small_r26_s32_384").grid == (12, 12)
    with pytest.raises(ValueError, match="unknown model name 'vit_q16'"):
        vitkit.models.resolve_config("vit_q16")


def tiny(**kw) -> ViTConfig:
    base = dict(img_size=(32, 48), patch_size=8, width=32, depth=3, heads=4, mlp_dim=64, num_classes=7)
    base.update(kw)
    return ViTConfig(**base)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"pool": "gap", "class_token": False},
        {"pool": "gap", "fc_norm": True},
        {"representation_size": 16},
        {"gelu": "tanh", "norm_eps": 1e-12},
        {"hybrid": (1, 1), "stem_width": 32, "patch_size": 1},
    ],
)
def test_fused_and_manual_attention_agree(kw):
    model = randomized(tiny(**kw))
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        fused = model(x)
        out = model.forward_intermediates(x, attn_layers=None)
    torch.testing.assert_close(out["logits"], fused, rtol=1e-5, atol=1e-5)
    assert sorted(out["attn"]) == [0, 1, 2]
    tokens = model.cfg.num_prefix_tokens + model.cfg.grid[0] * model.cfg.grid[1]
    for a in out["attn"].values():
        assert a.shape == (2, 4, tokens, tokens)
        torch.testing.assert_close(a.sum(-1), torch.ones(2, 4, tokens))


def test_attention_only_where_asked_and_manual_path_matches_reference_math():
    model = randomized(tiny())
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        out = model.forward_intermediates(x, layers=[-1], attn_layers=[1])
        # Attention of block 1 by hand from the hidden state after block 0.
        h0 = model.forward_intermediates(x, layers=[0])["hidden"][0]
        blk = model.blocks[1]
        q, k, _ = blk.attn.qkv(blk.norm1(h0)).split(32, dim=-1)
        q = q.view(1, -1, 4, 8).transpose(1, 2)
        k = k.view(1, -1, 4, 8).transpose(1, 2)
        expected = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
    assert list(out["attn"]) == [1] and list(out["hidden"]) == [2]
    torch.testing.assert_close(out["attn"][1], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.norm(out["hidden"][2]), out["features"])


def test_forward_head_pre_logits():
    model = randomized(tiny(representation_size=16))
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        expected = torch.tanh(model.pre_logits.fc(feats[:, 0]))
        torch.testing.assert_close(pre, expected)
        torch.testing.assert_close(model.head(pre), model(x))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_class_token_forward_skips_the_last_blocks_other_tokens(checkpointing):
    # forward() computes the last block for the class token alone; its logits and every gradient must be those of
    # the full forward. Heads of 16 dims, so the blocks before the last take the native attention kernel on CPU;
    # stochastic depth draws the same per-sample masks on both paths.
    model = randomized(tiny(width=32, heads=2, drop_path=0.2)).train()
    model.set_grad_checkpointing(checkpointing)
    x = torch.randn(3, 3, 32, 48, requires_grad=True)
    grads = []
    for run in (model, lambda t: model.forward_head(model.forward_features(t))):
        torch.manual_seed(1)
        model.zero_grad()
        x.grad = None
        logits = run(x)
        (logits * torch.arange(7.0)).sum().backward()
        grads.append((logits.detach(), x.grad.clone(), [p.grad.clone() for p in model.parameters()]))
    (fast, fast_x, fast_p), (full, full_x, full_p) = grads
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_x, full_x, rtol=1e-4, atol=1e-5)
    for a, b in zip(fast_p, full_p, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert all(g.abs().sum() > 0 for g in full_p)  # every parameter takes part: none compared as zero to zero
    assert count_macs(model.cfg, as_run=True) < count_macs(model.cfg)


def test_gap_pooling_norm_placement():
    x = torch.randn(2, 3, 32, 48)
    pre = randomized(tiny(pool="gap", class_token=False))
    post = randomized(tiny(pool="gap", class_token=False, fc_norm=True))
    with torch.no_grad():
        t = pre.forward_features(x)  # normed tokens, then the mean (official, big_vision)
        torch.testing.assert_close(pre.forward_head(t, pre_logits=True), t.mean(1))
        u = post.forward_features(x)  # raw tokens, mean, then fc_norm (timm)
        torch.testing.assert_close(post.forward_head(u, pre_logits=True), post.fc_norm(u.mean(1)))


def test_dynamic_img_size_equals_a_model_built_at_that_size():
    model = randomized(tiny(dynamic_img_size=True))
    x = torch.randn(1, 3, 64, 40)
    cfg = model.cfg.replace(img_size=(64, 40), dynamic_img_size=False)
    resized = vitkit.VisionTransformer(cfg).eval()
    sd = model.state_dict()
    sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], (8, 5), (4, 6))
    resized.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(model(x), resized(x))
        with pytest.raises(ValueError, match="dynamic_img_size=True"):
            randomized(tiny())(x)
        with pytest.raises(ValueError, match="not divisible by the token stride 8"):
            model(torch.randn(1, 3, 30, 40))


def test_resample_pos_embed():
    pos = torch.randn(1, 1 + 3 * 4, 6)
    assert resample_pos_embed(pos, (3, 4), (3, 4)) is pos
    out = resample_pos_embed(pos, (5, 7), (3, 4), mode="bilinear")
    torch.testing.assert_close(out[:, :1], pos[:, :1])  # class-token row kept apart
    grid_in = pos[0, 1:].view(3, 4, 6)
    grid_out = out[0, 1:].view(5, 7, 6)
    # The official zoom aligns corners: the four corner embeddings are kept exactly, the centre is the mean.
    for (i, j), (a, b) in {(0, 0): (0, 0), (0, 3): (0, 6), (2, 0): (4, 0), (2, 3): (4, 6)}.items():
        torch.testing.assert_close(grid_out[a, b], grid_in[i, j])
    torch.testing.assert_close(grid_out[2, 0], grid_in[1, 0])
    torch.testing.assert_close(grid_out[0, 1], grid_in[0, 0] + (grid_in[0, 1] - grid_in[0, 0]) * 0.5)
    with pytest.raises(ValueError, match="not a square grid"):
        resample_pos_embed(torch.randn(1, 1 + 12, 6), (4, 4))


def test_sincos_matches_big_vision_definition():
    pe = sincos_2d((3, 5), 16)[0]
    omega = 1.0 / 10000 ** (torch.arange(4, dtype=torch.float64) / 3)
    y, x = 2, 3  # row 2, column 3 -> flat index 2 * 5 + 3
    expected = torch.cat([torch.sin(x * omega), torch.cos(x * omega), torch.sin(y * omega), torch.cos(y * omega)])
    torch.testing.assert_close(pe[13], expected.float())
    model = vitkit.VisionTransformer(tiny(pos_embed="sincos", dynamic_img_size=True))
    assert "pos_embed" not in model.state_dict()  # fixed, computed, not saved
    big = vitkit.VisionTransformer(tiny(pos_embed="sincos", img_size=(64, 40))).eval()
    big.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 64, 40)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), big(x))


def test_same_padding_like_tensorflow():
    x = torch.ones(1, 1, 6, 7)
    # 3x3 stride 2: output ceil(n/2); padding total (out-1)*2+3-n, the odd one at the end.
    assert _same_pad(x, 3, 2).shape[-2:] == (7, 9)  # rows 6 -> out 3, pad (0, 1); cols 7 -> out 4, pad (1, 1)
    assert _same_pad(x, 7, 2).shape[-2:] == (11, 13)  # rows pad 5 -> (2, 3); cols pad 6 -> (3, 3)
    padded = _same_pad(torch.arange(6.0).view(1, 1, 1, 6), 3, 2)
    assert padded.shape[-2:] == (3, 7)  # one row: out 1, pad 2 -> (1, 1)
    assert padded[0, 0, 1].tolist() == [0, 1, 2, 3, 4, 5, 0]  # the odd pixel of padding goes at the end
    assert _same_pad(x, 1, 2) is x


def test_hybrid_stem_shapes_and_numerics():
    cfg = tiny(hybrid=(1, 1), stem_width=32, patch_size=1, img_size=(64, 64))
    model = randomized(cfg)
    assert cfg.stride == 8 and cfg.stem_channels == 256 and model.cfg.grid == (8, 8)
    x = torch.randn(1, 3, 64, 64)
    timm_style = randomized(cfg.replace(stem_numerics="timm"))
    with torch.no_grad():
        conv = model.patch_embed.backbone.stem.conv
        w = conv.standardized_weight()
        torch.testing.assert_close(w.mean(dim=(1, 2, 3)), torch.zeros(32), atol=1e-5, rtol=0)
        diff = (model(x) - timm_style(x)).abs().max().item()
    assert 0 < diff < 1e-2  # the two conventions are close but not equal (REFERENCE.md section 2)


def test_strided_1x1_convolution_equals_the_strided_reference():
    conv = StdConv2dSame(4, 8, 1, 2)
    torch.nn.init.normal_(conv.weight)
    x = torch.randn(2, 4, 7, 9, requires_grad=True)
    ref_x = x.detach().clone().requires_grad_()
    out = conv(x)
    ref = F.conv2d(ref_x, conv.standardized_weight(), None, 2)  # "SAME" pads nothing for a 1x1 kernel
    assert out.shape == (2, 8, 4, 5)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, ref_x.grad)
    assert x.grad[:, :, 1::2].abs().sum() == 0 and x.grad[:, :, ::2, ::2].abs().sum() > 0  # only the read pixels


def test_hybrid_stem_runs_nchw_for_a_grey_batch_in_nhwc_strides():
    # A grey batch made from (B, H, W, 1) arrays, as the loader makes it, passes `is_contiguous()` while its strides
    # are NHWC; the convolution then answers in NHWC and GroupNorm would take its slow channels-last path.
    model = randomized(tiny(hybrid=(1,), stem_width=32, patch_size=1, in_chans=1, img_size=(32, 32)))
    nhwc = torch.randn(2, 32, 32, 1).permute(0, 3, 1, 2)
    assert nhwc.is_contiguous() and nhwc.is_contiguous(memory_format=torch.channels_last)
    seen = []
    model.patch_embed.backbone.stem.norm.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        out = model(nhwc)
        torch.testing.assert_close(out, model(nhwc.clone(memory_format=torch.contiguous_format)))
    assert seen[0].stride() == (32 * 16 * 16, 16 * 16, 16, 1)  # (B, 32, 16, 16) in NCHW


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"width": 30}, "not divisible by heads=4"),
        ({"img_size": (30, 48)}, "not divisible by the token stride 8"),
        ({"pool": "avg"}, "ViTConfig.pool='avg'"),
        ({"class_token": False}, "pool='token' needs class_token=True"),
        ({"pos_embed": "sincos", "width": 34, "heads": 2}, "width divisible by 4"),
    ],
)
def test_config_errors(kw, message):
    with pytest.raises(ValueError, match=message):
        tiny(**kw)
    with pytest.raises(ValueError, match="unknown ViTConfig field"):
        tiny().replace(widht=3)


def test_same_seed_same_model_and_outputs():
    x = torch.randn(2, 3, 32, 48)
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        model = vitkit.VisionTransformer(tiny(drop_path=0.1, dropout=0.1)).train()
        torch.nn.init.normal_(model.head.weight)
        torch.manual_seed(4)
        outs.append(model(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
