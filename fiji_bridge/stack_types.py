"""The stack vocabulary: what the store, the protocol and clients say about stacks.

The errors of stack assembly (:class:`StackError` and its kinds), the pixel
types a stack may hold, :class:`AxisMapping` (which plane components place a
plane on C, Z and T, and which name its window, i.e. its stack key) and
:class:`StackInfo` (what a client learns about a stack). The assembly itself
is :mod:`fiji_bridge.hyperstack`, which re-exports all of these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from .components import Calibration, PlaneComponents

__all__ = [
    "ALLOWED_DTYPES",
    "COMPONENT_NAMES",
    "AxisMapping",
    "PlaneRejected",
    "StackError",
    "StackInfo",
    "StackNotFound",
]

#: pixel types a stack may hold (ImageJ's 8/16/32-bit, plus what converts losslessly)
ALLOWED_DTYPES = ("uint8", "uint16", "int16", "uint32", "int32", "float32", "float64")

#: component names an AxisMapping may use, in canonical order
COMPONENT_NAMES = ("plate", "well", "site", "channel", "z", "t")
_INT_COMPONENTS = frozenset({"site", "channel", "z", "t"})
# OpenHCS spellings of our components
_ALIASES = {"z_index": "z", "timepoint": "t", "field": "site"}
# OpenHCS FijiDimensionMode values -> our roles
_MODES = {"window": "window", "channel": "c", "slice": "z", "frame": "t"}
_AXES = ("t", "z", "c")


class StackError(ValueError):
    """Base class of hyperstack errors."""


class PlaneRejected(StackError):
    """A plane cannot be placed: dtype or YX shape disagrees with its stack,
    a bad index, an unsupported dtype, or the memory cap would be exceeded."""


class StackNotFound(StackError, KeyError):
    """No stack with that key."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


# --------------------------------------------------------------------------
# axis mapping


@dataclass(frozen=True)
class AxisMapping:
    """Which components place a plane on C, Z and T, and which form the window (stack) key.

    Default: channel->C, z->Z, t->T, window = plate+well+site. OpenHCS-style:
    ``t=("well", "site", "t")`` maps several wells/sites of one stream onto T.
    Component names: plate, well, site, channel, z, t (OpenHCS's ``z_index``,
    ``timepoint`` are accepted and normalised). A component may sit on at
    most one of C, Z, T; components on no axis and not in the window are
    ignored (planes differing only in them replace each other).
    """

    c: tuple[str, ...] = ("channel",)
    z: tuple[str, ...] = ("z",)
    t: tuple[str, ...] = ("t",)
    window: tuple[str, ...] = ("plate", "well", "site")

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        for role in ("c", "z", "t", "window"):
            value = getattr(self, role)
            if isinstance(value, str):
                value = (value,)
            try:
                names = tuple(_ALIASES.get(str(n), str(n)) for n in value)
            except TypeError:
                raise StackError(f"AxisMapping.{role} must be a list of component names") from None
            for n in names:
                if n not in COMPONENT_NAMES:
                    raise StackError(
                        f"AxisMapping.{role}: unknown component {n!r}; "
                        f"use any of {', '.join(COMPONENT_NAMES)}"
                    )
            if len(set(names)) != len(names):
                raise StackError(f"AxisMapping.{role} repeats a component: {names}")
            if role != "window":
                for n in names:
                    if n in seen:
                        raise StackError(
                            f"component {n!r} is mapped to both {seen[n].upper()} and "
                            f"{role.upper()}; a component can place planes on one axis only"
                        )
                    seen[n] = role
            object.__setattr__(self, role, names)

    @classmethod
    def from_modes(
        cls, modes: Mapping[str, str], order: Optional[Sequence[str]] = None
    ) -> "AxisMapping":
        """Build a mapping from OpenHCS ``component_modes``.

        ``modes`` maps a component (``well``, ``site``, ``channel``,
        ``z_index``, ``timepoint``, or our names) to ``"window"``,
        ``"channel"`` (C), ``"slice"`` (Z) or ``"frame"`` (T). Components it
        does not name keep their default role (plate/well/site -> window,
        channel -> C, z -> Z, t -> T); component names we do not know are
        ignored (newer OpenHCS versions may add some). Several components on
        one axis are combined in ``order`` (OpenHCS's ``component_order``),
        else in the canonical order plate, well, site, channel, z, t.
        """
        if not isinstance(modes, Mapping):
            raise StackError(f"component_modes must be a mapping, got {type(modes).__name__}")
        roles = {"plate": "window", "well": "window", "site": "window",
                 "channel": "c", "z": "z", "t": "t"}
        for comp, mode in modes.items():
            name = _ALIASES.get(str(comp), str(comp))
            mode_s = str(getattr(mode, "value", mode)).strip().lower()
            if mode_s not in _MODES:
                raise StackError(
                    f"component_modes[{comp!r}] = {mode!r}: expected one of "
                    f"{', '.join(_MODES)}"
                )
            if name in roles:
                roles[name] = _MODES[mode_s]
        ordered: list[str] = []
        for comp in list(order or ()) + list(COMPONENT_NAMES):
            name = _ALIASES.get(str(comp), str(comp))
            if name in roles and name not in ordered:
                ordered.append(name)
        pick = lambda role: tuple(n for n in ordered if roles[n] == role)  # noqa: E731
        return cls(c=pick("c"), z=pick("z"), t=pick("t"), window=pick("window"))

    def to_dict(self) -> dict:
        return {"c": list(self.c), "z": list(self.z), "t": list(self.t), "window": list(self.window)}

    @classmethod
    def from_dict(cls, d: Optional[Mapping[str, Any]]) -> "AxisMapping":
        if not d:
            return cls()
        if not isinstance(d, Mapping):
            raise StackError(f"an axis mapping must be an object, got {type(d).__name__}")
        unknown = set(d) - {"c", "z", "t", "window"}
        if unknown:
            raise StackError(f"unknown axis mapping keys {sorted(unknown)}; use c, z, t, window")
        try:
            return cls(**{k: (v,) if isinstance(v, str) else tuple(v) for k, v in d.items()})
        except TypeError:
            raise StackError(f"bad axis mapping {dict(d)!r}: each entry is a list of component names") from None

    def window_key(self, comps: PlaneComponents) -> str:
        """The stack key of a plane: ``stack_key(plate, well, site)`` for the
        default window, else the window components joined with ``/``
        (integers written ``s001``, ``c002``, ``z003``, ``t004``)."""
        if self.window == ("plate", "well", "site"):
            return comps.stack_key
        parts = []
        for n in self.window:
            v = getattr(comps, n)
            if n in _INT_COMPONENTS:
                parts.append(f"{n[0]}{v:03d}")
            elif v:
                parts.append(str(v))
        return "/".join(parts) or "default"

    def axis_components(self) -> dict[str, tuple[str, ...]]:
        return {"t": self.t, "z": self.z, "c": self.c}


