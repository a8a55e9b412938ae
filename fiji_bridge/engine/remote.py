"""An engine in a child process, used like one in this process.

A process holds one JVM, so a second engine (Fiji next to ImageJ 1, or a
headless Fiji next to a windowed one) needs a process of its own.
:class:`RemoteEngine` starts ``open_engine(kind, **kw)`` in a spawned child
and forwards method calls and attribute reads to it over a pipe; results and
errors (:class:`MacroError` keeps its kind, line and log) come back pickled.
A call that gets no answer within its timeout plus :data:`SLACK` seconds
kills the child and raises :class:`EngineError`. The bridge has its own
worker protocol (:mod:`fiji_bridge.engine_worker`); this is the small
in-Python way, for tests, benchmarks and scripts.
"""

from __future__ import annotations

import multiprocessing as mp
import traceback
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from .base import EngineError

__all__ = ["RemoteEngine", "SLACK"]

#: seconds a call may take beyond its own ``timeout`` (collecting results, a JVM start)
SLACK = 120.0


def _serve(conn: Any, kind: str, kw: dict) -> None:  # in the child
    from . import open_engine

    try:
        engine = open_engine(kind, **kw).start()
    except BaseException as e:  # noqa: BLE001 - the parent gets it
        conn.send(("err", _portable(e)))
        conn.close()
        import os

        os._exit(1)
    conn.send(("ok", engine.name))
    try:
        _loop(conn, engine)
    finally:
        try:
            engine.close()
        finally:
            import os
            import sys

            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)  # the JVM may keep non-daemon threads: leave now


def _loop(conn: Any, engine: Any) -> None:
    while True:
        try:
            op, name, args, kwargs = conn.recv()
        except EOFError:  # the parent went away
            break
        try:
            if op == "close":
                engine.close()
                conn.send(("ok", None))
                break
            value = getattr(engine, name)
            if op == "call":
                value = value(*args, **kwargs)
            elif callable(value):
                conn.send(("callable", None))
                continue
            conn.send(("ok", value))
        except BaseException as e:  # noqa: BLE001
            conn.send(("err", _portable(e)))


def _portable(e: BaseException) -> BaseException:
    """``e`` if it pickles, else an EngineError with its text and trace."""
    import pickle

    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return EngineError(f"{type(e).__name__}: {e}\n{''.join(traceback.format_exception(e))[-2000:]}")


class RemoteEngine:
    """``RemoteEngine("pyimagej", endpoint=fiji_dir).start()``: the engine runs
    in a child process; ``run_macro``, ``status()``, ``version``... are
    forwarded. ``start_timeout``: seconds for the child's JVM to come up."""

    def __init__(self, kind: str = "auto", start_timeout: float = 300.0, **kw: Any) -> None:
        self.kind = kind
        self.kw = kw
        self.start_timeout = start_timeout
        self.name: Optional[str] = None
        self._proc: Any = None
        self._conn: Any = None

    def start(self) -> "RemoteEngine":
        if self._proc is not None:
            return self
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, self.kind, self.kw), daemon=True,
                                 name=f"fiji-bridge-{self.kind}")
        self._proc.start()
        child.close()
        self._conn = parent
        self.name = self._answer(self.start_timeout)
        return self

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc is not None else None

    def _answer(self, timeout: Optional[float]) -> Any:
        if not self._conn.poll(timeout):
            self.kill()
            raise EngineError(f"the {self.kind} engine process gave no answer in {timeout} s and was killed")
        try:
            status, value = self._conn.recv()
        except EOFError:
            self.kill()
            raise EngineError(f"the {self.kind} engine process died") from None
        if status == "err":
            raise value
        return value if status == "ok" else _Callable

    def _request(self, op: str, name: str, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        if self._conn is None:
            raise EngineError("remote engine not started (or closed)")
        kwargs = dict(kwargs or {})
        for key in ("image", "stack"):  # hyperstack objects of any class travel as plain ones
            img = kwargs.get(key)
            if img is not None and not isinstance(img, np.ndarray) and hasattr(img, "array"):
                kwargs[key] = Hyperstack(np.asarray(img.array), list(getattr(img, "channel_names", None) or []),
                                         getattr(img, "calibration", None))
        limit = kwargs.get("timeout", 60)
        self._conn.send((op, name, args, kwargs))
        return self._answer(None if limit is None else float(limit) + SLACK)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        value = self._request("get", name)
        if value is _Callable:
            return lambda *args, **kwargs: self._request("call", name, args, kwargs)
        return value

    def close(self) -> None:
        if self._conn is None:
            return
        try:
            self._conn.send(("close", "", (), {}))
            self._answer(30)
        except Exception:
            pass
        finally:
            if self._proc is not None:
                self._proc.join(15)
            self.kill()

    def kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.is_alive():
            proc.kill()
            proc.join(5)
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> "RemoteEngine":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Hyperstack:
    """A hyperstack object (``.array`` TZCYX, ``.channel_names``, ``.calibration``) that pickles."""

    array: np.ndarray
    channel_names: list = field(default_factory=list)
    calibration: Any = None


class _Callable:  # marker: the attribute is a method
    pass
