"""OpenHCS 0.8.6's ``run_macro`` answered by the bridge's OpenHCS port.

The sender runs in its own process and builds, pickles, sends and decodes
exactly as openhcs 0.8.6 does (``openhcs/runtime/fiji_macro_runtime.py`` and
``ViewerControlMessageRequest.send`` in ``viewer_protocol.py``): the two
frozen, slotted dataclasses are defined there under openhcs's module path
with the wheel's field names, the request goes out as
``pickle.dumps({"type": "run_macro", "payload": request})`` on a REQ
socket, and the reply is decoded by plain ``pickle.loads`` and checked as
openhcs checks it (``isinstance(payload, FijiMacroExecutionResponse)``).
When the openhcs 0.8.6 wheel is at hand (``OPENHCS_WHEEL`` or
``~/.cache/fiji-bridge/openhcs-0.8.6``, where ``make test`` puts it), its source is parsed to confirm those facts.

The macros run in the real bridge (``fiji-bridge serve --openhcs-port``,
real ImageJ 1); oracles are numpy on the same pixels.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import bridge_process, free_port_pair
from fiji_bridge.openhcs import OpenHCSReceiver
from fiji_bridge.openhcs.macro_wire import REQUEST_FIELDS, RESPONSE_FIELDS, loads_control
from fiji_bridge.openhcs.wire import RefusedPickle, WireError

ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- the 0.8.6 sender

SENDER = r'''
import json, pickle, sys, types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar
import numpy as np

# openhcs.runtime.fiji_macro_runtime as openhcs 0.8.6 defines it (fields, decorators, checks)
mod = types.ModuleType("openhcs.runtime.fiji_macro_runtime")
for name in ("openhcs", "openhcs.runtime"):
    sys.modules.setdefault(name, types.ModuleType(name))
sys.modules[mod.__name__] = mod


@dataclass(frozen=True, slots=True)
class FijiMacroExecutionRequest:
    message_type: ClassVar[str] = "run_macro"
    macro_path: Path
    input_filenames: tuple
    output_filenames: tuple
    directory_variable: str
    macro_variables: Mapping
    input_images: tuple

    def __post_init__(self):
        if len(self.input_filenames) != len(self.input_images):
            raise ValueError("cardinality")
        if not self.input_filenames or not self.output_filenames:
            raise ValueError("groups")
        if not self.directory_variable.strip():
            raise ValueError("blank")

    @classmethod
    def from_arrays(cls, *, macro_path, input_filenames, output_filenames, directory_variable, macro_variables, input_images):
        return cls(macro_path=Path(macro_path), input_filenames=input_filenames, output_filenames=output_filenames,
                   directory_variable=directory_variable, macro_variables=dict(macro_variables),
                   input_images=tuple(np.ascontiguousarray(image) for image in input_images))


@dataclass(frozen=True, slots=True)
class FijiMacroExecutionResponse:
    outputs: tuple


for cls in (FijiMacroExecutionRequest, FijiMacroExecutionResponse):
    cls.__module__ = mod.__name__
    setattr(mod, cls.__name__, cls)

spec = json.loads(sys.stdin.read())
images = [np.random.default_rng(i["seed"]).integers(0, i["high"], size=i["shape"]).astype(i["dtype"]) for i in spec["images"]]
request = FijiMacroExecutionRequest.from_arrays(
    macro_path=spec["macro_path"], input_filenames=tuple(spec["inputs"]), output_filenames=tuple(spec["outputs"]),
    directory_variable=spec["directory_variable"], macro_variables=spec["variables"], input_images=tuple(images))
wire = {"type": request.message_type, "payload": request}  # ViewerControlMessageRequest.to_wire_mapping
if spec.get("dump"):
    Path(spec["dump"]).write_bytes(pickle.dumps(wire, protocol=spec.get("protocol", pickle.DEFAULT_PROTOCOL)))
    print(json.dumps({"ok": True}))
    sys.exit(0)

import zmq  # ViewerControlMessageRequest.send
context = zmq.Context()
socket = context.socket(zmq.REQ)
socket.setsockopt(zmq.LINGER, 0)
socket.setsockopt(zmq.RCVTIMEO, int(spec.get("timeout", 120) * 1000))
socket.connect(spec["url"])
socket.send(pickle.dumps(wire))
payload = pickle.loads(socket.recv())
socket.close(); context.term()
assert isinstance(payload, Mapping)
# FijiMacroExecutionRequest.send
if payload.get("status") != "success":
    print(json.dumps({"ok": False, "error": f"Managed Fiji macro execution failed: {payload!r}"}))
    sys.exit(0)
result = payload.get("payload")
if not isinstance(result, FijiMacroExecutionResponse):
    print(json.dumps({"ok": False, "error": "missing its nominal execution result"}))
    sys.exit(0)
np.savez(spec["out"], *result.outputs)
print(json.dumps({"ok": True, "n": len(result.outputs)}))
'''


def send(spec: dict, timeout: float = 150) -> dict:
    proc = subprocess.run([sys.executable, "-c", SENDER], input=json.dumps(spec), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def images(spec: dict) -> list[np.ndarray]:
    """The sender's input images, regenerated from their seeds."""
    return [np.random.default_rng(i["seed"]).integers(0, i["high"], size=i["shape"]).astype(i["dtype"]) for i in spec["images"]]