def _direct(names: tuple[str, ...]) -> bool:
    """True when an axis index is the component value itself."""
    return len(names) == 1 and names[0] in _INT_COMPONENTS


# --------------------------------------------------------------------------
# stack info


@dataclass
class StackInfo:
    """What a client needs to know about a stack (JSON-friendly via to_dict)."""

    key: str
    shape: tuple[int, int, int, int, int]  # T, Z, C, Y, X
    dtype: str
    planes: int  # distinct (t, z, c) positions filled
    missing: list[tuple[int, int, int]]  # (t, z, c) inside the dims with no plane yet
    channel_names: list[Optional[str]]
    calibration: Calibration
    version: int  # increments on every accepted plane
    axis_labels: dict[str, list] = field(default_factory=dict)
    #: for each labelled axis, the components its labels list ({"t": ["well", "site", "t"]})
    axis_components: dict[str, list[str]] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return not self.missing

    def to_dict(self) -> dict:
        return {
            "key": self.key,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "planes": self.planes,
            "missing": [list(m) for m in self.missing],
            "channel_names": list(self.channel_names),
            "calibration": self.calibration.to_dict(),
            "version": self.version,
            "axis_labels": {k: [list(v) for v in vs] for k, vs in self.axis_labels.items()},
            "axis_components": {k: list(v) for k, v in self.axis_components.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StackInfo":
        return cls(
            key=str(d["key"]),
            shape=tuple(int(n) for n in d["shape"]),  # type: ignore[arg-type]
            dtype=str(d["dtype"]),
            planes=int(d["planes"]),
            missing=[tuple(int(i) for i in m) for m in d.get("missing", [])],  # type: ignore[misc]
            channel_names=list(d.get("channel_names", [])),
            calibration=Calibration.from_dict(d.get("calibration")),
            version=int(d.get("version", 0)),
            axis_labels={k: [list(v) for v in vs] for k, vs in (d.get("axis_labels") or {}).items()},
            axis_components={k: list(v) for k, v in (d.get("axis_components") or {}).items()},
        )
