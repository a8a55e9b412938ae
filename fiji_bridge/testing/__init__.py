"""Test helpers shipped with fiji-bridge, for its own tests and for users'.

* :mod:`fiji_bridge.testing.omero_double` — an in-memory OMERO server
  behind the BlitzGateway surface that :class:`~fiji_bridge.backends.omero.OmeroBackend`
  uses; the omero.model objects and rtypes are omero-py's own (the extra
  ``fiji-bridge[omero]`` must be installed), only the server side is doubled.
"""
