"""SHiRA mask strategies: which entries of a kernel an adapter trains.

Every mask function returns a numpy ``int32`` array of shape ``[2, nnz]`` in Flax KERNEL
layout (the kernel is ``[in, out]``; torch's weight is its transpose ``[out, in]``):

* row 0 = input index (kernel row), row 1 = output index (kernel column);
* entries are unique and sorted row-major in kernel layout, i.e. by ``row0 * out + row1``;
* ``nnz = r * (in + out)``, LoRA's parameter count at rank ``r`` (see :func:`shira_budget`).

Strategies (Bhardwaj et al., "Sparse High Rank Adapters", NeurIPS 2024):

* :func:`random_mask` -- PEFT's ``random`` mask, reproduced bit-exactly without torch
  (:func:`peft_randperm_prefix` replays ``torch.randperm`` in O(nnz) time and memory).
* :func:`struct_mask` -- whole rows or columns plus the main diagonal ("rank 1 + diagonal").
* :func:`weight_magnitude_mask`, :func:`gradient_mask`, :func:`snip_mask` -- top-nnz of
  ``|W|``, of accumulated ``|grad|``, of ``|W * grad|`` (:func:`topk_mask`), with optional
  exclusion of other adapters' positions (non-overlapping masks for fusion).
* :func:`mask_from_dense` -- a custom 0/1 ``[in, out]`` mask to indices.

Helpers: :func:`validate_indices` (shape / dtype / range checks of foreign indices) and
:func:`canonicalize` (sort, de-duplicate and sum duplicate values, as PEFT's scatter-add does).

This module is pure numpy: it never imports torch (jax arrays are accepted as inputs).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "PEFT_UNSEEDED_SEED",
    "TORCH_RANDPERM_SMALL_N_LIMIT",
    "canonicalize",
    "from_custom",
    "gradient_mask",
    "make_mask",
    "mask_from_dense",
    "mask_to_dense",
    "max_rank",
    "peft_randperm_prefix",
    "random_mask",
    "shira_budget",
    "snip_mask",
    "struct_mask",
    "topk_mask",
    "validate_indices",
    "weight_magnitude_mask",
]

#: Seed of an unseeded ``torch.Generator()`` (torch's ``default_rng_seed_val``); PEFT uses
#: such a generator when ``random_seed=None``.
PEFT_UNSEEDED_SEED = 67280421310721

#: ``torch.randperm`` on CPU uses the 32-bit swap shuffle for ``n`` below this value
#: (``UINT32_MAX // 20``) and a 64-bit inside-out shuffle from it on.
TORCH_RANDPERM_SMALL_N_LIMIT = (2**32 - 1) // 20  # 214_748_364

_CHUNK = 1 << 22  # draws per chunk in the large-n replay (32 MiB of uint64)


# --------------------------------------------------------------------------------------
# Budget
# --------------------------------------------------------------------------------------


def _where(layer_name: str | None) -> str:
    return f"layer {layer_name!r}: " if layer_name else ""


def _as_int(value: object, name: str, layer_name: str | None = None) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{_where(layer_name)}{name} must be an integer, got {value!r}.")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"{_where(layer_name)}{name} must be an integer, got {type(value).__name__} {value!r}."
        ) from None


def max_rank(in_features: int, out_features: int) -> int:
    """Largest ``r`` whose budget ``r * (in + out)`` fits in an ``[in, out]`` kernel.

    >>> max_rank(4096, 4096)
    2048
    >>> max_rank(1, 1)
    0
    """
    return (in_features * out_features) // (in_features + out_features)


def shira_budget(
    in_features: int, out_features: int, r: int, *, layer_name: str | None = None
) -> int:
    """Number of trainable entries of a SHiRA adapter: ``nnz = r * (in + out)``.

    This is LoRA's parameter count at rank ``r``; PEFT uses the same budget.

    Args:
        in_features: kernel rows (``in``).
        out_features: kernel columns (``out``).
        r: budget rank; must be a positive integer with ``r * (in + out) <= in * out``.
        layer_name: if given, error messages start with ``layer '<name>': ``.

    Raises:
        ValueError: ``r <= 0``, non-positive features, or a budget larger than the kernel
            (the message names the shape, ``r`` and the largest ``r`` that fits).

    >>> shira_budget(4096, 14336, 32)
    589824
    >>> shira_budget(8, 4, 5, layer_name="fc1")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: layer 'fc1': r=5 is too large for a kernel [in=8, out=4]: ... is 2.
    """
    where = _where(layer_name)
    r = _as_int(r, "r", layer_name)
    in_features = _as_int(in_features, "in_features", layer_name)
    out_features = _as_int(out_features, "out_features", layer_name)
    if in_features <= 0 or out_features <= 0:
        raise ValueError(
            f"{where}kernel shape [in={in_features}, out={out_features}] must be positive."
        )
    if r <= 0:
        raise ValueError(f"{where}r must be a positive integer, got r={r}.")
    nnz = r * (in_features + out_features)
    size = in_features * out_features
    if nnz > size:
        best = max_rank(in_features, out_features)
        hint = (
            f"the largest r for this shape is {best}."
            if best > 0
            else "no r fits this shape; do not target this layer."
        )
        raise ValueError(
            f"{where}r={r} is too large for a kernel [in={in_features}, out={out_features}]: "
            f"nnz = r * (in + out) = {nnz} > in * out = {size} entries; {hint}"
        )
    return nnz


# --------------------------------------------------------------------------------------
# torch.randperm replay (PEFT's random mask)
# --------------------------------------------------------------------------------------


def _torch_seed32(seed: int | None) -> int:
    """The 32-bit MT19937 seed torch derives from ``Generator().manual_seed(seed)``."""
    if seed is None:
        seed = PEFT_UNSEEDED_SEED
    seed = _as_int(seed, "seed")
    # torch accepts [-2**63, 2**64) and reads negatives as two's complement uint64.
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed must be in [-2**63, 2**64) like torch's, got {seed}.")
    return seed & 0xFFFFFFFF


def _swap_shuffle_prefix(n: int, k: int, raw: np.ndarray) -> np.ndarray:
    """First ``k`` entries of torch's small-n randperm, given its raw 32-bit draws.

    torch: ``perm = arange(n); for i < n - 1: j = i + raw[i] % (n - i); swap(perm[i],
    perm[j])``. Position ``i`` is final after step ``i``, so only steps ``0..k-1`` matter.
    Step ``i`` reads two positions that are ``>= i``; such a position ``q`` was only ever
    written by earlier steps ``t`` with ``j_t == q`` (which stored there the value that
    position ``t`` held before step ``t``). So each lookup is either ``q`` itself (never
    written) or "the value position ``t`` held before step ``t``" for the last such ``t``:
    a forest of pointers into earlier steps, resolved by pointer doubling in O(k log k).
    """
    steps = np.arange(k, dtype=np.int64)
    j = steps + (raw % (np.uint64(n) - steps.astype(np.uint64))).astype(np.int64)
    # Sort steps by (target position, step); j < 2**28 and k <= n, so no int64 overflow.
    keys = np.sort(j * k + steps)
    tgt, stp = keys // k, keys % k
    same = tgt[1:] == tgt[:-1]
    # before_j[i]: last step t < i with j_t == j_i (predecessor in its target group), or -1.
    before_j = np.full(k, -1, dtype=np.int64)
    before_j[stp[1:][same]] = stp[:-1][same]
    # before_i[q]: last step t < q with j_t == q. Every t with j_t == q has t <= q, so it is
    # the group's last step, or its predecessor when the last step is q itself (j_q == q).
    before_i = np.full(k, -1, dtype=np.int64)
    last = np.append(~same, True)
    grp_tgt, grp_stp = tgt[last], stp[last]
    inside = grp_tgt < k
    before_i[grp_tgt[inside]] = grp_stp[inside]
    self_target = j == steps
    before_i[self_target] = before_j[self_target]
    # held[i] = value at position i before step i: i if never written, else held[before_i[i]].
    parent = np.where(before_i < 0, steps, before_i)
    while True:
        nxt = parent[parent]
        if np.array_equal(nxt, parent):
            break
        parent = nxt
    held = parent  # a root r is a never-written position, holding its own index r
    return np.where(before_j < 0, j, held[np.maximum(before_j, 0)])


def _inside_out_prefix(n: int, k: int, rs: np.random.RandomState) -> np.ndarray:
    """First ``k`` entries of torch's large-n randperm (``n >= 214_748_364``).

    torch: ``for i < n: z = random64() % (i + 1); r[i] = r[z]; r[z] = i`` with
    ``random64() = raw_hi << 32 | raw_lo`` (two MT19937 draws, high word first; numpy's
    legacy ``randint(0, 2**64, dtype=uint64)`` yields exactly these words). Entries are
    only final at the end, so all ``n`` draws are needed (O(n) time, O(k + chunk) memory):
    the first ``k`` steps are replayed on positions ``< k``, and every later step ``i`` with
    ``z < k`` overwrites ``r[z] = i`` (its other write lands at ``i >= k``).
    """
    first = rs.randint(0, 2**64, size=k, dtype=np.uint64)
    z_first = (first % np.arange(1, k + 1, dtype=np.uint64)).astype(np.int64).tolist()
    prefix: list[int] = []
    for i, z in enumerate(z_first):
        prefix.append(prefix[z] if z < i else i)
        prefix[z] = i
    out = np.asarray(prefix, dtype=np.int64)
    hits_i, hits_z = [], []
    for start in range(k, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        v = rs.randint(0, 2**64, size=stop - start, dtype=np.uint64)
        z = v % np.arange(start + 1, stop + 1, dtype=np.uint64)
        hit = np.flatnonzero(z < np.uint64(k))
        hits_i.append(hit + start)
        hits_z.append(z[hit].astype(np.int64))
    if hits_i:
        ev_i, ev_z = np.concatenate(hits_i), np.concatenate(hits_z)
        # The last write to a position wins: first occurrence in reversed order.
        pos, first_rev = np.unique(ev_z[::-1], return_index=True)
        out[pos] = ev_i[::-1][first_rev]
    return out


def peft_randperm_prefix(n: int, k: int, seed: int | None = None) -> np.ndarray:
    """``torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]``, without torch.

    Bit-exact replay of torch's CPU ``randperm`` (checked against torch 2.13): MT19937
    seeded with ``seed & 0xffffffff`` (numpy's legacy ``RandomState`` stream), then

    * ``n < 214_748_364``: the swap shuffle ``z = raw32_i % (n - i); swap(perm[i],
      perm[i + z])``. Only ``k`` steps are needed: O(k log k) time and O(k) memory, where
      torch (and PEFT) spend O(n). 4096 x 14336 at r=32 (k = 589,824) takes ~0.05 s.
    * ``n >= 214_748_364``: torch's 64-bit inside-out shuffle. Every one of the ``n`` steps
      can still change the prefix, so this is O(n) time (about as slow as torch itself,
      seconds per layer), but only O(k) memory.

    Args:
        n: permutation size.
        k: prefix length, ``0 <= k <= n``.
        seed: the generator's seed; None is an unseeded ``torch.Generator()`` (seed
            67280421310721), which is what PEFT uses when ``random_seed=None``. Any int that
            torch accepts (``[-2**63, 2**64)``) works; negatives wrap as in torch.

    Returns:
        int64 array of shape ``[k]``.

    >>> peft_randperm_prefix(10, 10, seed=42).tolist()
    [2, 6, 1, 8, 4, 5, 0, 9, 3, 7]
    >>> peft_randperm_prefix(10**6, 3, seed=0).tolist()
    [136044, 250786, 721077]
    """
    n = _as_int(n, "n")
    k = _as_int(k, "k")
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got n={n}, k={k}.")
    rs = np.random.RandomState(_torch_seed32(seed))
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    if n < TORCH_RANDPERM_SMALL_N_LIMIT:
        # Full-range legacy randint returns the raw 32-bit MT19937 outputs, one per draw.
        raw = rs.randint(0, 2**32, size=k, dtype=np.uint32).astype(np.uint64)
        return _swap_shuffle_prefix(n, k, raw)
    return _inside_out_prefix(n, k, rs)


def random_mask(
    in_features: int,
    out_features: int,
    r: int,
    seed: int | None = None,
    *,
    layer_name: str | None = None,
) -> np.ndarray:
    """PEFT's ``random`` mask, bit-exact, in kernel layout.

    PEFT draws ``p = randperm(out * in)[:nnz]`` from a fresh generator seeded with
    ``random_seed`` and reads each ``p`` as a flat index into the torch weight
    ``[out, in]``: ``o = p // in``, ``i = p % in``. This returns ``[[i...], [o...]]`` sorted
    row-major in kernel layout. Every layer of the same shape gets the same mask, as in PEFT.

    Args:
        in_features, out_features: kernel shape ``[in, out]``.
        r: budget rank, ``nnz = r * (in + out)`` (see :func:`shira_budget`).
        seed: PEFT's ``random_seed``; None is PEFT's unseeded generator.
        layer_name: for error messages.

    Returns:
        int32 ``[2, nnz]`` indices.

    >>> random_mask(4, 3, 1, seed=0)
    array([[0, 0, 0, 1, 1, 2, 3],
           [0, 1, 2, 1, 2, 0, 1]], dtype=int32)
    """
    nnz = shira_budget(in_features, out_features, r, layer_name=layer_name)
    p = peft_randperm_prefix(in_features * out_features, nnz, seed)
    o, i = np.divmod(p, in_features)
    return _from_flat(np.sort(i * out_features + o), out_features)


# --------------------------------------------------------------------------------------
# Structured mask
# --------------------------------------------------------------------------------------


def struct_mask(
    in_features: int,
    out_features: int,
    r: int,
    *,
    stride: int | None = None,
    lines: Literal["out", "in"] = "out",
    diagonal: bool = True,
    layer_name: str | None = None,
) -> np.ndarray:
    """The paper's structured mask: whole lines (rows or columns) plus the main diagonal.

    The lines alone form a rank-1 0/1 pattern; the diagonal makes the update full rank
    ("rank 1 + diagonal"). Exactly ``nnz = r * (in + out)`` unique entries, chosen
    deterministically:

    1. the main diagonal ``(t, t)`` for ``t < min(in, out)`` (if ``diagonal``; it always
       fits, since ``min(in, out) <= nnz``);
    2. whole lines, in the order ``0, f, 2f, ..., 1, 1 + f, 1 + 2f, ..., 2, 2 + f, ...`` (every
       ``f``-th line first, then the same pattern shifted by 1, 2, ...), where a line
       is a kernel column ``[:, o]`` (``lines="out"``: one output unit, a row of torch's
       weight) or a kernel row ``[i, :]`` (``lines="in"``: one input feature);
    3. lines are taken whole while they fit; the first line that does not fit is taken
       partially (its not-yet-chosen entries in increasing index order) to reach ``nnz``.

    Args:
        in_features, out_features: kernel shape ``[in, out]``.
        r: budget rank.
        stride: ``f`` above. None (default) spreads the needed lines evenly:
            ``f = max(1, n_lines // ceil(budget_left / (line_length - diagonal)))``, where
            ``budget_left = nnz - min(in, out)`` with the diagonal, else ``nnz``.
        lines: "out" (default: kernel columns = output units) or "in" (kernel rows).
        diagonal: include the main diagonal (default True).
        layer_name: for error messages.

    Returns:
        int32 ``[2, nnz]`` indices, sorted row-major in kernel layout.

    >>> struct_mask(4, 4, 1)  # 8 = diagonal + rest of column 0 + 1 entry of column 2 (f = 2)
    array([[0, 0, 1, 1, 2, 2, 3, 3],
           [0, 2, 0, 1, 0, 2, 0, 3]], dtype=int32)
    """
    nnz = shira_budget(in_features, out_features, r, layer_name=layer_name)
    if lines not in ("out", "in"):
        raise ValueError(f'lines must be "out" or "in", got {lines!r}.')
    n_lines, length = (out_features, in_features) if lines == "out" else (in_features, out_features)
    n_diag = min(in_features, out_features) if diagonal else 0
    left = nnz - n_diag
    if stride is None:
        per_line = max(1, length - 1) if diagonal else length  # entries a line adds
        needed = max(1, -(-left // per_line))
        stride = max(1, n_lines // needed)
    else:
        stride = _as_int(stride, "stride", layer_name)
        if stride <= 0:
            raise ValueError(f"{_where(layer_name)}stride must be positive, got {stride}.")
    line_ids = np.arange(n_lines, dtype=np.int64)
    order = line_ids[np.lexsort((line_ids, line_ids % stride))]
    # New entries each line adds: its diagonal entry (t, t) is already in when t < n_diag.
    gain = length - (order < n_diag)
    full = int(np.searchsorted(np.cumsum(gain), left, side="right"))
    rest = left - int(gain[:full].sum())

    def line_keys(t: np.ndarray, pos: np.ndarray) -> np.ndarray:
        row, col = (pos, t) if lines == "out" else (t, pos)
        return row * out_features + col

    diag = np.arange(n_diag, dtype=np.int64)
    parts = [diag * out_features + diag]
    pos = np.arange(length, dtype=np.int64)
    chosen = order[:full]
    parts.append(line_keys(chosen[:, None], pos[None, :]).ravel())
    if rest > 0:
        t = int(order[full])
        cand = pos[pos != t] if t < n_diag else pos
        parts.append(line_keys(np.int64(t), cand[:rest]))
    keys = np.unique(np.concatenate(parts))
    if keys.size != nnz:  # pragma: no cover - guarded by construction
        raise AssertionError(f"struct_mask built {keys.size} entries, expected {nnz}.")
    return _from_flat(keys, out_features)


# --------------------------------------------------------------------------------------
# Score-based masks
# --------------------------------------------------------------------------------------


def _scores_array(scores: npt.ArrayLike, name: str = "scores") -> np.ndarray:
    """A 2-D real array that numpy can compare: float32/float64 kept, others widened."""
    s = np.asarray(scores)
    if s.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [in, out] array, got shape {s.shape}.")
    if s.dtype in (np.float32, np.float64):
        return s
    if s.dtype.kind in "iub" or (s.dtype.kind == "f" and s.dtype.itemsize > 8):
        return s.astype(np.float64)
    if s.dtype.kind == "c" or s.dtype.kind in "OSUM":
        raise TypeError(f"{name} must be real-valued, got dtype {s.dtype}.")
    return s.astype(np.float32)  # float16, bfloat16 (ml_dtypes), float8: exact in float32


def _index_list(exclude: object) -> list[object]:
    """``exclude`` as a list of ``[2, k]`` index arrays."""
    if isinstance(exclude, (list, tuple)):
        if all(np.ndim(a) == 2 for a in exclude):
            return list(exclude)
        return [exclude]  # a nested list [[rows], [cols]]
    if np.ndim(exclude) == 3:
        return list(exclude)  # type: ignore[call-overload]
    return [exclude]


def _exclusion_mask(exclude: object, in_features: int, out_features: int) -> np.ndarray:
    taken = np.zeros(in_features * out_features, dtype=bool)
    for n, idx in enumerate(_index_list(exclude)):
        idx = validate_indices(idx, in_features, out_features, layer_name=f"exclude[{n}]")
        taken[idx[0].astype(np.int64) * out_features + idx[1]] = True
    return taken


def topk_mask(
    scores: npt.ArrayLike,
    nnz: int,
    exclude: npt.ArrayLike | Sequence[npt.ArrayLike] | None = None,
) -> np.ndarray:
    """Positions of the ``nnz`` largest scores of an ``[in, out]`` array.

    Ties are broken by lower flat (row-major) index first, so the result is deterministic.
    NaN scores are rejected.

    Args:
        scores: ``[in, out]`` numpy or jax array (any real dtype, bfloat16 included).
        nnz: how many positions to keep, ``0 <= nnz``.
        exclude: positions that may not be chosen: one ``[2, k]`` kernel-layout index
            array or a list of them (e.g. the masks of adapters already placed, for the
            paper's non-overlapping masks: adapter 2 takes the next ``nnz`` after adapter 1).

    Returns:
        int32 ``[2, nnz]`` indices, sorted row-major in kernel layout.

    Raises:
        ValueError: fewer than ``nnz`` positions remain after exclusion, or NaN scores.

    >>> s = np.array([[0.1, 0.9, 0.5], [0.9, 0.2, 0.0]])
    >>> topk_mask(s, 2)  # the two 0.9s
    array([[0, 1],
           [1, 0]], dtype=int32)
    >>> topk_mask(s, 2, exclude=[topk_mask(s, 2)])  # next best: 0.5, then 0.2
    array([[0, 1],
           [2, 1]], dtype=int32)
    """
    s = _scores_array(scores)
    in_features, out_features = s.shape
    nnz = _as_int(nnz, "nnz")
    if nnz < 0:
        raise ValueError(f"nnz must be >= 0, got {nnz}.")
    flat = s.ravel()
    if flat.dtype.kind == "f" and np.isnan(flat).any():
        raise ValueError("scores contain NaN; top-k needs comparable scores.")
    if exclude is not None and not (isinstance(exclude, (list, tuple)) and not exclude):
        taken = _exclusion_mask(exclude, in_features, out_features)
        cand = np.flatnonzero(~taken)
        vals = flat[cand]
        excluded = f" after excluding {int(taken.sum())} positions"
    else:
        cand, vals, excluded = None, flat, ""
    if nnz > vals.size:
        raise ValueError(
            f"need {nnz} positions but only {vals.size} of the [{in_features}, {out_features}] "
            f"kernel remain{excluded}; lower r or exclude fewer adapters."
        )
    if nnz == 0:
        return np.zeros((2, 0), dtype=np.int32)
    kth = vals.size - nnz
    threshold = np.partition(vals, kth)[kth]  # the nnz-th largest value
    above = np.flatnonzero(vals > threshold)
    ties = np.flatnonzero(vals == threshold)[: nnz - above.size]  # lowest indices first
    sel = np.concatenate([above, ties])
    if cand is not None:
        sel = cand[sel]
    return _from_flat(np.sort(sel), out_features)


def weight_magnitude_mask(
    kernel: npt.ArrayLike,
    r: int,
    exclude: npt.ArrayLike | Sequence[npt.ArrayLike] | None = None,
    *,
    layer_name: str | None = None,
) -> np.ndarray:
    """SHiRA-WM: the ``r * (in + out)`` entries of largest ``|kernel|``.

    With ``exclude`` (other adapters' indices) this gives the paper's non-overlapping WM
    masks for fusion: each adapter takes the next ``nnz`` by magnitude.

    >>> w = np.array([[1.0, -5.0, 0.0], [2.0, 0.5, -3.0], [0.0, 4.0, 0.1]])
    >>> weight_magnitude_mask(w, 1)  # budget 1 * (3 + 3) = 6
    array([[0, 0, 1, 1, 1, 2],
           [0, 1, 0, 1, 2, 1]], dtype=int32)
    """
    k = _scores_array(kernel, "kernel")
    nnz = shira_budget(*k.shape, r, layer_name=layer_name)
    return topk_mask(np.abs(k), nnz, exclude)


def gradient_mask(
    grad_accum: npt.ArrayLike,
    r: int,
    exclude: npt.ArrayLike | Sequence[npt.ArrayLike] | None = None,
    *,
    layer_name: str | None = None,
) -> np.ndarray:
    """SHiRA-Grad: the ``r * (in + out)`` entries of largest accumulated ``|gradient|``.

    ``grad_accum`` is the kernel-shaped gradient already accumulated over calibration
    batches by the caller; whether that is ``sum |g|`` or ``|sum g|`` is the caller's choice
    (the paper leaves it open; ``ShiraConfig.grad_reduction`` picks it). Its absolute value
    is taken here, so either form works.

    >>> g = np.array([[1.0, -2.0, 1.0], [1.0, 3.0, 0.0], [-4.0, 0.0, -1.0]])
    >>> gradient_mask(g, 1)  # budget 6: 4, 3, 2 and three of the four tied 1s (lowest index)
    array([[0, 0, 0, 1, 1, 2],
           [0, 1, 2, 0, 1, 0]], dtype=int32)
    """
    g = _scores_array(grad_accum, "grad_accum")
    nnz = shira_budget(*g.shape, r, layer_name=layer_name)
    return topk_mask(np.abs(g), nnz, exclude)


def snip_mask(
    kernel: npt.ArrayLike,
    grad_accum: npt.ArrayLike,
    r: int,
    exclude: npt.ArrayLike | Sequence[npt.ArrayLike] | None = None,
    *,
    layer_name: str | None = None,
) -> np.ndarray:
    """SHiRA-SNIP: the ``r * (in + out)`` entries of largest ``|kernel * grad_accum|``.

    ``grad_accum`` is accumulated by the caller as for :func:`gradient_mask`.

    >>> w = np.arange(9.0).reshape(3, 3)
    >>> snip_mask(w, np.ones((3, 3)), 1)  # = the 6 largest |w|
    array([[1, 1, 1, 2, 2, 2],
           [0, 1, 2, 0, 1, 2]], dtype=int32)
    """
    w = _scores_array(kernel, "kernel")
    g = _scores_array(grad_accum, "grad_accum")
    if w.shape != g.shape:
        raise ValueError(
            f"{_where(layer_name)}kernel {w.shape} and grad_accum {g.shape} shapes differ."
        )
    nnz = shira_budget(*w.shape, r, layer_name=layer_name)
    return topk_mask(np.abs(w * g), nnz, exclude)


# --------------------------------------------------------------------------------------
# Custom masks, validation, canonical form
# --------------------------------------------------------------------------------------


def _from_flat(keys: np.ndarray, out_features: int) -> np.ndarray:
    """Flat kernel-layout indices -> int32 ``[2, n]``."""
    rows, cols = np.divmod(keys, out_features)
    return np.stack([rows, cols]).astype(np.int32)


def mask_from_dense(mask: npt.ArrayLike, *, layer_name: str | None = None) -> np.ndarray:
    """A dense 0/1 (or bool) ``[in, out]`` mask -> int32 ``[2, nnz]`` sorted indices.

    >>> mask_from_dense(np.array([[0, 1], [1, 0], [0, 1]]))
    array([[0, 1, 2],
           [1, 0, 1]], dtype=int32)
    """
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"{_where(layer_name)}mask must be 2-D [in, out], got shape {m.shape}.")
    if m.dtype.kind != "b":
        if m.dtype.kind in "cOSUM":
            raise TypeError(f"{_where(layer_name)}mask must be bool or 0/1, got dtype {m.dtype}.")
        if m.dtype.kind not in "iuf":
            m = m.astype(np.float32)  # bfloat16 and other ml_dtypes floats
        bad = (m != 0) & (m != 1)
        if bad.any():
            raise ValueError(
                f"{_where(layer_name)}mask must contain only 0 and 1; found "
                f"{int(bad.sum())} other values, e.g. {m[bad].ravel()[0].item()!r}."
            )
        m = m != 0
    return np.stack(np.nonzero(m)).astype(np.int32)


def mask_to_dense(indices: npt.ArrayLike, shape: tuple[int, int]) -> np.ndarray:
    """Indices ``[2, n]`` -> dense bool ``[in, out]`` mask (the inverse of :func:`mask_from_dense`).

    >>> mask_to_dense(np.array([[0, 1], [1, 0]]), (2, 2)).astype(int).tolist()
    [[0, 1], [1, 0]]
    """
    idx = validate_indices(indices, *shape)
    dense = np.zeros(shape, dtype=bool)
    dense[idx[0], idx[1]] = True
    return dense


def validate_indices(
    indices: npt.ArrayLike,
    in_features: int,
    out_features: int,
    nnz: int | None = None,
    *,
    layer_name: str | None = None,
) -> np.ndarray:
    """Check kernel-layout indices and return them as contiguous int32 ``[2, n]``.

    Accepts any integer dtype and integral floats (PEFT on Windows writes float32 indices);
    rejects non-integral or non-finite floats, bools, a wrong shape, out-of-range entries
    and (if ``nnz`` is given) a wrong count. It does not sort or de-duplicate: see
    :func:`canonicalize`.

    Args:
        indices: ``[2, n]``: row 0 input index (``< in``), row 1 output index (``< out``).
        in_features, out_features: kernel shape ``[in, out]``.
        nnz: expected ``n``, or None to skip that check.
        layer_name: for error messages.

    >>> validate_indices(np.array([[0.0, 2.0], [1.0, 0.0]]), 3, 2)
    array([[0, 2],
           [1, 0]], dtype=int32)
    >>> validate_indices(np.array([[0.5], [1.0]]), 3, 2)
    Traceback (most recent call last):
    ...
    ValueError: indices must be integers; found 1 non-integral value(s), e.g. 0.5.
    """
    where = _where(layer_name)
    idx = np.asarray(indices)
    if idx.ndim != 2 or idx.shape[0] != 2:
        hint = " (transposed? expected [2, n])" if idx.ndim == 2 and idx.shape[1] == 2 else ""
        raise ValueError(f"{where}indices must have shape [2, n], got {idx.shape}{hint}.")
    kind = idx.dtype.kind
    if kind == "f":
        bad = ~np.isfinite(idx) | (idx != np.round(idx))
        if bad.any():
            raise ValueError(
                f"{where}indices must be integers; found {int(bad.sum())} non-integral "
                f"value(s), e.g. {idx[bad].ravel()[0].item()!r}."
            )
        if idx.size and np.abs(idx).max() > 2.0**62:  # would not survive the int64 cast
            raise ValueError(
                f"{where}indices out of range for a kernel [in={in_features}, "
                f"out={out_features}], e.g. {np.abs(idx).max().item()!r}."
            )
        idx = idx.astype(np.int64)
    elif kind not in "iu":
        raise TypeError(f"{where}indices must be integers, got dtype {idx.dtype}.")
    for axis, (name, limit) in enumerate((("input", in_features), ("output", out_features))):
        row = idx[axis]
        bad = (row < 0) | (row >= limit)
        if bad.any():
            raise ValueError(
                f"{where}{int(bad.sum())} {name} index(es) out of range [0, {limit}) for a "
                f"kernel [in={in_features}, out={out_features}], e.g. {int(row[bad][0])} "
                f"(row {axis} = {name} index in kernel layout)."
            )
    if nnz is not None and idx.shape[1] != nnz:
        raise ValueError(f"{where}expected {nnz} indices, got {idx.shape[1]}.")
    return np.ascontiguousarray(idx, dtype=np.int32)


def canonicalize(
    indices: npt.ArrayLike, values: npt.ArrayLike, shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Sort indices row-major, drop duplicates and SUM their values (scatter-add semantics).

    PEFT's readers scatter-ADD, so a duplicated position holds the sum of its values; this
    returns the equivalent unique form. Already-canonical input is returned unchanged.

    Args:
        indices: kernel-layout ``[2, n]`` (validated with :func:`validate_indices`).
        values: ``[n]`` values (numpy or jax; a numpy array of the same dtype comes back).
        shape: kernel shape ``(in, out)``.

    Returns:
        ``(int32 [2, m] sorted unique indices, [m] values)``, ``m <= n``.

    >>> idx, val = canonicalize(np.array([[1, 0, 1], [0, 1, 0]]), np.array([1., 2., 3.]), (2, 2))
    >>> idx.tolist(), val.tolist()
    ([[0, 1], [1, 0]], [2.0, 4.0])
    """
    in_features, out_features = shape
    idx = validate_indices(indices, in_features, out_features)
    val = np.asarray(values)
    if val.shape != (idx.shape[1],):
        raise ValueError(f"values must have shape [{idx.shape[1]}], got {val.shape}.")
    keys = idx[0].astype(np.int64) * out_features + idx[1]
    if keys.size < 2 or bool(np.all(keys[1:] > keys[:-1])):
        return idx, val
    uniq, inverse = np.unique(keys, return_inverse=True)
    summed = np.zeros(uniq.size, dtype=val.dtype)
    np.add.at(summed, inverse, val)
    return _from_flat(uniq, out_features), summed


# ----------------------------------------------------------------------------- dispatch


def from_custom(result: npt.ArrayLike, in_features: int, out_features: int, *, layer_name: str
                ) -> np.ndarray:
    """What a custom `mask_fn` returned (a 0/1 `[in, out]` mask or `[2, nnz]` indices) as
    sorted unique int32 `[2, nnz]` indices.

    >>> from_custom(np.array([[1, 0], [0, 1]]), 2, 2, layer_name="x").tolist()
    [[0, 1], [0, 1]]
    """
    result = np.asarray(result)
    if result.shape == (in_features, out_features):
        return mask_from_dense(result, layer_name=layer_name)
    if result.ndim == 2 and result.shape[0] == 2:
        idx = validate_indices(result, in_features, out_features, layer_name=layer_name)
        idx, _ = canonicalize(idx, np.zeros(idx.shape[1], np.float32), (in_features, out_features))
        return idx
    raise ValueError(
        f"mask_fn for {layer_name} returned shape {result.shape}; expected a 0/1 mask of the "
        f"kernel's shape {(in_features, out_features)} or [2, nnz] indices."
    )


def make_mask(
    config: Any,
    in_features: int,
    out_features: int,
    *,
    layer_name: str,
    kernel: npt.ArrayLike | None = None,
    grad: npt.ArrayLike | None = None,
    exclude: Sequence[npt.ArrayLike] = (),
    custom: Callable[[], npt.ArrayLike] | None = None,
) -> np.ndarray:
    """The one mask dispatch: `[2, nnz]` indices for one `[in, out]` matrix, as `config` asks.

    `config` is a `ShiraConfig` (its `r`, `mask_type`, `mask_fn`, `random_seed`,
    `struct_stride` are read). `kernel` is needed by "weight_magnitude" and "snip", `grad` by
    "gradient" and "snip"; `exclude` holds other adapters' indices to avoid (score-based
    masks only). When `config.mask_fn` is set (it wins, as in PEFT), `custom()` calls it.

    >>> from shira_jax.config import ShiraConfig
    >>> make_mask(ShiraConfig(r=1, mask_type="struct"), 4, 4, layer_name="x").shape
    (2, 8)
    """
    nnz = shira_budget(in_features, out_features, config.r, layer_name=layer_name)
    kind = config.mask_type
    if config.mask_fn is not None:
        if custom is None:
            raise ValueError(f"{layer_name}: config.mask_fn is set but nothing can call it here.")
        idx = from_custom(custom(), in_features, out_features, layer_name=layer_name)
    elif kind == "random":
        if len(exclude):
            raise ValueError(
                f'exclude_adapters works with score-based masks; mask_type="random" makes '
                f"PEFT's exact mask and cannot avoid positions ({layer_name})."
            )
        idx = random_mask(in_features, out_features, config.r, seed=config.random_seed)
    elif kind == "struct":
        idx = struct_mask(in_features, out_features, config.r, stride=config.struct_stride)
    elif kind == "weight_magnitude":
        idx = weight_magnitude_mask(_needed(kernel, "kernel", kind), config.r, exclude=exclude)
    elif kind == "gradient":
        idx = gradient_mask(_needed(grad, "grad", kind), config.r, exclude=exclude)
    elif kind == "snip":
        idx = snip_mask(
            _needed(kernel, "kernel", kind), _needed(grad, "grad", kind), config.r, exclude=exclude
        )
    else:
        raise ValueError(f"{layer_name}: mask_type {kind!r} needs mask_fn.")
    if idx.shape[1] != nnz:
        raise ValueError(f"Mask for {layer_name} has {idx.shape[1]} entries; the budget is {nnz}.")
    return idx


def _needed(array: npt.ArrayLike | None, name: str, kind: str) -> np.ndarray:
    if array is None:
        raise ValueError(f'mask_type="{kind}" needs the {name}; none was given.')
    return np.asarray(array)
