"""An in-memory OMERO server behind omero-py's BlitzGateway surface, at
least as strict as a real OMERO 5.6 server.

No OMERO server can run on a CI machine without Docker, so the OMERO
backend is tested against this double. Only the *server side* is doubled:
the objects that cross the "wire" are omero-py's real ``omero.model``
classes and rtypes (ROIs and shapes included), pickled both ways (callers
never share objects with the server, as with Ice), and every call is first
marshalled by omero-py's real Ice proxy (:mod:`.wire`), so what IcePy
would refuse to send is refused here too; results come wrapped in
omero-py's real gateway wrappers, and the gateway methods the backend uses
(``getObjects``, ``getObject``, ``buildQuery``, ``createOriginalFileFromFileObj``,
``keepAlive``, ``deleteObjects``, ``setGroupForSession``, the service
getters...) *are* omero-py's own code, run unchanged against the double.

Every rule the double enforces was read from the server's or omero-py's
source, named beside it:

* :mod:`.server` — sessions and logins (SessionManagerI.java,
  SessionManagerImpl.java), groups (OmeroInterceptor.java), the model graph;
* :mod:`.constraints` — the database's unique indexes and positive domains
  (psql-footer.vm, psql-header.vm, SemanticTypeProcessor.java,
  ServiceHandler.java);
* :mod:`.permissions` — group permission levels: reads, links, edits and
  deletes of other users' objects, canAnnotate/canEdit/canDelete
  (Permissions.java, OmeroInterceptor.java, BasicACLVoter.java,
  omero/plugins/group.py);
* :mod:`.wire` — Ice marshalling of every call (omero-py's generated
  ``*Prx`` classes, IcePy);
* :mod:`.query` — HQL as the gateway builds it, with Hibernate's row
  semantics (one row per joined sample, uniqueResult);
* :mod:`.commands` — Delete2 as a command with its handle and graph rules
  (blitz-delete-rules.xml);
* :mod:`.pixels` — write-once pixels, ROMIO strips, pyramid tiles in
  sequence, no pyramid for floats, missing pyramids of imports, buffer-size
  errors (PixelsService.java, RomioPixelBuffer.java, BfPyramidPixelBuffer.java,
  ConfiguredTileSizes.java, RawPixelsBean.java, omero-model.properties);
* :mod:`.files` — RawFileStore, OMERO.tables (SharedResourcesI.java,
  hdfstorageV2.py, columns.py);
* :mod:`.client` — the gateway's connect/keepAlive/delete outcomes
  (omero/gateway/__init__.py, omero/clients.py) and *strictness*: the
  gateway, its client, session factory, service proxies and callbacks admit
  only attribute names omero-py's real classes have.

Counters (:attr:`ServerDouble.counters`) count calls per kind, e.g.
``query:Well``, ``query:Plate``, ``rps.getPlane``, ``pixels.createImage``,
so tests can assert "one metadata query per plate".

Use::

    server = ServerDouble(users={"alice": "secret"})
    server.register("omero.test", 4064)          # this process
    conn = GatewayDouble("alice", "secret", host="omero.test", port=4064)
    assert conn.connect()

    host, port = server.serve()                  # other processes, over TCP
"""

from __future__ import annotations

from ._common import MAX_PLANE_SIZE, PYRAMID_TILE_SIZE, OriginalFileWrapper
from .client import GatewayDouble, StrictAttributeError, real_attributes
from .server import ServerDouble

__all__ = ["GatewayDouble", "ServerDouble", "StrictAttributeError", "MAX_PLANE_SIZE", "PYRAMID_TILE_SIZE",
           "OriginalFileWrapper", "real_attributes"]
