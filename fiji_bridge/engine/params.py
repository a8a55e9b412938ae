"""Macro arguments: ``getArgument()`` strings and SciJava ``#@`` parameters.

Plain ImageJ 1 does not understand SciJava script parameters
(``#@ Double sigma (value=2)``). The engine binds them before running, with
the one parser fiji-bridge has (:mod:`fiji_bridge.macros`): each
``#@ <type> <name> ...`` line becomes ``name = <value>;`` on the same line (so
macro line numbers stay right), the value from ``args`` or the parameter's
``value=`` default, checked against the declared type and limits. Service,
image and output parameters become comments.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional, Union

from .base import MacroError

__all__ = ["apply_args", "format_argument", "inject_dialog_options"]


def format_argument(args: Mapping[str, Any]) -> str:
    """``{"sigma": 2, "name": "a b"}`` -> ``"sigma=2 name=[a b]"`` (ImageJ's option syntax)."""
    out = []
    for k, v in args.items():
        if isinstance(v, bool):
            v = "true" if v else "false"
        text = str(v)
        out.append(f"{k}=[{text}]" if (" " in text or not text) else f"{k}={text}")
    return " ".join(out)


def apply_args(code: str, args: Optional[Union[str, Mapping[str, Any]]]) -> tuple[str, str]:
    """The macro code to run and its ``getArgument()`` string.

    * ``args`` a string: it is the argument; ``#@`` lines take their defaults.
    * ``args`` a mapping and the macro has ``#@`` parameters: they are filled
      from it; unknown, ill-typed or missing required values raise
      :class:`MacroError` with kind ``"argument"`` before anything runs.
    * ``args`` a mapping and no ``#@`` lines: ``key=value`` pairs as argument.
    """
    from ..macros import MacroArgumentError, MacroParseError, bind, parse_parameters

    if args is not None and not isinstance(args, (str, Mapping)):
        raise MacroError(f"args must be a string or a mapping, not {type(args).__name__}", kind="argument")
    mapping: Mapping[str, Any] = args if isinstance(args, Mapping) else {}
    argument = args if isinstance(args, str) else ""
    try:
        if not parse_parameters(code):
            return code, (format_argument(mapping) if mapping else argument)
        return bind(code, mapping), argument
    except (MacroArgumentError, MacroParseError) as e:
        line = getattr(e, "line", None)
        raise MacroError(str(e), line if isinstance(line, int) else None, kind="argument") from None


_DIALOG_CREATE = re.compile(r"\bDialog\.create(NonBlocking)?\s*\(")


def inject_dialog_options(code: str, options: str) -> str:
    """Hand ``options`` to every dialog the macro builds itself.

    ImageJ gives macro options to a GenericDialog when it is constructed, and
    each ``run(...)`` clears the thread's options when it ends; so the options
    are set again right before each ``Dialog.create(`` (on the same line, line
    numbers unchanged).
    """
    literal = '"' + options.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return _DIALOG_CREATE.sub(lambda m: f'call("ij.Macro.setOptions", {literal}); {m.group(0)}', code)
