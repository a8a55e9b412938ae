"""The double's command service: Delete2 as a command with a handle.

``submit`` gives a handle; the command finishes after
:attr:`~.server.ServerDouble.delete_polls` polls of ``getResponse``, and
closing the handle before that cancels it (nothing is deleted). An Image
that a WellSample still references cannot be deleted ("may not delete
Image while WellSample remains", omero-blitz
``graph-rules/blitz-delete-rules.xml``) and the response is an
``omero.cmd.ERR``, the whole request failing; deleting a Well deletes its
samples and their images; File/Tag/Term annotations are kept unless the
request says otherwise (omero-py ``omero/gateway/__init__.py``
deleteObjects ``excludeType``, which for a Plate without ``deleteChildren``
excludes Image too: the images stay, unlinked); the annotations of a deleted object are
considered for deletion — basic and comment ones regardless of
permissions, file and tag ones only when the object's owner owns them
(``X =/o A``), the others when the user may delete them (``/d``) — and an
annotation still linked to an object that stays is kept (blitz-delete-rules.xml
"do not delete the annotation if it remains linked"); deleting an OriginalFile deletes the
FileAnnotations that hold it and their links, whoever owns them
(blitz-delete-rules.xml ``A:FileAnnotation[E].file = [D]`` -> ``A:[D]/n``).
"""

from __future__ import annotations

from typing import Any, Optional

from ._common import _cls, _ctx_group, _Session, omero


def _owner(row: Any) -> Optional[int]:
    d = row._details
    return None if d is None or d._owner is None else d._owner.id.val


