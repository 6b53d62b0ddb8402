"""Hostile adapter files: every bad orbax checkpoint or PEFT folder is refused with
`sj.AdapterLoadError` naming the file, without a hang, and the model is left as it was."""

from __future__ import annotations

import json
import os
import shutil
import struct

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import shira_jax as sj
from bridge.peft import AdapterFileNotFoundError, load_peft_adapter, save_peft_adapter
from shira_jax import checkpoint, state
from shira_jax.errors import MAX_JSON_DEPTH

META = "shira_adapter.json"
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


class Net(nnx.Module):
    def __init__(self, hidden: int = 8, inter: int = 12):
        rngs = nnx.Rngs(0)
        self.up = nnx.Linear(hidden, inter, rngs=rngs)
        self.down = nnx.Linear(inter, hidden, rngs=rngs)
        self.head = nnx.Linear(hidden, 4, rngs=rngs)


def adapted(hidden: int = 8, inter: int = 12, modules_to_save: bool = True) -> Net:
    model = Net(hidden, inter)
    cfg = sj.ShiraConfig(
        r=1,
        target_modules=["up", "down"],
        modules_to_save=["head"] if modules_to_save else None,
        random_seed=0,
        init_weights=False,
    )
    sj.apply_shira(model, cfg, "first")
    return model


def snapshot(model: nnx.Module) -> dict:
    flat = nnx.to_flat_state(nnx.state(model))
    return {
        "names": sj.adapter_names(model),
        "arrays": {str(k): np.array(v.get_value()) for k, v in flat},
    }


def assert_unchanged(model: nnx.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["names"] == before["names"]
    assert sorted(after["arrays"]) == sorted(before["arrays"])
    for key, array in before["arrays"].items():
        np.testing.assert_array_equal(after["arrays"][key], array, err_msg=key)


def refused(load, model: nnx.Module, match: str | None = None) -> sj.AdapterLoadError:
    """`load()` raises AdapterLoadError (matching `match`) and leaves `model` unchanged."""
    before = snapshot(model)
    with pytest.raises(sj.AdapterLoadError, match=match) as info:
        load()
    assert_unchanged(model, before)
    return info.value


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("orbax") / "ck"
    sj.save_adapter(adapted(), folder, "first")
    return folder


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("peft") / "adapter"
    save_peft_adapter(adapted(), folder, "first")
    return folder / "first"


@pytest.fixture
def bad_ckpt(ckpt, tmp_path):
    folder = tmp_path / "ck"
    shutil.copytree(ckpt, folder)
    return folder


@pytest.fixture
def bad_peft(peft_dir, tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(peft_dir, folder)
    return folder


def edit_json(path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def load_orbax(folder, **kw):
    model = adapted()
    return model, lambda: sj.load_adapter(model, folder, "second", **kw)


def load_peft(folder, **kw):
    model = adapted()
    return model, lambda: load_peft_adapter(model, folder, "second", **kw)


def test_error_type_is_a_value_error_and_exported():
    assert issubclass(sj.AdapterLoadError, ValueError)
    assert issubclass(AdapterFileNotFoundError, sj.AdapterLoadError)
    assert issubclass(AdapterFileNotFoundError, FileNotFoundError)


# --------------------------------------------------------------------------- orbax metadata


def test_config_null_with_modules_to_save_changes_nothing(bad_ckpt):
    edit_json(bad_ckpt / META, lambda m: m.__setitem__("config", None))
    model, load = load_orbax(bad_ckpt)
    refused(load, model, "config")


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m.__setitem__("layers", []), "layers"),
        (lambda m: m.__setitem__("layers", "up"), "layers"),
        (lambda m: m["layers"].__setitem__("up", [8, 12]), "layers.up"),
        (lambda m: m["layers"]["up"].__setitem__("kernel_shape", [8, -12]), "layers.up"),
        (lambda m: m["layers"]["up"].__setitem__("r", "1"), "layers.up"),
        (lambda m: m.__setitem__("modules_to_save", ["head"]), "modules_to_save"),
        (lambda m: m["modules_to_save"].__setitem__("head", "kernel"), "modules_to_save"),
        (lambda m: m["modules_to_save"].__setitem__("head", ["../../x", "kernel"]), "x"),
        (lambda m: m["modules_to_save"].__setitem__("head", ["__class__", "kernel"]), "class"),
        (lambda m: m["layers"].__setitem__("../../x", m["layers"].pop("up")), "x"),
        (lambda m: m["layers"].__setitem__("__class__", m["layers"].pop("up")), "class"),
        (lambda m: m.__setitem__("config", [1]), "config"),
        (lambda m: m["config"].__setitem__("r", "two"), "config"),
        (lambda m: m.__setitem__("adapter_name", "a\n"), "adapter_name"),
        (lambda m: m.__setitem__("adapter_name", "a" * 300), "adapter_name"),
        (lambda m: m.__setitem__("version", 99), "version"),
    ],
)
def test_wrong_metadata_fields_are_refused(bad_ckpt, edit, match):
    edit_json(bad_ckpt / META, edit)
    model = adapted()
    refused(lambda: sj.load_adapter(model, bad_ckpt), model, match)