def outputs(path: Path) -> list[np.ndarray]:
    with np.load(path) as z:
        return [z[f"arr_{k}"] for k in range(len(z.files))]


def _spec(tmp_path: Path, macro: str, imgs: list[dict], inputs: list[str], outs: list[str], variables: dict | None = None, **kw) -> dict:
    path = tmp_path / "macro.ijm"
    path.write_text(textwrap.dedent(macro), encoding="utf-8")
    return {"macro_path": str(path), "images": imgs, "inputs": inputs, "outputs": outs, "directory_variable": "Directory",
            "variables": variables or {}, "out": str(tmp_path / "out.npz"), **kw}


# --------------------------------------------------------------------------- decoding (no JVM)

PLANE = {"seed": 1, "high": 4000, "shape": [5, 7], "dtype": "uint16"}
CUBE = {"seed": 2, "high": 100, "shape": [3, 4, 6], "dtype": "float32"}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("protocol", [4, 5])
def test_request_pickled_as_openhcs_does_decodes_exactly(tmp_path, protocol):
    dump = tmp_path / "request.pickle"
    spec = _spec(tmp_path, "print(1);", [PLANE, CUBE], ["a.tif", "b.tiff"], ["c.tif"], {"sigma": "2"}, dump=str(dump), protocol=protocol)
    assert send(spec)["ok"]
    msg, req = loads_control(dump.read_bytes())
    assert msg["type"] == "run_macro" and req is not None
    assert str(req.macro_path) == spec["macro_path"]
    assert req.input_filenames == ("a.tif", "b.tiff") and req.output_filenames == ("c.tif",)
    assert req.directory_variable == "Directory" and req.macro_variables == {"sigma": "2"}
    for got, want in zip(req.input_images, images(spec), strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/fiji-bridge-pwned",))


def _request_pickle(**fields) -> bytes:
    """A hand-made request pickle (the class referenced by openhcs's name,
    arbitrary field values) -- what a hostile peer could send."""
    base = {"macro_path": "/x.ijm", "input_filenames": ("a.tif",), "output_filenames": ("b.tif",),
            "directory_variable": "Directory", "macro_variables": {}, "input_images": (np.zeros((2, 2), np.uint8),)}
    base.update(fields)
    state = pickle.dumps([base[f] for f in REQUEST_FIELDS], protocol=4)
    head = b"\x80\x04}(\x8c\x04type\x8c\trun_macro\x8c\x07payloadcopenhcs.runtime.fiji_macro_runtime\nFijiMacroExecutionRequest\n)\x81"
    # splice the state list's pickle (without PROTO/FRAME/STOP) after NEWOBJ, then BUILD + SETITEMS
    return head + _body(state) + b"bu."


def _body(p: bytes) -> bytes:
    import pickletools

    ops = list(pickletools.genops(p))
    start = next(pos for op, _, pos in ops if op.name not in ("PROTO", "FRAME"))
    return p[start:-1]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "payload, why",
    [
        (pickle.dumps({"type": "run_macro", "payload": _Evil()}), "refused posix.system"),
        (_request_pickle(macro_variables={"x": _Evil()}), "refused posix.system"),
        (_request_pickle(input_images=(np.array([1, "a"], dtype=object),)), "refused dtype"),
        (_request_pickle(input_filenames=("../../etc/x.tif",)), "plain file name"),
        (_request_pickle(input_filenames=("a.tif", "b.tif")), "cardinality"),
        (_request_pickle(directory_variable="x); exec(\"sh\""), "macro variable name"),
        (pickle.dumps({"type": "ping", "extra": np.zeros(3)}), "only dicts"),
        (pickle.dumps({"type": "run_macro", "payload": {"macro_path": "/x"}}), "FijiMacroExecutionRequest"),
    ],
)
def test_hostile_run_macro_pickles_are_refused(payload, why):
    with pytest.raises((RefusedPickle, WireError), match=why.replace("(", r"\(")):
        loads_control(payload)
    assert not Path("/tmp/fiji-bridge-pwned").exists()


