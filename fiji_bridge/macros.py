"""The macro library: discovery, SciJava ``#@`` parameters, argument checking.

Library macros are ImageJ macro (``.ijm``) files with SciJava script
parameter headers, so the same file runs in Fiji (whose script engine reads
``#@`` lines and asks for the values) and, through fiji-bridge, in plain
ImageJ 1 (which does not: :func:`bind` turns the headers into ordinary
assignments first)::

    #@ Integer (label="Nuclei channel", value=1, min=1, description="...") channel
    #@ String (choices={"Otsu", "Default"}, value="Otsu") threshold_method
    #@ Boolean watershed

A header line is ``#@[input|output|both] <Type> [(<key>=<value>, ...)] <name>``.
Values are quoted strings, numbers, ``true``/``false`` or ``{a, b}`` lists.
Scalar types (String, numbers, Boolean, File) are *arguments*; images
(``ImagePlus``, ``Dataset``...) and services are filled by the host and are
not arguments.

Arguments are checked against the header before anything runs: an unknown
name, a value of the wrong type, a value outside ``choices`` or
``min``/``max``, or a missing required value raises
:class:`MacroArgumentError` naming the parameter.

The library lives in the repository's top-level ``macros/`` folder (also
installed as the package data folder ``fiji_bridge/_macros``); extra folders
may be named in ``FIJI_BRIDGE_MACRO_PATH`` (``os.pathsep``-separated), which
come first.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

__all__ = [
    "Macro",
    "MacroArgumentError",
    "MacroNotFound",
    "MacroParseError",
    "Parameter",
    "bind",
    "check_args",
    "library",
    "library_dirs",
    "macros_command",
    "parse_parameters",
    "resolve",
]

MACRO_SUFFIX = ".ijm"


class MacroParseError(ValueError):
    """A ``#@`` header line is malformed; the message names the line."""


class MacroArgumentError(ValueError):
    """Arguments do not match the macro's ``#@`` parameters.

    ``kind`` is ``"argument"`` (like :class:`~fiji_bridge.engine.base.MacroError`'s
    kind for argument problems), ``parameter`` the offending name when one."""

    kind = "argument"

    def __init__(self, message: str, parameter: Optional[str] = None) -> None:
        self.parameter = parameter
        self.message = message
        super().__init__(message)


class MacroNotFound(LookupError):
    """No library macro or file has that name."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "macro not found"


# --------------------------------------------------------------------------- parameters

#: SciJava type name (lower case) -> our kind
_KINDS = {
    "string": "string",
    "char": "string",
    "character": "string",
    "int": "int",
    "integer": "int",
    "long": "int",
    "short": "int",
    "byte": "int",
    "biginteger": "int",
    "float": "float",
    "double": "float",
    "number": "float",
    "bigdecimal": "float",
    "boolean": "boolean",
    "file": "file",
    "imageplus": "image",
    "dataset": "image",
    "img": "image",
    "imgplus": "image",
    "imagedisplay": "image",
    "randomaccessibleinterval": "image",
}
#: kinds a caller passes as arguments
ARGUMENT_KINDS = ("string", "int", "float", "boolean", "file")


@dataclass(frozen=True)
class Parameter:
    """One ``#@`` script parameter.

    ``kind`` is ``string``, ``int``, ``float``, ``boolean``, ``file``,
    ``image`` or ``other`` (a service, a colour...); ``java_type`` the type as
    written. ``default`` is the typed ``value=`` (``None`` when absent).
    ``line`` is the 1-based line of the header in the macro.
    """

    name: str
    java_type: str
    kind: str
    io: str = "input"  # input | output | both
    default: Any = None
    label: str = ""
    description: str = ""
    choices: tuple[Any, ...] = ()
    min: Optional[float] = None
    max: Optional[float] = None
    style: str = ""
    required: bool = True
    line: int = 0
    attributes: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_argument(self) -> bool:
        """Whether callers set this parameter (a scalar input)."""
        return self.io in ("input", "both") and self.kind in ARGUMENT_KINDS

    @property
    def effective_default(self) -> Any:
        """The value used when no argument is given (``None``: required)."""
        if self.default is not None:
            return self.default
        if self.choices:
            return self.choices[0]
        if self.kind == "boolean":
            return False
        return None

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "type": self.java_type,
            "kind": self.kind,
            "io": self.io,
            "default": self.effective_default,
            "label": self.label,
            "description": self.description,
            "choices": list(self.choices),
            "min": self.min,
            "max": self.max,
            "required": self.is_argument and self.effective_default is None,
        }


_HEADER_RE = re.compile(r"^\s*#@\s*(?P<rest>.*)$")
_IO_RE = re.compile(r"^(input|output|both)\b\s*", re.I)
_TYPE_RE = re.compile(r"^(?P<type>[A-Za-z_][\w.$]*(?:\[\])?)\s*")
_NAME_RE = re.compile(r"^(?P<name>[A-Za-z_]\w*)\b")


def parse_parameters(code: str) -> list[Parameter]:
    """The ``#@`` parameters of a macro, in order. Raises :class:`MacroParseError`."""
    params: list[Parameter] = []
    seen: set[str] = set()
    for lineno, line in enumerate(code.splitlines(), 1):
        m = _HEADER_RE.match(line)
        if not m:
            continue
        p = _parse_header(m.group("rest"), lineno, line)
        if p.name in seen:
            raise MacroParseError(f"line {lineno}: parameter {p.name!r} is declared twice")
        seen.add(p.name)
        params.append(p)
    return params