@pytest.mark.parametrize("content", ["[1, 2]", "null", "3", "{", "\xff", "[" * 200_000])
def test_metadata_that_is_not_a_json_object_is_refused(bad_ckpt, content):
    (bad_ckpt / META).write_bytes(content.encode("utf-8", "surrogateescape"))
    model, load = load_orbax(bad_ckpt)
    err = refused(load, model, META)
    if content.startswith("[["):
        assert str(MAX_JSON_DEPTH) in str(err)


@pytest.mark.parametrize("kind", ["fifo", "directory", "proc_mem", "dev_zero", "dangling"])
def test_metadata_that_is_not_a_regular_file_is_refused_without_reading(bad_ckpt, kind):
    path = bad_ckpt / META
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)  # reading it would block forever
    elif kind == "directory":
        path.mkdir()
    elif kind == "proc_mem":
        path.symlink_to("/proc/self/mem")
    elif kind == "dev_zero":
        path.symlink_to("/dev/zero")  # endless
    else:
        path.symlink_to(bad_ckpt / "nowhere")
    model, load = load_orbax(bad_ckpt)
    refused(load, model, META)


def test_fifo_inside_orbax_arrays_is_refused(bad_ckpt):
    target = bad_ckpt / "arrays" / "_METADATA"
    target.unlink()
    os.mkfifo(target)
    model, load = load_orbax(bad_ckpt)
    refused(load, model, "_METADATA")


