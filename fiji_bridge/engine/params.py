"""Macro arguments: ``getArgument()`` strings and SciJava ``#@`` parameters.

Plain ImageJ 1 does not understand SciJava script parameters
(``#@ Double sigma (value=2)``). This module fills them itself: each
``#@ <type> <name> ...`` line becomes ``name = <value>;`` on the same line (so
macro line numbers stay right), with the value from ``args`` or the
parameter's ``value=`` default. Service and image parameters (``#@ ImagePlus
imp``, ``#@ LogService log``) and ``#@output`` lines become blank lines.

This is a minimal, private parser: fiji_bridge.macros has the full one for
the macro library.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

from .base import MacroError

__all__ = ["Param", "apply_args", "format_argument", "inject_dialog_options", "parse_params"]

_LINE = re.compile(
    r"^\s*#@(?P<io>[A-Za-z]*)\s+(?P<type>[\w.\[\]<>]+)\s*(?P<a1>\(.*\))?\s*(?P<name>[A-Za-z_]\w*)?\s*(?P<a2>\(.*\))?\s*$"
)
_ATTR = re.compile(r"""(\w+)\s*=\s*("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|\{[^}]*\}|[^,)]+)""")

_NUMBER_TYPES = {
    "int", "integer", "long", "short", "byte", "double", "float", "number", "bigdecimal", "biginteger",
}
_BOOL_TYPES = {"boolean", "bool"}
_STRING_TYPES = {"string", "file", "char", "character", "colorrgb", "color", "date", "file[]"}


@dataclass
class Param:
    name: str
    type: str
    line: int  # 0-based line index in the macro
    io: str = ""
    attrs: dict[str, str] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """``number``, ``boolean``, ``string``, or ``skip`` (services, images, outputs)."""
        t = self.type.split(".")[-1].lower()
        if self.io.lower() == "output":
            return "skip"
        if t in _NUMBER_TYPES:
            return "number"
        if t in _BOOL_TYPES:
            return "boolean"
        if t in _STRING_TYPES:
            return "string"
        return "skip"

    @property
    def default(self) -> Optional[str]:
        v = self.attrs.get("value")
        if v is None:
            return None
        if len(v) >= 2 and v[0] == v[-1] and v[0] in "\"'":
            return v[1:-1].encode().decode("unicode_escape")
        return v.strip()


def parse_params(code: str) -> list[Param]:
    """The ``#@`` parameter lines of a macro."""
    params = []
    for i, line in enumerate(code.splitlines()):
        if not line.lstrip().startswith("#@"):
            continue
        m = _LINE.match(line)
        if not m or not m.group("name"):
            raise MacroError(f"cannot read script parameter line {i + 1}: {line.strip()!r}", i + 1, kind="argument")
        attrs = {}
        for group in ("a1", "a2"):
            if m.group(group):
                attrs.update({k.lower(): v.strip() for k, v in _ATTR.findall(m.group(group))})
        params.append(Param(m.group("name"), m.group("type"), i, m.group("io"), attrs))
    return params


def _literal(p: Param, value: Any) -> str:
    if p.kind == "boolean":
        if isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0"):
                raise MacroError(f"parameter {p.name!r} is boolean; got {value!r}", p.line + 1, kind="argument")
            value = value.lower() in ("true", "1")
        return "true" if value else "false"
    if p.kind == "number":
        try:
            num = float(value)
        except (TypeError, ValueError):
            raise MacroError(f"parameter {p.name!r} is a number; got {value!r}", p.line + 1, kind="argument") from None
        return repr(int(num)) if num.is_integer() and abs(num) < 2**53 else repr(num)
    text = str(value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


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
      from it (unknown keys are an error).
    * ``args`` a mapping and no ``#@`` lines: ``key=value`` pairs as argument.
    """
    params = parse_params(code)
    mapping: Mapping[str, Any] = args if isinstance(args, Mapping) else {}
    argument = args if isinstance(args, str) else ""
    if args is not None and not isinstance(args, (str, Mapping)):
        raise MacroError(f"args must be a string or a mapping, not {type(args).__name__}", kind="argument")
    if not params:
        if mapping:
            argument = format_argument(mapping)
        return code, argument
    known = {p.name for p in params}
    unknown = sorted(set(mapping) - known)
    if unknown:
        raise MacroError(
            f"unknown parameter(s) {unknown}; the macro declares {sorted(known)}", kind="argument"
        )
    lines = code.splitlines()
    for p in params:
        if p.kind == "skip":
            lines[p.line] = ""
            continue
        if p.name in mapping:
            value: Any = mapping[p.name]
        elif p.default is not None:
            value = p.default
        elif p.kind == "boolean":
            value = False
        else:
            raise MacroError(
                f"parameter {p.name!r} ({p.type}) has no value and no default: pass it in args",
                p.line + 1,
                kind="argument",
            )
        lines[p.line] = f"{p.name} = {_literal(p, value)};"
    return "\n".join(lines), argument


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
