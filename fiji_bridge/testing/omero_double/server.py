"""The double's server: sessions, the model graph, IQuery, IUpdate,
IMetadata, IAdmin and the command service (Delete2), in memory.

Rules, each from the source:

* login: a wrong password is ``Glacier2.PermissionDeniedException``; a group
  that the user is not a member of (or that does not exist) is a
  ``SecurityViolation`` (omero-server SessionManagerImpl.java, the group is a
  *name*: omero-blitz SessionManagerI.java ``getGroup(current)`` reads the
  ``omero.group`` string of the call context); a server that has not finished
  starting refuses sessions with a ``WrappedCreateSessionException``
  (concurrency, "Server not fully initialized": SessionManagerI.create);
* sessions time out when idle (omero.sessions.timeout); a dead session's
  calls raise ``Ice.ObjectNotExistException``;
* groups: objects are created in the call's group, reads see the call's group
  (or all the user's groups with ``-1``), a save linking objects of different
  groups is a ``SecurityViolation``; a save under ``-1`` takes the group of
  the first existing object it links (omero-server OmeroInterceptor.java,
  throwIfGroupsDontMatch);
* group permissions (reads, links, edits, deletes of others' objects) live
  in :mod:`.permissions`;
* IQuery lives in :mod:`.query`, Delete2 in :mod:`.commands`, the
  database's unique and domain constraints in :mod:`.constraints`.
"""

from __future__ import annotations

import collections
import os
import pickle
import secrets
import threading
import time
from typing import Any, Iterable, Optional

import numpy as np

from ._common import (
    MAX_PLANE_SIZE,
    MESSAGE_SIZE_MAX,
    PYRAMID_TILE_SIZE,
    _ENUMS,
    _GROUPLESS,
    _INVERSE,
    _PIXELS_TYPES,
    Ice,
    _cls,
    _ctx_group,
    _fields,
    _is_a,
    _is_coll,
    _is_entity,
    _message,
    _model,
    _paths,
    _Session,
    _User,
    omero,
    rint,
    rlong,
    rstring,
    unwrap,
)
from .commands import CommandServices
from .constraints import Constraints, check_domains
from .permissions import DEFAULT_PERMISSIONS, GroupPermissions, parse_permissions
from .files import REGISTRY_TIMEOUT, FileServices
from .pixels import PixelsServices
from .query import QueryServices

try:
    import Glacier2
except ImportError:  # pragma: no cover - comes with zeroc-ice
    Glacier2 = None


