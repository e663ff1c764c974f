"""The signatures of classes built into C, read once per process for pydantic's default factories.

Why: for every field declared with a `default_factory`, pydantic asks whether the factory takes
the validated data, and to answer it reads the factory's signature (`inspect.signature`). For a
class built into C (`list`, `tuple`, `decimal.Decimal`) Python parses its `__text_signature__`
each time, about 0.2 ms, and leaves garbage cycles for the collector. `Field(default_factory=list)`
is common: the large benchmark app has 350 such fields, and reading `list`'s signature again for
each was about a seventh of the CPU of a clean import of the app (bench/README.md).

Why it is safe to keep: a class built into C (not a heap type) is immutable. None of its
attributes can be set, so neither its `__text_signature__` nor its `__init__`, `__new__` or
`__signature__`; and with `type` as its metaclass, no `__call__` of a metaclass can change either.
One more thing goes into its signature: a default that the text names instead of spelling out
(`buffer_size=DEFAULT_BUFFER_SIZE` of `io.BufferedReader`), which `inspect` looks up in the
class's module, where it can be set. So a signature is kept only when every default in the text
is a literal (`iterable=()`); then it is the same at every call, and a `Signature` is itself
immutable, so one can be handed to every field. Anything else is read each time, as pydantic
does: a function, a lambda, a class of the app (whose `__init__` may be replaced), and a
class built into C with no signature (`dict`, `set`: reading fails at once, cheaply). The classes
kept are never freed, so the memo holds only a handful of them, for the process's life.

pydantic calls the same function for a few other things (a `validate_call` target, a
`json_schema_extra` callable): those are functions, read each time, and any argument beyond
the callable passes the memo by.

Written here rather than taken from a library: pydantic reads the signature anew for each
field and has no hook for it. `install` wraps the private
`pydantic._internal._typing_extra.signature_no_eval`, which `_fields.takes_validated_data_argument`
looks up at each call. It wraps pydantic's own function only (not one another library put there)
and keeps the wrapper only after asking `takes_validated_data_argument` about `list` and `tuple`
through it: the answers must be the original's, and the signatures must have been read through
the wrapper. Another pydantic, where that does not hold, reads them as it always did,
and the fork template says so once in its log.
"""

from __future__ import annotations

import ast
import inspect
from collections.abc import Callable
from typing import Any

_HEAP_TYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: a class made at run time, not one built into C
_IMMUTABLE_TYPE = 1 << 8  # Py_TPFLAGS_IMMUTABLETYPE: its attributes cannot be set
_PROBES = (list, tuple)  # classes built into C with a signature (Python 3.11 has none for `set` or `dict`)

_original: Callable[..., inspect.Signature] | None = None
_kept: dict[type, inspect.Signature] = {}


def install() -> str | None:
    """Wrap pydantic's signature reading; the reason it is left alone, or None once wrapped."""
    global _original
    if _original is not None:
        from pydantic._internal import _typing_extra as installed

        return None if installed.signature_no_eval is _signature else "another library replaced pypnm's hook"
    try:
        from pydantic._internal import _fields, _typing_extra
    except ImportError as exc:
        return f"cannot import pydantic's internals ({exc})"
    original = getattr(_typing_extra, "signature_no_eval", None)
    asks = getattr(_fields, "takes_validated_data_argument", None)
    if not callable(original) or not callable(asks):
        return "pydantic reads default factories' signatures otherwise than the version pypnm knows"
    if getattr(original, "__module__", None) != _typing_extra.__name__:
        return f"pydantic's signature_no_eval was replaced (by {getattr(original, '__module__', None)})"
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


def _signature(factory: Callable[..., Any], *args: Any, **kwargs: Any) -> inspect.Signature:
    """pydantic's signature of `factory`: kept for a class built into C, read each time for anything else."""
    assert _original is not None
    if args or kwargs or type(factory) is not type:  # a function, or a class with a metaclass of its own
        return _original(factory, *args, **kwargs)
    signature = _kept.get(factory)
    if signature is None:
        signature = _original(factory)
        if _constant(factory):
            _kept[factory] = signature
    return signature


def _constant(factory: type) -> bool:
    """Is `factory` a class built into C whose text signature spells every default out?"""
    if factory.__flags__ & _HEAP_TYPE or not factory.__flags__ & _IMMUTABLE_TYPE:
        return False
    text = getattr(factory, "__text_signature__", None)
    if not isinstance(text, str):
        return False
    try:  # `$self` marks a bound first parameter; the rest is Python syntax
        function = ast.parse(f"def f{text.replace('$', '')}: pass").body[0]
    except SyntaxError:
        return False
    assert isinstance(function, ast.FunctionDef)
    defaults = [*function.args.defaults, *(d for d in function.args.kw_defaults if d is not None)]
    try:
        for default in defaults:
            ast.literal_eval(default)
    except (ValueError, TypeError, SyntaxError):  # a name, looked up in the class's module each time
        return False
    return True
