"""SciJava scripts (``#@`` inputs, ``#@output`` outputs) on the engines.

``run_script(code_or_path, language=None, inputs=None, timeout=60)``:

* the language comes from ``language=`` ("ijm", "bsh", "clj", "java",
  "groovy", "py", "js", a name such as "BeanShell", or an extension) or the
  file's extension; plain code without either is an ImageJ macro;
* ImageJ macros run on the engine's own runner (dialogs guarded, every image
  and table collected), ``#@`` inputs bound as in ``run_macro``, and the
  ``#@output`` variables read from the interpreter afterwards;
* other languages run through Fiji's SciJava ScriptService
  (:func:`run_scijava`), with every input given (missing required ones are a
  ``MacroError`` of kind ``"argument"`` before anything runs: a SciJava
  harvester would otherwise ask for them in a dialog); a ``#@ ImagePlus`` /
  ``Dataset`` input is the ``image=``/``stack=`` given;
* outputs come back as Python values (:func:`to_python`): numbers, strings,
  booleans; images as TZCYX arrays (their info in ``image_info``); tables as
  columns.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np

from .base import ImageInfo, MacroError, MacroTimeout

__all__ = ["IJM", "language_of", "read_script", "run_scijava", "to_python"]

IJM = "ijm"

#: extension -> language, for the names and extensions users give
_ALIASES = {
    "ijm": IJM, "imagej macro": IJM, "ij1 macro": IJM, "macro": IJM, "txt": IJM,
    "bsh": "bsh", "beanshell": "bsh",
    "clj": "clj", "clojure": "clj",
    "java": "java",
    "groovy": "groovy",
    "py": "py", "python": "py", "jython": "py",
    "js": "js", "javascript": "js", "ecmascript": "js",
    "rb": "rb", "ruby": "rb", "jruby": "rb",
    "scala": "scala",
    "r": "r",
}
_SUFFIXES = tuple(f".{k}" for k in ("ijm", "txt", "bsh", "clj", "java", "groovy", "py", "js", "rb", "scala", "r"))


def read_script(code_or_path: Union[str, Path]) -> tuple[str, Optional[str]]:
    """(source, extension or None): a Path, a one-line string naming an
    existing script file, or the code itself."""
    if isinstance(code_or_path, Path):
        return code_or_path.read_text(), code_or_path.suffix.lstrip(".").lower() or None
    text = str(code_or_path)
    one = text.strip()
    if "\n" not in one and one.lower().endswith(_SUFFIXES):
        p = Path(one).expanduser()
        if p.is_file():
            return p.read_text(), p.suffix.lstrip(".").lower()
        raise MacroError(f"script file not found: {p}", kind="argument")
    return text, None


def language_of(language: Optional[str], extension: Optional[str]) -> str:
    """The normalised language (an extension such as ``"bsh"``), from
    ``language=`` first, else the file's extension, else ImageJ macro."""
    given = (language or extension or IJM).strip().lower().lstrip(".")
    return _ALIASES.get(given, given)


# -- Java -> Python ------------------------------------------------------------------


def to_python(value: Any, name: str, gateway: Any = None) -> tuple[Any, Optional[ImageInfo]]:
    """A script output as Python data, with an ImageInfo for images."""
    from .collect import table_columns
    from .transfer import J, from_imageplus

    if value is None:
        return None, None
    if not hasattr(value, "getClass"):  # already Python
        for t in (bool, int, float, str):
            if isinstance(value, t):
                return t(value), None
        return value, None
    Boolean, Number, CharSequence = J("java.lang.Boolean"), J("java.lang.Number"), J("java.lang.CharSequence")
    if isinstance(value, Boolean):
        return bool(value.booleanValue()), None
    if isinstance(value, Number):
        d = float(value.doubleValue())
        integral = value.getClass().getName() in ("java.lang.Integer", "java.lang.Long", "java.lang.Short", "java.lang.Byte")
        return (int(value.longValue()) if integral else d), None
    if isinstance(value, CharSequence):
        return str(value), None
    ImagePlus = J("ij.ImagePlus")
    if not isinstance(value, ImagePlus) and gateway is not None and _is_image(value):
        value = gateway.convert().convert(value, ImagePlus)
    if isinstance(value, ImagePlus):
        arr, info = from_imageplus(value, name)
        return arr, info
    if isinstance(value, J("ij.measure.ResultsTable")):
        return table_columns(value), None
    if isinstance(value, J("org.scijava.table.Table")):
        cols = {}
        for i in range(int(value.getColumnCount())):
            col = value.get(i)
            vals = [to_python(col.get(r), name)[0] for r in range(int(value.getRowCount()))]
            header = str(value.getColumnHeader(i) or f"C{i + 1}")
            cols[header] = np.array(vals, dtype=object if any(isinstance(v, str) for v in vals) else np.float64)
        return cols, None
    if value.getClass().isArray():
        return [to_python(v, name, gateway)[0] for v in value], None
    return str(value.toString()), None


def _is_image(value: Any) -> bool:
    from .transfer import J

    for cls in ("net.imagej.Dataset", "net.imagej.display.ImageDisplay", "net.imglib2.RandomAccessibleInterval"):
        try:
            if isinstance(value, J(cls)):
                return True
        except Exception:  # pragma: no cover - class missing
            continue
    return False


