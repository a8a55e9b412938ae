"""The double's group permissions: who may read, link to, annotate, edit and
delete whose objects.

Rules, each from the source:

* a group's permissions are a string such as ``rw----`` (private, the
  default of ``omero group add``: omero-py ``omero/plugins/group.py``),
  ``rwr---`` (read-only), ``rwra--`` (read-annotate), ``rwrw--``
  (read-write); ``r`` grants READ, ``a`` ANNOTATE, ``w`` ANNOTATE and WRITE,
  for the user, group and world roles in turn (omero-model
  ``ome/model/internal/Permissions.java`` parseString);
* the role of a user towards an object is USER for its owner, GROUP for a
  member of its group, else WORLD (omero-server ``OmeroInterceptor.java``
  neededRole); a scope is granted when the role has its right (omero-server
  ``BasicACLVoter.java``: ANNOTATE needs ANNOTATE; EDIT, DELETE and LINK need
  WRITE);
* reads: only the objects the user may READ are seen (BasicACLVoter.allowLoad,
  the security filter): in a private group only one's own;
* links: saving an object that references another user's object needs WRITE
  on it, ANNOTATE for an annotation link or a Roi on an Image, else
  ``SecurityViolation("Group is rw----. Cannot link to object: ...")``
  (OmeroInterceptor.evaluateLinkages, neededRight, throwIfNotGranted);
* updates of another user's object need EDIT (BasicACLVoter.allowUpdate),
  deleting one needs DELETE (allowDelete; Delete2 checks the targets);
* every object read carries ``details.permissions`` with the restrictions
  of the reading user (LINK, EDIT, DELETE, ANNOTATE, CHGRP, CHOWN, in the
  order of ``omero.constants.permissions``), so omero-py's
  ``canAnnotate()`` / ``canEdit()`` / ``canDelete()`` answer as on a real
  server.

Not modelled: administrators and group owners (the double has neither, so
the ``ReadOnlyGroupSecurityViolation`` of OmeroInterceptor's graph-critical
branch never arises), and Delete2's per-object permission checks beyond the
request's targets.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

from ._common import _GROUPLESS, _cls, omero

#: omero-py omero/plugins/group.py: "private (rw----) [DEFAULT]"
DEFAULT_PERMISSIONS = "rw----"
READ, ANNOTATE, WRITE = "read", "annotate", "write"
_ROLES = ("user", "group", "world")


@functools.lru_cache(maxsize=None)
def parse_permissions(perms: str) -> dict[str, frozenset]:
    """``"rwra--"`` -> the rights of each role (Permissions.java parseString)."""
    import re

    if not isinstance(perms, str) or not re.fullmatch(r"([Rr_-][AaWw_-]){3}", perms):
        raise omero.ApiUsageException(message=f"Permissions are of the form: ([Rr_-][AaWw_-]){{3}}, got {perms!r}")
    out: dict[str, set[str]] = {}
    for i, role in enumerate(_ROLES):
        r, w = perms[2 * i].lower(), perms[2 * i + 1].lower()
        rights = {READ} if r == "r" else set()
        if w == "a":
            rights.add(ANNOTATE)
        elif w == "w":
            rights |= {ANNOTATE, WRITE}
        out[role] = frozenset(rights)
    return out


def _is_annotation_link(cls: str) -> bool:
    return cls.endswith("AnnotationLink")


class GroupPermissions:
    """Permission checks of :class:`~.server.ServerDouble` (a mixin)."""

    _rows: dict
    _users: dict
    _group_perms: dict  # group id -> permissions string

    def _role(self, s: Any, row: Any) -> Optional[tuple[str, str]]:
        """(role, permissions string) of the session's user towards ``row``;
        None when no rule applies (system types, objects without details)."""
        d = row._details
        if _cls(row) in _GROUPLESS or d is None or d._owner is None or d._group is None:
            return None
        gid = d._group.id.val
        perms = self._group_perms.get(gid, DEFAULT_PERMISSIONS)
        if d._owner.id.val == s.uid:
            return "user", perms
        if gid in self._users[s.user].groups:
            return "group", perms
        return "world", perms

    def _granted(self, s: Any, row: Any, right: str) -> bool:
        rp = self._role(s, row)
        if rp is None:
            return True
        role, perms = rp
        rights = parse_permissions(perms)
        return right in rights["world"] or right in rights[role]

    def _may_read(self, s: Any, row: Any) -> bool:
        return self._granted(s, row, READ)

    def _check_link(self, s: Any, changed_cls: str, linked: Any) -> None:
        """OmeroInterceptor.evaluateLinkages for one linked, stored object."""
        right = ANNOTATE if _is_annotation_link(changed_cls) or \
            (changed_cls == "Roi" and _cls(linked) == "Image") else WRITE
        if not self._granted(s, linked, right):
            perms = self._role(s, linked)[1]
            raise omero.SecurityViolation(
                message=f"Group is {perms}. Cannot link to object: {_cls(linked)}:{linked.id.val}")

    def _check_edit(self, s: Any, row: Any) -> None:
        if not self._granted(s, row, WRITE):  # BasicACLVoter.allowUpdate (Scope.EDIT)
            raise omero.SecurityViolation(message=f"Cannot update {_cls(row)}:{row.id.val}")

    def _may_delete(self, s: Any, row: Any) -> bool:
        return self._granted(s, row, WRITE)  # BasicACLVoter.allowDelete (Scope.DELETE)

    def _details_for(self, s: Optional[Any], row: Any) -> Any:
        """The details a read of ``row`` carries: permissions with the reader's restrictions."""
        d = row._details
        if s is None or d is None or d._group is None:
            return d
        gid = d._group.id.val
        perms = omero.model.PermissionsI(self._group_perms.get(gid, DEFAULT_PERMISSIONS))
        may_write = self._granted(s, row, WRITE)
        may_annotate = self._granted(s, row, ANNOTATE)
        owner = d._owner is not None and d._owner.id.val == s.uid
        # omero.constants.permissions: LINK, EDIT, DELETE, ANNOTATE, CHGRP, CHOWN restrictions
        perms._restrictions = [not may_write, not may_write, not may_write, not may_annotate, not owner, True]
        out = omero.model.DetailsI()
        out._owner, out._group, out._permissions = d._owner, d._group, perms
        return out
