"""Merged-mode switching on every path: exact after 1000 switches, in place, AdapterBank.

Every comparison here is bit for bit: a switch restores saved entries (exact) and merges with
one float32 sum and one rounding per entry, which is what `switching_cases.expected` computes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import switching_cases as cases

import shira_jax as sj
from shira_jax import ops

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["plain", "stacked"])
def test_thousand_switches_are_exact(kind, dtype):
    model = cases.build(kind, cases.DTYPES[dtype])
    result = cases.thousand_switches(model, 1000)
    assert result == dict.fromkeys(result, True), result


@pytest.mark.parametrize("storage", ["device", "host"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_adapter_bank_round_trip(dtype, storage):
    model = cases.build("plain", cases.DTYPES[dtype])
    result = cases.bank_round_trip(model, storage)
    assert result == dict.fromkeys(result, True), result


def test_adapter_bank_stacked_and_errors():
    model = cases.build("stacked", jnp.bfloat16)
    result = cases.bank_round_trip(model, "host")
    assert result == dict.fromkeys(result, True), result
    bank = sj.AdapterBank(model)
    bank.add_from_model("a")
    with pytest.raises(KeyError, match="nope"):
        bank.switch("nope")
    with pytest.raises(ValueError, match="already"):
        bank.add_from_model("a")
    idx = np.zeros((3, 2, 4), np.int32)  # duplicate positions: refused before anything is kept
    with pytest.raises(ValueError, match="duplicate"):
        bank.add("bad", {"layers.q_proj": idx}, {"layers.q_proj": np.zeros((3, 4), np.float32)})
    with pytest.raises(ValueError, match="expected"):
        bank.add("bad", {"layers.q_proj": idx[0]}, {"layers.q_proj": np.zeros(4, np.float32)})
    assert bank.names == ("a",)
    bank.switch("a")
    with pytest.raises(ValueError, match="merged"):
        bank.remove("a")
    with pytest.raises(ValueError, match="storage"):
        sj.AdapterBank(model, storage="disk")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_switches_update_kernels_in_place(dtype):
    model = cases.build("plain", cases.DTYPES[dtype])
    sj.set_adapter(model, "a")
    sj.merge(model)
    pointer = model.up.base_layer.kernel.get_value().unsafe_buffer_pointer()
    sj.switch_adapter(model, "a", "b")
    sj.set_adapter(model, "c")
    sj.unmerge(model)
    sj.merge(model)
    assert model.up.base_layer.kernel.get_value().unsafe_buffer_pointer() == pointer
    held = model.gate.base_layer.kernel[...]  # a user's reference: never written through
    copy = np.array(held)
    sj.switch_adapter(model, "c", "a")
    np.testing.assert_array_equal(np.asarray(held), copy)
    assert model.gate.merged_adapters == ("a",)


def test_set_adapter_and_disable_adapter_on_merged_model():
    model = cases.build("plain", jnp.bfloat16)
    base = cases.kernels(model)
    sj.set_adapter(model, "a")
    sj.merge(model)
    sj.set_adapter(model, "b")  # merged mode: b replaces a, the model stays merged
    assert model.up.merged_adapters == ("b",) and sj.active_adapters(model) == ("b",)
    assert cases.same_bits(cases.kernels(model), cases.expected(model, base, "b"))
    with sj.disable_adapter(model):
        assert not model.up.merged_adapters
        assert cases.same_bits(cases.kernels(model), base)
    assert model.down.merged_adapters == ("b",)
    assert cases.same_bits(cases.kernels(model), cases.expected(model, base, "b"))
    sj.set_adapter(model, ["a", "c"])  # both merged, in that order
    assert model.up.merged_adapters == ("a", "c")
    sj.unmerge(model)
    assert cases.same_bits(cases.kernels(model), base)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_new_base_weights_are_never_merged_with_remembered_entries(dtype):
    """A merge reuses the entries it wrote last time only while the kernel is the array the
    engine left there: new base weights (any write from outside) are read afresh."""
    model = cases.build("plain", cases.DTYPES[dtype])
    sj.set_adapter(model, "a")
    sj.merge(model)
    sj.switch_adapter(model, "a", "b")
    sj.switch_adapter(model, "b", "a")  # "a" merged from memory: a pure write
    sj.unmerge(model)
    for _, layer in sj.shira_layers(model):
        layer.base_layer.kernel[...] = layer.base_layer.kernel[...] * 2 + 1
    base = cases.kernels(model)
    sj.merge(model)
    assert cases.same_bits(cases.kernels(model), cases.expected(model, base, "a"))
    sj.switch_adapter(model, "a", "b")
    assert cases.same_bits(cases.kernels(model), cases.expected(model, base, "b"))
    sj.unmerge(model)
    assert cases.same_bits(cases.kernels(model), base)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_host_writes_round_like_the_compiled_merge(dtype):
    """The 16-bit in-buffer path and the compiled path give the same bits (scale not a power
    of two, so a fused multiply-add in either would show)."""
    kernel = (0.02 * jax.random.normal(jax.random.key(0), (3, 24, 40))).astype(dtype)
    idx = jnp.asarray(np.stack([sj.masks.random_mask(24, 40, r=2, seed=s) for s in range(3)]))
    values = jax.random.normal(jax.random.key(1), (3, idx.shape[-1]))
    merge = [[(idx, values, 0.37)]]
    (host,), ((host_saved,),) = ops.switch_on_host([jnp.array(kernel)], [[]], merge)
    (xla,), ((xla_saved,),) = ops.switch_group([jnp.array(kernel)], [[]],
                                               [[(idx, values, jnp.float32(0.37))]], donate=False)
    np.testing.assert_array_equal(np.asarray(host).view(np.uint16), np.asarray(xla).view(np.uint16))
    np.testing.assert_array_equal(np.asarray(host_saved), np.asarray(xla_saved))
    (back,), _ = ops.switch_on_host([host], [[(idx, host_saved)]], [[]])
    np.testing.assert_array_equal(np.asarray(back).view(np.uint16),
                                  np.asarray(kernel).view(np.uint16))


def test_sharded_switches_are_exact(tmp_path):
    """Kernels split over a simulated 8-device mesh switch shard by shard, exactly.

    250 switches per model (dtype x plain/stacked) take each of the 4 merged-mode paths from
    each of the 6 (current, new) adapter pairs 5 to 19 times (seeded) and compare the disabled
    model with the base 3 times. A switch restores saved entries, so exactness does not depend
    on how many came before (a `W + d - d` unmerge would differ after one round trip in bf16);
    the 1000-switch run of the same scenarios is `test_thousand_switches_are_exact`. Each
    switch here costs several single-device ones (shard-local programs on 8 devices).
    """
    out = tmp_path / "switching.npz"
    proc = subprocess.run(
        [sys.executable, str(HERE / "switching_worker.py"), "8", str(out), "250"],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = dict(np.load(out))
    assert len(results) >= 20
    failed = [k for k, v in results.items() if not bool(v)]
    assert not failed, failed
