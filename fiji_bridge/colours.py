"""Channel colours: one rule for every place that shows a channel.

ImageJ's channel LUTs (:mod:`fiji_bridge.engine.transfer`), the ``omero``
channel metadata of OME-Zarr images (:mod:`fiji_bridge.backends.zarr_plate`)
and the demo's PNG montage all take a channel's colour from here, so a
channel that Fiji draws blue is blue in napari, OMERO.web and the montage.

The rule: a colour from the channel's name (DAPI/Hoechst/DNA blue, GFP/FITC
green, RFP/Cy3/mCherry red, Cy5 magenta), else the next of ImageJ's
composite order not yet taken; one channel alone is grey-scale. Colours are
named as ``java.awt.Color``'s constants (what ``LUT.createLutFromColor``
takes).
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["RGB", "channel_colours", "channel_hex"]

#: java.awt.Color's constants, the colours of ImageJ's channel LUTs
RGB: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "gray": (128, 128, 128),
    "cyan": (0, 255, 255), "magenta": (255, 0, 255), "yellow": (255, 255, 0),
}

#: colour by channel name fragment (case-insensitive)
_NAME_COLOURS = [
    (("dapi", "hoechst", "dna", "nuc", "405"), "blue"),
    (("gfp", "fitc", "488", "green", "alexa488"), "green"),
    (("rfp", "tritc", "cy3", "mcherry", "555", "561", "568", "red"), "red"),
    (("cy5", "far", "640", "647", "magenta"), "magenta"),
]
#: ImageJ's composite order, for channels whose name says nothing
_DEFAULT_COLOURS = ["red", "green", "blue", "gray", "cyan", "magenta", "yellow"]


def channel_colours(names: Sequence[str], n: int) -> list[str]:
    """The colour name of each of ``n`` channels (``names`` may be shorter)."""
    if n == 1:
        return ["gray"]
    colours: list[str] = []
    for i in range(n):
        name = names[i].lower() if i < len(names) and names[i] else ""
        pick = next((c for keys, c in _NAME_COLOURS if any(k in name for k in keys)), None)
        if pick is None or pick in colours:
            pick = next((c for c in _DEFAULT_COLOURS if c not in colours), "gray")
        colours.append(pick)
    return colours


def channel_hex(names: Sequence[str], n: int) -> list[str]:
    """The same colours as ``RRGGBB`` hex (OME-Zarr ``omero.channels[].color``);
    one channel alone is white (grey-scale)."""
    if n == 1:
        return ["FFFFFF"]
    return ["%02X%02X%02X" % RGB[c] for c in channel_colours(names, n)]
