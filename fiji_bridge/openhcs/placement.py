"""Where an OpenHCS plane goes: window key and (t, z, c).

OpenHCS describes a plane by component values (``well``, ``site``,
``channel``, ``z_index``, ``timepoint``, ...) and says in the batch's
``display_config.component_modes`` which ImageJ dimension each component
drives: ``window`` (one hyperstack per value), ``channel`` (C), ``slice`` (Z)
or ``frame`` (T). Without modes the default is channel -> C,
z_index -> Z and well + site + timepoint -> T, as OpenHCS's own Fiji
viewer does.

An axis may combine several components (T often holds well x site x
timepoint), so its index is a *number given to each distinct value tuple*,
per window and axis: new tuples of a batch are sorted (numbers numerically,
then strings) and appended after those already seen. A tuple keeps its index
until :meth:`Placer.clear` (OpenHCS's ``clear_state``), so later batches add
frames instead of moving old ones.

Windows are also split by producer (the pipeline step that streamed the
plane), like OpenHCS's viewer does, so two steps never write into one stack.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence

from .wire import Batch, ImageItem, Item, Scalar

__all__ = ["Layout", "Placement", "Placer", "PlacementError"]

#: OpenHCS's component names in the order they nest on a shared axis
_CANONICAL = ("well", "site", "timepoint", "channel", "z_index")
DEFAULT_MODES = {
    "well": "frame",
    "site": "frame",
    "timepoint": "frame",
    "channel": "channel",
    "z_index": "slice",
}
#: indices beyond this are refused (a runaway stream, not an acquisition)
MAX_INDEX = 100_000


class PlacementError(ValueError):
    """A plane cannot be given a (key, t, z, c)."""


@dataclass(frozen=True)
class Layout:
    """Which components make the window key and each of C, Z and T."""

    window: tuple[str, ...] = ()
    channel: tuple[str, ...] = ("channel",)
    slice: tuple[str, ...] = ("z_index",)
    frame: tuple[str, ...] = ("well", "site", "timepoint")

    @classmethod
    def from_modes(cls, modes: Optional[Mapping[str, str]], order: Sequence[str] = ()) -> "Layout":
        modes = DEFAULT_MODES if modes is None else modes
        rank = {c: i for i, c in enumerate(_CANONICAL)}
        rank.update({c: len(_CANONICAL) + i for i, c in enumerate(order) if c not in rank})
        names = sorted(modes, key=lambda c: (rank.get(c, 1 << 20), c))
        by = {m: tuple(c for c in names if modes[c] == m) for m in ("window", "channel", "slice", "frame")}
        return cls(window=by["window"], channel=by["channel"], slice=by["slice"], frame=by["frame"])


@dataclass(frozen=True)
class Placement:
    """One plane's destination."""

    item: Item
    key: str
    t: int = 0
    z: int = 0
    c: int = 0
    plane: int = 0  # index along a 3-D item's leading axis
    channel_name: Optional[str] = None
    metadata: Optional[dict] = None


def _natural(v: Scalar) -> tuple:
    if v is None:
        return (0, 0)
    if isinstance(v, bool):
        return (1, int(v))
    if isinstance(v, (int, float)):
        return (1, v)
    if isinstance(v, str):
        s = v.strip()
        if re.fullmatch(r"[+-]?\d+", s):
            return (1, int(s))
        return (2, v)
    return (3, tuple(_natural(x) for x in v))


def _order(t: tuple) -> tuple:
    return tuple(_natural(v) for v in t)


def _token(v: object) -> str:
    s = re.sub(r"[\s/\\]+", "_", str(v)).strip("_")
    s = "".join(ch for ch in s if ch.isprintable())
    return s[:64] or "_"