def _parse_header(rest: str, lineno: int, line: str) -> Parameter:
    where = f"line {lineno}: bad #@ parameter {line.strip()!r}"
    io = "input"
    m = _IO_RE.match(rest)
    if m:
        io = m.group(1).lower()
        rest = rest[m.end():]
    m = _TYPE_RE.match(rest)
    if not m:
        raise MacroParseError(f"{where}: expected a type, e.g. '#@ Double sigma'")
    java_type = m.group("type")
    rest = rest[m.end():]
    attrs: dict[str, Any] = {}
    if rest.startswith("("):
        body, rest = _split_parenthesised(rest, where)
        attrs = _parse_attributes(body, where)
    rest = rest.strip()
    m = _NAME_RE.match(rest)
    if not m:
        raise MacroParseError(f"{where}: expected a variable name after the type")
    name = m.group("name")
    # SciJava also takes the attributes after the name: #@ Double sigma (value=2)
    tail = rest[m.end():].strip()
    if tail.startswith("(") and not attrs:
        body, tail = _split_parenthesised(tail, where)
        attrs = _parse_attributes(body, where)
    tail = tail.strip()
    if tail and not tail.startswith("//"):
        raise MacroParseError(f"{where}: unexpected {tail!r} after the parameter")
    kind = _KINDS.get(java_type.split(".")[-1].lower(), "other")
    p = Parameter(
        name=name,
        java_type=java_type,
        kind=kind,
        io=io,
        label=str(attrs.get("label", "")),
        description=str(attrs.get("description", "")),
        style=str(attrs.get("style", "")),
        required=bool(attrs.get("required", True)),
        line=lineno,
        attributes=attrs,
    )
    choices = attrs.get("choices", ())
    if choices and not isinstance(choices, (list, tuple)):
        choices = (choices,)
    try:
        bounds = {k: (None if attrs.get(k) is None else float(attrs[k])) for k in ("min", "max")}
        typed_choices = tuple(_convert(p, c) for c in choices)
        default = None if "value" not in attrs else _convert(p, attrs["value"])
    except MacroArgumentError as e:
        raise MacroParseError(f"{where}: {e.message}") from None
    except (TypeError, ValueError):
        raise MacroParseError(f"{where}: min/max must be numbers") from None
    return Parameter(**{**p.__dict__, "choices": typed_choices, "default": default, **bounds})


def _split_parenthesised(s: str, where: str) -> tuple[str, str]:
    depth, quote = 0, None
    for i, ch in enumerate(s):
        if quote:
            if ch == "\\":
                continue
            if ch == quote and s[i - 1] != "\\":
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch in "({":
            depth += 1
        elif ch in ")}":
            depth -= 1
            if depth == 0:
                return s[1:i], s[i + 1:]
    raise MacroParseError(f"{where}: unbalanced parentheses or quotes")


_TOKEN_RE = re.compile(
    r"""\s*(?:
        (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
      | (?P<punct>[=,{}])
      | (?P<word>[^\s=,{}"']+)
    )""",
    re.X,
)


