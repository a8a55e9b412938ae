"""What the OMERO double's wire check costs: every call is first marshalled
by omero-py's real Ice proxy against a refused loopback endpoint
(``fiji_bridge.testing.omero_double.wire``).

Prints the median time of one check for typical calls (a query, a ROI save,
a 128 KB tile) and a backend workload (a plate of fields, tables, reads)
with the check and with it switched off, per call. The double is NOT a real
server; these are the double's own costs.

    python benchmarks/omero_wire.py
"""

from __future__ import annotations

import statistics
import time

import numpy as np


def _per_call(fn, n: int = 300) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    from fiji_bridge.backends.omero import OmeroBackend
    from fiji_bridge.testing.omero_double import GatewayDouble, ServerDouble
    from fiji_bridge.testing.omero_double import client as client_module
    from fiji_bridge.testing.omero_double import wire
    from fiji_bridge.testing.omero_double._common import omero
    from omero.rtypes import rdouble, rint, rstring
    from omero.sys import ParametersI

    roi = omero.model.RoiI()
    roi.image = omero.model.ImageI(1, False)
    for i in range(20):
        r = omero.model.RectangleI()
        r.x, r.y, r.width, r.height, r.theZ = rdouble(i), rdouble(i), rdouble(3), rdouble(4), rint(0)
        r.textValue = rstring(f"cell {i}")
        roi.addShape(r)
    tile = b"\0" * (256 * 256 * 2)
    cases = {
        "IQuery.findAllByQuery": ("omero.api.IQueryPrx", "findAllByQuery", ("from Image as i", ParametersI())),
        "IUpdate.saveAndReturnObject (ROI, 20 shapes)": ("omero.api.IUpdatePrx", "saveAndReturnObject", (roi,)),
        "RawPixelsStore.setTile (128 KB)": ("omero.api.RawPixelsStorePrx", "setTile",
                                            (tile, 0, 0, 0, 0, 0, 256, 256)),
    }
    for name, (prx, method, args) in cases.items():
        wire.marshal(prx, method, args)
        print(f"wire check, {name}: {_per_call(lambda: wire.marshal(prx, method, args)):.3f} ms")

    def workload() -> tuple[float, int]:
        srv = ServerDouble(users={"alice": "pw"}).register("wire.bench", 4064)
        calls = [0]
        real = srv.handle

        def counted(blob: bytes) -> bytes:
            calls[0] += 1
            return real(blob)
        srv.handle = counted  # type: ignore[method-assign]
        try:
            b = OmeroBackend(host="wire.bench", user="alice", password="pw", gateway=GatewayDouble, keepalive=0)
            t0 = time.perf_counter()
            pid = b.create_plate("bench")
            for w in ("A01", "A02", "B01", "B02"):
                for site in range(2):
                    b.save_field(pid, w, site, np.zeros((1, 2, 2, 64, 64), "uint16"))
                b.save_table(pid, "results", "a,b\n1,2\n", well=w)
            for w in ("A01", "A02", "B01", "B02"):
                b.load_field(pid, w, 0)
            b.close()
            return time.perf_counter() - t0, calls[0]
        finally:
            srv.unregister()

    workload()  # warm up
    on = [workload() for _ in range(3)]
    real_marshal = client_module.marshal
    client_module.marshal = lambda *a, **k: None
    try:
        off = [workload() for _ in range(3)]
    finally:
        client_module.marshal = real_marshal
    t_on, n = statistics.median(t for t, _ in on), on[0][1]
    t_off = statistics.median(t for t, _ in off)
    print(f"backend workload: {n} calls, {t_on * 1e3:.0f} ms with the wire check, {t_off * 1e3:.0f} ms without "
          f"({(t_on - t_off) / n * 1e3:.3f} ms a call)")


if __name__ == "__main__":
    main()
