"""Hostile and buggy peers against one real bridge: nothing crashes, nothing
hangs, no stranger runs code.

Every attack is bounded (counts, seconds) and runs on loopback or /dev/shm
only. After each one :func:`intact` checks the bridge as a user would: it
answers ping, a tiny macro computes 6 * 7, the stack streamed before any
attack is unchanged (numpy oracle: the array sent), no shared-memory segment
of the attack is left, and the bridge has no process beyond its engine
worker (and that worker's private Xvfb).

The time each case took to be answered is recorded; set
``FIJI_BRIDGE_HOSTILE_REPORT=FILE`` to get the table as JSON lines.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import random
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
import zmq.utils.monitor  # noqa: F401  (imported before a fork: the child may not import)

from conftest import bridge_process, free_port_pair
from fiji_bridge.client import BridgeClient, BridgeError, PlanesRejected
from fiji_bridge.engine.base import MacroError
from fiji_bridge.protocol import ErrorCode
from fiji_bridge.security import apply_client_secret, ensure_secret, secret_path

pytestmark = [pytest.mark.imagej, pytest.mark.timeout(180)]

FIJI_BRIDGE = [sys.executable, "-m", "fiji_bridge.cli"]
SHM = Path("/dev/shm")
#: segments this module creates on purpose start with this
ATTACK = f"fjbh{os.getpid()}"
REPORT: list[dict] = []


def record(case: str, result: str, seconds: float) -> None:
    REPORT.append({"case": case, "result": result, "seconds": round(seconds, 3)})


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    out = os.environ.get("FIJI_BRIDGE_HOSTILE_REPORT")
    lines = [json.dumps(r) for r in REPORT]
    if out:
        Path(out).write_text("\n".join(lines) + "\n")
    for f in SHM.glob(f"{ATTACK}*"):
        with contextlib.suppress(OSError):
            f.unlink()


# --------------------------------------------------------------------------- the bridge under attack


@pytest.fixture(scope="module")
def bridge(tmp_path_factory):
    # a worker silent for 6 s is restarted (default 60 s: the SIGSTOP case stays short)
    with bridge_process(tmp_path_factory.mktemp("hostile"), "--no-display", "--engine", "imagej1",
                        env={"FIJI_BRIDGE_HEARTBEAT_KILL": "6"}) as bp:
        yield bp


@pytest.fixture(scope="module")
def baseline(bridge):
    """A stack streamed (over shared memory) before every attack."""
    arr = np.random.default_rng(12).integers(0, 60000, (2, 1, 2, 48, 64), dtype=np.uint16)
    with bridge.client() as c:
        c.send_stack(arr, "baseline")
    return arr


def children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for c in children(todo.pop()):
            out.append(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def intact(bridge, baseline, timeout: float = 60.0) -> dict:
    """The bridge serves as before (see the module doc); returns its status."""
    deadline = time.monotonic() + timeout
    with bridge.client(timeout=30) as c:
        assert c.ping(timeout=5)["ok"]
        while c.status()["engine"]["state"] != "ready":  # a restart after the attack
            assert time.monotonic() < deadline, c.status()["engine"]
            time.sleep(0.2)
        assert "42" in c.run_macro("print(6 * 7);", timeout=60).log
        np.testing.assert_array_equal(c.get_stack("baseline"), baseline)
        st = c.status()
    assert sorted(SHM.glob(f"{ATTACK}*")) == [] and sorted(SHM.glob(f"fjb_{os.getpid()}_*")) == []
    worker = st["engine"]["pid"]
    while True:  # a killed worker is reaped by the supervisor within a tick
        kids = [p for p in children(bridge.proc.pid) if alive(p)]
        if kids == [worker] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert kids == [worker], f"bridge children {kids}, worker {worker}"
    assert len([p for p in descendants(bridge.proc.pid) if alive(p)]) <= 2  # the worker and its Xvfb
    return st


def raw_socket(ctx: zmq.Context, port: int, secret: bool = True) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    if secret:
        apply_client_secret(s, ensure_secret())
    s.connect(f"tcp://127.0.0.1:{port}")
    return s


def ask(sock: zmq.Socket, frames: list, timeout: float = 10.0) -> dict:
    sock.send_multipart([b""] + frames)
    assert sock.poll(int(timeout * 1000)), f"no answer within {timeout} s to {frames[0][:80]!r}"
    reply = sock.recv_multipart()
    body = reply[1:] if reply and not reply[0] else reply
    return json.loads(body[0])


def plane_header(seq: int, transport: str = "inline", shape=(16, 16), **over) -> bytes:
    h = {"type": "plane", "stream": f"{ATTACK}-s", "seq": seq, "shape": list(shape), "dtype": "uint16",
         "transport": transport, "key": "fuzz-target", "components": {"channel": 0}}
    h.update(over)
    return json.dumps(h).encode()


# --------------------------------------------------------------------------- fuzzing both channels


def _mutations(rng: random.Random, valid: list[bytes], n: int):
    for i in range(n):
        base = bytearray(rng.choice(valid))
        how = i % 6
        if how == 0:  # flip bytes
            for _ in range(rng.randint(1, 8)):
                base[rng.randrange(len(base))] = rng.randrange(256)
        elif how == 1:  # truncate
            base = base[: rng.randrange(len(base))]
        elif how == 2:  # random bytes
            base = bytearray(rng.randbytes(rng.randint(0, 300)))
        elif how == 3:  # type confusion of every field
            d = json.loads(bytes(base))
            k = rng.choice(list(d))
            d[k] = rng.choice([None, True, -1, 2**70, 1e308, "", "x" * 5000, [], {}, [[[]]], {"a": {"b": {}}}])
            base = bytearray(json.dumps(d).encode())
        elif how == 4:  # deep nesting
            depth = rng.choice([500, 5000, 100000])
            base = bytearray(b'{"type": "ping", "id": 1, "x": ' + b"[" * depth + b"]" * depth + b"}")
        else:  # unknown types and ids
            base = bytearray(json.dumps({"type": rng.choice(["format_disk", "exec", "", "PING", "__class__"]), "id": rng.choice([1, "a", None, [], {}])}).encode())
        yield bytes(base)


CONTROL_VALID = [
    b'{"type": "ping", "id": 1}',
    b'{"type": "status", "id": 2}',
    b'{"type": "list_stacks", "id": 3}',
    b'{"type": "stack_info", "id": 4, "key": "fuzz-none"}',
    b'{"type": "get_stack", "id": 5, "key": "fuzz-none"}',
    b'{"type": "shm_probe", "id": 6, "name": "fjbh_none_0_0", "size": 16}',
]


def test_fuzzed_control_frames_all_get_answers(bridge, baseline):
    rng = random.Random(1201)
    ctx = zmq.Context()
    s = raw_socket(ctx, bridge.port)
    t0 = time.monotonic()
    worst, answered, n = 0.0, 0, 600
    try:
        for i, msg in enumerate(_mutations(rng, CONTROL_VALID, n)):
            extra = [rng.randbytes(rng.randint(0, 64))] if i % 7 == 0 else []
            t = time.monotonic()
            r = ask(s, [msg] + extra)
            worst = max(worst, time.monotonic() - t)
            assert "ok" in r and (r["ok"] or r["error"]["code"] in vars(ErrorCode).values()), r
            answered += 1
        # an empty body is answered too
        r = ask(s, [])
        assert r["error"]["code"] == ErrorCode.BAD_FRAME
    finally:
        s.close()
        ctx.term()
    assert answered == n
    record(f"control fuzz ({n} frames)", f"{answered} answered, 0 lost", worst)
    intact(bridge, baseline)


def test_fuzzed_data_frames_all_get_acks(bridge, baseline):
    rng = random.Random(1202)
    valid = [plane_header(0), plane_header(1, "shm", offset=0), plane_header(2, shape=(4, 4))]
    payloads = [b"\0" * 512, b"\0" * 32, b"fjbh_none_1_1", b"..", b".", b"/", b"../../etc/passwd", b""]
    ctx = zmq.Context()
    s = raw_socket(ctx, bridge.port + 1000)
    worst, n = 0.0, 600
    try:
        for msg in _mutations(rng, valid, n):
            t = time.monotonic()
            ack = ask(s, [msg, rng.choice(payloads)])
            worst = max(worst, time.monotonic() - t)
            assert "ok" in ack and (ack["ok"] or ack["error"]["code"] in vars(ErrorCode).values()), ack
        for frames in ([b"one"], [b"a", b"b", b"c"]):
            assert ask(s, frames)["error"]["code"] == ErrorCode.BAD_FRAME
    finally:
        s.close()
        ctx.term()
    record(f"data fuzz ({n} frames)", "every frame acknowledged", worst)
    with bridge.client() as c:
        for k in c.list_stacks():
            if k.startswith("fuzz"):
                c.close_stack(k)
    intact(bridge, baseline)


def test_deeply_nested_json_is_a_protocol_error_on_both_channels(bridge, baseline):
    deep = b'{"type": "ping", "id": 7, "x": ' + b"[" * 200000 + b"]" * 200000 + b"}"
    ctx = zmq.Context()
    try:
        for port, frames in ((bridge.port, [deep]), (bridge.port + 1000, [deep, b""])):
            s = raw_socket(ctx, port)
            t = time.monotonic()
            r = ask(s, frames, timeout=5)
            record(f"nested JSON, 200,000 deep ({'control' if port == bridge.port else 'data'})", r["error"]["code"], time.monotonic() - t)
            assert r["ok"] is False and r["error"]["code"] == ErrorCode.BAD_JSON
            s.close()
    finally:
        ctx.term()
    intact(bridge, baseline)


# --------------------------------------------------------------------------- bad planes and segments


def _make_segment(name: str, data: bytes, mode: int = 0o600) -> Path:
    p = SHM / name
    fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
    os.write(fd, data)
    os.close(fd)
    return p


def _bad_segments(tmp_path: Path) -> list[tuple[str, str, str]]:
    """(case, segment name, expected code) after creating what the case needs."""
    private = tmp_path / "private.bin"
    private.write_bytes(b"PRIVATE-BYTES-" * 40)
    cases = []
    fifo = f"{ATTACK}_fifo"
    os.mkfifo(SHM / fifo, 0o600)
    cases.append(("FIFO named as a segment", fifo, ErrorCode.BAD_SHM))
    link = f"{ATTACK}_link"
    (SHM / link).symlink_to(private)
    cases.append(("symlink to a private file", link, ErrorCode.BAD_SHM))
    folder = f"{ATTACK}_dir"
    (SHM / folder).mkdir()
    cases.append(("folder named as a segment", folder, ErrorCode.BAD_SHM))
    if os.geteuid() == 0:
        foreign = f"{ATTACK}_foreign"
        _make_segment(foreign, b"\1" * 512)
        os.chown(SHM / foreign, 65534, 65534)  # another user's segment (nobody)
        cases.append(("another user's segment", foreign, ErrorCode.BAD_SHM))
    short = f"{ATTACK}_short"
    _make_segment(short, b"\2" * 100)
    cases.append(("segment shorter than its shape", short, ErrorCode.SHAPE_MISMATCH))
    cases += [("segment name '.'", ".", ErrorCode.BAD_SHM), ("segment name '..'", "..", ErrorCode.BAD_SHM),
              ("missing segment", f"{ATTACK}_missing", ErrorCode.BAD_SHM)]
    return cases


def _cleanup_segments() -> None:
    for p in SHM.glob(f"{ATTACK}*"):
        with contextlib.suppress(OSError):
            p.rmdir() if p.is_dir() and not p.is_symlink() else p.unlink()


def test_bad_segments_are_refused_at_once_by_planes_and_shm_probe(bridge, baseline, tmp_path):
    cases = _bad_segments(tmp_path)
    ctx = zmq.Context()
    data = raw_socket(ctx, bridge.port + 1000)
    ctrl = raw_socket(ctx, bridge.port)
    try:
        for i, (case, name, code) in enumerate(cases):
            t = time.monotonic()
            ack = ask(data, [plane_header(i, "shm"), name.encode()], timeout=3)
            took = time.monotonic() - t
            assert ack["ok"] is False and ack["error"]["code"] == code, (case, ack)
            probe = ask(ctrl, [json.dumps({"type": "shm_probe", "id": i, "name": name, "size": 16}).encode()], timeout=3)
            if code == ErrorCode.SHAPE_MISMATCH:  # our own segment, just short: 16 bytes are readable
                assert probe["ok"] and probe["readable"] and bytes.fromhex(probe["data"]) == b"\2" * 16
            elif probe["ok"]:
                assert probe["readable"] is False and "PRIVATE" not in json.dumps(probe), (case, probe)
            else:
                assert probe["error"]["code"] == ErrorCode.BAD_SHM, (case, probe)
            record(case, code, took)
    finally:
        data.close()
        ctrl.close()
        ctx.term()
        _cleanup_segments()
    intact(bridge, baseline)


def test_huge_shapes_are_bad_fields(bridge, baseline):
    ctx = zmq.Context()
    data = raw_socket(ctx, bridge.port + 1000)
    ctrl = raw_socket(ctx, bridge.port)
    try:
        t = time.monotonic()
        ack = ask(data, [plane_header(0, "inline", shape=(131072, 131072)), b"\0" * 16])
        record("plane of 131072 x 131072 (32 GiB)", ack["error"]["code"], time.monotonic() - t)
        assert ack["error"]["code"] == ErrorCode.BAD_FIELD
        image = {"shape": [1 << 23] * 8, "dtype": "float64", "frame": 0}  # 2**184 * 8 bytes: over int64
        t = time.monotonic()
        r = ask(ctrl, [json.dumps({"type": "run_macro", "id": 1, "code": "x=1;", "image": image, "dims": "TZCYX"}).encode(), b"\0" * 8])
        record("run_macro image whose byte count overflows int64", r["error"]["code"], time.monotonic() - t)
        assert r["error"]["code"] == ErrorCode.BAD_FIELD, r
    finally:
        data.close()
        ctrl.close()
        ctx.term()
    intact(bridge, baseline)


def test_a_segment_shrinking_under_the_bridge_is_bad_shm_never_sigbus(bridge, baseline):
    name = f"{ATTACK}_shrink"
    nbytes = 1024 * 2048 * 2
    fd = os.open(SHM / name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    os.ftruncate(fd, nbytes)
    stop = threading.Event()

    def shrink_and_grow():
        while not stop.is_set():
            os.ftruncate(fd, 4096)
            os.ftruncate(fd, nbytes)

    th = threading.Thread(target=shrink_and_grow, daemon=True)
    th.start()
    ctx = zmq.Context()
    s = raw_socket(ctx, bridge.port + 1000)
    codes: dict[str, int] = {}
    worst = 0.0
    try:
        for i in range(150):
            t = time.monotonic()
            ack = ask(s, [plane_header(i, "shm", shape=(1024, 2048), key=f"fuzz-shrink"), name.encode()])
            worst = max(worst, time.monotonic() - t)
            code = "ok" if ack["ok"] else ack["error"]["code"]
            codes[code] = codes.get(code, 0) + 1
    finally:
        stop.set()
        th.join(5)
        os.close(fd)
        s.close()
        ctx.term()
        _cleanup_segments()
    assert set(codes) <= {"ok", ErrorCode.BAD_SHM, ErrorCode.SHAPE_MISMATCH}, codes
    assert bridge.proc.poll() is None, "the bridge died (SIGBUS?)"
    record("segment shrunk while read (150 planes)", ", ".join(f"{k} {v}" for k, v in sorted(codes.items())), worst)
    with bridge.client() as c:
        with contextlib.suppress(BridgeError):
            c.close_stack("fuzz-shrink")
    intact(bridge, baseline)


# --------------------------------------------------------------------------- other local users


def _as_other_user(uid: int, gid: int, port: int, secret_file: str, marker: str) -> dict:
    """Fork a child that drops to ``uid`` and tries the bridge; what it got."""
    bridge_secret = str(secret_path())  # the bridge user's, computed before dropping to uid
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no imports from here on (the venv may be unreadable to uid)
        out = {}
        try:
            os.close(rfd)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            try:
                open(bridge_secret).read()
                out["read_secret"] = True
            except OSError as e:
                out["read_secret"] = type(e).__name__
            ctx = zmq.Context()
            got = {}
            for what, port_ in (("control", port), ("data", port + 1000)):
                for mech in ("null", "curve-guess"):
                    s = ctx.socket(zmq.DEALER)
                    s.linger = 0
                    if mech == "curve-guess":  # keys from a guessed secret
                        apply_client_secret(s, secrets.token_hex(32))
                    s.connect(f"tcp://127.0.0.1:{port_}")
                    macro = json.dumps({"type": "run_macro", "id": 1, "code": f'File.saveString("pwned", "{marker}");'}).encode()
                    s.send_multipart([b"", macro] if what == "control" else [b"", plane_header(0), b"\0" * 512])
                    got[f"{what}/{mech}"] = s.poll(1500)
                    s.close(0)
            ctx.term()
            out["answers"] = got
            os.environ["FIJI_BRIDGE_SECRET_FILE"] = secret_file
            try:
                BridgeClient.connect(port, timeout=5)
                out["client"] = "connected"
            except BridgeError as e:
                out["client"] = f"{e.code}: {e}"
        except BaseException as e:  # report anything
            out["crash"] = repr(e)
        os.write(wfd, json.dumps(out).encode())
        os._exit(0)
    os.close(wfd)
    buf = b""
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        if select.select([rfd], [], [], 1)[0]:
            chunk = os.read(rfd, 65536)
            if not chunk:
                break
            buf += chunk
    os.close(rfd)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return json.loads(buf or b"{}")


@pytest.mark.skipif(os.geteuid() != 0, reason="creating a second local user needs root")
def test_a_second_local_user_gets_nothing_without_the_secret(bridge, baseline, tmp_path):
    name = f"fjbh{secrets.token_hex(3)}"
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True, capture_output=True, timeout=30)
    try:
        ent = pwd.getpwnam(name)
        theirs = Path(tempfile.mkdtemp(prefix="fjbh", dir="/tmp"))  # reachable for them (tmp_path is not)
        os.chown(theirs, ent.pw_uid, ent.pw_gid)
        marker = tmp_path / "pwned"
        with bridge.client() as c:
            refused_before = c.status()["auth"]["refused"]
            if "fuzz-target" in c.list_stacks():
                c.close_stack("fuzz-target")
        t = time.monotonic()
        got = _as_other_user(ent.pw_uid, ent.pw_gid, bridge.port, str(theirs / "secret"), str(marker))
        took = time.monotonic() - t
    finally:
        subprocess.run(["userdel", name], capture_output=True, timeout=30)
        shutil.rmtree(theirs, ignore_errors=True)
    assert "crash" not in got, got
    assert got["read_secret"] == "PermissionError"
    assert got["answers"] == {"control/null": 0, "control/curve-guess": 0, "data/null": 0, "data/curve-guess": 0}
    assert got["client"].startswith("unauthorized: ") and "refused" in got["client"]
    assert not marker.exists()  # no macro ran
    with bridge.client() as c:
        assert c.status()["auth"]["refused"] >= refused_before + 6  # each of its handshakes, logged
        assert "fuzz-target" not in c.list_stacks()  # its planes never arrived
    record("second local user, no secret", "nothing answered; client: unauthorized", took)
    intact(bridge, baseline)


# --------------------------------------------------------------------------- dying and stopped processes


def _macro_in_thread(bridge, code: str, **kw):
    out: dict = {}

    def run():
        try:
            with bridge.client(timeout=30) as c:
                out["result"] = c.run_macro(code, **kw)
        except Exception as e:  # noqa: BLE001 - checked by the caller
            out["error"] = e
        out["at"] = time.monotonic()

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th, out


def _wait_running(bridge, op="run_macro", timeout=20.0) -> int:
    with bridge.client() as c:
        deadline = time.monotonic() + timeout
        while True:
            st = c.status()["engine"]
            if st["running"] == op:
                return st["pid"]
            assert time.monotonic() < deadline, st
            time.sleep(0.05)


def test_engine_sigkill_mid_macro(bridge, baseline):
    th, out = _macro_in_thread(bridge, "wait(20000);", stack="baseline", timeout=60)
    worker = _wait_running(bridge)
    t = time.monotonic()
    os.kill(worker, signal.SIGKILL)
    th.join(60)
    took = out["at"] - t
    assert isinstance(out.get("error"), MacroError) and out["error"].kind == "engine", out
    record("engine worker SIGKILL mid-macro", "MacroError(engine), restarted", took)
    st = intact(bridge, baseline)
    assert st["engine"]["pid"] != worker and not alive(worker)


def test_engine_sigstop_mid_macro_shows_unresponsive_then_restarts(bridge, baseline):
    th, out = _macro_in_thread(bridge, "wait(20000);", timeout=60)
    worker = _wait_running(bridge)
    os.kill(worker, signal.SIGSTOP)
    t = time.monotonic()
    try:
        with bridge.client() as c:
            while c.status()["engine"]["state"] != "unresponsive":
                assert time.monotonic() - t < 8, c.status()["engine"]
                time.sleep(0.1)
            seen = time.monotonic() - t
            assert c.ping(timeout=2)["engine"] == "unresponsive"
        th.join(60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGCONT)
    assert isinstance(out.get("error"), MacroError) and out["error"].kind == "engine", out
    assert "no sign of life" in str(out["error"])
    record("engine worker SIGSTOP mid-macro", f"status 'unresponsive' after {seen:.1f} s; restarted after {out['at'] - t:.1f} s", seen)
    st = intact(bridge, baseline)
    assert st["engine"]["pid"] != worker and not alive(worker)


PRODUCER = textwrap.dedent("""
    import sys, numpy as np
    from fiji_bridge.client import BridgeClient
    c = BridgeClient.connect(int(sys.argv[1]))
    plane = np.full((1024, 1024), 7, np.uint16)
    i = 0
    while True:
        c.send_plane(plane, "victim", t=i % 16)
        i += 1
        if i == 20:
            print("streaming", flush=True)
