"""The shared virtual backend: plate stores behind one interface.

``open_plate("zarr:///data/p1.zarr")`` -> ``(ZarrPlateStore('/data'), 'p1')``;
``open_store(uri)`` -> the store alone. See :mod:`.uri` for the URI forms and
:mod:`.base` for the :class:`VirtualBackend` contract.

* :class:`~.zarr_plate.ZarrPlateStore` - OME-NGFF HCS plates in Zarr (default)
* :class:`~.ome_tiff.OmeTiffStore` - one OME-TIFF per well field
* ``fiji_bridge.backends.omero.OmeroBackend`` - OMERO (``pip install fiji-bridge[omero]``)
"""

from __future__ import annotations

import os
from typing import Union

from .base import BackendError, NotFound, PlateStructure, StoreUnavailable, VirtualBackend
from .uri import PlateURI, URIError

__all__ = [
    "BackendError",
    "NotFound",
    "PlateStructure",
    "PlateURI",
    "StoreUnavailable",
    "URIError",
    "VirtualBackend",
    "open_plate",
    "open_store",
]

URILike = Union[str, os.PathLike, PlateURI]


def _as_uri(uri: URILike) -> PlateURI:
    if isinstance(uri, PlateURI):
        return uri
    try:
        return PlateURI.parse(uri)
    except URIError as e:
        raise BackendError(str(e)) from None


def open_store(uri: URILike) -> VirtualBackend:
    """The store a URI points into (its plate, if any, is ignored)."""
    u = _as_uri(uri)
    if u.scheme == "zarr":
        from .zarr_plate import ZarrPlateStore

        return ZarrPlateStore(u.path)
    if u.scheme == "ometiff":
        from .ome_tiff import OmeTiffStore

        return OmeTiffStore(u.path)
    if u.scheme == "omero":
        return _open_omero(u)
    raise BackendError(f"no backend for scheme {u.scheme!r}")  # pragma: no cover - parse refuses


def open_plate(uri: URILike) -> tuple[VirtualBackend, str]:
    """``(store, plate id)`` for a plate URI. The plate need not exist yet
    (the importer and batch create it); the id is "" when the URI names a
    store only."""
    u = _as_uri(uri)
    return open_store(u), u.plate


def _open_omero(u: PlateURI) -> VirtualBackend:
    try:
        from .omero import OmeroBackend  # type: ignore[import-not-found]
    except ImportError as e:
        raise BackendError(
            f"cannot open {u}: the OMERO backend needs omero-py "
            f"(pip install fiji-bridge[omero]); import failed: {e}"
        ) from None
    from_uri = getattr(OmeroBackend, "from_uri", None)
    if from_uri is not None:  # preferred: the backend reads what it needs from the URI
        return from_uri(u)
    kwargs: dict = {"host": u.host, "user": u.user or None}
    if u.port is not None:
        kwargs["port"] = u.port
    return OmeroBackend(**kwargs)