def test_our_stand_ins_match_the_wheel():
    """openhcs 0.8.6's own source (when its wheel is at hand): class names,
    frozen+slots dataclasses, field names in order."""
    # `make test` downloads the wheel (no dependencies, never imported) into the cache
    folders = [Path.home() / ".cache" / "fiji-bridge" / "openhcs-0.8.6", Path("/tmp/openhcs")]
    found = sorted(w for d in folders if d.is_dir() for w in d.glob("openhcs-0.8.6-*.whl"))
    wheel = os.environ.get("OPENHCS_WHEEL") or (found[0] if found else None)
    if not wheel or not Path(wheel).is_file():
        pytest.skip("the openhcs 0.8.6 wheel is not here (pip download --no-deps openhcs==0.8.6 -d ~/.cache/fiji-bridge/openhcs-0.8.6)")
    with zipfile.ZipFile(wheel) as z:
        tree = ast.parse(z.read("openhcs/runtime/fiji_macro_runtime.py"))
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    for name, want in (("FijiMacroExecutionRequest", REQUEST_FIELDS), ("FijiMacroExecutionResponse", RESPONSE_FIELDS)):
        cls = classes[name]
        deco = next(d for d in cls.decorator_list if isinstance(d, ast.Call) and getattr(d.func, "id", "") == "dataclass")
        assert {k.arg: k.value.value for k in deco.keywords} == {"frozen": True, "slots": True}
        fields = [s.target.id for s in cls.body if isinstance(s, ast.AnnAssign) and "ClassVar" not in ast.unparse(s.annotation)]
        assert tuple(fields) == want
        sender = ast.parse(SENDER)
        ours = next(n for n in sender.body if isinstance(n, ast.ClassDef) and n.name == name)
        assert tuple(s.target.id for s in ours.body if isinstance(s, ast.AnnAssign) and "ClassVar" not in ast.unparse(s.annotation)) == want


# --------------------------------------------------------------------------- who may send it (no JVM)


def _never(code, args, timeout):  # the policy must refuse before anything runs
    raise AssertionError("run_macro ran although the policy forbids it")


@pytest.mark.timeout(90)
def test_run_macro_is_refused_on_tcp_and_on_an_open_ipc_folder(tmp_path):
    ipc = Path(tempfile.mkdtemp(prefix="ohm", dir="/tmp"))
    try:
        ipc.chmod(0o755)
        port = free_port_pair()
        spec = _spec(tmp_path, "print(1);", [PLANE], ["a.tif"], ["b.tif"])
        with OpenHCSReceiver(port, lambda *a: None, transport="both", ipc_dir=ipc, legacy_ack_port=None, macro_runner=_never) as r:
            assert r.macro_transports() == []  # the folder is open to others
            out = send({**spec, "url": f"tcp://127.0.0.1:{port + 1000}", "timeout": 30})
            assert not out["ok"] and "--openhcs-macros any" in out["error"]
            out = send({**spec, "url": f"ipc://{ipc}/openhcs-zmq-{port + 1000}.sock", "timeout": 30})
            assert not out["ok"] and "chmod 700" in out["error"]
            ipc.chmod(0o700)
            assert r.macro_transports() == ["ipc"]
            out = send({**spec, "url": f"tcp://127.0.0.1:{port + 1000}", "timeout": 30})
            assert not out["ok"] and "--openhcs-macros any" in out["error"]
            assert r.stats()["macros"] == 0
    finally:
        shutil.rmtree(ipc, ignore_errors=True)


