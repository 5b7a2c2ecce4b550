"""The paper's analyses: pure math against references written here, and the model-driven functions against the
model's own `forward_intermediates`."""

import numpy as np
import pytest
import torch
from randomized import randomized
from scipy.spatial.distance import cdist

import vitkit
from vitkit.analysis import (
    attention_maps,
    attention_rollout,
    cosine_similarity_grid,
    discard_lowest,
    filter_components,
    iter_attention,
    mean_attention_distance,
    mean_distance,
    patch_distances,
    posembed_similarity,
    principal_components,
    rollout,
    token_map,
)
from vitkit.models.posembed import resample_pos_embed


def tiny(**kw) -> vitkit.ViTConfig:
    base = dict(img_size=(16, 24), patch_size=4, width=32, depth=2, heads=2, mlp_dim=64, num_classes=3)
    return vitkit.ViTConfig(**{**base, **kw})


def random_attention(rng, *shape) -> np.ndarray:
    """Rows of softmax probabilities, (..., T, T)."""
    logits = rng.normal(0, 2, shape)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def ref_rollout(layers: list[np.ndarray], fusion: str, discard: float, prefix: int) -> np.ndarray:
    """Abnar & Zuidema's rollout written out per image with loops: (B, T, T)."""
    B, _, T, _ = layers[0].shape
    out = np.zeros((B, T, T))
    for b in range(B):
        joint = np.eye(T)
        for attn in layers:
            fused = {"mean": attn[b].mean(0), "max": attn[b].max(0), "min": attn[b].min(0)}[fusion].copy()
            k = int(discard * T * T)
            for flat in np.argsort(fused.ravel(), kind="stable")[:k]:
                row, col = divmod(int(flat), T)
                if col >= prefix:
                    fused[row, col] = 0.0
            a = (fused + np.eye(T)) / 2
            a = a / a.sum(axis=1, keepdims=True)
            joint = a @ joint
        out[b] = joint
    return out


# ---- rollout ---------------------------------------------------------------------------------------------------


def test_rollout_of_two_hand_written_layers():
    # One head, T = 2. A = [[.2, .8], [.6, .4]] -> A' = (A + I) / 2 = [[.6, .4], [.3, .7]]; two layers: A' @ A'.
    a = torch.tensor([[[[0.2, 0.8], [0.6, 0.4]]]], dtype=torch.float64)
    joint = rollout([a, a])
    assert torch.allclose(joint[0], torch.tensor([[0.48, 0.52], [0.39, 0.61]], dtype=torch.float64), atol=1e-15)
    # The later layer multiplies from the left: joint = A'_2 @ A'_1.
    b = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]], dtype=torch.float64)  # B' = I
    c = torch.tensor([[[[0.0, 1.0], [1.0, 0.0]]]], dtype=torch.float64)  # C' = [[.5, .5], [.5, .5]]
    expected = torch.tensor([[0.45, 0.55], [0.45, 0.55]], dtype=torch.float64)  # C' @ A': the mean of A''s rows
    assert torch.allclose(rollout([a, c])[0], expected)
    assert torch.allclose(rollout([c, a])[0], torch.full((2, 2), 0.5, dtype=torch.float64))  # A' @ C'
    assert torch.allclose(rollout([b, a])[0], torch.tensor([[0.6, 0.4], [0.3, 0.7]], dtype=torch.float64))


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("discard", [0.0, 0.3, 0.9])
def test_rollout_matches_reference(fusion, discard):
    rng = np.random.default_rng(0)
    layers = [random_attention(rng, 2, 3, 7, 7) for _ in range(4)]  # B=2, heads=3, T=7 (1 + 2x3 grid)
    got = rollout([torch.from_numpy(a) for a in layers], fusion, discard, num_prefix_tokens=1).numpy()
    np.testing.assert_allclose(got, ref_rollout(layers, fusion, discard, prefix=1), rtol=0, atol=1e-13)
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-13)  # a joint attention row is a distribution


