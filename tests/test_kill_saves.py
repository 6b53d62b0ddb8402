"""Saves killed by SIGKILL: the target always loads as the old or the new version, whole, and
the next save recovers and cleans up. Real child processes are killed (not mocks):

* at random moments of a save loop (the kill lands anywhere: while staging, between the
  journal and the renames, between the renames, while cleaning up);
* exactly before each `os.replace` of one save, one after the other (every step of the
  commit protocol), so no step is left to chance.

Starting Python with jax and orbax costs seconds, so one "zygote" process imports them once and
forks each child (the children initialize jax's CPU backend themselves, after the fork).
"""

from __future__ import annotations

import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bridge import peft
from shira_jax import atomic, checkpoint

ROOT = Path(__file__).resolve().parent.parent
SHAPE = (8, 12)  # one layer "up", r=1: nnz = 20
FORMATS = ("orbax", "peft")

ZYGOTE = r"""
import json, os, signal, sys
import numpy as np
from shira_jax import atomic, checkpoint
from shira_jax.config import ShiraConfig
from shira_jax.state import AdapterState, LayerState
from bridge import peft

IDX = np.stack(np.divmod(np.arange(0, 96, 96 // 20)[:20], 12)).astype(np.int32)

def state(v):
    cfg = ShiraConfig(r=1, target_modules=["up"], random_seed=v, init_weights=False)
    layer = LayerState(IDX, np.full(20, float(v), np.float32), (8, 12), 1)
    return AdapterState(cfg, {"up": layer})

def save(fmt, target, v):
    if fmt == "orbax":
        checkpoint.write_state(target, state(v), "default")
    elif fmt == "peft-x":  # a named adapter: PEFT's subfolder target/x
        peft.write_state(target, state(v), "x")
    else:
        peft.write_state(target, state(v), "default")

def say(**msg):
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()

def child(cmd):
    if cmd["mode"] == "step":  # SIGKILL ourselves just before the k-th os.replace
        real, calls = os.replace, [0]
        def replace(*args, **kwargs):
            calls[0] += 1
            if calls[0] == cmd["k"]:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        os.replace = replace
        save(cmd["fmt"], cmd["target"], cmd["base"])
        return
    v = cmd["base"]
    save(cmd["fmt"], cmd["target"], v)  # warm up (jax backend, orbax) before the kills
    with open(cmd["log"], "a") as log:
        log.write(f"{v}\n")
    say(go=os.getpid())
    while True:
        v += 1
        save(cmd["fmt"], cmd["target"], v)
        with open(cmd["log"], "a") as log:
            log.write(f"{v}\n")

say(ready=True)
for line in sys.stdin:
    cmd = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            child(cmd)
        except BaseException as err:
            sys.stderr.write(f"child failed: {err!r}\n")
            code = 1
        os._exit(code)
    say(pid=pid)
    _, status = os.waitpid(pid, 0)
    say(done=pid, status=status)
"""