# -- SciJava ---------------------------------------------------------------------------


_LINE = re.compile(r"(?:at )?line(?: number)?[: ]+(\d+)", re.I)


def _available_languages(scripts: Any) -> list[str]:
    out = []
    for lang in scripts.getLanguages():
        try:
            out.append(f"{lang.getLanguageName()} (.{', .'.join(str(e) for e in lang.getExtensions())})")
        except Exception:  # pragma: no cover - a broken plugin
            continue
    return sorted(out)


def _error_listener(errors: list) -> Any:
    """A SciJava LogListener that keeps ERROR messages (level 1) in ``errors``."""
    from jpype import JImplements, JOverride

    @JImplements("org.scijava.log.LogListener")
    class _Listener:
        @JOverride
        def messageLogged(self, message: Any) -> None:
            try:
                if int(message.level()) <= 1:
                    errors.append(message)
            except Exception:  # pragma: no cover - never fail in SciJava's logger
                pass

    return _Listener()


def _script_error(message: Any) -> MacroError:
    """The MacroError for a logged script failure: the innermost exception's
    message, and the script line it names."""
    thrown = message.throwable()
    text = str(message.text() or "")
    while thrown is not None:
        text = str(thrown.getMessage() or thrown.getClass().getName())
        name = str(thrown.getClass().getName()).rsplit(".", 1)[-1]
        if "ScriptException" in name or thrown.getCause() is None:
            break
        thrown = thrown.getCause()
    else:
        name = "error"
    m = _LINE.search(text)
    return MacroError(f"{name}: {text.strip()}", int(m.group(1)) if m else None, kind="exception")


def run_scijava(
    gateway: Any,
    code: str,
    language: str,
    inputs: Mapping[str, Any],
    timeout: Optional[float],
) -> tuple[dict[str, Any], dict[str, ImageInfo], float]:
    """Run ``code`` in ``language`` with every input in ``inputs`` (Java
    objects or plain values); return (outputs, image infos, elapsed).

    Raises :class:`MacroError`: kind ``"argument"`` for an unknown language,
    ``"exception"`` with the script's line for a script error,
    ``"timeout"`` past ``timeout`` (the script's thread is interrupted).
    """
    import time

    from .transfer import J

    scripts = gateway.script()
    lang = scripts.getLanguageByExtension(language) or scripts.getLanguageByName(language)
    if lang is None:
        raise MacroError(
            f"unknown script language {language!r} in this Fiji (its jars may be missing); available: "
            + "; ".join(_available_languages(scripts)),
            kind="argument",
        )
    ext = str(lang.getExtensions()[0]) if lang.getExtensions() else language
    HashMap = J("java.util.HashMap")
    jinputs = HashMap()
    for k, v in inputs.items():
        jinputs.put(k, v)
    t0 = time.perf_counter()
    errors: list[Any] = []
    listener = _error_listener(errors)
    logs = gateway.log()
    logs.addLogListener(listener)  # ScriptModule logs a script's exception instead of throwing it
    TimeUnit = J("java.util.concurrent.TimeUnit")
    try:
        future = scripts.run(f"fiji_bridge_script.{ext}", code, True, jinputs)
        module = future.get(int(1000 * timeout), TimeUnit.MILLISECONDS) if timeout is not None else future.get()
        if errors:
            raise _script_error(errors[0])
    except MacroError:
        raise
    except Exception as e:  # Java exceptions arrive as Python exceptions
        name = e.getClass().getName() if hasattr(e, "getClass") else type(e).__name__
        if name.endswith("TimeoutException"):
            future.cancel(True)
            raise MacroTimeout(f"script ran longer than {timeout} s (interrupted)") from None
        cause = e
        while hasattr(cause, "getCause") and cause.getCause() is not None and name.endswith(
            ("ExecutionException", "InvocationTargetException")
        ):
            cause = cause.getCause()
            name = cause.getClass().getName()
        message = str(cause.getMessage() if hasattr(cause, "getMessage") else cause) or name
        m = _LINE.search(message)
        raise MacroError(f"{name.rsplit('.', 1)[-1]}: {message}", int(m.group(1)) if m else None,
                         kind="exception") from None
    finally:
        logs.removeLogListener(listener)
    elapsed = time.perf_counter() - t0
    if module is None:
        raise MacroError("the script did not run (SciJava returned no module)", kind="exception")
    if getattr(module, "isCanceled", None) is not None and module.isCanceled():
        reason = module.getCancelReason()
        raise MacroError(f"the script was canceled: {reason}" if reason else "the script was canceled",
                         kind="dialog" if reason and "input" in str(reason).lower() else "exception")
    outputs: dict[str, Any] = {}
    infos: dict[str, ImageInfo] = {}
    for item in module.getInfo().outputs():
        key = str(item.getName())
        if key == "result" and module.getOutput(key) is None:
            continue  # SciJava's implicit return value
        value, info = to_python(module.getOutput(key), key, gateway)
        outputs[key] = value
        if info is not None:
            infos[key] = info
    return outputs, infos, elapsed
