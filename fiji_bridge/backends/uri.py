"""Plate URIs: how users name a plate (or a store) on the command line.

Forms, parsed by :meth:`PlateURI.parse` and written back by ``str()``::

    /data/plates/screen1.zarr              a plain path (see below)
    zarr:///data/plates/screen1.zarr       OME-Zarr plate "screen1" in the store /data/plates
    zarr:///data/plates/                   the OME-Zarr store itself (no plate)
    ometiff:///data/tiffs/screen1          OME-TIFF plate folder "screen1" in /data/tiffs
    ometiff:///data/tiffs/                 the OME-TIFF store itself
    omero://alice@omero.example.org:4064/plate/51
    omero://omero.example.org              an OMERO server (no plate)

In ``zarr://`` and ``ometiff://`` URIs the last path component names the plate
(``.zarr`` is stripped from the plate id); a trailing ``/`` names the store
folder only. A plain path (no scheme) is made absolute and then: ends in
``.zarr`` -> an OME-Zarr plate; an existing folder holding ``plate.json`` or
``*.ome.tif`` files -> an OME-TIFF plate; an existing Zarr group -> an OME-Zarr
plate; anything else -> a new OME-Zarr plate ``<name>.zarr`` beside it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

__all__ = ["PlateURI", "URIError", "LOCAL_SCHEMES", "SCHEMES"]

LOCAL_SCHEMES = ("zarr", "ometiff")
SCHEMES = LOCAL_SCHEMES + ("omero",)


class URIError(ValueError):
    """A plate URI is malformed; the message shows the accepted forms."""


_FORMS = (
    "expected a path, zarr:///abs/path/plate.zarr, ometiff:///abs/dir/plate "
    "or omero://[user@]host[:port]/plate/<id>"
)
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")
_OMERO_RE = re.compile(
    r"^(?:(?P<user>[^@/:]+)@)?(?P<host>[^@/:]+)(?::(?P<port>\d+))?(?:/plate/(?P<plate>[^/]+))?/?$"
)


@dataclass(frozen=True)
class PlateURI:
    """A parsed plate URI. ``path`` is the store folder of a local store
    (absolute), ``plate`` the plate id ("" when the URI names a store)."""

    scheme: str
    path: str = ""
    plate: str = ""
    host: str = ""
    port: Optional[int] = None
    user: str = ""

    # ------------------------------------------------------------------ parse

    @classmethod
    def parse(cls, text: str | os.PathLike) -> "PlateURI":
        """Parse a URI or a plain path; raises :class:`URIError`."""
        raw = os.fspath(text).strip()
        if not raw:
            raise URIError(f"empty plate URI: {_FORMS}")
        m = _SCHEME_RE.match(raw)
        if not m:
            return cls._parse_plain(raw)
        scheme, rest = m.group(1).lower(), m.group(2)
        if scheme == "omero":
            return cls._parse_omero(raw, rest)
        if scheme not in LOCAL_SCHEMES:
            raise URIError(f"unknown plate URI scheme {scheme!r} in {raw!r}: {_FORMS}")
        if not rest.startswith("/"):
            raise URIError(
                f"{raw!r}: a {scheme}:// URI needs an absolute path, e.g. {scheme}:///data/plates/p1"
                + (".zarr" if scheme == "zarr" else "")
            )
        return cls._local(scheme, rest)

    @classmethod
    def _local(cls, scheme: str, path: str) -> "PlateURI":
        if path.endswith("/"):
            return cls(scheme, path=_norm(path), plate="")
        p = Path(_norm(path))
        plate = p.name[: -len(".zarr")] if scheme == "zarr" and p.name.endswith(".zarr") else p.name
        if not plate:
            raise URIError(f"{path!r}: no plate name")
        return cls(scheme, path=str(p.parent), plate=plate)

    @classmethod
    def _parse_plain(cls, raw: str) -> "PlateURI":
        p = Path(raw).expanduser().absolute()
        if raw.endswith("/") and not p.name.endswith(".zarr") and p.is_dir() and not _is_plate_dir(p):
            # an existing folder named with a trailing slash: a store root
            kind = "ometiff" if _looks_ometiff_store(p) else "zarr"
            return cls(kind, path=str(p), plate="")
        if p.name.endswith(".zarr"):
            return cls._local("zarr", str(p))
        if p.is_dir():
            if (p / "plate.json").is_file() or any(p.glob("*.ome.tif")):
                return cls._local("ometiff", str(p))
            if (p / ".zattrs").is_file() or (p / "zarr.json").is_file():
                return cls("zarr", path=str(p.parent), plate=p.name)
        return cls._local("zarr", str(p))

    @classmethod
    def _parse_omero(cls, raw: str, rest: str) -> "PlateURI":
        m = _OMERO_RE.match(rest)
        if not m:
            raise URIError(f"bad OMERO URI {raw!r}: expected omero://[user@]host[:port]/plate/<id>")
        port = int(m.group("port")) if m.group("port") else None
        return cls(
            "omero",
            plate=m.group("plate") or "",
            host=m.group("host"),
            port=port,
            user=m.group("user") or "",
        )

    # ------------------------------------------------------------------ format

    def __str__(self) -> str:
        if self.scheme == "omero":
            auth = f"{self.user}@" if self.user else ""
            port = f":{self.port}" if self.port is not None else ""
            plate = f"/plate/{self.plate}" if self.plate else ""
            return f"omero://{auth}{self.host}{port}{plate}"
        if not self.plate:
            return f"{self.scheme}://{self.path.rstrip('/')}/"
        suffix = ".zarr" if self.scheme == "zarr" else ""
        return f"{self.scheme}://{self.path.rstrip('/')}/{self.plate}{suffix}"

    @property
    def is_local(self) -> bool:
        return self.scheme in LOCAL_SCHEMES

    def with_plate(self, plate: str) -> "PlateURI":
        """The same store with another plate."""
        return PlateURI(self.scheme, self.path, plate, self.host, self.port, self.user)


def _norm(path: str) -> str:
    return os.path.normpath(path) if path not in ("", "/") else "/"


def _is_plate_dir(p: Path) -> bool:
    return (p / "plate.json").is_file() or (p / ".zattrs").is_file() or (p / "zarr.json").is_file()


def _looks_ometiff_store(p: Path) -> bool:
    return any(p.glob("*/plate.json")) and not any(p.glob("*.zarr"))
