"""Synthetic plates with known truth, for the demo, tests and benchmarks.

Each field holds nuclei-like blobs: disks of random radius, Gaussian-smoothed,
placed at random positions at least ``min_gap`` radii apart (so a correct
segmentation separates them), brightest in the middle of the Z stack, on a
flat background with Gaussian read noise and shot noise. Channel 0 is the
nuclear stain; channel 1 a dimmer "cell body" signal around each nucleus, so
the two channels are positively correlated. The number of nuclei of every
field is the truth the nuclei counting macro must find.

    plate = make_plate(wells=("A01", "A02"), fields=2, seed=1)
    plate.fields[("A01", 0)].array      # TZCYX uint16
    plate.fields[("A01", 0)].n_nuclei   # the truth
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np

from .components import Calibration, normalize_well

__all__ = ["SyntheticField", "SyntheticPlate", "make_field", "make_plate", "write_plate"]

CHANNEL_NAMES = ("DNA", "Cell")


@dataclass
class SyntheticField:
    """One field image (TZCYX) and its nuclei: centres (y, x) and radii."""

    well: str
    site: int
    array: np.ndarray
    centers: np.ndarray  # (n, 2) float y, x
    radii: np.ndarray  # (n,)

    @property
    def n_nuclei(self) -> int:
        return int(len(self.radii))


@dataclass
class SyntheticPlate:
    name: str
    fields: dict[tuple[str, int], SyntheticField] = field(default_factory=dict)
    channel_names: tuple[str, ...] = CHANNEL_NAMES
    calibration: Calibration = field(default_factory=lambda: Calibration(0.65, 0.65, 2.0, "micron"))

    @property
    def wells(self) -> list[str]:
        return sorted({w for w, _ in self.fields})

    def truth(self) -> dict[tuple[str, int], int]:
        """(well, field) -> number of nuclei."""
        return {k: f.n_nuclei for k, f in sorted(self.fields.items())}


def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a 2-D float image (reflecting borders)."""
    if sigma <= 0:
        return img
    r = max(1, int(round(3 * sigma)))
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    k /= k.sum()
    out = np.pad(img, ((r, r), (0, 0)), mode="reflect")
    out = sum(k[i] * out[i : i + img.shape[0]] for i in range(2 * r + 1))
    out = np.pad(out, ((0, 0), (r, r)), mode="reflect")
    return sum(k[i] * out[:, i : i + img.shape[1]] for i in range(2 * r + 1))


def _place(rng: np.random.Generator, n: int, shape: tuple[int, int], radius_max: float, min_gap: float) -> np.ndarray:
    """n centres at least ``min_gap * radius_max`` apart and a radius from the border."""
    margin = radius_max + 2
    dmin = min_gap * radius_max
    pts: list[tuple[float, float]] = []
    tries = 0
    while len(pts) < n:
        tries += 1
        if tries > 200 * (n + 1):
            raise ValueError(f"cannot place {n} nuclei {dmin:.0f} px apart in a {shape[0]}x{shape[1]} field; use a bigger field")
        y = rng.uniform(margin, shape[0] - margin)
        x = rng.uniform(margin, shape[1] - margin)
        if all((y - py) ** 2 + (x - px) ** 2 >= dmin**2 for py, px in pts):
            pts.append((y, x))
    return np.array(pts, dtype=np.float64).reshape(-1, 2)