# --------------------------------------------------------------------------- the real bridge


@pytest.fixture(scope="module")
def bridge(tmp_path_factory):
    home = Path(tempfile.mkdtemp(prefix="ohm", dir="/tmp"))  # short: ipc paths must fit ~107 bytes
    tmp = Path(tempfile.mkdtemp(prefix="ohmt"))
    p = free_port_pair()
    q = next(q for q in (free_port_pair() for _ in range(50)) if not {q, q + 1000} & {p, p + 1000})
    try:
        with bridge_process(
            tmp_path_factory.mktemp("bridge"), "--no-display", "--engine", "imagej1", "--openhcs-port", str(q),
            port=p, env={"HOME": str(home), "TMPDIR": str(tmp)},
        ) as bp:
            yield {"bp": bp, "url": f"ipc://{home}/.openhcs/ipc/openhcs-zmq-{q + 1000}.sock", "tcp": f"tcp://127.0.0.1:{q + 1000}", "home": home, "tmp": tmp}
    finally:
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)


def _leftovers(bridge) -> list[str]:
    return sorted(p.name for p in bridge["tmp"].glob("fiji_bridge_openhcs_macro_*"))


@pytest.mark.imagej
@pytest.mark.timeout(180)
def test_two_inputs_two_outputs_with_variables(bridge, tmp_path):
    """uint16 + offset (saturating) and float32 x factor, the offset and
    factor passed as OpenHCS macro_variables (``#@`` parameters)."""
    assert (bridge["home"] / ".openhcs" / "ipc").stat().st_mode & 0o777 == 0o700
    macro = """\
        #@ String Directory
        #@ String offset
        #@ String factor
        open(Directory + "/input_0.tiff");
        run("Add...", "value=" + offset);
        saveAs("Tiff", Directory + "/output_0.tiff");
        close();
        open(Directory + "/input_1.tif");
        run("Multiply...", "value=" + factor);
        saveAs("Tiff", Directory + "/output_1.tif");
        close();
    """
    imgs = [{"seed": 11, "high": 65535, "shape": [40, 50], "dtype": "uint16"}, {"seed": 12, "high": 1000, "shape": [30, 20], "dtype": "float32"}]
    spec = _spec(tmp_path, macro, imgs, ["input_0.tiff", "input_1.tif"], ["output_0.tiff", "output_1.tif"], {"offset": "1000", "factor": "2.5"}, url=bridge["url"])
    out = send(spec)
    assert out == {"ok": True, "n": 2}, out
    a, b = images(spec)
    got = outputs(tmp_path / "out.npz")
    want = [np.minimum(a.astype(np.int64) + 1000, 65535).astype(np.uint16), (b.astype(np.float64) * 2.5).astype(np.float32)]
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g, w)
    assert _leftovers(bridge) == []


@pytest.mark.imagej
@pytest.mark.timeout(180)
def test_stack_in_projection_out(bridge, tmp_path):
    macro = """\
        #@ String Directory
        open(Directory + "/stack.tif");
        run("Z Project...", "projection=[Max Intensity]");
        saveAs("Tiff", Directory + "/max.tif");
    """
    imgs = [{"seed": 21, "high": 250, "shape": [4, 16, 24], "dtype": "uint8"}]
    spec = _spec(tmp_path, macro, imgs, ["stack.tif"], ["max.tif"], url=bridge["url"])
    assert send(spec) == {"ok": True, "n": 1}
    (got,) = outputs(tmp_path / "out.npz")
    np.testing.assert_array_equal(got, images(spec)[0].max(axis=0))