def test_discard_keeps_the_class_token_column():
    rng = np.random.default_rng(1)
    fused = torch.from_numpy(random_attention(rng, 1, 5, 5))
    fused[0, :, 0] = 1e-9  # the smallest entries of all sit in the class-token column
    kept = discard_lowest(fused, 0.5, num_prefix_tokens=1)
    assert torch.equal(kept[0, :, 0], fused[0, :, 0])
    dropped = (kept == 0) & (fused != 0)
    assert int(dropped.sum()) == int(0.5 * 25) - 5  # the 12 lowest, less the 5 class-token entries among them
    threshold = fused[0, :, 1:][~dropped[0, :, 1:]].min()
    assert fused[dropped].max() < threshold  # exactly the lowest patch-column entries went
    with pytest.raises(ValueError, match="discard fraction"):
        discard_lowest(fused, 1.0)


def test_token_map_reads_class_row_or_mean_of_patch_rows():
    rng = np.random.default_rng(2)
    joint = random_attention(rng, 2, 7, 7)  # 1 prefix + a 2x3 grid
    token = token_map(torch.from_numpy(joint), (2, 3), 1, "token").numpy()
    gap = token_map(torch.from_numpy(joint), (2, 3), 1, "gap").numpy()
    for b in range(2):
        for r in range(2):
            for c in range(3):
                key = 1 + r * 3 + c  # row-major grid
                assert token[b, r, c] == joint[b, 0, key]
                assert np.isclose(gap[b, r, c], np.mean([joint[b, q, key] for q in range(1, 7)]))
    no_prefix = token_map(torch.from_numpy(joint[:, 1:, 1:]), (2, 3), 0, "gap").numpy()
    np.testing.assert_allclose(no_prefix, joint[:, 1:, 1:].mean(1).reshape(2, 2, 3))


# ---- mean attention distance -----------------------------------------------------------------------------------


def grid_centres(grid, patch):
    return np.array([((r + 0.5) * patch, (c + 0.5) * patch) for r in range(grid[0]) for c in range(grid[1])])


def test_patch_distances_are_centre_distances():
    grid, patch = (3, 4), 16
    np.testing.assert_allclose(
        patch_distances(grid, patch).numpy(), cdist(grid_centres(grid, patch), grid_centres(grid, patch))
    )


def test_mean_distance_of_self_uniform_and_fixed_key_heads():
    grid, patch = (3, 4), 16
    n = grid[0] * grid[1]
    T = 1 + n
    attn = torch.zeros(1, 3, T, T, dtype=torch.float64)
    attn[0, :, :, 0] = 0.5  # half of every row on the class token: excluded, the rest renormalised
    attn[0, 0, 1:, 1:] = 0.5 * torch.eye(n)  # head 0: each patch attends only to itself
    attn[0, 1, 1:, 1:] = 0.5 / n  # head 1: uniform over the patches
    attn[0, 2, 1:, 1 + 5] = 0.5  # head 2: every patch attends to patch 5, (1, 1)
    attn[0, :, 0, 1:] = 0.5 / n  # the class-token query is left out, whatever it holds
    got = mean_distance(attn, patch_distances(grid, patch), num_prefix_tokens=1)[0].numpy()
    centres = grid_centres(grid, patch)
    pairwise = [np.hypot(*(centres[i] - centres[j])) for i in range(n) for j in range(n)]
    to_five = [np.hypot(*(centres[i] - centres[5])) for i in range(n)]
    np.testing.assert_allclose(got, [0.0, np.mean(pairwise), np.mean(to_five)], rtol=1e-12)
    assert np.isclose(np.mean(pairwise), 16 * np.mean(cdist(grid_centres(grid, 1), grid_centres(grid, 1))))


# ---- the model-driven functions against forward_intermediates --------------------------------------------------

MODELS = {
    "token": tiny(),
    "gap": tiny(pool="gap", class_token=False, fc_norm=True),
    "gap_with_class_token": tiny(pool="gap"),
    "hybrid": tiny(img_size=(32, 64), hybrid=(), stem_width=32, patch_size=2),
}