def _tokens(body: str, where: str) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    pos = 0
    body = body.strip()
    while pos < len(body):
        m = _TOKEN_RE.match(body, pos)
        if not m or m.end() == pos:
            raise MacroParseError(f"{where}: cannot read {body[pos:]!r}")
        pos = m.end()
        if m.group("str") is not None:
            raw = m.group("str")[1:-1]
            out.append(("str", re.sub(r"\\(.)", r"\1", raw)))
        elif m.group("punct"):
            out.append(("punct", m.group("punct")))
        else:
            out.append(("word", m.group("word")))
        while pos < len(body) and body[pos].isspace():
            pos += 1
    return out


def _literal(tok: tuple[str, Any]) -> Any:
    kind, v = tok
    if kind == "str":
        return v
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(v)
    except ValueError:
        pass
    try:
        return float(v)
    except ValueError:
        return v  # a bare word (e.g. style=slider)


def _parse_attributes(body: str, where: str) -> dict[str, Any]:
    toks = _tokens(body, where)
    attrs: dict[str, Any] = {}
    i = 0
    while i < len(toks):
        kind, key = toks[i]
        if kind != "word":
            raise MacroParseError(f"{where}: expected an attribute name, got {key!r}")
        if i + 1 >= len(toks) or toks[i + 1] != ("punct", "="):
            raise MacroParseError(f"{where}: expected '=' after {key!r}")
        i += 2
        if i >= len(toks):
            raise MacroParseError(f"{where}: attribute {key!r} has no value")
        if toks[i] == ("punct", "{"):
            items: list[Any] = []
            i += 1
            while i < len(toks) and toks[i] != ("punct", "}"):
                if toks[i] != ("punct", ","):
                    items.append(_literal(toks[i]))
                i += 1
            if i >= len(toks):
                raise MacroParseError(f"{where}: unclosed '{{' in {key!r}")
            attrs[key] = tuple(items)
            i += 1
        elif toks[i][0] == "punct":
            raise MacroParseError(f"{where}: attribute {key!r} has no value")
        else:
            attrs[key] = _literal(toks[i])
            i += 1
        if i < len(toks):
            if toks[i] != ("punct", ","):
                raise MacroParseError(f"{where}: expected ',' between attributes")
            i += 1
    return attrs


