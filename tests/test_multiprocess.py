"""`shira-jax finetune` on 2 real processes (JAX distributed runtime, gloo CPU collectives).

Two processes x 4 simulated CPU devices on localhost train the tiny Llama of test_finetune
with `--mesh data=2,model=4 --coordinator 127.0.0.1:PORT --num-processes 2 --process-id I`,
and are compared with one process holding all 8 devices on the same mesh:

* the per-step losses agree (tolerance below);
* a run stopped after step 2 leaves a checkpoint that both processes wrote into (each its
  own orbax shard files, `ocdbt.process_0` / `ocdbt.process_1`), under the same fixed
  temporary names, with nothing left behind;
* `--resume` from it continues on 2 processes, and on 1 process with 1 device (another
  mesh), with the losses of the uninterrupted 8-device run.

Each run is a separate interpreter from the one that wrote its input (the device count and the
distributed runtime are fixed at start-up), except that the 2-process resume runs in the two
interpreters of the stopped run, after its `finetune.run` has returned and the checkpoint has
been copied aside (starting jax, the distributed runtime and the compiler twice more was about a
quarter of this file's CPU time); the 1-process resume, in this interpreter, is the one from a
process that never saw the run. This file is also the worker,
`python test_multiprocess.py RESULT STOP [RESUMED] -- FLAGS`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from xla_flags import SLOW_COLLECTIVES

STEPS = 4
STOP = 2  # the interrupted run stops (and checkpoints) after this step
# Loss tolerance. Both sides run the same partitioned program on the same 2x4 mesh; only the
# order of float32 additions in cross-device reductions differs (an all-reduce inside one
# process vs gloo between two; one device adds in yet another order). Each loss is a mean of
# 64 token losses of about 6 nats from logits that are sums over <= 128 products; a different
# order changes such a float32 sum by a few units of 2**-24 relative per addition (~1e-6
# relative at worst over 128 terms), and four clipped Adam steps carry that into the weights
# without amplifying it much. Seen here: at most one float32 ulp of the loss (8e-8 relative);
# 2e-5 relative leaves room for other reduction orders (other XLA versions, 1 device).
LOSS_RTOL = 2e-5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(n_devices: int, cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices}" + SLOW_COLLECTIVES,
        JAX_PLATFORMS="cpu",
        JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
        # the resumed run reuses the interrupted run's compiled programs (about half its time)
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
        PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")]),
    )
    return env


def _run(
    work: Path,
    name: str,
    flags: list[str],
    *,
    processes: int,
    devices: int,
    stop=0,
    then_resume=None,
):
    """Start `processes` workers (each with `devices` CPU devices), wait, return their
    results (process 0 first).

    With `then_resume` (a callable), the stopped workers wait once their run has returned and
    written its results: `then_resume()` is called (here: copy the checkpoint aside), then the
    same workers run again with `--resume`; returns (stopped results, resumed results)."""
    dist = []
    if processes > 1:
        dist = ["--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", str(processes)]
    procs = []
    for i in range(processes):
        result = work / f"{name}.{i}.json"
        argv = [sys.executable, __file__, str(result), str(stop)]
        argv += [str(work / f"{name}.resumed.{i}.json")] if then_resume else []
        argv += ["--", *flags, *dist]
        argv += ["--process-id", str(i)] if dist else []
        log = open(work / f"{name}.{i}.log", "w")  # noqa: SIM115 - closed below
        procs.append(
            (
                subprocess.Popen(
                    argv,
                    env=_env(devices, work / "jax_cache"),
                    stdin=subprocess.PIPE,
                    stdout=log,
                    stderr=log,
                ),
                log,
            )
        )

    def failed(i: int) -> str:
        return f"{name} process {i} failed:\n{(work / f'{name}.{i}.log').read_text()[-6000:]}"

    try:
        if then_resume:
            deadline = time.monotonic() + 300  # only turns a hang into a failure
            for i, (proc, _) in enumerate(procs):
                while not (work / f"{name}.{i}.json").exists():
                    assert proc.poll() is None, failed(i)
                    assert time.monotonic() < deadline, failed(i)
                    time.sleep(0.1)
            then_resume()
            for proc, _ in procs:
                proc.stdin.write(b"resume\n")
                proc.stdin.flush()
        for i, (proc, _) in enumerate(procs):
            proc.stdin.close()
            assert proc.wait(timeout=300) == 0, failed(i)
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
            log.close()
    results = [json.loads((work / f"{name}.{i}.json").read_text()) for i in range(processes)]
    if not then_resume:
        return results
    resumed = [
        json.loads((work / f"{name}.resumed.{i}.json").read_text()) for i in range(processes)
    ]
    return results, resumed


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from conftest import make_text, make_tiny_model_dir

    work = tmp_path_factory.mktemp("multiprocess")
    text = make_text(200, seed=1)
    (work / "corpus.txt").write_text(text)
    model_dir = make_tiny_model_dir(work / "model", text=text)
    flags = ["--model", str(model_dir), "--data", str(work / "corpus.txt"), "--r", "4"]
    flags += ["--steps", str(STEPS), "--batch-size", "4", "--seq-len", "16", "--lr", "2e-2"]
    flags += ["--eval-batches", "1", "--dtype", "float32", "--no-peft", "--no-progress"]
    mesh = ["--mesh", "data=2,model=4"]
    out = {"work": work, "flags": flags}
    out["single"] = _run(work, "single", [*flags, *mesh, "--out", str(work / "single")],
                         processes=1, devices=8)[0]  # fmt: skip
    two = [*flags, *mesh, "--out", str(work / "two")]

    def copy_stopped():  # as the stopped run left it, for the 1-process resume
        shutil.copytree(work / "two", work / "one", symlinks=True)

    out["stopped"], out["resumed"] = _run(
        work, "stopped", two, processes=2, devices=4, stop=STOP, then_resume=copy_stopped
    )
    return out


def test_two_processes_match_one(runs):
    ref = runs["single"]["train_loss"]
    assert len(ref) == STEPS and runs["single"]["processes"] == 1
    stopped, resumed = runs["stopped"], runs["resumed"]
    for proc in (*stopped, *resumed):
        assert proc["processes"] == 2 and proc["devices"] == 8 and proc["local_devices"] == 4
    assert [p["process"] for p in stopped] == [0, 1]
    for p in stopped:
        assert p["interrupted"] and len(p["train_loss"]) == STOP
        np.testing.assert_allclose(p["train_loss"], ref[:STOP], rtol=LOSS_RTOL)
    for p in resumed:  # the history of the checkpoint, then steps STOP+1 .. STEPS
        assert not p["interrupted"]
        np.testing.assert_allclose(p["train_loss"], ref, rtol=LOSS_RTOL)
    metrics = json.loads((runs["work"] / "two" / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["mesh"] == {"data": 2, "model": 4}


def test_checkpoint_written_by_both_processes_under_the_same_names(runs):
    ckpt = runs["work"] / "one" / "checkpoint"  # as the stopped 2-process run left it
    assert json.loads((ckpt / "state.json").read_text())["step"] == STOP
    for arrays in (ckpt / "optimizer", ckpt / "adapter" / "arrays"):
        assert {p.name for p in arrays.glob("ocdbt.process_*")} == {
            "ocdbt.process_0",
            "ocdbt.process_1",
        }, sorted(p.name for p in arrays.iterdir())
    for run in ("stopped", "resumed"):
        p0, p1 = runs[run]
        assert p0["orbax_saves"] == p1["orbax_saves"] and p0["orbax_saves"], (p0, p1)
        assert any(".checkpoint.tmp-shira" in s for s in p0["orbax_saves"])
    for folder in ("one", "two"):
        hidden = [p.name for p in (runs["work"] / folder).rglob(".*")]
        assert not hidden, f"leftover temporary files in {folder}: {hidden}"


def test_resume_in_one_process_on_another_mesh(runs, tmp_path):
    """The 2-process checkpoint resumes on 1 device (no mesh) with the same losses."""
    from shira_jax.app import cli, finetune
    from shira_jax.app.flags import from_namespace

    out = tmp_path / "one"
    shutil.copytree(runs["work"] / "one", out, symlinks=True)
    flags = [*runs["flags"], "--out", str(out), "--resume"]
    cfg = from_namespace(
        finetune.FinetuneConfig, cli.build_parser().parse_args(["finetune", *flags])
    )
    result = finetune.run(cfg, log=lambda _: None, progress=False)
    ref = runs["single"]["train_loss"]
    np.testing.assert_allclose(result.metrics["train_loss"], ref, rtol=LOSS_RTOL)
    assert result.metrics["steps_done"] == STEPS and "mesh" not in result.metrics


def test_process_flags_are_checked_before_loading():
    from shira_jax.app.options import FinetuneConfig, FinetuneError, distributed_args, validate

    bad = [
        ({"coordinator": "127.0.0.1:1234"}, "missing: --num-processes, --process-id"),
        ({"coordinator": "nohost", "num_processes": 2, "process_id": 0}, "HOST:PORT"),
        ({"coordinator": "h:1", "num_processes": 0, "process_id": 0}, "--num-processes"),
        ({"coordinator": "h:1", "num_processes": 2, "process_id": 2}, "--process-id must"),
        ({"coordinator": "h:1", "num_processes": 2, "process_id": 0}, "needs --mesh"),
    ]
    for kw, message in bad:
        with pytest.raises(FinetuneError, match=message):
            validate(FinetuneConfig(data=__file__, **kw))
    good = FinetuneConfig(coordinator="h:1", num_processes=2, process_id=1, mesh="data=2")
    assert distributed_args(good) == {
        "coordinator_address": "h:1",
        "num_processes": 2,
        "process_id": 1,
    }


# ----------------------------------------------------------------------------- worker


def _worker(result_path: str, stop: int, flags: list[str], resumed_path: str | None) -> None:
    """One process of a run: `shira-jax finetune FLAGS`, stopped (as Ctrl-C) after step
    `stop` if > 0; records where orbax wrote, then the losses, in `result_path`. With
    `resumed_path`: then waits for a line on stdin and runs `FLAGS --resume` to the end,
    recording in `resumed_path`."""
    import jax
    import orbax.checkpoint as ocp

    from shira_jax.app import cli, finetune
    from shira_jax.app.flags import from_namespace

    saves: list[str] = []
    save = ocp.PyTreeCheckpointer.save

    def recording_save(self, directory, *args, **kw):
        saves.append(str(directory))
        return save(self, directory, *args, **kw)

    ocp.PyTreeCheckpointer.save = recording_save

    def run(flags: list[str], stop: int, path: str) -> None:
        saves.clear()
        cfg = from_namespace(
            finetune.FinetuneConfig, cli.build_parser().parse_args(["finetune", *flags])
        )
        result = finetune.run(
            cfg, progress=False, on_step=lambda step, _: stop > 0 and step >= stop
        )
        record = {
            "train_loss": result.metrics["train_loss"],
            "interrupted": result.interrupted,
            "process": jax.process_index(),
            "processes": jax.process_count(),
            "devices": jax.device_count(),
            "local_devices": jax.local_device_count(),
            "orbax_saves": list(saves),
        }
        tmp = Path(path + ".tmp")  # the test waits for the file: it appears whole
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)

    run(flags, stop, result_path)
    if resumed_path is not None:
        assert sys.stdin.readline() == "resume\n"
        run([*flags, "--resume"], 0, resumed_path)


if __name__ == "__main__":
    dash = sys.argv.index("--")
    _worker(
        sys.argv[1],
        int(sys.argv[2]),
        sys.argv[dash + 1 :],
        sys.argv[3] if dash > 3 else None,
    )
