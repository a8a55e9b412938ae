"""Live Fiji windows under a virtual X display, checked by the screen's pixels."""

from __future__ import annotations

import shutil
import subprocess
import time

import numpy as np
import pytest

from conftest import bridge_process
from fiji_bridge.client import write_png

pytestmark = [pytest.mark.imagej, pytest.mark.timeout(150)]


@pytest.fixture(scope="module")
def xdisplay():
    if not shutil.which("Xvfb") or not shutil.which("import"):
        pytest.skip("needs Xvfb and ImageMagick's import")
    for n in range(91, 140):
        proc = subprocess.Popen(["Xvfb", f":{n}", "-screen", "0", "1280x1024x24", "-nolisten", "tcp"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        if proc.poll() is None:
            break
    else:
        pytest.skip("no free X display number")
    try:
        yield f":{n}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def bridge(tmp_path_factory, xdisplay):
    with bridge_process(tmp_path_factory.mktemp("display"), "--display", env={"DISPLAY": xdisplay}) as bp:
        yield bp


def screenshot(display: str, path) -> np.ndarray:
    from PIL import Image

    subprocess.run(["import", "-display", display, "-window", "root", f"png:{path}"], check=True, timeout=30)
    return np.asarray(Image.open(path).convert("RGB"))


def pure(img: np.ndarray, ch: int) -> np.ndarray:
    """Pixels that are bright in colour channel ``ch`` and dark in the others."""
    others = [i for i in range(3) if i != ch]
    return (img[..., ch] > 200) & (img[..., others[0]] < 60) & (img[..., others[1]] < 60)


def wait_shown(client, key, version=None, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = client.status()
        if key in st["windows"] and key not in st["display_pending"] and st["engine"]["queued"] == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"window {key} not shown: {st}")


def send_stack(client, key: str, arr: np.ndarray) -> None:
    """Stream every plane of TZCYX ``arr`` into stack ``key``, t then z then c, until ImageJ shows them."""
    T, Z, C = arr.shape[:3]
    for t in range(T):
        for z in range(Z):
            for ch in range(C):
                client.send_plane(arr[t, z, ch], key, t=t, z=z, channel=ch)
    client.flush()
    wait_shown(client, key)


def eventually(check, timeout: float = 15.0):
    """``check()``'s result once it stops failing: a window is drawn by the
    engine when it has nothing else to do, a moment after its pixels arrived."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def kill_engine(client) -> None:
    """Make the engine worker die (System.exit from a macro) and wait until
    its successor is ready."""
    from fiji_bridge.engine.base import MacroError

    with pytest.raises(MacroError):
        client.run_macro('call("java.lang.System.exit", "0");', timeout=30)
    deadline = time.monotonic() + 60
    while client.status()["engine"]["state"] != "ready" and time.monotonic() < deadline:
        time.sleep(0.2)


def blob(img: np.ndarray, area: int) -> tuple[int, float, float]:
    """(colour channel, y, x) of the one pure-primary blob of about ``area`` pixels."""
    found = []
    for ch in range(3):
        m = pure(img, ch)
        if 0.8 * area < m.sum() < 1.25 * area:
            y, x = np.argwhere(m).mean(0)
            found.append((ch, y, x))
    assert len(found) == 1, f"expected one blob of ~{area} px, got {found}"
    return found[0]


def test_live_window_shows_the_hyperstack_and_updates_in_place(bridge, xdisplay, tmp_path):
    before = screenshot(xdisplay, tmp_path / "before.png")
    assert not any(pure(before, ch).any() for ch in range(3))
    size = 200
    a = np.zeros((size, size), np.uint8)
    a[20:100, 20:100] = 255  # channel 1: an 80 px square top left
    b = np.zeros((size, size), np.uint8)
    b[120:180, 120:180] = 255  # channel 2: a 60 px square bottom right
    with bridge.client() as c:
        c.send_plane(a, "live", channel=0, channel_name="DNA")
        c.send_plane(b, "live", channel=1, channel_name="GFP")
        c.flush()
        wait_shown(c, "live")

        def shown():
            shot = screenshot(xdisplay, tmp_path / "shown.png")
            # a composite: each channel in its own colour, at 100% zoom
            return blob(shot, 80 * 80), blob(shot, 60 * 60)

        (ca, ay, ax), (cb, by, bx) = eventually(shown)
        assert ca != cb
        assert (by - ay) == pytest.approx(90, abs=3) and (bx - ax) == pytest.approx(90, abs=3)

        # a new plane into the shown stack updates the window in place
        a2 = np.zeros((size, size), np.uint8)
        a2[140:190, 10:60] = 255
        c.send_plane(a2, "live", channel=0)
        c.flush()
        wait_shown(c, "live")

        def updated():
            shot2 = screenshot(xdisplay, tmp_path / "updated.png")
            ca2, ay2, ax2 = blob(shot2, 50 * 50)
            assert ca2 == ca
            assert (ay2 - ay) == pytest.approx(105, abs=3) and (ax2 - ax) == pytest.approx(-25, abs=3)
            assert blob(shot2, 60 * 60)[0] == cb

        eventually(updated)

        # snapshot (through ImageJ's renderer) checked by pixels
        rgb = c.render("live")
        assert rgb.shape == (size, size, 3)
        write_png(tmp_path / "snap.png", rgb)
        from PIL import Image

        snap = np.asarray(Image.open(tmp_path / "snap.png").convert("RGB"))
        assert pure(snap, ca)[140:190, 10:60].all() and pure(snap, cb)[120:180, 120:180].all()
        assert not snap[20:100, 20:100].any()  # the old square was replaced
        assert c.status()["engine"]["restarts"] == 0


def test_windows_come_back_after_an_engine_restart(bridge, xdisplay, tmp_path):
    a = np.zeros((120, 120), np.uint8)
    a[10:50, 10:50] = 255
    with bridge.client() as c:
        c.clear_state()
        c.send_plane(a, "again", channel=0, channel_name="DNA")
        c.send_plane(np.zeros_like(a), "again", channel=1)
        c.flush()
        wait_shown(c, "again")
        kill_engine(c)
        wait_shown(c, "again", timeout=30)
        eventually(lambda: blob(screenshot(xdisplay, tmp_path / "reshown.png"), 40 * 40))


#: java.awt.Color.blue / .green / .red: what ImageJ's LUT for that colour draws at full intensity
BLUE, GREEN, RED = 2, 1, 0


def test_channel_names_that_arrive_later_colour_the_window_and_the_snapshot(bridge, xdisplay, tmp_path):
    """A stream whose first planes carry no channel names gets ImageJ's
    default colours (red, green); once the names come (DAPI, GFP), the live
    window and the snapshot PNG show them blue and green."""
    from PIL import Image

    size = 160
    a = np.zeros((size, size), np.uint8)
    a[10:70, 10:70] = 255  # channel 1: 60 px square
    b = np.zeros((size, size), np.uint8)
    b[100:140, 100:140] = 255  # channel 2: 40 px square
    with bridge.client() as c:
        c.clear_state()
        c.send_plane(a, "named-late", channel=0)
        c.send_plane(b, "named-late", channel=1)
        c.flush()
        wait_shown(c, "named-late")
        snap = c.render("named-late")
        assert pure(snap, RED)[10:70, 10:70].all() and pure(snap, GREEN)[100:140, 100:140].all()
        c.send_plane(a, "named-late", channel=0, channel_name="DAPI")
        c.send_plane(b, "named-late", channel=1, channel_name="GFP")
        c.flush()
        wait_shown(c, "named-late")

        def coloured() -> None:  # the window is drawn a moment after its pixels arrived
            shot = screenshot(xdisplay, tmp_path / "named.png")
            assert blob(shot, 60 * 60)[0] == BLUE and blob(shot, 40 * 40)[0] == GREEN

        eventually(coloured)
        write_png(tmp_path / "named-snap.png", c.render("named-late"))
        png = np.asarray(Image.open(tmp_path / "named-snap.png").convert("RGB"))
        assert (png[10:70, 10:70] == (0, 0, 255)).all() and (png[100:140, 100:140] == (0, 255, 0)).all()
        assert not png[80:90, 80:90].any()
        c.close_stack("named-late")


def _imagej_copy(c, key):
    """The live window's pixels as ImageJ holds them (TZCYX), read by a macro."""
    res = c.run_macro(f'selectImage("{key}"); run("Duplicate...", "title=copy duplicate");', outputs=["copy"], timeout=60)
    return res.images["copy"]


def test_streamed_stack_in_imagej_is_bit_exact_and_survives_a_restart(bridge, xdisplay):
    """Planes streamed over shm into a growing stack reach ImageJ from the
    bridge's shared stack memory: ImageJ's copy equals numpy's bit for bit,
    zeros where nothing arrived; a refresh replaces every plane; after the
    worker dies the stack is shown again, still exact; a closed stack's
    memory goes back to the pool, no segment is left behind."""
    import os

    rng = np.random.default_rng(3)
    T, Z, C, Y, X = 3, 4, 2, 96, 128
    truth = rng.integers(0, 65535, (T, Z, C, Y, X), dtype=np.uint16)
    skip = (1, 3, 1)
    with bridge.client() as c:
        pid = c.status()["pid"]

        def stack_segments() -> set[str]:
            return {n for n in os.listdir("/dev/shm") if n.startswith(f"fjbs_{pid}_st")}

        others = stack_segments()  # the other tests' stacks
        for t in range(T):
            for z in range(Z):
                for ch in range(C):
                    if (t, z, ch) != skip:
                        c.send_plane(truth[t, z, ch], "exact", t=t, z=z, channel=ch)
        c.flush()
        wait_shown(c, "exact")
        want = truth.copy()
        want[skip] = 0
        assert np.array_equal(_imagej_copy(c, "exact"), want)
        during = stack_segments()
        assert during, "the stack should live in shared memory"

        again = rng.integers(0, 65535, (T, Z, C, Y, X), dtype=np.uint16)
        send_stack(c, "exact", again)
        assert np.array_equal(_imagej_copy(c, "exact"), again)

        kill_engine(c)
        wait_shown(c, "exact", timeout=30)
        assert np.array_equal(_imagej_copy(c, "exact"), again)
        pooled = c.status()["memory"]["pooled"]
        c.close_stack("exact")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and c.status()["memory"]["pooled"] <= pooled:
            time.sleep(0.1)
        assert c.status()["memory"]["pooled"] > pooled, "a closed stack's memory goes back to the pool"
        assert stack_segments() <= during | others, "no segment is left behind"


def test_display_ranges_of_a_streamed_stack_are_numpy_s_min_and_max(bridge):
    """Each channel's display range in the live window reaches the max of
    the planes that channel received (taken by the bridge while it read them
    from shared memory), as numpy computes it over the same pixels, and its
    min (or 0, when the growing window showed a missing plane as zeros); a
    refresh with wider data widens it, never narrows it."""
    rng = np.random.default_rng(11)
    T, Z, C, Y, X = 2, 3, 2, 64, 96
    first = rng.integers(1000, 5000, (T, Z, C, Y, X), dtype=np.uint16)
    first[..., 1, :, :] += 20000  # the channels apart
    code = "".join(f'Stack.setPosition({c + 1}, 1, 1); getMinAndMax(lo, hi); print("{c} " + lo + " " + hi);' for c in range(C))

    def imagej_ranges(c) -> dict[int, tuple[float, float]]:
        log = c.run_macro(f'selectImage("ranges"); {code}', outputs=[], timeout=60).log.split("\n")
        return {int(a): (float(b), float(d)) for a, b, d in (line.split() for line in log if line.strip())}

    with bridge.client(transport="shm") as c:
        send_stack(c, "ranges", first)
        got = imagej_ranges(c)
        for ch in range(C):  # the low end is 0 if the window showed a not-yet-arrived plane (zeros)
            assert got[ch][1] == float(first[:, :, ch].max()), (ch, got)
            assert got[ch][0] in (0.0, float(first[:, :, ch].min())), (ch, got)
        wider = first.copy()
        wider[1, 2, 0, 5, 5] = 60000
        c.send_plane(wider[1, 2, 0], "ranges", t=1, z=2, channel=0)
        c.send_plane(np.full((Y, X), 22000, np.uint16), "ranges", t=0, z=0, channel=1)  # inside the range seen
        c.flush()
        wait_shown(c, "ranges")
        again = imagej_ranges(c)
        assert again[0] == (got[0][0], 60000.0) and again[1] == got[1]
        c.close_stack("ranges")


def test_the_warm_memory_is_touched_and_mapped_by_the_worker_at_start(bridge):
    """A bridge with a display prepares its warm stack memory (FIJI_BRIDGE_WARM,
    64 MiB in the tests) and has the engine worker map it before the first
    stack; status says so."""
    with bridge.client() as c:
        deadline = time.monotonic() + 30
        while (c.status()["memory"].get("warm") or {}).get("mapped") is None and time.monotonic() < deadline:
            time.sleep(0.1)
        warm = c.status()["memory"]["warm"]
        assert warm["bytes"] == 64 << 20 and warm["mapped"] is True
