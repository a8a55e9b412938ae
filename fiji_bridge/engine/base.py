"""The engine interface: what every ImageJ engine offers fiji-bridge.

An :class:`Engine` owns one JVM with ImageJ in it (in *this* process: the
bridge runs engines in a supervised worker process, never in a producer).
It turns numpy arrays into ImageJ hyperstacks, runs macros on them and
returns a :class:`MacroResult` of plain Python/numpy data. Errors are data:
a failed macro raises :class:`MacroError`, never opens a dialog.

Dimension order: arrays that come back are always ordered ``TZCYX`` (five
dims, singleton axes kept), whatever ImageJ's internal ``CZT`` stack order.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np

from ..components import Calibration

__all__ = [
    "Engine",
    "EngineError",
    "EngineUnavailable",
    "ImageInfo",
    "MacroError",
    "MacroResult",
    "MacroTimeout",
    "Roi",
]

DIMS = "TZCYX"


class EngineError(RuntimeError):
    """The engine itself failed (JVM died, ImageJ could not start)."""


class EngineUnavailable(EngineError):
    """No engine of the requested kind can run here; the message says what is missing."""


class MacroError(Exception):
    """A macro failed. Raised for every kind of macro failure, never a dialog.

    Attributes:
        message: ImageJ's error text (``"Undefined identifier in line 3"``,
            ``"Unrecognized command: \\"Foo\\""``, the text of ``exit("...")``...)
        line: 1-based macro line number when ImageJ reports one, else ``None``
        log: the ImageJ Log window's text up to the failure
        kind: one of ``"syntax"``, ``"command"``, ``"exit"``, ``"exception"``,
            ``"dialog"``, ``"timeout"``, ``"engine"``, ``"argument"``
    """

    def __init__(
        self,
        message: str,
        line: Optional[int] = None,
        log: str = "",
        kind: str = "exception",
    ) -> None:
        self.message = message
        self.line = line
        self.log = log
        self.kind = kind
        where = f" (macro line {line})" if line else ""
        super().__init__(f"{message}{where}")

    def to_dict(self) -> dict:
        return {"message": self.message, "line": self.line, "log": self.log, "kind": self.kind}

    def __reduce__(self) -> tuple:  # pickles with its kind, line and log (engines in child processes)
        return (type(self), (self.message, self.line, self.log, self.kind))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MacroError":
        kind = d.get("kind", "exception")
        klass = MacroTimeout if kind == "timeout" else cls
        return klass(d.get("message", "macro failed"), d.get("line"), d.get("log", ""), kind)


class MacroTimeout(MacroError):
    """The macro ran longer than its ``timeout``."""

    def __init__(self, message: str, line: Optional[int] = None, log: str = "", kind: str = "timeout"):
        super().__init__(message, line, log, "timeout")


@dataclass
class ImageInfo:
    """Metadata of one image a macro produced (its pixels are in ``MacroResult.images``)."""

    title: str
    dims: str = DIMS  # always TZCYX for returned arrays
    shape: tuple[int, ...] = ()
    dtype: str = ""
    calibration: Calibration = field(default_factory=Calibration)
    channel_names: list[str] = field(default_factory=list)
    #: ImageJ's type before conversion, when the pixels had to be converted
    #: (e.g. an RGB image comes back as C=3 uint8)
    converted_from: Optional[str] = None

    def to_dict(self) -> dict:
        return {
            "title": self.title,
            "dims": self.dims,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "calibration": self.calibration.to_dict(),
            "channel_names": list(self.channel_names),
            "converted_from": self.converted_from,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ImageInfo":
        return cls(
            title=d["title"],
            dims=d.get("dims", DIMS),
            shape=tuple(d.get("shape", ())),
            dtype=d.get("dtype", ""),
            calibration=Calibration.from_dict(d.get("calibration")),
            channel_names=list(d.get("channel_names", [])),
            converted_from=d.get("converted_from"),
        )


@dataclass
class Roi:
    """One ImageJ ROI: its ``.roi`` file bytes (readable by ImageJ's RoiDecoder,
    the ``roifile`` package, OMERO importers) and simple polygon coordinates."""

    name: str
    type: str  # ImageJ's type name: "rectangle", "oval", "polygon", "point", ...
    data: bytes  # the ImageJ .roi encoding
    coordinates: np.ndarray  # (N, 2) float x, y of the polygon / points
    position: tuple[int, int, int] = (0, 0, 0)  # (c, z, t), 1-based as ImageJ; 0 = all

    def to_dict(self) -> dict:
        import base64

        return {
            "name": self.name,
            "type": self.type,
            "data": base64.b64encode(self.data).decode("ascii"),
            "coordinates": np.asarray(self.coordinates, dtype=float).tolist(),
            "position": list(self.position),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Roi":
        import base64

        coords = np.asarray(d.get("coordinates", []), dtype=float).reshape(-1, 2)
        return cls(
            name=d["name"],
            type=d["type"],
            data=base64.b64decode(d.get("data", "")),
            coordinates=coords,
            position=tuple(d.get("position", (0, 0, 0))),
        )


@dataclass
class MacroResult:
    """What a macro run produced.

    * ``images``: title -> array ordered TZCYX (every image left open, or the
      ones named as outputs); metadata in ``image_info[title]``
    * ``tables``: table title -> {column name -> 1-D numpy array}; the
      Results table is ``tables["Results"]``; text columns are object arrays
    * ``log``: the Log window's text
    * ``rois``: the ROI Manager's ROIs (and the image's own ROI if any)
    """

    images: dict[str, np.ndarray] = field(default_factory=dict)
    image_info: dict[str, ImageInfo] = field(default_factory=dict)
    tables: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    log: str = ""
    rois: list[Roi] = field(default_factory=list)
    elapsed: float = 0.0
    #: notes about conversions made on the way in (e.g. int32 -> float32)
    notes: list[str] = field(default_factory=list)
    #: a script's ``#@output`` values by name (``run_script``): numbers, strings,
    #: booleans, TZCYX arrays (info in ``image_info``), tables as {column: array}
    outputs: dict[str, Any] = field(default_factory=dict)

    @property
    def results(self) -> dict[str, np.ndarray]:
        """Shortcut for ``tables.get("Results", {})``."""
        return self.tables.get("Results", {})


ImageLike = Union[np.ndarray, Any]  # an ndarray, or an object with .array/.channel_names/.calibration


class Engine(abc.ABC):
    """One ImageJ in this process. Use as a context manager or call close()."""

    #: short name: "imagej1" or "pyimagej"
    name: str = "engine"

    @abc.abstractmethod
    def start(self) -> "Engine":
        """Start the JVM and ImageJ (idempotent). Returns self."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close ImageJ windows and stop helpers (Xvfb). The JVM itself cannot
        be restarted in a process; a closed engine cannot be started again."""

    @property
    @abc.abstractmethod
    def version(self) -> str:
        """ImageJ's version string, e.g. ``"1.53t"``."""

    @abc.abstractmethod
    def run_macro(
        self,
        code_or_path: Union[str, Path],
        image: Optional[ImageLike] = None,
        dims: str = DIMS,
        args: Optional[Union[str, Mapping[str, Any]]] = None,
        dialog_options: Optional[str] = None,
        timeout: Optional[float] = 60,
        *,
        title: Optional[str] = None,
        channel_names: Optional[list[str]] = None,
        calibration: Optional[Calibration] = None,
        outputs: Optional[list[str]] = None,
        keep_state: bool = False,
    ) -> MacroResult:
        """Run an ImageJ macro, optionally on an image, and collect its outputs.

        ``code_or_path``: macro source, or a path to a ``.ijm`` file.
        ``image``: a numpy array whose axes ``dims`` names (any order, any
        subset of T, Z, C, Y, X; Y and X required), or a hyperstack object
        (``.array`` in TZCYX, ``.channel_names``, ``.calibration``). It becomes
        the macro's current image, a real hyperstack (CompositeImage when
        C > 1).
        ``args``: the macro's ``getArgument()`` string, or a mapping that
        fills SciJava ``#@`` parameters / ``key=value`` pairs.
        ``dialog_options``: ImageJ option string for dialogs the macro opens
        itself (``Dialog.show()``); a dialog that gets none fails the run.
        ``outputs``: titles of images to return; default every image open
        at the end. ``keep_state``: do not clear Results/ROI Manager/images
        before the run.
        """

    def run_script(self, code_or_path: Union[str, Path], language: Optional[str] = None,
                   inputs: Optional[Mapping[str, Any]] = None, timeout: Optional[float] = 60, **kw: Any) -> MacroResult:
        """Run a script with ``#@`` inputs; ``result.outputs`` holds its
        ``#@output`` values (see :mod:`fiji_bridge.engine.scripts`)."""
        raise NotImplementedError(f"{self.name} engine runs no scripts")

    def open_image(self, path: Union[str, Path], series: int = 0, timeout: Optional[float] = 300) -> MacroResult:
        """Open an image file as a hyperstack (Bio-Formats on Fiji)."""
        raise NotImplementedError(f"{self.name} engine opens no files")

    def status(self) -> dict:
        """Engine kind and versions (``engine``, ``imagej1``, Fiji: ``imagej2``, ``start``)."""
        return {"engine": self.name, "version": self.version}

    # -- live display (a window per stack), used by the bridge -------------

    def show_stack(
        self,
        key: str,
        array: np.ndarray,
        channel_names: Optional[list[str]] = None,
        calibration: Optional[Calibration] = None,
    ) -> None:
        """Show (or replace the pixels of) the window for stack ``key``;
        ``array`` is TZCYX. Reuses the window when the shape is unchanged."""
        raise NotImplementedError(f"{self.name} engine has no live display")

    def update_plane(self, key: str, t: int, z: int, c: int, plane: np.ndarray) -> None:
        """Write one YX plane into the window of stack ``key`` in place."""
        raise NotImplementedError(f"{self.name} engine has no live display")

    def close_stack(self, key: str) -> None:
        """Close the window of stack ``key`` if one is open."""

    def render(self, key_or_array: Union[str, np.ndarray], **kw: Any) -> np.ndarray:
        """Render a stack as ImageJ shows it (composite, LUTs) to an RGB
        uint8 array (Y, X, 3): for snapshots without a screen."""
        raise NotImplementedError(f"{self.name} engine cannot render")

    # -- context manager ----------------------------------------------------

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