@pytest.mark.parametrize("kind", MODELS)
def test_attention_from_the_model_equals_rollout_of_its_matrices(kind):
    model = randomized(MODELS[kind])
    cfg = model.cfg
    x = torch.randn(3, cfg.in_chans, *cfg.img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.forward_intermediates(x, attn_layers=None)  # every layer on the manual path
        fused = model(x)  # every layer on the fused kernel
        streamed = dict(iter_attention(model, x))
    assert torch.allclose(out["logits"], fused, atol=1e-5), (out["logits"] - fused).abs().max()
    assert sorted(out["attn"]) == sorted(streamed) == list(range(cfg.depth))
    T = cfg.num_prefix_tokens + cfg.grid[0] * cfg.grid[1]
    for i, a in out["attn"].items():
        assert torch.equal(a, streamed[i]) and a.shape == (3, cfg.heads, T, T)
        assert torch.allclose(a.sum(-1), torch.ones(()), atol=1e-5)
    layers = [out["attn"][i].double().numpy() for i in range(cfg.depth)]
    p = cfg.num_prefix_tokens
    for fusion, discard in [("mean", 0.0), ("max", 0.2), ("min", 0.5)]:
        joint = ref_rollout(layers, fusion, discard, p)
        rows = joint[:, 0, p:] if cfg.pool == "token" else joint[:, p:, p:].mean(1)
        expected = rows.reshape(3, *cfg.grid)
        got = attention_rollout(model, x, fusion, discard, batch_size=2)  # batches of 2 and 1
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)  # float32 attention, other batching
    maps = attention_maps(model, x, layers=[-1, 0])
    assert maps.layers == [0, cfg.depth - 1] and maps.grid == cfg.grid
    for j, i in enumerate(maps.layers):
        a = out["attn"][i].numpy()
        rows = a[:, :, 0, p:] if cfg.pool == "token" else a[:, :, p:, p:].mean(2)
        np.testing.assert_allclose(maps.heads[:, j], rows.reshape(3, cfg.heads, *cfg.grid), rtol=1e-6)


def test_hybrid_grid_is_the_stem_feature_map():
    model = randomized(MODELS["hybrid"])  # root stem (stride 4) x patch 2 -> stride 8
    x = torch.randn(1, 3, 32, 64)
    with torch.no_grad():
        feature_map = model.patch_embed.backbone(x)
        _, grid = model.patch_embed(x)
    assert grid == (feature_map.shape[-2] // 2, feature_map.shape[-1] // 2) == (4, 8) == model.cfg.grid
    assert attention_rollout(model, x).shape == (1, 4, 8)


@pytest.mark.parametrize("kind", ["token", "gap", "hybrid"])
def test_mean_attention_distance_streams_and_matches_reference(kind):
    model = randomized(MODELS[kind])
    cfg = model.cfg
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(b, 3, *cfg.img_size, generator=gen) for b in (2, 3)]
    got = mean_attention_distance(model, iter(batches))  # a generator: consumed once, batch by batch
    with torch.no_grad():
        attn = model.forward_intermediates(torch.cat(batches), attn_layers=None)["attn"]
    centres = grid_centres(cfg.grid, cfg.stride)
    d = cdist(centres, centres)
    p = cfg.num_prefix_tokens
    expected = np.zeros((cfg.depth, cfg.heads))
    for layer in range(cfg.depth):
        a = attn[layer].double().numpy()[:, :, p:, p:]
        a = a / a.sum(-1, keepdims=True)
        expected[layer] = (a * d).sum(-1).mean(-1).mean(0)  # over keys, then queries, then images
    np.testing.assert_allclose(got, expected, rtol=1e-6)  # float32 attention, batched differently
    # at most the grid's diameter, at least 0; stop early after max_images
    assert (got >= 0).all() and (got <= d.max()).all()
    first_two = mean_attention_distance(model, iter(batches), max_images=2)
    np.testing.assert_allclose(first_two, mean_attention_distance(model, [batches[0]]), rtol=1e-12)


# ---- position embeddings ---------------------------------------------------------------------------------------