def producer_label(identity: Optional[Mapping]) -> Optional[str]:
    """A short readable name of the producer (pipeline step or output)."""
    if not identity:
        return None
    base = identity.get("step_name") or identity.get("output_key")
    if not base:
        return None
    label = str(base)
    pos = identity.get("pipeline_position")
    if isinstance(pos, int) and not isinstance(pos, bool):
        label = f"step{pos + 1}-{label}"
    key, kind = identity.get("output_key"), identity.get("output_kind")
    if key and kind not in ("main", "manual", "direct") and str(key) != str(base):
        label = f"{label}-{key}"
    return label


class Placer:
    """Numbers axis values per window and places items; one per receiver."""

    def __init__(self, key_prefix: str = "openhcs") -> None:
        self.key_prefix = key_prefix
        # (window key, axis) -> {value tuple: index}
        self._axes: dict[tuple[str, str], dict[tuple, int]] = {}

    def clear(self) -> None:
        """Forget every numbering (OpenHCS ``clear_state``)."""
        self._axes.clear()

    def window_key(self, item: Item, layout: Layout) -> str:
        parts = [self.key_prefix] if self.key_prefix else []
        label = producer_label(item.producer_identity)
        if label:
            parts.append(_token(label))
        for comp in layout.window:
            parts.append(f"{_token(comp)}_{_token(_value(item.metadata, comp))}")
        key = "/".join(parts) or "openhcs"
        return key[:500]

    def place(self, batch: Batch) -> list[Placement]:
        """One :class:`Placement` per plane of every image item of ``batch``,
        and one (t = z = c = 0) per ROI item."""
        layout = Layout.from_modes(batch.display.component_modes, batch.display.component_order)
        planes: list[tuple[Item, str, int, dict]] = []
        for item in batch.items:
            key = self.window_key(item, layout)
            if isinstance(item, ImageItem) and item.plane_values is not None:
                comp, values = item.plane_values
                for k, v in enumerate(values):
                    planes.append((item, key, k, {**item.metadata, comp: v}))
            else:
                planes.append((item, key, 0, item.metadata))
        axes = (("c", layout.channel), ("z", layout.slice), ("t", layout.frame))
        for axis, comps in axes:
            new: dict[str, set] = {}
            for item, key, _, md in planes:
                if isinstance(item, ImageItem):
                    new.setdefault(key, set()).add(_tuple(md, comps))
            for key, values in new.items():
                self._register(key, axis, values)
        out = []
        for item, key, k, md in planes:
            if not isinstance(item, ImageItem):
                out.append(Placement(item, key, metadata=md))
                continue
            idx = {axis: self._axes[(key, axis)][_tuple(md, comps)] for axis, comps in axes}
            out.append(
                Placement(
                    item,
                    key,
                    t=idx["t"],
                    z=idx["z"],
                    c=idx["c"],
                    plane=k,
                    channel_name=_channel_name(md, layout.channel, batch.component_names),
                    metadata=md,
                )
            )
        return out

    def _register(self, key: str, axis: str, values: Iterable[tuple]) -> None:
        known = self._axes.setdefault((key, axis), {})
        fresh = sorted((v for v in values if v not in known), key=_order)
        if len(known) + len(fresh) > MAX_INDEX + 1:
            raise PlacementError(
                f"stack {key!r}: more than {MAX_INDEX + 1} distinct values on axis {axis.upper()}; "
                "send clear_state to start over"
            )
        for v in fresh:
            known[v] = len(known)


def _value(md: Mapping[str, Scalar], comp: str) -> Scalar:
    return md.get(comp)


def _tuple(md: Mapping[str, Scalar], comps: Sequence[str]) -> tuple:
    return tuple(md.get(c) for c in comps)


def _channel_name(md: Mapping[str, Scalar], comps: Sequence[str], names: Mapping[str, Mapping[str, str]]) -> Optional[str]:
    """``component_names_metadata`` names of the C value, joined; None if none known."""
    if not comps:
        return None
    labels, named = [], False
    for comp in comps:
        v = md.get(comp)
        name = names.get(comp, {}).get(str(v))
        named = named or name is not None
        labels.append(name if name is not None else f"{comp} {v}")
    return " | ".join(labels) if named else None
