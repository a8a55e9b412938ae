"""Shared fixtures. Test modules own their own fixtures; add here only what
several modules need, and only by appending."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: real microscopy images (see ../shared/data/README.md); never copied into the repo
DATA_DIR = Path(os.environ.get("FIJI_BRIDGE_TEST_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.skip(f"real test images not found at {DATA_DIR} (set FIJI_BRIDGE_TEST_DATA)")
    return DATA_DIR


def free_port_pair() -> int:
    """A port P such that P and P+1000 are both free on 127.0.0.1 right now."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p + 1000 >= 65535:
            continue
        try:
            with socket.socket() as s2:
                s2.bind(("127.0.0.1", p + 1000))
            return p
        except OSError:
            continue
    raise RuntimeError("no free port pair")


@pytest.fixture
def free_port() -> int:
    return free_port_pair()


@pytest.fixture(scope="session")
def ij():
    """One ImageJ 1 engine in the test process (a process holds one JVM)."""
    from fiji_bridge.engine import open_engine

    try:
        eng = open_engine("imagej1")
        eng.start()
    except Exception as e:  # pragma: no cover - the reason is in the skip
        pytest.skip(f"ImageJ 1 engine unavailable: {e}")
    yield eng
    eng.close()
