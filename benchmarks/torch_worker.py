"""Run PyTorch contenders in a child process, driven step by step from the benchmark process.

JAX (XLA's thread pool) and torch (OpenMP) in one process interfere on a small machine: each
runtime's idle threads spin while the other computes. The child process gets the same number
of threads, `OMP_WAIT_POLICY=PASSIVE` (idle OpenMP threads sleep), and blocks on a pipe
between calls, so interleaved A B A B timing compares the two runtimes fairly.

Example:
    >>> from benchmarks.torch_worker import TorchWorker
    >>> worker = TorchWorker("benchmarks.torch_worker:_example", {"n": 3})
    >>> worker.call("double"), worker.names
    (6, ['double'])
    >>> worker.close()
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

__all__ = ["TorchWorker"]


class TorchWorker:
    """A child process holding named callables built by `builder(**kwargs)` ("module:function"
    returning a dict name -> callable); `call(name)` runs one and returns its result."""

    def __init__(self, builder: str, kwargs: dict[str, Any]) -> None:
        down_r, down_w = os.pipe()  # parent -> child
        up_r, up_w = os.pipe()  # child -> parent
        env = dict(os.environ)
        env.update(OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS=str(os.cpu_count() or 1))
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "from benchmarks.torch_worker import _main; _main()",
             str(down_r), str(up_w)],
            pass_fds=(down_r, up_w),
            env=env,
        )
        os.close(down_r)
        os.close(up_w)
        self._send = Connection(down_w, readable=False)
        self._recv = Connection(up_r, writable=False)
        self._send.send((builder, kwargs))
        try:
            reply = self._recv.recv()
        except EOFError:
            reply = "the worker process exited"
        if isinstance(reply, str):
            self.close()
            raise RuntimeError(f"torch worker failed to start:\n{reply}")
        self.names: list[str] = reply

    def call(self, name: str) -> Any:
        self._send.send(name)
        kind, value = self._recv.recv()
        if kind == "error":
            raise RuntimeError(f"torch worker failed in {name!r}:\n{value}")
        return value

    def fn(self, name: str) -> Callable[[], Any]:
        return lambda: self.call(name)

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._send.send(None)
            except (BrokenPipeError, OSError):
                pass
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.terminate()
                self._proc.wait()
        self._send.close()
        self._recv.close()

    def __enter__(self) -> TorchWorker:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _main() -> None:
    recv = Connection(int(sys.argv[1]), writable=False)
    send = Connection(int(sys.argv[2]), readable=False)
    try:
        builder, kwargs = recv.recv()
        module, name = builder.split(":")
        fns = getattr(importlib.import_module(module), name)(**kwargs)
        send.send(list(fns))
    except BaseException:  # noqa: BLE001 - reported to the parent
        send.send(traceback.format_exc())
        return
    while True:
        try:
            name = recv.recv()
        except EOFError:
            return
        if name is None:
            return
        try:
            send.send(("ok", fns[name]()))
        except BaseException:  # noqa: BLE001 - reported to the parent
            send.send(("error", traceback.format_exc()))


def _example(n: int) -> dict[str, Callable[[], Any]]:
    return {"double": lambda: 2 * n}