# --------------------------------------------------------------------------- arguments

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _convert(p: Parameter, value: Any) -> Any:
    """``value`` as the parameter's kind; raises :class:`MacroArgumentError`."""

    def bad(expected: str) -> MacroArgumentError:
        return MacroArgumentError(
            f"argument {p.name}={value!r}: expected {expected} ({p.java_type} parameter)", p.name
        )

    k = p.kind
    if k == "boolean":
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise bad("true or false")
    if k == "int":
        if isinstance(value, bool):
            raise bad("an integer")
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                try:
                    f = float(value.strip())
                except ValueError:
                    raise bad("an integer") from None
                if f.is_integer():
                    return int(f)
        raise bad("an integer")
    if k == "float":
        if isinstance(value, bool):
            raise bad("a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise bad("a number") from None
        try:  # numpy scalars
            return float(value)
        except (TypeError, ValueError):
            raise bad("a number") from None
    if k in ("string", "file"):
        if isinstance(value, (str, os.PathLike)):
            return os.fspath(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad("a string")
    raise MacroArgumentError(f"parameter {p.name} ({p.java_type}) cannot be set as an argument", p.name)


def check_args(params: Sequence[Parameter], args: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """Typed values for every argument parameter: the given ones checked and
    converted, defaults for the rest. Raises :class:`MacroArgumentError` for an
    unknown name, a wrong type, a value outside choices/min/max, or a missing
    required value -- before anything runs."""
    args = dict(args or {})
    settable = {p.name: p for p in params if p.is_argument}
    unknown = sorted(set(args) - set(settable))
    if unknown:
        known = ", ".join(settable) or "none"
        raise MacroArgumentError(
            f"unknown argument{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
            f"this macro's parameters are: {known}",
            unknown[0],
        )
    values: dict[str, Any] = {}
    for name, p in settable.items():
        if name in args:
            v = _convert(p, args[name])
        else:
            v = p.effective_default
            if v is None:
                if p.kind == "string" and not p.required:
                    v = ""
                else:
                    raise MacroArgumentError(
                        f"missing argument {name} ({p.java_type}"
                        + (f": {p.description or p.label}" if (p.description or p.label) else "")
                        + f"); pass it as {name}=VALUE",
                        name,
                    )
        if p.choices and v not in p.choices:
            raise MacroArgumentError(
                f"argument {name}={v!r}: not one of {', '.join(map(str, p.choices))}", name
            )
        if p.kind in ("int", "float"):
            if isinstance(v, float) and math.isnan(v):
                raise MacroArgumentError(f"argument {name}: NaN is not allowed", name)
            if p.min is not None and v < p.min:
                raise MacroArgumentError(f"argument {name}={v}: below the minimum {_num(p.min)}", name)
            if p.max is not None and v > p.max:
                raise MacroArgumentError(f"argument {name}={v}: above the maximum {_num(p.max)}", name)
        values[name] = v
    return values


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def ijm_literal(value: Any) -> str:
    """A Python value as an ImageJ macro literal."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "parseFloat(\"Infinity\")" if value > 0 else "parseFloat(\"-Infinity\")"
        return repr(value)
    s = str(value)
    s = s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return f'"{s}"'


def bind(code: str, args: Optional[Mapping[str, Any]] = None) -> str:
    """The macro with its ``#@`` headers replaced by plain assignments, so it
    runs in ImageJ 1. Arguments are checked first (:func:`check_args`). Line
    numbers are kept: each header line becomes one assignment (or a comment
    for host-filled parameters), so errors point at the right line."""
    params = parse_parameters(code)
    values = check_args(params, args)
    by_line = {p.line: p for p in params}
    out = []
    for lineno, line in enumerate(code.splitlines(), 1):
        p = by_line.get(lineno)
        if p is None:
            out.append(line)
        elif p.name in values:
            out.append(f"{p.name} = {ijm_literal(values[p.name])}; // {line.strip()}")
        else:
            out.append(f"// {line.strip()}")
    text = "\n".join(out)
    return text + ("\n" if code.endswith("\n") else "")


# --------------------------------------------------------------------------- the library


@dataclass(frozen=True)
class Macro:
    """A macro with its header read: what ``fiji-bridge run``/``batch`` run."""

    name: str
    path: Optional[Path]
    code: str
    parameters: tuple[Parameter, ...]
    description: str = ""
    #: titles of the images the macro leaves open (its "Output images:" line)
    output_images: tuple[str, ...] = ()
    #: names of the tables it fills (its "Output tables:" line)
    output_tables: tuple[str, ...] = ()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.code.encode("utf-8")).hexdigest()

    @property
    def arguments(self) -> list[Parameter]:
        return [p for p in self.parameters if p.is_argument]

    def check(self, args: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
        """Typed argument values (see :func:`check_args`)."""
        return check_args(self.parameters, args)

    def bind(self, args: Optional[Mapping[str, Any]] = None) -> str:
        """The runnable ImageJ 1 code with ``args`` bound (see :func:`bind`)."""
        return bind(self.code, args)

    @property
    def summary(self) -> str:
        """The description's first paragraph, on one line."""
        first = self.description.split("\n\n", 1)[0] if self.description else ""
        return " ".join(first.split())


def _description(code: str) -> str:
    """The leading ``//`` comment block, up to the Input:/Output lines."""
    lines: list[str] = []
    for line in code.splitlines():
        s = line.strip()
        if not s.startswith("//"):
            if lines or s.startswith("#@"):
                break
            continue
        text = s[2:].strip()
        if re.match(r"^(Input|Output images|Output tables)\s*:", text):
            break
        lines.append(text)
    return "\n".join(lines).strip()


def _declared(code: str, what: str) -> tuple[str, ...]:
    for line in code.splitlines():
        m = re.match(rf"^\s*//\s*Output {what}\s*:(.*)$", line)
        if m:
            return tuple(re.findall(r'"([^"]+)"', m.group(1)))
    return ()


def load_macro(code: str, *, name: str = "inline", path: Optional[Path] = None) -> Macro:
    """A :class:`Macro` from source text."""
    return Macro(
        name=name,
        path=path,
        code=code,
        parameters=tuple(parse_parameters(code)),
        description=_description(code),
        output_images=_declared(code, "images"),
        output_tables=_declared(code, "tables"),
    )


def library_dirs() -> list[Path]:
    """Folders searched for library macros, first match wins."""
    dirs: list[Path] = []
    for d in os.environ.get("FIJI_BRIDGE_MACRO_PATH", "").split(os.pathsep):
        if d:
            dirs.append(Path(d).expanduser())
    here = Path(__file__).resolve().parent
    dirs.append(here / "_macros")  # installed package data
    dirs.append(here.parent / "macros")  # the source tree
    seen: set[Path] = set()
    out = []
    for d in dirs:
        if d.is_dir():
            key = d.resolve()
            if key not in seen:
                seen.add(key)
                out.append(d)
    return out


def library() -> dict[str, Path]:
    """Library macro name -> file, over :func:`library_dirs`."""
    found: dict[str, Path] = {}
    for d in library_dirs():
        for f in sorted(d.glob(f"*{MACRO_SUFFIX}")):
            found.setdefault(f.stem, f)
    return dict(sorted(found.items()))


def resolve(name_or_path: Union[str, os.PathLike]) -> Macro:
    """A library macro by name (``"nuclei_count"`` or ``"nuclei_count.ijm"``),
    a ``.ijm`` file by path, or macro source text (anything with a newline).
    Raises :class:`MacroNotFound` with the available names."""
    s = os.fspath(name_or_path)
    if "\n" in s:
        return load_macro(s)
    p = Path(s).expanduser()
    if p.is_file():
        return load_macro(p.read_text(encoding="utf-8"), name=p.stem, path=p.resolve())
    lib = library()
    key = s[: -len(MACRO_SUFFIX)] if s.endswith(MACRO_SUFFIX) else s
    if key in lib and ("/" not in s and os.sep not in s):
        f = lib[key]
        return load_macro(f.read_text(encoding="utf-8"), name=key, path=f)
    names = ", ".join(lib) or "(none found)"
    raise MacroNotFound(f"no macro {s!r}: not a file, not in the library ({names})")


# --------------------------------------------------------------------------- CLI


def _param_row(p: Parameter) -> tuple[str, str, str, str]:
    default = p.effective_default
    dflt = "(required)" if default is None else repr(default)
    constraint = ""
    if p.choices:
        constraint = " | ".join(map(str, p.choices))
    elif p.min is not None or p.max is not None:
        constraint = f"[{'' if p.min is None else _num(p.min)}, {'' if p.max is None else _num(p.max)}]"
    return p.name, p.java_type, dflt, constraint


def macros_command(name: Optional[str] = None) -> int:
    """``fiji-bridge macros [NAME]``: list the library, or show one macro
    (rich tables on a terminal, plain text otherwise)."""
    from rich.console import Console

    console = Console(highlight=False)
    rich_out = console.is_terminal
    say = console.print if rich_out else print
    if name is None:
        lib = library()
        if not lib:
            say("no macros found in " + ", ".join(map(str, library_dirs())))
            return 1
        rows = []
        for n in lib:
            m = resolve(n)
            rows.append((n, m.summary, ", ".join(f"{p.name}={p.effective_default!r}" for p in m.arguments)))
        if rich_out:
            from rich.table import Table

            t = Table(title="fiji-bridge macro library")
            t.add_column("macro", style="bold")
            t.add_column("what it does")
            t.add_column("parameters (default)")
            for r in rows:
                t.add_row(*r)
            console.print(t)
        else:
            for n, summary, params in rows:
                print(f"{n}: {summary}\n    {params or '(no parameters)'}")
        say("`fiji-bridge macros NAME` shows one macro's parameters and outputs.")
        return 0
    try:
        m = resolve(name)
    except (MacroNotFound, MacroParseError) as e:
        say(f"error: {e}")
        return 2
    say(f"{m.name}  {m.path or ''}")
    if m.description:
        say(m.description)
    rows = [(*_param_row(p), p.description or p.label) for p in m.arguments]
    if rich_out:
        from rich.table import Table

        t = Table(title="parameters")
        for col in ("name", "type", "default", "choices / range", "description"):
            t.add_column(col)
        for r in rows:
            t.add_row(*r)
        console.print(t)
    else:
        print("parameters:")
        for pname, jtype, dflt, constraint, desc in rows:
            extra = f" [{constraint}]" if constraint else ""
            print(f"  {pname} ({jtype}) = {dflt}{extra}: {desc}")
    say(f"output images: {', '.join(m.output_images) or 'none'}")
    say(f"output tables: {', '.join(m.output_tables) or 'none'}")
    return 0