class CommandServices:
    """``sf.submit`` and the command Handle of :class:`~.server.ServerDouble` (a mixin)."""

    _rows: dict
    delete_polls: int

    # -- the command service: Delete2 ---------------------------------------------------------

    def _rpc_sf_submit(self, s: _Session, request: Any, ctx: Any = None) -> int:
        """ServiceFactory.submit: a handle; the command runs when polled (see the module doc)."""
        if not isinstance(request, omero.cmd.Delete2):
            raise NotImplementedError(f"the OMERO test double runs Delete2 commands only, not {type(request).__name__}")
        self.counters["cmd.submit"] += 1
        return self._open(s, "handle", request=request, polls=self.delete_polls, response=None,
                          group=_ctx_group(ctx))

    def _rpc_Handle_getResponse(self, s: _Session, sid: int, ctx: Any = None) -> Any:
        st = self._svc(s, sid, "handle")
        if st["response"] is None:
            if st["polls"] > 0:
                st["polls"] -= 1
                return None
            st["response"] = self._delete(s, st["request"])
        return st["response"]

    def _rpc_Handle_getStatus(self, s: _Session, sid: int, ctx: Any = None) -> Any:
        st = self._svc(s, sid, "handle")
        return omero.cmd.Status(steps=1, currentStep=0 if st["response"] is None else 1)

    def _rpc_Handle_cancel(self, s: _Session, sid: int, ctx: Any = None) -> bool:
        st = self._svc(s, sid, "handle")
        if st["response"] is None:
            self.counters["cmd.cancelled"] += 1
            st["response"] = omero.cmd.ERR(category="cancel", name="cancelled", parameters={})
            return True
        return False

    def _rpc_Handle_close(self, s: _Session, sid: int, ctx: Any = None) -> None:
        st = self._services.get(sid)
        if st is not None and st["kind"] == "handle" and st["response"] is None:
            self.counters["cmd.cancelled"] += 1  # closing an unfinished command cancels it
        self._services.pop(sid, None)

    def _delete(self, s: _Session, req: Any) -> Any:
        """Run one Delete2: an ``omero.cmd.OK`` (DoAllRsp-like) or ``ERR``, all or nothing."""
        excluded: set[str] = set()
        for opt in req.childOptions or []:
            excluded.update(opt.excludeType or [])
        doomed: set[int] = set()
        errors: list[str] = []

        def image(iid: int, via_sample: bool = False) -> None:
            if iid in doomed:
                return
            samples = [ws for ws in self._children("Image", "wellSamples", iid) if ws not in doomed]
            if samples and not via_sample:  # blitz-delete-rules.xml
                errors.append(f"may not delete Image[{iid}] while WellSample[{samples[0]}] remains")
                return
            doomed.add(iid)
            for pid in self._children("Image", "pixels", iid):
                doomed.add(pid)
                for ch in self._children("Pixels", "channels", pid):
                    doomed.add(ch)
                    doomed.add(self._rows[ch].logicalChannel.id.val)
            for rid in self._children("Image", "rois", iid):
                roi(rid)
            links(iid, "Image")

        def roi(rid: int) -> None:
            doomed.add(rid)
            doomed.update(self._children("Roi", "shapes", rid))
            links(rid, "Roi")

        considered: list[int] = []

        def links(oid: int, kind: str) -> None:
            parent_owner = _owner(self._rows[oid])
            for lid in self._children(kind, "annotationLinks", oid):
                doomed.add(lid)  # L:IAnnotationLink[E].parent = [D] -> L:[D]/n
                aid = self._rows[lid].child.id.val
                ann = self._rows[aid]
                if _cls(ann) in excluded:
                    continue
                if isinstance(ann, (omero.model.BasicAnnotation, omero.model.CommentAnnotation)):
                    considered.append(aid)  # "regardless of permissions"
                elif isinstance(ann, (omero.model.FileAnnotation, omero.model.TagAnnotation)):
                    if _owner(ann) == parent_owner and self._may_delete(s, ann):  # X =/o A, /d
                        considered.append(aid)
                elif self._may_delete(s, ann):  # List/Map/XmlAnnotation ... {i}/d
                    considered.append(aid)

        def still_linked(aid: int) -> bool:
            """L:IAnnotationLink[E].parent = [E]{ia}, L.child = A -> A:{a}: kept while linked elsewhere."""
            return any(k not in doomed for k, r in self._rows.items()
                       if _cls(r).endswith("AnnotationLink") and r.child is not None and r.child.id.val == aid)

        def annotation(aid: int) -> None:
            doomed.add(aid)
            row = self._rows[aid]
            doomed.update(k for k, r in self._rows.items()
                          if _cls(r).endswith("AnnotationLink") and r.child.id.val == aid)
            if _cls(row) == "FileAnnotation" and row.file is not None:
                doomed.add(row.file.id.val)

        def well(wid: int) -> None:
            doomed.add(wid)
            for ws in self._children("Well", "wellSamples", wid):
                doomed.add(ws)
                if self._rows[ws].image is not None and "Image" not in excluded:  # ChildOption.excludeType
                    image(self._rows[ws].image.id.val, via_sample=True)
            links(wid, "Well")

        for spec, ids in (req.targetObjects or {}).items():
            self.counters[f"delete:{spec}"] += 1
            for oid in ids:
                if oid not in self._rows or not self._visible(s, oid, None):
                    errors.append(f"no {spec}[{oid}] to delete")
                    continue
                kind = _cls(self._rows[oid])
                if not self._may_delete(s, self._rows[oid]):  # BasicACLVoter.allowDelete
                    errors.append(f"may not delete {spec}[{oid}]: not permitted by the group's permissions")
                    continue
                if spec == "Image":
                    image(oid)
                elif spec == "Roi":
                    roi(oid)
                elif spec == "OriginalFile":
                    doomed.add(oid)
                    # blitz-delete-rules.xml "If an original file is deleted then also delete the
                    # corresponding file annotation regardless of permissions":
                    # A:FileAnnotation[E].file = [D] -> A:[D]/n (and with it its links)
                    for k in [k for k, r in self._rows.items() if _cls(r) == "FileAnnotation"
                              and r.file is not None and r.file.id.val == oid]:
                        annotation(k)
                elif spec == "Annotation" or kind.endswith("Annotation"):
                    annotation(oid)
                elif spec == "Well":
                    well(oid)
                elif spec == "Plate":
                    doomed.add(oid)
                    for w in self._children("Plate", "wells", oid):
                        well(w)
                    links(oid, "Plate")
                    doomed.update(self._children("Plate", "screenLinks", oid))
                else:
                    raise NotImplementedError(f"the OMERO test double cannot delete {spec}")
        for aid in considered:  # once the graph is known: orphans go, what is still linked stays
            if aid not in doomed and not still_linked(aid):
                annotation(aid)
        if errors:  # the whole graph operation fails
            return omero.cmd.ERR(category="graph-fail", name="graph-fail",
                                 parameters={"message": "; ".join(errors)})
        for oid in doomed:
            self._rows.pop(oid, None)
            self._pixels.pop(oid, None)
            self._written.discard(oid)
            self._files.pop(oid, None)
            self._tables.pop(oid, None)
            self._order.pop(oid, None)
            self._extent.pop(oid, None)
        return omero.cmd.OK()

