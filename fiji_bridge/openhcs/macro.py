"""Running OpenHCS 0.8.6's ``run_macro`` in the bridge's engine.

The same contract as OpenHCS's own ``FijiMacroExecutionRequest.execute``
(openhcs 0.8.6): the macro file named by ``macro_path`` (read as UTF-8) runs
with the request's inputs written as files into a fresh temporary folder,
whose path is passed in the variable named ``directory_variable`` together
with ``macro_variables``; afterwards every ``output_filenames`` entry is read
back from that folder, in order, and a missing one is an error
(``ImageJ macro did not produce declared outputs: (...)``). The folder is
removed afterwards, whatever happened.

Variables reach the macro as OpenHCS's PyImageJ ``run_script`` passes them:
as SciJava script parameters (``#@ String Directory``), so only the names the
macro declares are bound (the engine turns ``#@`` lines into assignments for
ImageJ 1). Files: ``.tif``/``.tiff`` (tifffile, any numeric dtype; a 3-D
array is a stack of grey planes, unless it is 8-bit Y x X x 3|4: RGB) and ``.png`` (Pillow; 8- or 16-bit). Languages: ImageJ macro
(``.ijm``, as OpenHCS's suffix rule names it; no suffix means ``ijm``).

:class:`LoopMacros` hands runs from the receiver's thread to the bridge's
event loop (which owns the engine) and waits for their end.
"""

from __future__ import annotations

import concurrent.futures
import tempfile
import threading
from pathlib import Path, PurePath
from typing import Any, Callable, Mapping

import numpy as np

from .macro_wire import MacroRequest

__all__ = ["LoopMacros", "MacroRunError", "MacroRunner", "execute", "read_image", "write_image"]

#: ``run(code, args, timeout)`` runs ImageJ macro ``code`` with ``#@`` args; raises :class:`MacroRunError`
MacroRunner = Callable[[str, Mapping[str, str], float], None]

_LANGUAGES = ("ijm", "txt")


class MacroRunError(RuntimeError):
    """A ``run_macro`` request could not be carried out; the text says why."""


# ---------------------------------------------------------------- files


def write_image(path: Path, image: np.ndarray) -> None:
    """Write ``image`` as the file kind its suffix names (TIFF or PNG)."""
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        import tifffile

        # a leading axis of 3 or 4 would be taken for colour samples: planes are
        # grey unless the array is 8-bit Y x X x RGB(A)
        rgb = image.ndim == 3 and image.shape[-1] in (3, 4) and image.dtype == np.uint8
        tifffile.imwrite(path, image, photometric="rgb" if rgb else "minisblack")
    elif suffix == ".png":
        from PIL import Image

        if image.ndim != 2 or image.dtype not in (np.uint8, np.uint16):
            raise MacroRunError(f"{path.name}: PNG holds 2-D uint8 or uint16 images, got {image.dtype} {list(image.shape)}")
        Image.fromarray(np.ascontiguousarray(image)).save(path)
    else:
        raise MacroRunError(f"{path.name}: fiji-bridge passes run_macro images as .tif, .tiff or .png files")


def read_image(path: Path) -> np.ndarray:
    """Read the TIFF or PNG at ``path`` (native byte order)."""
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        import tifffile

        data = tifffile.imread(path)
    elif suffix == ".png":
        from PIL import Image

        with Image.open(path) as im:
            data = np.asarray(im)
    else:
        raise MacroRunError(f"{path.name}: fiji-bridge reads run_macro outputs from .tif, .tiff or .png files")
    return np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("="))


# ---------------------------------------------------------------- one run


def _native(path: PurePath) -> Path:
    if not isinstance(path, type(PurePath())):  # PurePosixPath here, PureWindowsPath on Windows
        raise MacroRunError(f"macro_path {str(path)!r} is a path of another operating system")
    return Path(path)


def _declared_args(code: str, variables: Mapping[str, str]) -> dict[str, str]:
    """The variables the macro declares as ``#@`` parameters (as SciJava binds them)."""
    from ..macros import MacroParseError, parse_parameters

    try:
        names = {p.name for p in parse_parameters(code) if p.is_argument}
    except MacroParseError:
        return dict(variables)  # the engine reports the bad header
    return {k: v for k, v in variables.items() if k in names}


def execute(request: MacroRequest, run: MacroRunner, *, timeout: float) -> tuple[np.ndarray, ...]:
    """Carry out ``request`` with ``run``; its outputs, in declared order."""
    path = _native(request.macro_path)
    language = path.suffix.lower().removeprefix(".") or "ijm"
    if language not in _LANGUAGES:
        raise MacroRunError(
            f"{path.name}: this bridge runs ImageJ macros (.ijm); a .{language} script needs "
            "Fiji's script engine (OpenHCS's own Fiji viewer)"
        )
    try:
        code = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MacroRunError(f"ImageJ macro file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MacroRunError(f"cannot read the ImageJ macro {path}: {exc}") from None
    with tempfile.TemporaryDirectory(prefix="fiji_bridge_openhcs_macro_") as tmp:
        folder = Path(tmp)
        for name, image in zip(request.input_filenames, request.input_images, strict=True):
            write_image(folder / name, image)
        variables = {request.directory_variable: str(folder), **request.macro_variables}
        run(code, _declared_args(code, variables), timeout)
        missing = tuple(n for n in request.output_filenames if not (folder / n).is_file())
        if missing:
            raise MacroRunError(f"ImageJ macro did not produce declared outputs: {missing!r}.")
        return tuple(read_image(folder / n) for n in request.output_filenames)


# ---------------------------------------------------------------- to the loop


class LoopMacros:
    """Macro runs handed from other threads to the thread that owns the engine.

    :meth:`run` (a :data:`MacroRunner`, called on the receiver's worker
    thread) queues a run and blocks until it ends; the bridge's loop calls
    :meth:`drain` with ``submit(body, done)``, which starts an engine
    ``run_macro`` job on ``body`` and calls ``done(reply)`` with the
    worker's reply (``{"ok": True, ...}`` or ``{"ok": False, "error": {...}}``).
    """

    #: beyond the macro's own timeout: the queue ahead and an engine (re)start
    GRACE_S = 300.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[tuple[dict, concurrent.futures.Future]] = []

    def __bool__(self) -> bool:
        return bool(self._pending)

    def run(self, code: str, args: Mapping[str, str], timeout: float) -> None:
        body: dict[str, Any] = {"code": code, "args": dict(args), "timeout": float(timeout), "outputs": []}
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._pending.append((body, fut))
        try:
            reply = fut.result(timeout + self.GRACE_S)
        except concurrent.futures.TimeoutError:
            raise MacroRunError(f"the bridge's engine did not run the macro within {timeout + self.GRACE_S:.0f} s") from None
        if not reply.get("ok"):
            err = reply.get("error") or {}
            raise MacroRunError(str(err.get("message") or "the macro failed"))

    def drain(self, submit: Callable[[dict, Callable[[dict], None]], None]) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for body, fut in pending:
            try:
                submit(body, lambda reply, fut=fut: fut.done() or fut.set_result(reply))
            except Exception as exc:  # noqa: BLE001 - the waiting sender hears of it
                fut.set_result({"ok": False, "error": {"message": f"{type(exc).__name__}: {exc}"}})

    def cancel(self, reason: str) -> None:
        """Fail every queued run (the bridge is closing)."""
        with self._lock:
            pending, self._pending = self._pending, []
        for _, fut in pending:
            fut.set_result({"ok": False, "error": {"message": reason}})