def test_sincos_similarity_is_local():
    model = vitkit.VisionTransformer(tiny(img_size=(24, 28), width=64, pos_embed="sincos"))  # grid 6x7
    sim = posembed_similarity(model)
    gh, gw = 6, 7
    assert sim.shape == (gh, gw, gh, gw)
    for i in range(gh):
        for j in range(gw):
            m = sim[i, j]
            assert np.isclose(m[i, j], 1.0) and np.unravel_index(m.argmax(), m.shape) == (i, j)
            neighbours = [
                m[a, b] for a, b in [(i - 1, j), (i + 1, j), (i, j - 1), (i, j + 1)] if 0 <= a < gh and 0 <= b < gw
            ]
            far = [m[a, b] for a in range(gh) for b in range(gw) if max(abs(a - i), abs(b - j)) >= 3]
            assert min(neighbours) > max(far)
    np.testing.assert_allclose(sim, sim.transpose(2, 3, 0, 1), atol=1e-12)  # cosine similarity is symmetric


def test_learned_similarity_at_the_model_grid_and_resampled():
    model = randomized(tiny())  # grid 4x6, learned
    pos = model.pos_embed.detach()[0, 1:].double().numpy()
    unit = pos / np.linalg.norm(pos, axis=1, keepdims=True)
    np.testing.assert_allclose(posembed_similarity(model), (unit @ unit.T).reshape(4, 6, 4, 6), atol=1e-12)
    resampled = resample_pos_embed(model.pos_embed.detach(), (6, 3), (4, 6), 1, "bicubic", True)[0, 1:].double()
    unit = resampled.numpy() / np.linalg.norm(resampled.numpy(), axis=1, keepdims=True)
    np.testing.assert_allclose(posembed_similarity(model, (6, 3)), (unit @ unit.T).reshape(6, 3, 6, 3), atol=1e-6)
    with pytest.raises(ValueError, match="do not fill"):
        cosine_similarity_grid(torch.zeros(5, 4), (2, 3))


# ---- embedding filters -----------------------------------------------------------------------------------------


def test_pca_recovers_planted_filter_patterns():
    rng = np.random.default_rng(3)
    P, C, D = 4, 3, 64
    patterns, _ = np.linalg.qr(rng.normal(size=(P * P * C, 2)))  # two orthonormal P*P*C patterns
    mix = rng.normal(size=(D, 2)) * [3.0, 1.0]  # the first pattern carries the most variance
    filters = mix @ patterns.T + 0.01 * rng.normal(size=(D, P * P * C))  # (D, P*P*C) in (P, P, C) order
    model = vitkit.VisionTransformer(tiny(width=D, patch_size=P, img_size=(8, 8)))
    with torch.no_grad():
        model.patch_embed.proj.weight.copy_(torch.from_numpy(filters).reshape(D, P, P, C).permute(0, 3, 1, 2))
    components, ratios = filter_components(model, count=3)
    assert components.shape == (3, P, P, C)
    flat = components.reshape(3, -1)
    for k in range(2):
        assert abs(flat[k] @ patterns[:, k]) > 0.999  # the k-th component is the k-th pattern, up to sign
    assert ratios[0] > ratios[1] > 10 * ratios[2] and ratios[:2].sum() > 0.99
    # the same as the eigenvectors of the covariance, up to sign
    centred = filters - filters.mean(0)
    values, vectors = np.linalg.eigh(centred.T @ centred)
    for k in range(3):
        assert abs(flat[k] @ vectors[:, -1 - k]) > 1 - 1e-6
    np.testing.assert_allclose(ratios, values[::-1][:3] / values.sum(), rtol=1e-6)


def test_pca_signs_are_deterministic_and_count_is_capped():
    samples = torch.randn(10, 6, dtype=torch.float64)
    components, _ = principal_components(samples, 3)
    biggest = components.abs().argmax(1)
    assert (components[torch.arange(3), biggest] > 0).all()
    components2, _ = principal_components(-samples, 3)
    assert torch.allclose(components, components2)
    model = vitkit.VisionTransformer(tiny(in_chans=1, patch_size=2, img_size=(8, 8)))  # 4 values per filter
    components, ratios = filter_components(model, count=28)
    assert components.shape == (4, 2, 2, 1) and np.isclose(ratios.sum(), 1.0)
    with pytest.raises(ValueError, match="at most"):
        principal_components(samples, 7)


def test_filters_of_a_hybrid_are_refused():
    model = vitkit.VisionTransformer(MODELS["hybrid"])
    with pytest.raises(ValueError, match=r"hybrid.*ResNet v2 stem \(root block only; stride 4\)"):
        filter_components(model)