def test_damaged_orbax_files_are_refused_or_load_whole(ckpt, tmp_path):
    """Every orbax file deleted, truncated or bit-flipped: a refusal of our type (model
    unchanged) or, where orbax has no checksum to notice a flipped data byte, a whole load."""
    names = sorted(
        str(p.relative_to(ckpt / "arrays")) for p in (ckpt / "arrays").rglob("*") if p.is_file()
    )
    assert "_METADATA" in names and len(names) >= 5
    reference = checkpoint.read_state(ckpt)[1]
    outcomes = {}
    for i, name in enumerate(names):
        for mutation in ("delete", "truncate", "flip"):
            folder = tmp_path / f"ck{i}-{mutation}"
            shutil.copytree(ckpt, folder)
            path = folder / "arrays" / name
            data = path.read_bytes()
            if mutation == "delete":
                path.unlink()
            elif mutation == "truncate":
                path.write_bytes(data[: len(data) // 2])
            else:
                path.write_bytes(
                    data[: len(data) // 2]
                    + bytes([data[len(data) // 2] ^ 0x5A])
                    + data[len(data) // 2 + 1 :]
                )
            model = adapted()
            before = snapshot(model)
            try:
                sj.load_adapter(model, folder, "second")
                outcomes[name, mutation] = "loaded"
                for path in ("up", "down"):
                    got = getattr(model, path).shira_weight["second"][...]
                    np.testing.assert_array_equal(got, reference.layers[path].values)
            except sj.AdapterLoadError as err:
                outcomes[name, mutation] = "refused"
                assert str(folder) in str(err)
                assert_unchanged(model, before)
    # The files orbax reads are checked (json, zstd, ocdbt manifests); the others (commit
    # marker, timestamps, per-process copies merged into the top-level tree) are not read, so
    # damage there loads the unchanged adapter (compared above).
    read = [n for n in names if n in ("_METADATA", "manifest.ocdbt") or n.startswith("d/")]
    assert len(read) >= 3
    assert all(outcomes[n, m] == "refused" for n in read for m in ("delete", "truncate", "flip"))


# --------------------------------------------------------------------------- orbax arrays


def _rewrite(folder, edit) -> None:
    name, saved = checkpoint.read_state(folder)
    checkpoint.write_state(folder, edit(saved), name)


def _map_layer(st: state.AdapterState, path: str, **changes) -> state.AdapterState:
    import dataclasses

    layers = dict(st.layers)
    layers[path] = dataclasses.replace(layers[path], **changes)
    return dataclasses.replace(st, layers=layers)


def test_nonfinite_orbax_values_are_refused_unless_allowed(bad_ckpt):
    def poison(st):
        vals = np.array(st.layers["up"].values, np.float32)
        vals[3] = np.nan
        vals[5] = np.inf
        return _map_layer(st, "up", values=vals)

    _rewrite(bad_ckpt, poison)
    model, load = load_orbax(bad_ckpt)
    refused(load, model, "NaN/inf")
    model, load = load_orbax(bad_ckpt, allow_nonfinite=True)
    load()
    assert np.isnan(np.asarray(model.up.shira_weight["second"][...])).sum() == 1


def test_nonfinite_orbax_modules_to_save_are_refused_unless_allowed(bad_ckpt):
    import dataclasses

    def poison(st):
        head = dict(st.modules_to_save["head"])
        head["bias"] = np.full_like(np.asarray(head["bias"]), np.nan)
        return dataclasses.replace(st, modules_to_save={"head": head})

    _rewrite(bad_ckpt, poison)
    model, load = load_orbax(bad_ckpt)
    refused(load, model, "head.bias")
    model, load = load_orbax(bad_ckpt, allow_nonfinite=True)
    load()


def test_duplicate_orbax_positions_are_refused(bad_ckpt):
    def dup(st):
        idx = np.array(st.layers["down"].indices)
        idx[:, 1] = idx[:, 0]
        return _map_layer(st, "down", indices=idx)

    _rewrite(bad_ckpt, dup)
    model, load = load_orbax(bad_ckpt)
    refused(load, model, "repeated index")


@pytest.mark.parametrize(
    ("row", "value", "match"),
    [
        (0, -1, r"layer up: row \(in\) indices run from -1"),
        (1, 12, r"layer up: column \(out\) indices run from \d+ to 12, outside \[0, 12\)"),
        (1, 2**33 + 1, r"to 8589934593"),  # int64: not wrapped into int32 range first
    ],
)
def test_orbax_indices_outside_the_kernel_are_refused_naming_the_file(bad_ckpt, row, value, match):
    def out_of_range(st):
        idx = np.array(st.layers["up"].indices, np.int64)
        idx[row, 0] = value
        return _map_layer(st, "up", indices=idx)

    _rewrite(bad_ckpt, out_of_range)
    model, load = load_orbax(bad_ckpt)
    assert str(bad_ckpt) in str(refused(load, model, match))


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda st: _map_layer(st, "up", indices=-np.array(st.layers["up"].indices)), "outside"),
        (lambda st: _map_layer(st, "down", values=np.full_like(
            np.asarray(st.layers["down"].values), np.nan)), "NaN/inf"),
    ],
)
def test_orbax_to_peft_checks_what_load_adapter_checks(bad_ckpt, tmp_path, edit, match):
    from bridge import orbax_to_peft

    _rewrite(bad_ckpt, edit)
    with pytest.raises(sj.AdapterLoadError, match=match):
        orbax_to_peft(bad_ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.parametrize("field", ["modules_to_save", "target_modules"])
def test_config_lists_of_non_names_are_refused(bad_ckpt, bad_peft, field):
    edit_json(bad_ckpt / META, lambda m: m["config"].__setitem__(field, [1]))
    model, load = load_orbax(bad_ckpt)
    refused(load, model, f"{field} must be names")
    edit_json(bad_peft / CONFIG, lambda c: c.__setitem__(field, [1]))
    model, load = load_peft(bad_peft)
    refused(load, model, f"{CONFIG}: bad SHiRA config: {field} must be names")


def test_save_adapter_never_empties_a_folder_of_other_files(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="holds other files and no shira_adapter.json"):
        sj.save_adapter(adapted(), folder, "first")
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    (folder / "notes.txt").unlink()
    sj.save_adapter(adapted(), folder, "first")  # an empty folder is fine
    sj.save_adapter(adapted(), folder, "first")  # and so is an adapter checkpoint (replaced)
    assert (folder / META).is_file()


def test_orbax_config_r_disagreeing_with_stored_entries_is_refused(bad_ckpt):
    edit_json(bad_ckpt / META, lambda m: m["config"].__setitem__("r", 2))
    model, load = load_orbax(bad_ckpt)
    refused(load, model, "r \\* \\(in \\+ out\\)")


def test_orbax_arrays_of_wrong_shape_are_refused(bad_ckpt):
    _rewrite(bad_ckpt, lambda st: _map_layer(st, "up", values=np.zeros(5, np.float32)))
    model, load = load_orbax(bad_ckpt)
    refused(load, model, "up")


def test_checkpoint_from_another_model_size_is_refused(bad_ckpt):
    model = adapted(hidden=16)
    refused(lambda: sj.load_adapter(model, bad_ckpt, "second"), model, "kernel")


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize("name", ["a\n", "a" * 300, "a" * 101])
def test_bad_adapter_names_are_refused_before_any_file_is_touched(name, tmp_path):
    model = adapted()
    with pytest.raises(ValueError, match="adapter name"):
        sj.save_adapter(model, tmp_path / "ck", name)
    with pytest.raises(ValueError, match="adapter name"):
        save_peft_adapter(model, tmp_path / "peft", name)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- PEFT folders


def _edit_tensors(folder, edit) -> None:
    tensors = load_file(str(folder / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})


def test_peft_nonfinite_values_are_refused_unless_allowed(bad_peft):
    key = "base_model.model.up.shira_weight"
    _edit_tensors(bad_peft, lambda t: t[key].__setitem__(0, np.nan))
    model, load = load_peft(bad_peft)
    refused(load, model, "NaN/inf")
    model, load = load_peft(bad_peft, allow_nonfinite=True)
    load()


def test_peft_f64_values_that_overflow_float32_are_refused(bad_peft):
    def huge(t):
        t["base_model.model.head.weight"] = np.full(
            t["base_model.model.head.weight"].shape, 1e300, np.float64
        )
        t["base_model.model.up.shira_weight"] = (
            t["base_model.model.up.shira_weight"].astype(np.float64) * 1e300
        )

    _edit_tensors(bad_peft, huge)
    model, load = load_peft(bad_peft)
    refused(load, model, "NaN/inf")
    model, load = load_peft(bad_peft, allow_nonfinite=True)
    load()


@pytest.mark.parametrize("sizes", [((48, 12), (64, 12)), ((8, 64), (8, 96))])
def test_peft_adapter_of_another_base_model_is_refused_by_size(sizes, tmp_path):
    """Indices of the smaller model are in range in the larger one; PEFT refuses by size."""
    (h0, i0), (h1, i1) = sizes
    save_peft_adapter(adapted(h0, i0, modules_to_save=False), tmp_path, "first")
    model = adapted(h1, i1, modules_to_save=False)
    err = refused(lambda: load_peft_adapter(model, tmp_path / "first", "second"), model)
    assert "r * (in + out)" in str(err) and WEIGHTS in str(err)


def test_peft_config_r_disagreeing_with_the_arrays_is_refused(bad_peft):
    edit_json(bad_peft / CONFIG, lambda c: c.__setitem__("r", 2))
    model, load = load_peft(bad_peft)
    refused(load, model, "r \\* \\(in \\+ out\\)")


@pytest.mark.parametrize("content", ["[1]", "null", "[" * 200_000, '{"peft_type": 3}'])
def test_peft_config_that_is_not_a_shira_object_is_refused(bad_peft, content):
    (bad_peft / CONFIG).write_text(content)
    model, load = load_peft(bad_peft)
    refused(load, model, CONFIG)


@pytest.mark.parametrize("which", [CONFIG, WEIGHTS])
@pytest.mark.parametrize("kind", ["fifo", "directory", "proc_mem", "dev_zero"])
def test_peft_files_that_are_not_regular_files_are_refused(bad_peft, which, kind):
    path = bad_peft / which
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        path.symlink_to("/proc/self/mem" if kind == "proc_mem" else "/dev/zero")
    model, load = load_peft(bad_peft)
    refused(load, model, which)


def _raw_safetensors(path, tensors) -> None:
    """A safetensors file written by hand: `{key: (dtype string, shape, raw bytes)}`."""
    header, offset, blobs = {"__metadata__": {"format": "pt"}}, 0, []
    for key, (dtype, shape, raw) in tensors.items():
        header[key] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        offset += len(raw)
        blobs.append(raw)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


@pytest.mark.parametrize("dtype", ["F8_E4M3", "F8_E5M2"])
def test_peft_f8_tensors_are_refused(bad_peft, dtype):
    tensors = load_file(str(bad_peft / WEIGHTS))
    raw = {k: (_st_dtype(v), v.shape, v.tobytes()) for k, v in tensors.items()}
    key = "base_model.model.up.shira_weight"
    raw[key] = (dtype, tensors[key].shape, bytes(tensors[key].size))
    _raw_safetensors(bad_peft / WEIGHTS, raw)
    model, load = load_peft(bad_peft)
    refused(load, model, dtype)


def _st_dtype(array: np.ndarray) -> str:
    return {"float32": "F32", "int32": "I32", "float64": "F64"}[array.dtype.name]


@pytest.mark.parametrize(
    "key",
    [
        "base_model.model.__class__.shira_weight",
        "base_model.model.../../x.shira_weight",
        "base_model.model.head.__dict__",
    ],
)
def test_peft_keys_with_bad_paths_are_refused(bad_peft, key):
    _edit_tensors(bad_peft, lambda t: t.__setitem__(key, np.zeros(3, np.float32)))
    model, load = load_peft(bad_peft)
    refused(load, model, "path")


def test_peft_truncated_weights_are_refused(bad_peft):
    data = (bad_peft / WEIGHTS).read_bytes()
    (bad_peft / WEIGHTS).write_bytes(data[: len(data) // 2])
    model, load = load_peft(bad_peft)
    refused(load, model, WEIGHTS)


def test_peft_modules_to_save_shape_mismatch_is_refused(bad_peft):
    _edit_tensors(
        bad_peft,
        lambda t: t.__setitem__("base_model.model.head.weight", np.zeros((4, 9), np.float32)),
    )
    model, load = load_peft(bad_peft)
    refused(load, model, "head.weight")


def test_missing_files_are_adapter_file_not_found(tmp_path, bad_peft):
    model = adapted()
    refused(lambda: load_peft_adapter(model, tmp_path / "nope"), model)
    (bad_peft / WEIGHTS).unlink()
    with pytest.raises(AdapterFileNotFoundError):
        load_peft_adapter(model, bad_peft, "second")
    with pytest.raises(FileNotFoundError, match="not a shira-jax adapter"):
        sj.load_adapter(model, tmp_path, "second")


@pytest.mark.parametrize("name", ["model.safetensors", "shard.safetensors"])
def test_base_weights_symlinked_to_a_device_are_refused(tmp_path, name):
    """HF base weights (a single file or an index shard) that resolve to /proc/self/mem are
    refused before any read, with our error type (reading them would block or read memory)."""
    import bridge

    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    )
    if name != "model.safetensors":
        index = {"weight_map": {"model.embed_tokens.weight": name}}
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    os.symlink("/proc/self/mem", tmp_path / name)
    with pytest.raises(sj.AdapterLoadError, match="pseudo file"):
        bridge.from_pretrained(str(tmp_path))
