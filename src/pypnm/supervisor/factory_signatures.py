"""The signatures of classes built into C, read once per process for pydantic's default factories.

Why: for every field declared with a `default_factory`, pydantic asks whether the factory takes
the validated data, and to answer it reads the factory's signature (`inspect.signature`). For a
class built into C (`list`, `set`, `collections.deque`) Python parses its `__text_signature__`
each time, about 0.2 ms, and leaves garbage cycles for the collector. `Field(default_factory=list)`
is common: the large benchmark app has 350 such fields, and reading `list`'s signature again for
each was about a tenth of the CPU of a clean import of the app.

Why it is safe to keep: a class built into C (not a heap type) is immutable. None of its
attributes can be set, so neither its `__text_signature__` nor its `__init__`, `__new__` or
`__signature__`; and with `type` as its metaclass, no `__call__` of a metaclass can change either.
Its signature is therefore the same at every call, and a `Signature` is itself immutable, so
one can be handed to every field. Only such classes are kept: a function, a lambda, a class of
the app (whose `__init__` may be replaced) are read each time, as pydantic does. The classes
kept are never freed, so the memo holds only a handful of them, for the process's life.

Written here rather than taken from a library: pydantic reads the signature anew for each
field and has no hook for it. `install` wraps the private
`pydantic._internal._typing_extra.signature_no_eval`, which `_fields.takes_validated_data_argument`
looks up at each call, and keeps the wrapper only after asking that function about `list` and
`tuple` through it: the answers must be the original's, and the signatures must have been read
through the wrapper. Another pydantic, where that does not hold, reads them as it always did,
and the fork template says so once in its log.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

_HEAP_TYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: a class made at run time, not one built into C
_IMMUTABLE_TYPE = 1 << 8  # Py_TPFLAGS_IMMUTABLETYPE: its attributes cannot be set
_PROBES = (list, tuple)  # classes built into C with a signature (Python 3.11 has none for `set` or `dict`)

_original: Callable[[Any], inspect.Signature] | None = None
_kept: dict[type, inspect.Signature] = {}


def install() -> str | None:
    """Wrap pydantic's signature reading; the reason it is left alone, or None once wrapped."""
    global _original
    if _original is not None:
        return None
    try:
        from pydantic._internal import _fields, _typing_extra
    except ImportError as exc:
        return f"cannot import pydantic's internals ({exc})"
    original = getattr(_typing_extra, "signature_no_eval", None)
    asks = getattr(_fields, "takes_validated_data_argument", None)
    if not callable(original) or not callable(asks):
        return "pydantic reads default factories' signatures otherwise than the version pypnm knows"
    try:
        before = [asks(probe) for probe in _PROBES]
    except Exception as exc:  # any other shape: pydantic's own way
        return f"pydantic cannot tell whether a built-in class takes the validated data ({type(exc).__name__}: {exc})"
    _original = original
    setattr(_typing_extra, "signature_no_eval", _signature)  # noqa: B010 (a module function, replaced)
    try:  # through the wrapper, the same answers, from signatures read through it
        same = [asks(probe) for probe in _PROBES] == before and all(probe in _kept for probe in _PROBES)
        same = same and all(_kept[probe] == original(probe) for probe in _PROBES)
    except Exception:
        same = False
    if same:
        return None
    _typing_extra.signature_no_eval = original
    _original = None
    _kept.clear()
    return "pydantic does not read default factories' signatures the way pypnm knows"


def kept() -> list[type]:
    """The classes whose signature this process keeps (for tests and diagnostics)."""
    return list(_kept)


def _signature(factory: Callable[..., Any]) -> inspect.Signature:
    """pydantic's signature of `factory`: kept for a class built into C, read each time for anything else."""
    assert _original is not None
    if not isinstance(factory, type) or type(factory) is not type:  # a function, or a class with a metaclass
        return _original(factory)
    if factory.__flags__ & _HEAP_TYPE or not factory.__flags__ & _IMMUTABLE_TYPE:
        return _original(factory)
    signature = _kept.get(factory)
    if signature is None:
        signature = _kept[factory] = _original(factory)
    return signature