def make_field(
    n_nuclei: int,
    *,
    well: str = "A01",
    site: int = 0,
    size: int = 256,
    size_z: int = 3,
    size_t: int = 1,
    radius: tuple[float, float] = (6.0, 9.0),
    min_gap: float = 2.6,
    background: float = 200.0,
    signal: float = 1800.0,
    noise: float = 25.0,
    seed: Optional[int] = None,
) -> SyntheticField:
    """One 2-channel field (TZCYX uint16) with ``n_nuclei`` separated nuclei."""
    rng = np.random.default_rng(seed)
    centers = _place(rng, n_nuclei, (size, size), radius[1], min_gap)
    radii = rng.uniform(radius[0], radius[1], n_nuclei)
    brightness = rng.uniform(0.7, 1.0, n_nuclei)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    nuclei = np.zeros((size, size))
    cells = np.zeros((size, size))
    for (cy, cx), r, b in zip(centers, radii, brightness):
        d2 = (yy - cy) ** 2 + (xx - cx) ** 2
        nuclei[d2 <= r * r] = b
        cells += 0.35 * b * np.exp(-d2 / (2 * (1.8 * r) ** 2))
    nuclei = _gaussian_blur(nuclei, 1.2)
    # focus: brightest in the middle plane
    zc = (size_z - 1) / 2
    focus = np.exp(-0.5 * ((np.arange(size_z) - zc) / max(size_z / 2, 1)) ** 2)
    arr = np.empty((size_t, size_z, 2, size, size), dtype=np.uint16)
    for t in range(size_t):
        for z in range(size_z):
            for c, base in enumerate((nuclei, cells)):
                ideal = background + signal * focus[z] * base
                img = rng.poisson(np.clip(ideal, 0, None)) + rng.normal(0, noise, ideal.shape)
                arr[t, z, c] = np.clip(np.round(img), 0, 65535).astype(np.uint16)
    return SyntheticField(normalize_well(well), int(site), arr, centers, radii)


def make_plate(
    wells: Sequence[str] = ("A01", "A02", "B01", "B02"),
    fields: int = 3,
    *,
    nuclei: Optional[Mapping[str, int]] = None,
    name: str = "synthetic",
    size: int = 256,
    size_z: int = 3,
    seed: int = 0,
) -> SyntheticPlate:
    """A plate whose wells hold clearly different numbers of nuclei.

    ``nuclei[well]`` is the mean count per field of a well (default 6, 12,
    18, ... in well order); each field varies by up to +-2 around it."""
    wells = [normalize_well(w) for w in wells]
    if nuclei is None:
        nuclei = {w: 6 * (i + 1) for i, w in enumerate(wells)}
    rng = np.random.default_rng(seed)
    plate = SyntheticPlate(name)
    for w in wells:
        for f in range(fields):
            n = max(0, int(nuclei[w]) + int(rng.integers(-2, 3)))
            plate.fields[(w, f)] = make_field(
                n, well=w, site=f, size=size, size_z=size_z, seed=int(rng.integers(2**31))
            )
    return plate


def write_plate(plate: SyntheticPlate, uri: str) -> tuple[object, str]:
    """Write a synthetic plate into a store (``uri`` names the plate);
    returns ``(backend, plate id)``. The plate's truth is recorded in its
    provenance (``truth``: ``{"A01/0": n, ...}``)."""
    from .backends import open_plate

    backend, plate_id = open_plate(uri)
    from .backends import PlateStructure

    first = next(iter(plate.fields.values()))
    t, z, c, y, x = first.array.shape
    like = PlateStructure(
        plate="",
        name=plate.name,
        wells=tuple(plate.wells),
        fields={w: sum(1 for ww, _ in plate.fields if ww == w) for w in plate.wells},
        size_t=t,
        size_z=z,
        size_c=c,
        size_y=y,
        size_x=x,
        dtype=str(first.array.dtype),
        channel_names=plate.channel_names,
        calibration=plate.calibration,
    )
    provenance = {
        "generator": "fiji_bridge.synthetic",
        "truth": {f"{w}/{s}": f.n_nuclei for (w, s), f in sorted(plate.fields.items())},
    }
    pid = backend.create_plate(plate_id or plate.name, like, provenance=provenance)
    for (w, s), f in sorted(plate.fields.items()):
        backend.save_field(pid, w, s, f.array, channel_names=plate.channel_names, calibration=plate.calibration)
    return backend, pid
