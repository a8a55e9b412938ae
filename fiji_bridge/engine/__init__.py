"""The ImageJ engines behind one interface.

``open_engine()`` picks one: Fiji (the ``pyimagej`` engine: ImageJ2 with the
legacy layer) when FIJI_BRIDGE_IMAGEJ names a Fiji (a Fiji.app directory or a
Maven endpoint), else ImageJ 1 from an ij.jar::

    from fiji_bridge.engine import open_engine, MacroError

    with open_engine() as ij:
        r = ij.run_macro('run("Measure");', image=array, dims="YX")
        r.tables["Results"]["Mean"]
"""

from __future__ import annotations

import os
from typing import Any

from .base import (
    DIMS,
    Engine,
    EngineError,
    EngineUnavailable,
    ImageInfo,
    MacroError,
    MacroResult,
    MacroTimeout,
    Roi,
)

__all__ = [
    "DIMS",
    "Engine",
    "EngineError",
    "EngineUnavailable",
    "ImageInfo",
    "ImageJ1Engine",
    "MacroError",
    "MacroResult",
    "MacroTimeout",
    "PyImageJEngine",
    "Roi",
    "open_engine",
]

KINDS = ("auto", "imagej1", "pyimagej", "fiji")  # "fiji" is another name for "pyimagej"


def open_engine(kind: str = "auto", **kw: Any) -> Engine:
    """A new, not yet started engine (``with open_engine() as ij:`` starts it).

    ``kind``: ``"auto"`` (PyImageJ when FIJI_BRIDGE_IMAGEJ is set, else
    ImageJ 1), ``"imagej1"`` or ``"pyimagej"``. Keywords go to the engine:
    ``display=True`` shows live stacks as windows; ImageJ 1 takes
    ``ij_jar=``; Fiji ``endpoint=``, ``headless=``, ``start=`` ("auto",
    "pyimagej", "gateway") and ``extra_jars=``; both ``xvfb=`` and
    ``java_options=``.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown engine kind {kind!r}; choose one of {KINDS}")
    if kind == "auto":
        kind = "pyimagej" if os.environ.get("FIJI_BRIDGE_IMAGEJ") else "imagej1"
    if kind in ("pyimagej", "fiji"):
        from .pyimagej import PyImageJEngine

        return PyImageJEngine(**kw)
    from .imagej1 import ImageJ1Engine

    return ImageJ1Engine(**kw)


def __getattr__(name: str) -> Any:  # lazy: importing the package starts nothing
    if name == "ImageJ1Engine":
        from .imagej1 import ImageJ1Engine

        return ImageJ1Engine
    if name == "PyImageJEngine":
        from .pyimagej import PyImageJEngine

        return PyImageJEngine
    raise AttributeError(name)