@pytest.mark.imagej
@pytest.mark.timeout(240)
def test_failures_are_errors_and_the_bridge_keeps_serving(bridge, tmp_path):
    # a declared output the macro never writes: openhcs's own message
    spec = _spec(tmp_path, '#@ String Directory\nopen(Directory + "/in.tif");\n', [PLANE], ["in.tif"], ["never.tif"], url=bridge["url"])
    out = send(spec)
    assert not out["ok"] and "did not produce declared outputs: ('never.tif',)" in out["error"]
    # a macro that fails in ImageJ
    spec = _spec(tmp_path, '#@ String Directory\nrun("No Such Command Anywhere");\n', [PLANE], ["in.tif"], ["o.tif"], url=bridge["url"])
    out = send(spec)
    assert not out["ok"] and "No Such Command Anywhere" in out["error"], out
    # a macro file that does not exist
    spec = _spec(tmp_path, "", [PLANE], ["in.tif"], ["o.tif"], url=bridge["url"])
    spec["macro_path"] = str(tmp_path / "missing.ijm")
    out = send(spec)
    assert not out["ok"] and "not found" in out["error"]
    # loopback tcp: refused by default
    spec = _spec(tmp_path, '#@ String Directory\nprint(1);\n', [PLANE], ["in.tif"], ["o.tif"], url=bridge["tcp"])
    out = send(spec)
    assert not out["ok"] and "--openhcs-macros any" in out["error"]
    # and afterwards a good one works, the bridge answers, nothing is left behind
    spec = _spec(tmp_path, '#@ String Directory\nopen(Directory + "/in.tif");\nrun("Flip Horizontally");\nsaveAs("Tiff", Directory + "/o.tif");\n', [PLANE], ["in.tif"], ["o.tif"], url=bridge["url"])
    assert send(spec) == {"ok": True, "n": 1}
    np.testing.assert_array_equal(outputs(tmp_path / "out.npz")[0], images(spec)[0][:, ::-1])
    with bridge["bp"].client() as c:
        assert c.ping()
        assert c.status()["openhcs"]["macros"] >= 1
    assert _leftovers(bridge) == []


@pytest.mark.imagej
@pytest.mark.timeout(120)
def test_macros_any_serves_tcp_and_off_refuses_even_a_private_ipc_folder(ij, tmp_path):
    """The receiver with ImageJ 1 in this process as its engine: ``any``
    runs OpenHCS's request over loopback tcp; ``off`` refuses it on a 0700
    ipc folder."""
    def run(code, args, timeout):
        ij.run_macro(code, args=dict(args), timeout=timeout, outputs=[])

    macro = '#@ String Directory\nopen(Directory + "/a.tif");\nrun("Invert");\nsaveAs("Tiff", Directory + "/b.tif");\n'
    imgs = [{"seed": 31, "high": 256, "shape": [12, 9], "dtype": "uint8"}]
    port = free_port_pair()
    with OpenHCSReceiver(port, lambda *a: None, transport="tcp", legacy_ack_port=None, macro_runner=run, macros="any") as r:
        assert r.macro_transports() == ["tcp"]
        spec = _spec(tmp_path, macro, imgs, ["a.tif"], ["b.tif"], url=f"tcp://127.0.0.1:{port + 1000}")
        assert send(spec) == {"ok": True, "n": 1}
        np.testing.assert_array_equal(outputs(tmp_path / "out.npz")[0], 255 - images(spec)[0])
        assert r.stats()["macros"] == 1
    ipc = Path(tempfile.mkdtemp(prefix="ohm", dir="/tmp"))  # mkdtemp: 0700
    try:
        with OpenHCSReceiver(port, lambda *a: None, transport="ipc", ipc_dir=ipc, legacy_ack_port=None, macro_runner=run, macros="off") as r:
            assert r.macro_transports() == []
            out = send({**spec, "url": f"ipc://{ipc}/openhcs-zmq-{port + 1000}.sock", "timeout": 30})
            assert not out["ok"] and "switched off" in out["error"]
    finally:
        shutil.rmtree(ipc, ignore_errors=True)
