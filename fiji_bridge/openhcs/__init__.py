"""fiji-bridge as OpenHCS's Fiji viewer.

OpenHCS (through PolyStore's ``FijiStreamingBackend`` and ``zmqruntime``)
streams pipeline outputs to "its Fiji viewer" on a port (5565 by default):
data on the port, control on port + 1000. :class:`OpenHCSReceiver` answers
there in the viewer's place and puts the planes into the bridge's stacks.
``fiji-bridge serve --openhcs-port P`` starts one.

* :mod:`.wire`       the message format, checked; the refusing unpickler
* :mod:`.placement`  component modes -> window key and (t, z, c)
* :mod:`.shm`        copying sender-owned shared memory; leftovers
* :mod:`.receiver`   the sockets and the serving thread
* :mod:`.macro_wire` OpenHCS 0.8.6 `run_macro`: its pickles, decoded by stand-ins
* :mod:`.macro`      running one `run_macro` request in the bridge's engine
"""

from .placement import Layout, Placer, PlacementError
from .receiver import DEFAULT_IPC_DIR, DEFAULT_IPC_PREFIX, DEFAULT_PORT, LEGACY_ACK_PORT, OpenHCSReceiver
from .wire import RefusedPickle, WireError, loads_plain, parse_batch

__all__ = [
    "DEFAULT_IPC_DIR",
    "DEFAULT_IPC_PREFIX",
    "DEFAULT_PORT",
    "LEGACY_ACK_PORT",
    "Layout",
    "OpenHCSReceiver",
    "Placer",
    "PlacementError",
    "RefusedPickle",
    "WireError",
    "loads_plain",
    "parse_batch",
]
