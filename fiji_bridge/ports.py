"""The bridge's ports: where a client finds it by default.

Constants only, so the command line can show them in ``--help`` and start a
batch's engine workers before it imports the wire protocol (numpy and all).
:mod:`fiji_bridge.protocol` exports them too.
"""

__all__ = ["DATA_PORT_OFFSET", "DEFAULT_PORT"]

#: the bridge's default control port
DEFAULT_PORT = 5570
#: the data channel listens on the control port + this
DATA_PORT_OFFSET = 1000
