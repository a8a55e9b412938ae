"""OMERO as a plate store, through omero-py's BlitzGateway (optional extra).

``pip install fiji-bridge[omero]``. omero-py is imported lazily: this package
imports without it, and using the backend without it raises a
:class:`~fiji_bridge.backends.base.BackendError` that says what to install.

Mapping (as omero-cli-zarr maps plates): a virtual path
``/omero/plate_<plate id>/<well>/<well>_s<site>_z<z>_c<c>_t<t>.tif`` is plane
(z, c, t) of the image of well sample ``site`` (its index in the well) of the
well at 0-based ``(row, column)``.

What OMERO users see natively:

* fields are images linked to their well samples; channel names, pixel sizes
  (ImageJ units mapped to OMERO's) and per-channel min/max are set;
* tables (``.csv``) are FileAnnotations in :data:`NS_RESULTS` linked to the
  plate, the well or the field's image, and the same rows as an OMERO.table
  (:data:`NS_TABLE`) with typed columns (Long, Double, Bool, String) plus a
  WellColumn, an ImageColumn and, where a field's ROIs are one per row, a
  RoiColumn — OMERO.web and OMERO.parade link rows to wells, images, ROIs;
* a field's ImageJ ROIs (``<well>/rois_s<site>.json`` as written by
  :mod:`fiji_bridge.outputs`, or :meth:`OmeroBackend.save_rois`) become OMERO
  ROIs with Rectangle, Ellipse, Polygon, Polyline, Line, Point and Mask
  shapes on the image; :meth:`OmeroBackend.load_rois` gives them back as
  ImageJ ``.roi`` bytes (:mod:`.rois`);
* every processed image carries a MapAnnotation in :data:`NS_SUMMARY` — the
  per-field summary (table row counts, ROI count, status, elapsed time) and
  the provenance (macro, its hash, arguments, source plate) — shown in
  OMERO.web's key-value panel; the derived plate's provenance is a
  MapAnnotation in :data:`NS_PROVENANCE`.

Connection (:mod:`.connection`): host/port/user/group from the arguments or
``OMERO_HOST`` / ``OMERO_PORT`` (4064) / ``OMERO_USER`` / ``OMERO_GROUP``;
the password from the argument or ``OMERO_PASSWORD``, or a session key
(``session=`` / ``OMERO_SESSION``). There is no default password, and the
password is never logged, shown in ``repr`` or pickled: a pickled backend
carries host, port, user, group and the session key, and a worker process
reconnects lazily by joining that session, falling back to
``OMERO_PASSWORD`` in its own environment. A daemon thread calls
``keepAlive()`` every ``keepalive`` seconds while connected.

Reading a plate costs two queries (the plate, then every well with its well
samples, images and pixels in ONE ``getObjects('Well', ...)``), cached per
plate; planes come from one RawPixelsStore per image (reused) and are decoded
from OMERO's big-endian bytes with ``np.frombuffer``.

The server's rules this package follows, each read from the server's or
omero-py's source, are listed in the modules that follow them
(:mod:`.connection`, :mod:`.pixels`, :mod:`.annotations`); the test double
in :mod:`fiji_bridge.testing.omero_double` enforces them.
"""

from __future__ import annotations

from .annotations import NS_PROVENANCE, NS_RESULTS, NS_SUMMARY, NS_TABLE
from .backend import OmeroBackend
from .connection import INSTALL_HINT, OmeroParams, _default_gateway
from .pixels import MAX_PLANE_SIZE
from .rois import NS_ROIS, OmeroRoiError

__all__ = ["NS_PROVENANCE", "NS_RESULTS", "NS_ROIS", "NS_SUMMARY", "NS_TABLE", "OmeroBackend", "OmeroParams",
           "OmeroRoiError", "INSTALL_HINT", "MAX_PLANE_SIZE", "_default_gateway"]