""")


def test_producer_sigkill_mid_stream_leaves_no_segment(bridge, baseline, tmp_path):
    script = tmp_path / "producer.py"
    script.write_text(PRODUCER)
    p = subprocess.Popen([sys.executable, str(script), str(bridge.port)], stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        assert p.stdout.readline().strip() == b"streaming"
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
    t = time.monotonic()
    prefix = f"fjb_{p.pid}_"
    while any(SHM.glob(prefix + "*")) and time.monotonic() - t < 15:
        time.sleep(0.1)
    took = time.monotonic() - t
    assert not any(SHM.glob(prefix + "*")), sorted(SHM.glob(prefix + "*"))
    with bridge.client() as c:
        victim = c.get_stack("victim")
        assert victim.shape[0] >= 1 and set(np.unique(victim)) <= {0, 7}
        c.close_stack("victim")
    record("producer SIGKILL mid-stream", "its segments gone, stack consistent", took)
    intact(bridge, baseline)


def test_eight_concurrent_clients_get_their_own_answers(bridge, baseline):
    errors: list = []
    times: list[float] = []

    def one(i: int) -> None:
        try:
            arr = np.random.default_rng(100 + i).integers(0, 1000 * (i + 1), (1, 2, 1, 40, 40), dtype=np.uint16)
            with bridge.client(timeout=60) as c:
                for rep in range(3):
                    t = time.monotonic()
                    c.send_stack(arr, f"client{i}")
                    res = c.run_macro('Stack.setSlice(2); getStatistics(a, mean); print("mean=" + d2s(mean, 4));', stack=f"client{i}", timeout=60)
                    mean = float(res.log.split("mean=")[1].split()[0])
                    assert abs(mean - arr[0, 1, 0].mean()) < 1e-3, (i, mean)
                    np.testing.assert_array_equal(c.get_stack(f"client{i}"), arr)
                    assert c.stack_info(f"client{i}").shape == arr.shape
                    times.append(time.monotonic() - t)
                c.close_stack(f"client{i}")
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append((i, e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(150)
    assert not errors, errors
    record("8 concurrent clients (stream + macro + get_stack x3)", "every reply its own", max(times))
    intact(bridge, baseline)


def test_quit_then_a_dialog_macro_does_not_lose_the_log(bridge, baseline):
    with bridge.client(timeout=30) as c:
        c.run_macro('run("Quit");', timeout=60)
        with pytest.raises(MacroError, match="dialog"):
            c.run_macro('Dialog.create("hostile"); Dialog.addNumber("n", 1); Dialog.show();', timeout=60)
        t = time.monotonic()
        logs = [c.run_macro(f'print("still logging {i}");', timeout=60).log for i in range(3)]
        took = time.monotonic() - t
    assert logs == [f"still logging {i}\n" for i in range(3)], logs
    record('run("Quit") then a dialog macro', "fresh ImageJ, logs intact", took)
    intact(bridge, baseline)


def test_save_to_outside_the_allowed_roots_is_forbidden(bridge, baseline):
    target = Path("/etc") / f"{ATTACK}.zarr"
    with bridge.client(timeout=30) as c:
        t = time.monotonic()
        with pytest.raises(BridgeError) as ei:
            c.run_macro('newImage("x", "8-bit", 8, 8, 1);', stack="baseline", save_to=str(target), timeout=60)
        took = time.monotonic() - t
    assert ei.value.code == ErrorCode.FORBIDDEN and "--allow-save-to" in str(ei.value)
    assert not target.exists()
    record("save_to /etc/...", "forbidden", took)
    intact(bridge, baseline)


# --------------------------------------------------------------------------- memory


def test_many_tiny_stacks_hit_the_cap_with_their_real_cost(tmp_path):
    cap = 2 << 20
    with bridge_process(tmp_path, "--no-display", wait_engine=False, env={"FIJI_BRIDGE_MAX_STACK_BYTES": str(cap)}) as bp:
        with bp.client(timeout=30) as c:
            t = time.monotonic()
            for i in range(1500):
                c.send_plane(np.ones((4, 4), np.uint8), f"tiny{i}")
            with pytest.raises(PlanesRejected) as ei:
                c.flush()
            took = time.monotonic() - t
            st = c.status()
        kept = len(st["stacks"])
        # the store's own bytes (pixels and plane index), and 4 KiB of bookkeeping a stack on top
        assert 16 * kept <= st["memory"]["data"] <= 32 * kept and st["memory"]["used"] == st["memory"]["data"] + 4096 * kept <= cap
        assert 1500 - kept == len(ei.value.rejected) and "memory cap" in ei.value.rejected[0]["message"]
        assert 300 < kept < 600  # 2 MiB at ~4 KiB a stack, not 2 MiB / 16 B pixels = 131072 stacks
    record("1,500 one-plane stacks against a 2 MiB cap", f"{kept} kept, the rest rejected", took)


# --------------------------------------------------------------------------- owners that die


def _bridges_of(parent: int, flag: bytes = b"--parent-pid") -> list[int]:
    """Live bridges (or, ``flag=b"--parent"``, engine workers) that ``parent`` owns."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if flag in cmd and cmd[cmd.index(flag) + 1] == str(parent).encode() and alive(int(d.name)):
                out.append(int(d.name))
    return out


