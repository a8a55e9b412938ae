"""`fiji-bridge demo` end to end in a subprocess: synthetic plate -> bridge ->
nuclei batch -> derived plate and tables, counts against the known truth."""

from __future__ import annotations

import csv
import io
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest

from fiji_bridge.backends import open_plate
from fiji_bridge.demo import montage, write_png

pytestmark = pytest.mark.imagej


def read_png(path):
    """Decode the PNGs write_png makes (8-bit RGB, filter 0) with zlib alone."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, w, h = 8, b"", 0, 0
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            w, h = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + 3 * w)
    assert (raw[:, 0] == 0).all()
    return raw[:, 1:].reshape(h, w, 3)


def test_png_writer_round_trips(tmp_path):
    rgb = (np.arange(7 * 5 * 3) * 7 % 256).astype(np.uint8).reshape(7, 5, 3)
    write_png(tmp_path / "x.png", rgb)
    np.testing.assert_array_equal(read_png(tmp_path / "x.png"), rgb)


def test_montage_layout_shows_mask():
    field = np.zeros((1, 2, 2, 16, 16), np.uint16)
    field[0, :, 0, 4:8, 4:8] = 1000
    mask = np.zeros((1, 1, 1, 16, 16), np.uint8)
    mask[..., 4:8, 4:8] = 255
    m = montage(field, mask, gap=2)
    assert m.shape == (3 * 16 + 2 * 2, 3 * 16 + 2 * 2, 3)
    mask_panel = m[2 * 18:2 * 18 + 16, 0:16, 0]
    np.testing.assert_array_equal(mask_panel > 0, mask[0, 0, 0] > 0)


@pytest.mark.timeout(260)
def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "fiji_bridge.cli", "demo", "-o", str(out)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "counted" in proc.stdout and "within 1 nucleus of the truth" in proc.stdout
    # the truth recorded with the source plate vs the counts in the derived plate's table
    src, sid = open_plate(f"zarr://{out}/plates/demo.zarr")
    truth = src.plate_provenance(sid)["truth"]
    dst, did = open_plate(f"zarr://{out}/plates/demo_nuclei_count.zarr")
    rows = list(csv.DictReader(io.StringIO(dst.load(f"/zarr/plate_{did}/counts.csv"))))
    assert len(rows) == len(truth) == 12
    for r in rows:
        assert abs(int(float(r["Count"])) - truth[f"{r['well']}/{r['field']}"]) <= 1, r
    # every field of the derived plate has the source pixels and the mask as its NGFF label "nuclei";
    # the montage shows the first field and its mask
    assert dst.plate_structure(did).units() == src.plate_structure(sid).units()
    np.testing.assert_array_equal(dst.load_field(did, "A01", 0), src.load_field(sid, "A01", 0))
    import zarr

    labels = np.asarray(zarr.open_array(str(out / "plates/demo_nuclei_count.zarr/A/1/0/labels/nuclei/s0"), mode="r"))
    assert labels.max() == truth["A01/0"] or abs(int(labels.max()) - truth["A01/0"]) <= 1
    assert "ngio.open_ome_zarr_plate" in proc.stdout and "'nuclei'" in proc.stdout
    png = read_png(out / "montage.png")
    mask = labels.reshape(labels.shape[-2:])
    ny, nx = mask.shape
    panel = png[2 * (ny + 4):2 * (ny + 4) + ny, 0:nx, 0]
    np.testing.assert_array_equal(panel > 0, mask > 0)