class Zygote:
    def __init__(self) -> None:
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        assert self.read()["ready"]

    def read(self, timeout: float = 120.0) -> dict:
        """The next message; the limit only turns a hang into a failure (never reached)."""
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, "the zygote stopped answering"
        line = self.proc.stdout.readline()
        assert line, "the zygote died"
        return json.loads(line)

    def run(self, **cmd) -> int:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.read()["pid"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


def loaded_version(fmt: str, target: Path) -> int:
    """The version a target holds, checking that it is whole (config and arrays agree)."""
    if fmt == "orbax":
        _, st = checkpoint.read_state(target)
    else:
        _, st = peft.read_state(target, kernel_shapes={"up": SHAPE})
    values = np.asarray(st.layers["up"].values)
    version = st.config.random_seed
    assert values.shape == (20,) and np.all(values == version), (version, values[:3])
    return int(version)


def save(fmt: str, target: Path, version: int) -> None:
    from shira_jax.config import ShiraConfig
    from shira_jax.state import AdapterState, LayerState

    idx = np.stack(np.divmod(np.arange(0, 96, 96 // 20)[:20], 12)).astype(np.int32)
    cfg = ShiraConfig(r=1, target_modules=["up"], random_seed=version, init_weights=False)
    st = AdapterState(
        cfg, {"up": LayerState(idx, np.full(20, float(version), np.float32), SHAPE, 1)}
    )
    if fmt == "orbax":
        checkpoint.write_state(target, st, "default")
    else:
        peft.write_state(target, st, "default")


def expected_names(fmt: str, target: Path) -> list[str]:
    if fmt == "orbax":
        return [target.name]
    return [peft.CONFIG_NAME, peft.WEIGHTS_NAME]


def listing(fmt: str, target: Path) -> list[str]:
    folder = target.parent if fmt == "orbax" else target
    return sorted(p.name for p in folder.iterdir())


def check_after_kill(fmt: str, target: Path, allowed: set[int], next_version: int) -> int:
    got = loaded_version(fmt, target)  # the load itself recovers
    assert got in allowed, (got, allowed)
    save(fmt, target, next_version)  # the next save works and cleans every leftover
    assert loaded_version(fmt, target) == next_version
    assert listing(fmt, target) == sorted(expected_names(fmt, target))
    return got


def _last_logged(log: Path, default: int) -> int:
    lines = log.read_text().split() if log.exists() else []
    return int(lines[-1]) if lines else default


@pytest.mark.parametrize("fmt", FORMATS)
def test_kill_at_random_moments_of_a_save_loop(zygote, fmt, tmp_path):
    rng = random.Random(f"kills-{fmt}")  # reproducible delays
    target = tmp_path / "out" / "adapter"
    save(fmt, target, 1)
    previous, outcomes = 1, []
    kills = 16  # with the step kills below, 20+ real SIGKILLs per format
    for i in range(kills):
        base, log = 1000 * (i + 1), tmp_path / f"log{i}"
        pid = zygote.run(mode="loop", fmt=fmt, target=str(target), base=base, log=str(log))
        assert zygote.read()["go"] == pid
        os.sched_yield()
        if rng.random() < 0.9:  # mostly within the first saves, sometimes later
            select.select([], [], [], rng.uniform(0.0, 0.15))
        else:
            select.select([], [], [], rng.uniform(0.15, 0.6))
        os.kill(pid, signal.SIGKILL)
        done = zygote.read()
        assert done["done"] == pid and os.WIFSIGNALED(done["status"])
        last = _last_logged(log, previous)
        got = check_after_kill(fmt, target, {last, last + 1}, base - 1)
        outcomes.append("new" if got == last + 1 else "old")
        previous = base - 1
    assert len(outcomes) == kills
    print(f"{fmt}: random kills {kills}: {outcomes.count('old')} old, {outcomes.count('new')} new")


@pytest.mark.parametrize("fmt", FORMATS)
def test_kill_before_each_rename_of_a_save(zygote, fmt, tmp_path):
    """SIGKILL just before the 1st, 2nd, ... os.replace of one save, until a save finishes."""
    target = tmp_path / "out" / "adapter"
    save(fmt, target, 1)
    outcomes = []
    for k in range(1, 30):
        version = 100 + k
        pid = zygote.run(mode="step", fmt=fmt, target=str(target), base=version, k=k)
        done = zygote.read()
        assert done["done"] == pid
        if not os.WIFSIGNALED(done["status"]):  # the save finished: every step was covered
            assert os.WEXITSTATUS(done["status"]) == 0
            assert loaded_version(fmt, target) == version
            break
        got = check_after_kill(fmt, target, {1, version}, 1)
        outcomes.append(got == version)
    else:
        pytest.fail("a save never finished")
    print(f"{fmt}: step kills {len(outcomes)}, old/new {outcomes}")
    # a kill before the commit point keeps the old version, after it the new one
    assert outcomes and not outcomes[0] and outcomes[-1], outcomes
    assert len(outcomes) >= 3  # journal write, at least one swap rename, and more


@pytest.mark.parametrize("fmt", FORMATS)
def test_symlinks_at_temporary_names_are_unlinked_never_followed(fmt, tmp_path):
    target = tmp_path / "out" / "adapter"
    save(fmt, target, 1)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("precious")
    if fmt == "orbax":
        planted = [atomic.sibling(target, kind) for kind in ("tmp", "old", "swap")]
        planted.append(target.parent / f".{target.name}.old-0123abcd")  # an earlier version's
    else:
        planted = [target / f".{name}.new-shira" for name in expected_names(fmt, target)]
        planted.append(target / atomic.FILES_JOURNAL)
    for link in planted:
        link.symlink_to(outside if fmt == "orbax" else outside / "keep.txt")
    save(fmt, target, 2)
    assert loaded_version(fmt, target) == 2
    assert listing(fmt, target) == sorted(expected_names(fmt, target))
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]
    assert (outside / "keep.txt").read_text() == "precious"


def test_target_missing_with_both_hidden_copies_recovers_on_load(tmp_path):
    """The state a kill between the two renames of a directory swap leaves: the load rolls the
    complete new copy forward; without a journal it would roll back to the old one."""
    target = tmp_path / "adapter"
    save("orbax", target, 1)
    save("orbax", tmp_path / "staged", 2)
    os.replace(target, atomic.sibling(target, "old"))
    os.replace(tmp_path / "staged", atomic.sibling(target, "tmp"))
    atomic.sibling(target, "swap").write_text(json.dumps({"new": ".adapter.tmp-shira"}))
    assert loaded_version("orbax", target) == 2
    assert not atomic.sibling(target, "tmp").exists()
    shutil.rmtree(atomic.sibling(target, "old"))  # a load leaves the old copy to the next save
    os.replace(target, atomic.sibling(target, "old"))  # no journal: the old copy comes back
    assert loaded_version("orbax", target) == 2
    save("orbax", target, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_first_named_save_killed_after_its_commit_loads_as_the_new_adapter(zygote, tmp_path):
    """A folder with a default adapter at its root, and a first save of adapter "x" (into the
    subfolder x/) killed before each rename: once x/ holds the commit journal or a file, a
    load of "x" gives the new adapter (the subfolder is recovered before it is chosen), never
    the root's; before that, the root's, as PEFT reads a folder without the subfolder."""
    target = tmp_path / "out"
    save("peft", target, 1)
    seen = []
    for k in range(1, 30):
        version = 200 + k
        pid = zygote.run(mode="step", fmt="peft-x", target=str(target), base=version, k=k)
        done = zygote.read()
        assert done["done"] == pid
        sub = target / "x"
        started = sub.is_dir() and any(
            (sub / name).exists() for name in (atomic.FILES_JOURNAL, peft.CONFIG_NAME)
        )
        _, st = peft.read_state(target, "x", kernel_shapes={"up": SHAPE})
        got = int(st.config.random_seed)
        assert got == (version if started else 1), (k, started, got)
        seen.append(started)
        if not os.WIFSIGNALED(done["status"]):
            break
        shutil.rmtree(sub, ignore_errors=True)  # the next try is a first save again
    assert True in seen and False in seen, seen