class ServerDouble(QueryServices, CommandServices, PixelsServices, FileServices, Constraints, GroupPermissions):
    """The state and services of one OMERO server, in memory.

    ``users`` maps user names to passwords; every user is a member of the
    groups named in ``groups`` (default ``{"lab": [all users]}``), the first
    one being their default group. ``permissions`` maps group names to
    permission strings (default ``rw----``, private, see
    :mod:`.permissions`). ``tables=False`` runs the server without
    the OMERO.tables service. ``session_timeout`` is OMERO's idle timeout.
    ``delete_polls``: how many polls of its handle a Delete2 takes to finish.
    ``ready=False`` models a server still starting (sessions refused).
    """

    def __init__(
        self,
        users: Optional[dict[str, str]] = None,
        *,
        groups: Optional[dict[str, list[str]]] = None,
        permissions: Optional[dict[str, str]] = None,
        tables: bool = True,
        session_timeout: float = 600.0,
        message_size_max: int = MESSAGE_SIZE_MAX,
        max_plane_size: int = MAX_PLANE_SIZE,
        tile_size: int = PYRAMID_TILE_SIZE,
        max_plane_float_override: bool = True,
        registry_timeout: float = REGISTRY_TIMEOUT,
        delete_polls: int = 1,
        ready: bool = True,
    ) -> None:
        self.tables = tables
        self.registry_timeout = registry_timeout
        self.waited = 0.0  # seconds the server spent waiting for a missing tables service
        self.delete_polls = int(delete_polls)
        self.ready = ready
        self.session_timeout = session_timeout
        self.message_size_max = message_size_max
        self.max_plane_size = max_plane_size
        self.tile_size = int(tile_size)  # the pyramid writer's fixed 256 (a test knob: see .pixels)
        self.max_plane_float_override = max_plane_float_override
        self.counters: collections.Counter[str] = collections.Counter()
        self.up = True
        self.generation = 0
        self._lock = threading.RLock()
        self._next = 1
        self._rows: dict[int, Any] = {}
        self._order: dict[int, int] = {}
        self._pixels: dict[int, np.ndarray] = {}
        self._written: set[int] = set()  # pixels whose file exists (write-once)
        self._extent: dict[int, int] = {}  # bytes of a ROMIO pixels file written so far
        self._pyramid_pending: set[int] = set()  # imported big images whose pyramid is being built
        self._files: dict[int, bytearray] = {}
        self._tables: dict[int, dict] = {}
        self._services: dict[int, dict] = {}
        self._sessions: dict[str, _Session] = {}
        self._groups: dict[str, int] = {}
        self._users: dict[str, _User] = {}
        self._enum_ids: dict[tuple[str, str], int] = {}
        self._managers: list[Any] = []
        for kind, values in _ENUMS.items():
            for v in values:
                obj = _model(kind)()
                obj.setValue(rstring(v))
                oid = self._new_id()
                obj._id = rlong(oid)
                self._rows[oid] = obj
                self._enum_ids[(kind, v)] = oid
        users = dict(users or {"root": "omero-double"})
        groups = groups or {"lab": list(users)}
        self._group_perms: dict[int, str] = {}
        self._caller: Optional[_Session] = None  # the session of the call being answered
        for gname in groups:
            self._groups[gname] = self._new_id()
            perms = (permissions or {}).get(gname, DEFAULT_PERMISSIONS)
            parse_permissions(perms)
            self._group_perms[self._groups[gname]] = perms
        for uname, pw in users.items():
            member = [self._groups[g] for g, us in groups.items() if uname in us]
            self._users[uname] = _User(uname, pw, self._new_id(), member or [self._groups[next(iter(groups))]])
        self.repository_id = self._system_file("ManagedRepository", "/", "Repository")

    # -- test controls -------------------------------------------------------

    def group_id(self, name: str) -> int:
        return self._groups[name]

    def stop(self) -> None:
        """The server goes away: connections are lost, connects are refused."""
        with self._lock:
            self.up = False
            self.generation += 1

    def start(self) -> None:
        """The server is back; sessions created before survive (a network cut)."""
        with self._lock:
            self.up = True

    def drop_connections(self) -> None:
        """Every open connection is lost (the next call on it raises
        ``Ice.ConnectionLostException``); the server stays up."""
        with self._lock:
            self.generation += 1

    def finish_pyramids(self) -> None:
        """The server's PixelData service has built every pending pyramid."""
        with self._lock:
            self._pyramid_pending.clear()

    def reset_counters(self) -> None:
        self.counters.clear()

    def register(self, host: str, port: int = 4064) -> "ServerDouble":
        """Make this server answer at ``host:port`` for gateways of this process."""
        _REGISTRY[(host, int(port))] = self
        return self

    def unregister(self) -> None:
        for k in [k for k, v in _REGISTRY.items() if v is self]:
            del _REGISTRY[k]

    def serve(self, port: int = 0) -> tuple[str, int]:
        """Serve this server over TCP on 127.0.0.1 to other processes (a
        ``multiprocessing`` manager with an auth key passed to children in
        ``FIJI_BRIDGE_OMERO_DOUBLE_KEY``); also registers it in this process."""
        from multiprocessing.managers import BaseManager

        key = os.environ.get("FIJI_BRIDGE_OMERO_DOUBLE_KEY") or secrets.token_hex(16)
        os.environ["FIJI_BRIDGE_OMERO_DOUBLE_KEY"] = key

        class _Manager(BaseManager):
            pass

        endpoint = _Endpoint(self)
        _Manager.register("endpoint", callable=lambda: endpoint)
        mgr = _Manager(address=("127.0.0.1", port), authkey=key.encode())
        server = mgr.get_server()
        threading.Thread(target=server.serve_forever, name="omero-double", daemon=True).start()
        self._managers.append(server)
        host, real_port = server.address
        self.register(host, real_port)
        return host, real_port

    # -- seeding (as if images had been imported) ----------------------------

    def seed_plate(
        self,
        name: str,
        fields: dict[tuple[str, int], np.ndarray],
        *,
        channel_names: Iterable[str] = (),
        pixel_size: Optional[tuple[float, float, float]] = None,
        group: Optional[str] = None,
        user: Optional[str] = None,
        rows: int = 8,
        columns: int = 12,
        pyramid_pending: bool = False,
    ) -> int:
        """Create a plate holding ``fields[(well, site)]`` = TZCYX arrays and
        return its id. Wells are "A01"-style names; sites count from 0.
        ``pyramid_pending``: big images (see :meth:`requires_pyramid`) have no
        pyramid yet, as right after an import, until :meth:`finish_pyramids`."""
        from ...components import parse_well

        with self._lock:
            uname = user or next(iter(self._users))
            u = self._users[uname]
            gid = self._groups[group] if group else u.groups[0]
            sess = _Session("seed", uname, u.uid, gid)
            plate = omero.model.PlateI()
            plate.name = rstring(name)
            plate.rows, plate.columns = rint(rows), rint(columns)
            pid = self._save(sess, plate, gid)
            wells: dict[str, Any] = {}
            for (wname, site), arr in sorted(fields.items()):
                r, c = parse_well(wname)
                if wname not in wells:
                    w = omero.model.WellI()
                    w.row, w.column, w.plate = rint(r), rint(c), omero.model.PlateI(pid, False)
                    wells[wname] = self._save(sess, w, gid)
                st, sz, sc, sy, sx = arr.shape
                ptype = {np.dtype(v).newbyteorder("=").name: k for k, v in _PIXELS_TYPES.items()
                         if k not in ("bit", "complex", "double-complex")}[arr.dtype.name]
                names = list(channel_names)
                iid = self._create_image(sess, gid, sx, sy, sz, st, list(range(sc)), ptype,
                                         f"{name} {wname} field {site}", None)
                pix_id = self._children("Image", "pixels", iid)[0]
                pix = self._rows[pix_id]
                if pixel_size:
                    for axis, v in zip("XYZ", pixel_size):
                        getattr(pix, f"setPhysicalSize{axis}")(
                            omero.model.LengthI(v, omero.model.enums.UnitsLength.MICROMETER))
                for ci, ch_id in enumerate(self._children("Pixels", "channels", pix_id)):
                    lc_id = self._rows[ch_id].logicalChannel.id.val
                    if ci < len(names):
                        self._rows[lc_id].name = rstring(names[ci])
                self._pixels[pix_id][...] = np.transpose(arr, (0, 2, 1, 3, 4))
                self._written.add(pix_id)  # imported: its pixels are read-only
                self._extent[pix_id] = self._pixels[pix_id].nbytes
                if pyramid_pending and self.requires_pyramid(pix_id):
                    self._pyramid_pending.add(pix_id)
                ws = omero.model.WellSampleI()
                ws.well, ws.image = omero.model.WellI(wells[wname], False), omero.model.ImageI(iid, False)
                self._save(sess, ws, gid)
            return pid

    # -- transport entry point ----------------------------------------------

    def handle(self, blob: bytes) -> bytes:
        """One remote call: pickled (session, service, method, args, generation)
        in, pickled ("ok", result) or ("error", module, name, message) out."""
        try:
            if len(blob) > self.message_size_max:
                raise Ice.MemoryLimitException(reason=f"message of {len(blob)} bytes exceeds Ice.MessageSizeMax")
            key, service, method, args, generation = pickle.loads(blob)
            with self._lock:
                if not self.up:
                    if service == "Session":
                        raise Ice.ConnectionRefusedException()
                    raise Ice.ConnectionLostException()
                if service != "Session" and generation != self.generation:
                    raise Ice.ConnectionLostException()
                fn = getattr(self, f"_rpc_{service}_{method}", None)
                if fn is None:
                    raise NotImplementedError(f"the OMERO test double does not implement {service}.{method}")
                if service == "Session":
                    result = fn(*args)
                else:
                    self._caller = self._session(key)
                    try:
                        result = fn(self._caller, *args)
                    finally:
                        self._caller = None
            out = pickle.dumps(("ok", result))
            if len(out) > self.message_size_max:
                raise Ice.MemoryLimitException(reason=f"reply of {len(out)} bytes exceeds Ice.MessageSizeMax")
            return out
        except Exception as e:  # every error travels back to the caller, as itself when it pickles
            try:
                same = pickle.dumps(e) if type(e).__module__.split(".")[0] in ("omero", "Ice", "Glacier2") else None
            except Exception:
                same = None
            return pickle.dumps(("error", type(e).__module__, type(e).__name__, _message(e), same))

    # -- sessions --------------------------------------------------------------

    def _session(self, key: Optional[str]) -> _Session:
        s = self._sessions.get(key or "")
        now = time.monotonic()
        if s is None or s.closed or now - s.last > self.session_timeout:
            if s is not None:
                s.closed = True
            raise Ice.ObjectNotExistException()
        s.last = now
        return s

    def _rpc_Session_login(self, user: str, password: str, group: Optional[str]) -> tuple:
        self.counters["login"] += 1
        if not self.ready:  # omero-blitz SessionManagerI.create before the server is loaded
            import omero_ServerErrors_ice  # noqa: F401

            raise omero.WrappedCreateSessionException(reason="Server not fully initialized", concurrency=True,
                                                      backOff=1000, type="ApiUsageException")
        u = self._users.get(user or "")
        if u is None or not password or not secrets.compare_digest(str(password), u.password):
            raise Glacier2.PermissionDeniedException(reason="Password check failed")
        gid = u.groups[0]
        if group is not None:
            if not isinstance(group, str):  # the call context carries strings only
                raise omero.ApiUsageException(message=f"omero.group must be a group name, got {group!r}")
            gid = self._groups.get(group)
            if gid is None or gid not in u.groups:  # SessionManagerImpl: no such group / not a member
                raise omero.SecurityViolation(message=f"User {u.uid} is not a member of group {group}")
        key = secrets.token_hex(16)
        self._sessions[key] = _Session(key, u.name, u.uid, gid)
        return key, self.generation

    def _rpc_Session_join(self, key: str) -> tuple:
        self.counters["join"] += 1
        try:
            self._session(key)
        except Ice.ObjectNotExistException:
            raise Glacier2.PermissionDeniedException(reason=f"No session with key {key[:4]}...") from None
        return key, self.generation

    def _rpc_Session_close(self, key: str) -> None:
        s = self._sessions.get(key)
        if s is not None:
            s.closed = True

    def _rpc_sf_keepAlive(self, s: _Session) -> bool:
        self.counters["keepAlive"] += 1
        return True

    def _rpc_sf_activeServices(self, s: _Session) -> list:
        return [sid for sid, st in self._services.items() if st["session"] == s.key and st["kind"] != "handle"]

    def _rpc_sf_setSecurityContext(self, s: _Session, gid: int) -> None:
        u = self._users[s.user]
        if gid not in u.groups:
            raise omero.SecurityViolation(message=f"user {s.user} is not a member of group {gid}")
        s.group = gid

    def _rpc_IAdmin_getEventContext(self, s: _Session) -> Any:
        ec = omero.sys.EventContext()
        ec.sessionUuid, ec.userId, ec.userName = s.key, s.uid, s.user
        ec.groupId = s.group
        ec.groupName = next(n for n, g in self._groups.items() if g == s.group)
        ec.memberOfGroups = list(self._users[s.user].groups)
        ec.leaderOfGroups, ec.isAdmin = [], False
        return ec

    # -- graph storage -----------------------------------------------------------

    def _new_id(self) -> int:
        oid = self._next
        self._next += 1
        return oid

    def _group_of(self, oid: int) -> Optional[int]:
        d = self._rows[oid]._details
        return None if d is None or d._group is None else d._group.id.val

    def _visible(self, s: _Session, oid: int, ctx: Any) -> bool:
        row = self._rows.get(oid)
        if row is None:
            return False
        if _cls(row) in _GROUPLESS:
            return True
        g = _ctx_group(ctx)
        groups = self._users[s.user].groups if g == -1 else [s.group if g is None else g]
        return self._group_of(oid) in groups and self._may_read(s, row)

    def _write_group(self, s: _Session, ctx: Any, *objs: Any) -> int:
        """The group a write lands in: the call context's ``omero.group``, else
        the session's. With ``-1`` (all groups) the group of the first linked
        object that exists (omero-server OmeroInterceptor.java, "-1
        situation": the linked object's group is passed back out; objects of
        other groups then fail throwIfGroupsDontMatch in :meth:`_save`); a
        write under ``-1`` that links no existing object has no group and is
        refused."""
        g = _ctx_group(ctx)
        if g == -1:
            gid = next((x for x in (self._linked_group(o) for o in objs) if x is not None), None)
            if gid is None:
                raise omero.SecurityViolation(
                    message="omero.group=-1: the object links no existing object to take its group from; "
                    "set the group in the call context")
        else:
            gid = s.group if g is None else g
        if gid not in self._users[s.user].groups:
            raise omero.SecurityViolation(message=f"user {s.user} is not a member of group {gid}")
        return gid

    def _linked_group(self, obj: Any, seen: Optional[set] = None) -> Optional[int]:
        """The group of the first stored object ``obj`` reaches (itself included)."""
        seen = set() if seen is None else seen
        if id(obj) in seen:
            return None
        seen.add(id(obj))
        if obj.id is not None and obj.id.val in self._rows and _cls(obj) not in _GROUPLESS:
            g = self._group_of(obj.id.val)
            if g is not None:
                return g
        if obj.id is not None and not obj.isLoaded():
            return None
        for f in _fields(obj):
            kids = (getattr(obj, f"_{f}Seq") or []) if _is_coll(obj, f) else [getattr(obj, "_" + f)]
            for v in kids:
                if _is_entity(v):
                    g = self._linked_group(v, seen)
                    if g is not None:
                        return g
        return None

    def _children(self, cls: str, fname: str, oid: int) -> list[int]:
        child_cls, fk, ordered = _INVERSE[(cls, fname)]
        kids = [cid for cid, row in self._rows.items()
                if _is_a(row, child_cls) and getattr(row, "_" + fk) is not None
                and getattr(row, "_" + fk).id.val == oid]
        return sorted(kids, key=lambda k: (self._order.get(k, 0), k)) if ordered else sorted(kids)

    def _save(self, s: _Session, obj: Any, gid: int) -> int:
        """Store ``obj`` and everything loaded it reaches, all or nothing
        (the database constraints of :mod:`.constraints`); return its id."""
        with self._transaction() as seen:
            return self._store(s, obj, gid, seen)

    def _store(self, s: _Session, obj: Any, gid: int, seen: dict, position: Optional[int] = None) -> int:
        """One object of a save (see :meth:`_save`)."""
        if id(obj) in seen:
            return seen[id(obj)]
        cls = _cls(obj)
        if cls in _ENUMS and obj.id is None:
            v = unwrap(obj._value)
            if (cls, v) not in self._enum_ids:  # enumerations exist by value only (omero-model *.ome.xml enums)
                raise omero.ValidationException(message=f"no {cls} enumeration {v!r}")
            return self._enum_ids[(cls, v)]
        if obj.id is not None:
            oid = obj.id.val
            row = self._rows.get(oid)
            if row is None or not isinstance(row, type(obj)):  # Hibernate: no row with the given identifier
                raise omero.ValidationException(message=f"{cls}:{oid} does not exist")
            g = self._group_of(oid)
            if g is not None and cls not in _GROUPLESS and g != gid:  # OmeroInterceptor.throwIfGroupsDontMatch
                raise omero.SecurityViolation(
                    message=f"{cls}:{oid} is in group {g}, the call writes in group {gid}: "
                    "objects of different groups cannot be linked")
            if not obj.isLoaded():
                return oid
            self._check_edit(s, row)
            seen[id(obj)] = oid
            details = row._details
        else:
            oid = self._new_id()
            seen[id(obj)] = oid
            details = omero.model.DetailsI()
            details._owner = omero.model.ExperimenterI(s.uid, False)
            details._group = omero.model.ExperimenterGroupI(gid, False)
            self.counters[f"create:{cls}"] += 1
        new = type(obj)()
        new._id = rlong(oid)
        new._details = details
        pending: list[tuple[str, list]] = []
        for f in _fields(obj):
            if _is_coll(obj, f):
                setattr(new, f"_{f}Seq", [])
                setattr(new, f"_{f}Loaded", True)
                if getattr(obj, f"_{f}Loaded") and getattr(obj, f"_{f}Seq"):
                    if (cls, f) not in _INVERSE:
                        raise NotImplementedError(f"the OMERO test double does not store {cls}.{f}")
                    pending.append((f, list(getattr(obj, f"_{f}Seq"))))
                continue
            v = getattr(obj, "_" + f)
            if _is_entity(v):
                if v.id is not None and v.id.val in self._rows:
                    self._check_link(s, cls, self._rows[v.id.val])
                v = type(v)(self._store(s, v, gid, seen), False)
            setattr(new, "_" + f, v)
        for f in _fields(obj):
            info = getattr(type(obj)._field_info, f)
            if not info.nullable and not _is_coll(obj, f) and getattr(new, "_" + f) is None:
                # a <required> field of omero-model's mappings (omero-py's _field_info.nullable)
                raise omero.ValidationException(message=f"{cls}.{f} is required")
        check_domains(cls, new)
        if position is not None:
            self._order[oid] = position
        elif oid not in self._order:
            for (pcls, pf), (ccls, fk, ordered) in _INVERSE.items():
                if ordered and ccls == cls and getattr(new, "_" + fk) is not None:
                    sib = self._children(pcls, pf, getattr(new, "_" + fk).id.val)
                    self._order[oid] = 1 + max((self._order.get(k, 0) for k in sib), default=-1)
        self._rows[oid] = new
        for f, kids in pending:
            _ccls, fk, ordered = _INVERSE[(cls, f)]
            for i, kid in enumerate(kids):
                if getattr(kid, "_" + fk) is None:
                    setattr(kid, "_" + fk, obj)
                self._store(s, kid, gid, seen, position=i if ordered else None)
        return oid

    def _load(self, oid: int, fetch: set, path: tuple = ()) -> Any:
        """A copy of a stored object: fetched paths loaded, the rest unloaded."""
        row = self._rows[oid]
        cls = _cls(row)
        out = type(row)()
        out._id = rlong(oid)
        out._details = self._details_for(self._caller, row)
        for f in _fields(row):
            p = path + (f,)
            if _is_coll(row, f):
                if p in fetch and (cls, f) in _INVERSE:
                    setattr(out, f"_{f}Seq", [self._load(k, fetch, p) for k in self._children(cls, f, oid)])
                    setattr(out, f"_{f}Loaded", True)
                else:
                    setattr(out, f"_{f}Seq", None)
                    setattr(out, f"_{f}Loaded", False)
                continue
            v = getattr(row, "_" + f)
            if _is_entity(v):
                vid = v.id.val
                if p in fetch or (_cls(v) in _ENUMS):
                    v = self._load(vid, fetch, p) if vid in self._rows else type(v)(vid, False)
                else:
                    v = type(v)(vid, False)
            setattr(out, "_" + f, v)
        return out

    # -- IUpdate ----------------------------------------------------------------

    def _rpc_IUpdate_saveAndReturnObject(self, s: _Session, obj: Any, ctx: Any = None) -> Any:
        self.counters["update.save"] += 1
        gid = self._write_group(s, ctx, obj)
        oid = self._save(s, obj, gid)
        return self._load(oid, _paths(obj))

    def _rpc_IUpdate_saveObject(self, s: _Session, obj: Any, ctx: Any = None) -> None:
        self._rpc_IUpdate_saveAndReturnObject(s, obj, ctx)

    def _rpc_IUpdate_saveAndReturnArray(self, s: _Session, objs: list, ctx: Any = None) -> list:
        self.counters["update.save"] += 1
        gid = self._write_group(s, ctx, *objs)
        with self._transaction() as seen:
            ids = [self._store(s, o, gid, seen) for o in objs]
        return [self._load(i, _paths(o)) for i, o in zip(ids, objs)]

    def _rpc_IUpdate_saveArray(self, s: _Session, objs: list, ctx: Any = None) -> None:
        self._rpc_IUpdate_saveAndReturnArray(s, objs, ctx)


    # -- IMetadata -------------------------------------------------------------------------

    def _rpc_IMetadata_loadAnnotations(self, s: _Session, root_type: str, root_ids: list,
                                       annotation_types: list, annotator_ids: Any = None,
                                       options: Any = None, ctx: Any = None) -> dict:
        root = root_type.split(".")[-1]
        self.counters["query:Annotation"] += 1
        self.counters["query"] += 1
        wanted = {t.split(".")[-1] for t in (annotation_types or [])}
        out: dict[int, list] = {}
        for rid in root_ids:
            anns = []
            if rid in self._rows and self._visible(s, rid, ctx):
                for lid in self._children(root, "annotationLinks", rid):
                    aid = self._rows[lid].child.id.val
                    if not wanted or _cls(self._rows[aid]) in wanted:
                        anns.append(self._load(aid, {("file",)}))
            out[rid] = anns
        return out

    # -- stateful services ---------------------------------------------------------

    def _open(self, s: _Session, kind: str, **state: Any) -> int:
        sid = self._new_id()
        self._services[sid] = {"kind": kind, "session": s.key, **state}
        self.counters[f"{kind}.create"] += 1
        return sid

    def _svc(self, s: _Session, sid: int, kind: str) -> dict:
        st = self._services.get(sid)
        if st is None or st["kind"] != kind or st["session"] != s.key:
            raise Ice.ObjectNotExistException()
        return st


    # -- inspection helpers for tests (server-side, no counters) ------------------------------

    def objects(self, kind: str) -> list[Any]:
        """Every stored object of a class (``"Image"``, ``"Well"``...), loaded shallowly."""
        with self._lock:
            return [self._load(k, set()) for k, r in sorted(self._rows.items()) if _cls(r) == kind]

    def children(self, kind: str, collection: str, oid: int) -> list[int]:
        with self._lock:
            return self._children(kind, collection, oid)

    def pixels_of(self, pixels_id: int) -> np.ndarray:
        """The stored pixels of a Pixels object as a native-endian TZCYX array."""
        with self._lock:
            buf = self._pixels[pixels_id]
            return np.transpose(buf, (0, 2, 1, 3, 4)).astype(buf.dtype.newbyteorder("="))

    def file_bytes(self, file_id: int) -> bytes:
        with self._lock:
            return bytes(self._files.get(file_id, b""))

    def open_services(self, kind: Optional[str] = None) -> list[int]:
        """Ids of the stateful services (``"rps"``, ``"rfs"``, ``"table"``, ``"handle"``) still open."""
        with self._lock:
            return [sid for sid, st in self._services.items() if kind is None or st["kind"] == kind]

    def table_columns(self, file_id: int) -> dict[str, list]:
        with self._lock:
            return {c.name: list(c.values) for c in self._tables[file_id]["columns"] or []}



class _Endpoint:
    """What a ``multiprocessing`` manager exposes to other processes."""

    def __init__(self, server: ServerDouble) -> None:
        self._server = server

    def handle(self, blob: bytes) -> bytes:
        return self._server.handle(blob)


_REGISTRY: dict[tuple[str, int], ServerDouble] = {}

