"""The wire format: every malformed message is refused with a specific code."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fiji_bridge.components import Calibration
from fiji_bridge.engine.base import ImageInfo, MacroResult, Roi
from fiji_bridge.protocol import (
    Ack,
    ArrayDesc,
    ErrorCode,
    FrameSink,
    PlaneHeader,
    ProtocolError,
    decode_macro_result,
    encode,
    encode_macro_result,
    parse_request,
)


def req(**d):
    return [json.dumps(d).encode()]


def code_of(frames):
    with pytest.raises(ProtocolError) as ei:
        parse_request(frames)
    return ei.value.code


@pytest.mark.parametrize(
    "frames, code",
    [
        ([], ErrorCode.BAD_FRAME),
        ([b"\xff\xfe garbage"], ErrorCode.BAD_JSON),
        ([b"{not json"], ErrorCode.BAD_JSON),
        ([b"[1, 2]"], ErrorCode.BAD_JSON),
        (req(type="launch_missiles", id=1), ErrorCode.UNKNOWN_TYPE),
        (req(id=1), ErrorCode.MISSING_FIELD),
        (req(type="ping", v=2), ErrorCode.BAD_VERSION),
        (req(type="stack_info"), ErrorCode.MISSING_FIELD),
        (req(type="stack_info", key=5), ErrorCode.BAD_FIELD),
        (req(type="stack_info", key=""), ErrorCode.BAD_FIELD),
        (req(type="run_macro"), ErrorCode.MISSING_FIELD),
        (req(type="run_macro", code="   "), ErrorCode.BAD_FIELD),
        (req(type="run_macro", code="x=1;", timeout=-1), ErrorCode.BAD_FIELD),
        (req(type="run_macro", code="x=1;", timeout=True), ErrorCode.BAD_FIELD),
        (req(type="run_macro", code="x=1;", args=[1, 2]), ErrorCode.BAD_FIELD),
        (req(type="run_macro", code="x=1;", image={"shape": [2, 2], "dtype": "uint8", "frame": 0}), ErrorCode.BAD_FRAME),
        (req(type="run_macro", code="x=1;", image={"shape": [2, 2], "dtype": "object", "frame": 0}) + [b"1234"], ErrorCode.BAD_FIELD),
        (req(type="run_macro", code="x=1;", image={"shape": [2, 2], "dtype": "uint8", "frame": 0}, dims="TZCYX") + [b"1234"], ErrorCode.BAD_FIELD),
        (req(type="subscribe", endpoint="http://example.org"), ErrorCode.BAD_FIELD),
        (req(type="shm_probe", name="../etc/passwd", size=4), ErrorCode.BAD_SHM),
    ],
)
def test_bad_requests_are_refused_with_a_code(frames, code):
    assert code_of(frames) == code


def test_a_valid_run_macro_request_carries_its_image():
    arr = np.arange(12, dtype=np.uint16).reshape(3, 4)
    sink = FrameSink()
    frames = encode({"type": "run_macro", "id": 7, "code": "run('Invert');", "image": sink.put(arr), "dims": "yx", "args": {"radius": 2}}, sink.frames)
    r = parse_request([bytes(f) for f in frames])
    assert r.TYPE == "run_macro" and r.id == 7 and r.dims == "YX" and r.args == {"radius": 2}
    np.testing.assert_array_equal(r.image_array(), arr)


def test_image_frame_of_the_wrong_size_is_a_shape_mismatch():
    frames = req(type="run_macro", code="x=1;", image={"shape": [3, 3], "dtype": "uint16", "frame": 0}, dims="YX") + [b"\0" * 10]
    r = parse_request(frames)
    with pytest.raises(ProtocolError) as ei:
        r.image_array()
    assert ei.value.code == ErrorCode.SHAPE_MISMATCH


def header(**over):
    d = {"type": "plane", "stream": "s", "seq": 0, "shape": [4, 5], "dtype": "uint16", "transport": "inline", "components": {"well": "B2", "channel": 1}}
    d.update(over)
    return json.dumps(d).encode()


def test_plane_header_round_trip():
    h = PlaneHeader.parse(header(calibration={"pixel_width": 0.5, "pixel_height": 0.5}), b"\0" * 40)
    assert h.components.well == "B02" and h.components.channel == 1 and h.calibration.pixel_width == 0.5
    again = PlaneHeader.parse(h.encode(), b"\0" * 40)
    assert again == h


@pytest.mark.parametrize(
    "hdr, payload, code",
    [
        (b"\x00\x01binary", b"", ErrorCode.BAD_JSON),
        (header(type="bogus"), b"\0" * 40, ErrorCode.UNKNOWN_TYPE),
        (header(stream=None), b"\0" * 40, ErrorCode.MISSING_FIELD),
        (header(seq="zero"), b"\0" * 40, ErrorCode.BAD_FIELD),
        (header(shape=[4]), b"\0" * 40, ErrorCode.BAD_FIELD),
        (header(shape=[0, 5]), b"", ErrorCode.BAD_FIELD),
        (header(shape=[4, 10**9]), b"", ErrorCode.BAD_FIELD),
        (header(dtype="complex128"), b"\0" * 40, ErrorCode.BAD_FIELD),
        (header(dtype="no-such-type"), b"\0" * 40, ErrorCode.BAD_FIELD),
        (header(transport="carrier-pigeon"), b"\0" * 40, ErrorCode.BAD_FIELD),
        (header(), b"\0" * 39, ErrorCode.SHAPE_MISMATCH),
        (header(components={"z": -1}), b"\0" * 40, ErrorCode.BAD_INDEX),
        (header(components={"t": 10**9}), b"\0" * 40, ErrorCode.BAD_INDEX),
        (header(components={"well": "nowhere"}), b"\0" * 40, ErrorCode.BAD_FIELD),
        (header(components={"colour": 1}), b"\0" * 40, ErrorCode.BAD_FIELD),
        (header(transport="shm"), b"bad name with spaces", ErrorCode.BAD_SHM),
        (header(calibration={"pixel_width": -1}), b"\0" * 40, ErrorCode.BAD_FIELD),
    ],
)
def test_bad_plane_headers(hdr, payload, code):
    with pytest.raises(ProtocolError) as ei:
        PlaneHeader.parse(hdr, payload)
    assert ei.value.code == code, ei.value.message


def test_ack_encoding():
    a = Ack.parse(Ack("s", 3, True, "k", 1, 2, 0).encode())
    assert (a.ok, a.key, a.t, a.z, a.c) == (True, "k", 1, 2, 0)
    e = Ack.parse(Ack("s", 4, False, error={"code": "rejected", "message": "dtype"}).encode())
    assert not e.ok and e.error["code"] == "rejected"


def test_macro_result_round_trip_through_frames():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, (1, 2, 3, 5, 6), dtype=np.uint8)
    res = MacroResult(
        images={"blurred": img},
        image_info={"blurred": ImageInfo("blurred", shape=img.shape, dtype="uint8", calibration=Calibration(0.5, 0.5), channel_names=["a", "b", "c"])},
        tables={"Results": {"Area": np.array([1.5, np.nan]), "Label": np.array(["x", None], dtype=object)}},
        log="done\n",
        rois=[Roi("r1", "rectangle", b"Iout\0\1", np.array([[0, 0], [1, 0], [1, 1.0]]), (1, 0, 0))],
        elapsed=0.25,
        notes=["int32 -> float32"],
    )
    sink = FrameSink()
    d = encode_macro_result(res, sink.put)
    wire = json.loads(json.dumps(d))  # JSON-safe
    back = decode_macro_result(wire, lambda desc: ArrayDesc.parse(desc).from_frame(sink.frames[desc["frame"]]))
    np.testing.assert_array_equal(back.images["blurred"], img)
    assert back.image_info["blurred"].channel_names == ["a", "b", "c"]
    assert back.image_info["blurred"].calibration.pixel_width == 0.5
    np.testing.assert_array_equal(back.results["Area"], res.results["Area"])
    assert list(back.results["Label"]) == ["x", None]
    assert back.rois[0].data == b"Iout\0\1" and back.rois[0].position == (1, 0, 0)
    assert back.log == "done\n" and back.notes == ["int32 -> float32"]
