"""Handles for Python objects that travel through torch.library custom ops.

A process group, a communicator or a collectives bundle is not a tensor or a schema
type, so a custom op receives an int handle and looks the object up here. The
registry keeps each object alive, so a handle stays valid (and unique) for the life
of the process; callers pass long-lived objects (groups, cached communicators), so
the registry does not grow per call. Handle 0 stands for None.
"""

from __future__ import annotations

_OBJECTS: dict = {}   # handle -> object(s)
_HANDLES: dict = {}   # ids of the object(s) -> handle


def handle_of(*objs) -> int:
    """A stable int for one object or a tuple of objects (0 for a lone None)."""
    if objs == (None,):
        return 0
    key = tuple(id(o) for o in objs)
    handle = _HANDLES.get(key)
    if handle is None:
        handle = len(_HANDLES) + 1
        _HANDLES[key] = handle
        _OBJECTS[handle] = objs[0] if len(objs) == 1 else objs
    return handle


def resolve(handle: int):
    return None if handle == 0 else _OBJECTS[handle]