def _kill_owner(owner: subprocess.Popen, tree: list[int], timeout: float = 20.0) -> float:
    """SIGKILL ``owner``; seconds until every process of ``tree`` is gone."""
    try:
        owner.kill()
        owner.wait(10)
        t = time.monotonic()
        while any(alive(p) for p in tree):
            assert time.monotonic() - t < timeout, [p for p in tree if alive(p)]
            time.sleep(0.1)
        return time.monotonic() - t
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait(10)


OWNER = textwrap.dedent("""
    import sys, time
    from fiji_bridge.client import BridgeClient
    c = BridgeClient.connect_or_spawn(int(sys.argv[1]), timeout=120, own=True, display=False, log_dir=sys.argv[2])
    while c.status()["engine"]["state"] != "ready":
        time.sleep(0.2)
    print(c.pid, c.status()["engine"]["pid"], flush=True)
    time.sleep(600)
""")


def test_an_owned_bridge_dies_with_its_killed_owner(tmp_path):
    script = tmp_path / "owner.py"
    script.write_text(OWNER)
    port = free_port_pair()
    p = subprocess.Popen([sys.executable, str(script), str(port), str(tmp_path)], stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    line = p.stdout.readline().split()
    tree = sorted(set([int(v) for v in line] + descendants(int(line[0])))) if len(line) == 2 else []
    took = _kill_owner(p, tree)
    assert len(line) == 2, line
    record("owner of connect_or_spawn(own=True) SIGKILLed", f"bridge and all its processes gone ({len(tree)})", took)


BATCH_MACRO = textwrap.dedent("""\
    // hostile-suite batch macro: one Measure row per field, slowly
    // Output tables: "Results"
    wait(600);
    run("Set Measurements...", "mean redirect=None decimal=3");
    run("Measure");
    """)


@pytest.mark.timeout(300)
def test_a_killed_batch_leaves_no_engine_worker_and_resumes(tmp_path):
    from fiji_bridge.backends import open_plate
    from fiji_bridge.synthetic import make_plate, write_plate

    plate = make_plate(("A01", "A02", "A03"), fields=2, size=64, size_z=1, seed=9, nuclei={"A01": 1, "A02": 1, "A03": 1})
    uri = f"zarr://{tmp_path}/b.zarr"
    write_plate(plate, uri)
    macro = tmp_path / "hostile_measure.ijm"
    macro.write_text(BATCH_MACRO)
    out = f"zarr://{tmp_path}/b_out.zarr"
    cmd = FIJI_BRIDGE + ["batch", "--plate", uri, "--macro", str(macro), "--out", out, "--workers", "1"]
    env = {**os.environ, "FIJI_BRIDGE_LOG_DIR": str(tmp_path / "logs")}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    markers = lambda: list((tmp_path / "b_out.zarr" / "tables").rglob("fiji_bridge_unit_s*.json"))  # noqa: E731
    deadline = time.monotonic() + 150
    while len(markers()) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    spawned = _bridges_of(proc.pid, flag=b"--parent")  # the batch's engine workers (JVM, Xvfb below)
    tree = spawned + [d for b in spawned for d in descendants(b)]
    took = _kill_owner(proc, tree)
    assert spawned, "the batch started no engine worker of its own"
    done_before = len(markers())
    assert 2 <= done_before < len(plate.fields)
    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=200, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    backend, pid = open_plate(out)
    report = backend.load(f"/zarr/plate_{pid}/batch.json")
    assert report["skipped"] >= done_before and report["skipped"] + report["done"] == len(plate.fields)
    assert report["failed"] == 0
    record("fiji-bridge batch SIGKILLed, then --resume", f"{len(tree)} processes gone; resume ran {report['done']}, skipped {report['skipped']}", took)
