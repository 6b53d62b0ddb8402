"""Tests of shira_jax.masks: PEFT-exact random masks, budgets, structured and top-k masks."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from shira_jax import masks

try:  # the torch extra is optional: only the parity tests need it
    import torch
except ImportError:  # pragma: no cover
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="needs torch (the [torch] extra)")


def _torch_randperm(n: int, seed: int | None) -> np.ndarray:
    gen = torch.Generator()
    if seed is not None:
        gen.manual_seed(seed)
    return torch.randperm(n, generator=gen).numpy()


def _check_canonical(idx: np.ndarray, in_features: int, out_features: int, nnz: int) -> None:
    assert isinstance(idx, np.ndarray) and idx.dtype == np.int32 and idx.shape == (2, nnz)
    assert idx.flags.c_contiguous
    assert (idx[0] >= 0).all() and (idx[0] < in_features).all()
    assert (idx[1] >= 0).all() and (idx[1] < out_features).all()
    keys = idx[0].astype(np.int64) * out_features + idx[1]
    assert (np.diff(keys) > 0).all(), "not unique and sorted row-major in kernel layout"


# --------------------------------------------------------------------------------------
# torch.randperm replay
# --------------------------------------------------------------------------------------

SEEDS = [0, 1, 42, 2**32 + 5, -1, 2**63, 2**64 - 1, masks.PEFT_UNSEEDED_SEED]


@pytest.mark.parametrize("n", [1, 2, 10, 91, 1000, 12291, 50000, 110592, 331776])
@pytest.mark.parametrize("seed", SEEDS)
@needs_torch
def test_randperm_full_permutation_matches_torch(n, seed):
    np.testing.assert_array_equal(masks.peft_randperm_prefix(n, n, seed), _torch_randperm(n, seed))


@pytest.mark.parametrize(
    ("n", "k"), [(10, 3), (1000, 1), (110592, 7000), (331776, 40960), (4096 * 1536, 180224)]
)
@pytest.mark.parametrize("seed", [0, 7, 123456789])
@needs_torch
def test_randperm_prefix_matches_torch(n, k, seed):
    out = masks.peft_randperm_prefix(n, k, seed)
    assert out.dtype == np.int64 and out.shape == (k,)
    np.testing.assert_array_equal(out, _torch_randperm(n, seed)[:k])


@needs_torch
def test_unseeded_generator_is_peft_default_seed():
    n = 50000
    unseeded = torch.randperm(n, generator=torch.Generator()).numpy()
    np.testing.assert_array_equal(masks.peft_randperm_prefix(n, n, None), unseeded)
    np.testing.assert_array_equal(
        masks.peft_randperm_prefix(n, n, masks.PEFT_UNSEEDED_SEED), unseeded
    )
    assert torch.Generator().initial_seed() == masks.PEFT_UNSEEDED_SEED


def test_randperm_argument_errors():
    assert masks.peft_randperm_prefix(5, 0, 1).shape == (0,)
    with pytest.raises(ValueError, match="k <= n"):
        masks.peft_randperm_prefix(5, 6, 1)
    with pytest.raises(ValueError, match="seed"):
        masks.peft_randperm_prefix(5, 2, 2**64)
    with pytest.raises(TypeError, match="seed"):
        masks.peft_randperm_prefix(5, 2, 1.5)


@pytest.mark.slow
@needs_torch
def test_randperm_large_n_inside_out_path_matches_torch():
    # n >= UINT32_MAX // 20 switches torch to a 64-bit inside-out shuffle; the smallest such
    # n exercises it (no smaller n takes that path). torch's shuffle is O(n) random writes into
    # its output: asked for int32 (the same shuffle, templated on the output type; the values
    # fit), it writes 0.86 GB instead of 1.7 GB, ~30% faster (~28 s vs ~39 s CPU on a loaded
    # 2-core machine). The replay takes ~4 s and O(k) memory.
    n = masks.TORCH_RANDPERM_SMALL_N_LIMIT
    k = 50_000
    gen = torch.Generator().manual_seed(3)
    theirs = torch.randperm(n, generator=gen, dtype=torch.int32)[:k].numpy().astype(np.int64)
    np.testing.assert_array_equal(masks.peft_randperm_prefix(n, k, 3), theirs)


# --------------------------------------------------------------------------------------
# random_mask == PEFT's random_mask
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("in_features", "out_features", "r", "seed"),
    [
        (7, 5, 1, 0),
        (5, 7, 2, None),
        (64, 48, 4, 42),
        (48, 64, 8, -3),
        (576, 192, 8, 2**40 + 11),
        (576, 1536, 32, None),
        (1536, 576, 16, 1234),
        (333, 101, 3, 9),
    ],
)
@needs_torch
def test_random_mask_equals_peft(in_features, out_features, r, seed):
    peft_masks = pytest.importorskip("peft.tuners.shira.mask_functions")
    layer = torch.nn.Linear(in_features, out_features)  # torch weight [out, in]
    dense = peft_masks.random_mask(layer, r, random_seed=seed)
    assert tuple(dense.shape) == (out_features, in_features)
    o, i = torch.where(dense)
    theirs = np.stack([i.numpy(), o.numpy()])  # kernel layout: swap the rows, then sort
    theirs = theirs[:, np.argsort(theirs[0].astype(np.int64) * out_features + theirs[1])]
    ours = masks.random_mask(in_features, out_features, r, seed=seed)
    nnz = r * (in_features + out_features)
    _check_canonical(ours, in_features, out_features, nnz)
    np.testing.assert_array_equal(ours, theirs)


def test_random_mask_same_for_same_shape_and_deterministic():
    a = masks.random_mask(96, 64, 4, seed=3)
    np.testing.assert_array_equal(a, masks.random_mask(96, 64, 4, seed=3))
    assert not np.array_equal(a, masks.random_mask(96, 64, 4, seed=4))


def test_random_mask_budget_error_names_layer():
    with pytest.raises(ValueError, match=r"layer 'model.q_proj': r=6 .*largest r .* is 5"):
        masks.random_mask(10, 10, 6, layer_name="model.q_proj")


def test_masks_module_does_not_import_torch():
    code = "import sys, shira_jax.masks; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------
# Budget
# --------------------------------------------------------------------------------------


def test_budget_values():
    assert masks.shira_budget(4096, 14336, 32) == 32 * (4096 + 14336)
    assert masks.shira_budget(2, 2, 1) == 4  # the whole kernel is allowed
    assert masks.shira_budget(np.int64(8), 4, np.int32(2)) == 24


@pytest.mark.parametrize("r", [0, -1])
def test_budget_rejects_non_positive_r(r):
    with pytest.raises(ValueError, match="positive"):
        masks.shira_budget(8, 8, r)


def test_budget_too_large_message():
    with pytest.raises(ValueError) as err:
        masks.shira_budget(8, 4, 5, layer_name="blocks.0.fc")
    msg = str(err.value)
    for part in [
        "blocks.0.fc",
        "r=5",
        "in=8",
        "out=4",
        "60",
        "32",
        "largest r for this shape is 2",
    ]:
        assert part in msg
    with pytest.raises(ValueError, match="no r fits"):
        masks.shira_budget(1, 1, 1)


@pytest.mark.parametrize(("in_features", "out_features"), [(8, 4), (4096, 4096), (3, 1000)])
def test_max_rank_is_the_boundary(in_features, out_features):
    best = masks.max_rank(in_features, out_features)
    masks.shira_budget(in_features, out_features, best)
    with pytest.raises(ValueError):
        masks.shira_budget(in_features, out_features, best + 1)


def test_budget_type_errors():
    with pytest.raises(TypeError):
        masks.shira_budget(8, 8, 1.5)
    with pytest.raises(TypeError):
        masks.shira_budget(8, 8, True)
    with pytest.raises(ValueError, match="positive"):
        masks.shira_budget(0, 8, 1)


# --------------------------------------------------------------------------------------
# Structured mask
# --------------------------------------------------------------------------------------


def _line_counts(idx, in_features, out_features, lines, diagonal):
    dense = masks.mask_to_dense(idx, (in_features, out_features))
    if diagonal:
        d = np.arange(min(in_features, out_features))
        assert dense[d, d].all(), "diagonal missing"
        dense[d, d] = False
    per_line = dense.sum(axis=0) if lines == "out" else dense.sum(axis=1)
    length = in_features if lines == "out" else out_features
    # Off the diagonal, lines are whole (length, or length - 1 where the diagonal crosses).
    return per_line, length


@pytest.mark.parametrize(
    ("in_features", "out_features", "r"),
    [
        (4, 4, 1),
        (64, 64, 4),
        (96, 32, 2),
        (32, 96, 3),
        (7, 5, 2),
        (2, 2, 1),
        (2, 9, 1),
        (576, 1536, 8),
    ],
)
@pytest.mark.parametrize("lines", ["out", "in"])
@pytest.mark.parametrize("diagonal", [True, False])
def test_struct_mask_exact_and_structured(in_features, out_features, r, lines, diagonal):
    idx = masks.struct_mask(in_features, out_features, r, lines=lines, diagonal=diagonal)
    nnz = r * (in_features + out_features)
    _check_canonical(idx, in_features, out_features, nnz)
    per_line, length = _line_counts(idx, in_features, out_features, lines, diagonal)
    n_diag = min(in_features, out_features) if diagonal else 0
    full = np.array([length - (t < n_diag) for t in range(per_line.size)])
    touched = per_line > 0
    partial = touched & (per_line != full)
    assert partial.sum() <= 1, "more than one partially filled line"
    np.testing.assert_array_equal(
        masks.struct_mask(in_features, out_features, r, lines=lines, diagonal=diagonal), idx
    )


def test_struct_mask_stride_picks_every_fth_line_first():
    # 64 x 64, r=2: nnz 256 = diagonal 64 + 192 more = 3 whole columns (63 new each) + 3.
    idx = masks.struct_mask(64, 64, 2, stride=16)
    per_line, _ = _line_counts(idx, 64, 64, "out", True)
    assert sorted(np.flatnonzero(per_line == 63)) == [0, 16, 32]
    assert per_line[48] == 3 and per_line.sum() == 192
    # Stride larger than what the budget covers: continue with the shifted pattern 1, 17, ...
    idx = masks.struct_mask(64, 64, 2, stride=40)
    per_line, _ = _line_counts(idx, 64, 64, "out", True)
    assert sorted(np.flatnonzero(per_line == 63)) == [0, 1, 40]  # order 0, 40, 1, 41, ...
    assert per_line[41] == 3
    # Default stride spreads the lines evenly: 64 // ceil(192 / 63) = 16.
    np.testing.assert_array_equal(
        masks.struct_mask(64, 64, 2), masks.struct_mask(64, 64, 2, stride=16)
    )


def test_struct_mask_lines_in_is_the_transpose():
    a = masks.struct_mask(48, 80, 3, lines="in")
    b = masks.struct_mask(80, 48, 3, lines="out")
    np.testing.assert_array_equal(
        masks.mask_to_dense(a, (48, 80)), masks.mask_to_dense(b, (80, 48)).T
    )


def test_struct_mask_errors():
    with pytest.raises(ValueError, match="stride"):
        masks.struct_mask(8, 8, 1, stride=0)
    with pytest.raises(ValueError, match="lines"):
        masks.struct_mask(8, 8, 1, lines="rows")
    with pytest.raises(ValueError, match="too large"):
        masks.struct_mask(8, 8, 5)


# --------------------------------------------------------------------------------------
# Score-based masks
# --------------------------------------------------------------------------------------


def _reference_topk(scores, nnz, excluded=()):
    flat = np.asarray(scores, dtype=np.float64).ravel().copy()
    order = np.lexsort((np.arange(flat.size), -flat))  # largest first, lower index on ties
    order = [p for p in order if p not in set(excluded)][:nnz]
    return np.sort(np.asarray(order, dtype=np.int64))


def _flat(idx, out_features):
    return idx[0].astype(np.int64) * out_features + idx[1]


def test_topk_ties_go_to_lower_flat_index():
    scores = np.zeros((4, 5))
    scores[3, 4] = 2.0
    idx = masks.topk_mask(scores, 6)
    np.testing.assert_array_equal(_flat(idx, 5), [0, 1, 2, 3, 4, 19])
    scores = np.ones((3, 3))
    np.testing.assert_array_equal(_flat(masks.topk_mask(scores, 4), 3), [0, 1, 2, 3])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_topk_matches_reference_with_many_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 5, size=(23, 17)).astype(np.float32)
    for nnz in [0, 1, 40, 200, 23 * 17]:
        idx = masks.topk_mask(scores, nnz)
        _check_canonical(idx, 23, 17, nnz)
        np.testing.assert_array_equal(_flat(idx, 17), _reference_topk(scores, nnz))


def test_topk_exclusion_gives_non_overlapping_masks():
    rng = np.random.default_rng(5)
    kernel = rng.normal(size=(40, 24))
    r = 2
    nnz = r * (40 + 24)
    first = masks.weight_magnitude_mask(kernel, r)
    second = masks.weight_magnitude_mask(kernel, r, exclude=[first])
    third = masks.weight_magnitude_mask(kernel, r, exclude=[first, second])
    flat = [set(_flat(m, 24).tolist()) for m in (first, second, third)]
    assert not (flat[0] & flat[1]) and not (flat[0] & flat[2]) and not (flat[1] & flat[2])
    # Together they are the top 3 * nnz by |W|, handed out in rank order.
    ranked = np.argsort(-np.abs(kernel).ravel(), kind="stable")
    for n, part in enumerate(flat):
        assert part == set(ranked[n * nnz : (n + 1) * nnz].tolist())
    # One array, a nested list and a stacked [m, 2, k] array are all accepted.
    np.testing.assert_array_equal(masks.weight_magnitude_mask(kernel, r, exclude=first), second)
    np.testing.assert_array_equal(
        masks.weight_magnitude_mask(kernel, r, exclude=first.tolist()), second
    )
    np.testing.assert_array_equal(
        masks.weight_magnitude_mask(kernel, r, exclude=np.stack([first, second])), third
    )
    np.testing.assert_array_equal(masks.weight_magnitude_mask(kernel, r, exclude=[]), first)


def test_topk_not_enough_positions_after_exclusion():
    scores = np.arange(12.0).reshape(3, 4)
    taken = masks.topk_mask(scores, 8)
    with pytest.raises(ValueError, match=r"need 5 positions but only 4 .* excluding 8"):
        masks.topk_mask(scores, 5, exclude=[taken])
    with pytest.raises(ValueError, match="need 13"):
        masks.topk_mask(scores, 13)
    with pytest.raises(ValueError, match="out of range"):
        masks.topk_mask(scores, 2, exclude=[np.array([[3], [0]])])


def test_topk_rejects_nan_and_bad_shapes():
    with pytest.raises(ValueError, match="NaN"):
        masks.topk_mask(np.array([[np.nan, 1.0]]), 1)
    with pytest.raises(ValueError, match="2-D"):
        masks.topk_mask(np.ones(4), 1)


def test_score_masks_match_reference_and_accept_jax():
    jnp = pytest.importorskip("jax.numpy")
    rng = np.random.default_rng(11)
    w = rng.normal(size=(30, 20)).astype(np.float32)
    g = rng.normal(size=(30, 20)).astype(np.float32)
    nnz = 3 * 50
    cases = [
        (masks.weight_magnitude_mask(w, 3), np.abs(w)),
        (masks.weight_magnitude_mask(jnp.asarray(w), 3), np.abs(w)),
        (masks.gradient_mask(g, 3), np.abs(g)),
        (masks.gradient_mask(jnp.asarray(g), 3), np.abs(g)),
        (masks.snip_mask(w, g, 3), np.abs(w * g)),
        (masks.snip_mask(jnp.asarray(w), jnp.asarray(g), 3), np.abs(w * g)),
    ]
    for idx, score in cases:
        assert isinstance(idx, np.ndarray)
        _check_canonical(idx, 30, 20, nnz)
        np.testing.assert_array_equal(_flat(idx, 20), _reference_topk(score, nnz))
    wb = jnp.asarray(w, dtype=jnp.bfloat16)
    ref = _reference_topk(np.abs(np.asarray(wb, dtype=np.float32)), nnz)
    np.testing.assert_array_equal(_flat(masks.weight_magnitude_mask(wb, 3), 20), ref)
    with pytest.raises(ValueError, match="shapes differ"):
        masks.snip_mask(w, g.T, 3)
    with pytest.raises(ValueError, match="layer 'x'"):
        masks.gradient_mask(g, 100, layer_name="x")


# --------------------------------------------------------------------------------------
# Dense masks, validation, canonical form
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [bool, np.int8, np.int64, np.float32, np.float64])
def test_mask_from_dense_roundtrip(dtype):
    rng = np.random.default_rng(0)
    dense = rng.random((13, 7)) < 0.3
    idx = masks.mask_from_dense(dense.astype(dtype))
    _check_canonical(idx, 13, 7, int(dense.sum()))
    np.testing.assert_array_equal(masks.mask_to_dense(idx, (13, 7)), dense)


def test_mask_from_dense_accepts_jax_and_rejects_non_binary():
    jnp = pytest.importorskip("jax.numpy")
    np.testing.assert_array_equal(
        masks.mask_from_dense(jnp.eye(3, dtype=jnp.bfloat16)), [[0, 1, 2], [0, 1, 2]]
    )
    with pytest.raises(ValueError, match="only 0 and 1.*2"):
        masks.mask_from_dense(np.array([[0, 2], [1, 0]]))
    with pytest.raises(ValueError, match="only 0 and 1"):
        masks.mask_from_dense(np.array([[0.5, 1.0]]))
    with pytest.raises(ValueError, match="2-D"):
        masks.mask_from_dense(np.ones(3))


def test_validate_indices_accepts_integral_floats_and_keeps_order():
    raw = np.array([[2.0, 0.0, 2.0], [1.0, 3.0, 1.0]], dtype=np.float32)  # unsorted, duplicate
    idx = masks.validate_indices(raw, 3, 4, nnz=3)
    assert idx.dtype == np.int32 and idx.flags.c_contiguous
    np.testing.assert_array_equal(idx, [[2, 0, 2], [1, 3, 1]])
    np.testing.assert_array_equal(
        masks.validate_indices(np.array([[1], [2]], dtype=np.uint64), 3, 4), [[1], [2]]
    )


@pytest.mark.parametrize(
    ("bad", "error", "pattern"),
    [
        (np.array([[0.5], [1.0]]), ValueError, "non-integral"),
        (np.array([[np.nan], [1.0]]), ValueError, "non-integral"),
        (np.array([[np.inf], [1.0]]), ValueError, "non-integral"),
        (np.array([[1e30], [1.0]]), ValueError, "out of range"),
        (np.array([[3], [0]]), ValueError, r"input index.* \[0, 3\)"),
        (np.array([[0], [4]]), ValueError, r"output index.* \[0, 4\)"),
        (np.array([[-1], [0]]), ValueError, "out of range"),
        (np.zeros((3, 2), dtype=np.int32), ValueError, "transposed"),
        (np.zeros(4, dtype=np.int32), ValueError, r"shape \[2, n\]"),
        (np.zeros((2, 2), dtype=bool), TypeError, "integers"),
    ],
)
def test_validate_indices_rejects(bad, error, pattern):
    with pytest.raises(error, match=pattern):
        masks.validate_indices(bad, 3, 4, layer_name="lin")
    with pytest.raises(error, match="layer 'lin'"):
        masks.validate_indices(bad, 3, 4, layer_name="lin")


def test_validate_indices_count():
    with pytest.raises(ValueError, match="expected 5 indices, got 2"):
        masks.validate_indices(np.zeros((2, 2), np.int32), 3, 4, nnz=5)


def test_canonicalize_sums_duplicates_like_scatter_add():
    rng = np.random.default_rng(3)
    n_in, n_out = 6, 5
    idx = rng.integers(0, [[n_in], [n_out]], size=(2, 40))
    val = rng.normal(size=40).astype(np.float32)
    cidx, cval = masks.canonicalize(idx, val, (n_in, n_out))
    _check_canonical(cidx, n_in, n_out, cidx.shape[1])
    assert cidx.shape[1] < 40 and cval.dtype == np.float32
    want = np.zeros((n_in, n_out), np.float64)
    np.add.at(want, (idx[0], idx[1]), val)
    got = np.zeros((n_in, n_out), np.float64)
    got[cidx[0], cidx[1]] = cval
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_canonicalize_keeps_canonical_input_and_checks_values():
    idx = masks.random_mask(16, 8, 1, seed=0)
    val = np.arange(idx.shape[1], dtype=np.float32)
    cidx, cval = masks.canonicalize(idx, val, (16, 8))
    np.testing.assert_array_equal(cidx, idx)
    np.testing.assert_array_equal(cval, val)
    # unsorted but unique: sorted, values follow their index
    perm = np.random.default_rng(0).permutation(idx.shape[1])
    sidx, sval = masks.canonicalize(idx[:, perm].astype(np.float32), val[perm], (16, 8))
    np.testing.assert_array_equal(sidx, idx)
    np.testing.assert_array_equal(sval, val)
    jnp = pytest.importorskip("jax.numpy")
    bidx, bval = masks.canonicalize(
        [[1, 0, 1], [0, 1, 0]], jnp.asarray([1.0, 2.0, 3.0], dtype=jnp.bfloat16), (2, 2)
    )
    assert bidx.tolist() == [[0, 1], [1, 0]] and bval.astype(np.float32).tolist() == [2.0, 4.0]
    with pytest.raises(ValueError, match="values must have shape"):
        masks.canonicalize(idx, val[:-1], (16, 8))
