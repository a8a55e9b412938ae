"""The PyImageJ engine: a Fiji (Fiji.app directory or Maven endpoint) through
``imagej.init``, with the legacy layer on.

Only start-up differs from the ImageJ 1 engine: macros run through the same
``ij.*`` classes (the legacy layer carries ImageJ 1), so running, error
capture, result collection, transfer and display are all inherited.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

from .base import EngineUnavailable
from .imagej1 import ImageJ1Engine
from .java import configure_offline, find_java_home

__all__ = ["PyImageJEngine"]


class PyImageJEngine(ImageJ1Engine):
    """Fiji via PyImageJ. ``endpoint``: a Fiji.app directory or Maven
    coordinates such as ``sc.fiji:fiji:2.15.0`` (default: FIJI_BRIDGE_IMAGEJ).

    Headless (``mode="headless"``) unless ``display=True``: Fiji's legacy
    layer patches ImageJ 1's dialogs for headless use, so no Xvfb is needed.
    """

    name = "pyimagej"

    def __init__(
        self,
        endpoint: Optional[str] = None,
        display: bool = False,
        xvfb: Optional[bool] = None,
        java_options: Sequence[str] = (),
    ) -> None:
        super().__init__(None, display=display, xvfb=xvfb if display else False, java_options=java_options)
        self.endpoint = endpoint or os.environ.get("FIJI_BRIDGE_IMAGEJ")
        self.ij: Any = None  # the PyImageJ gateway

    def _start_jvm(self) -> None:
        if not self.endpoint:
            raise EngineUnavailable(
                "the PyImageJ engine needs a Fiji: set FIJI_BRIDGE_IMAGEJ to a Fiji.app directory "
                "or a Maven endpoint such as sc.fiji:fiji:2.15.0"
            )
        looks_like_dir = "/" in self.endpoint or self.endpoint.startswith(".")
        if looks_like_dir and not Path(self.endpoint).is_dir():
            raise EngineUnavailable(f"FIJI_BRIDGE_IMAGEJ={self.endpoint} is not a directory")
        try:
            import imagej
            import scyjava
        except ImportError as e:  # pragma: no cover - a dependency
            raise EngineUnavailable(f"pyimagej is not installed: {e}") from e
        configure_offline(find_java_home())
        scyjava.config.add_options(self.java_options)
        if self.display:
            self._start_display()
        mode = "interactive" if self.display else "headless"
        self.ij = imagej.init(self.endpoint, mode=mode, add_legacy=True)
