"""Typed records for the modules PID 1 imports, without the ``dataclasses`` module.

``dataclasses`` imports ``inspect`` (and with it ast, dis, tokenize ...): about 3 MB of
resident memory in a process whose budget is 10 MB. This gives the small part of it init
needs: ``@record`` builds ``__init__`` (positional or keyword, defaults, per-instance
factories), ``__repr__``, ``__eq__`` and, with ``frozen=True``, immutability and
``__hash__``; :func:`replace`, :func:`fields` and :func:`asdict` work as their dataclasses
namesakes. Field names and order come from the class's own annotations.
"""
from __future__ import annotations

_MISSING = object()


class Field:
    __slots__ = ("default", "factory", "compare")

    def __init__(self, default=_MISSING, factory=None, compare: bool = True):
        self.default, self.factory, self.compare = default, factory, compare


def field(*, default=_MISSING, default_factory=None, compare: bool = True) -> Field:
    return Field(default, default_factory, compare)


class FrozenInstanceError(AttributeError):
    pass


def record(cls=None, *, frozen: bool = False):
    def wrap(cls):
        names = tuple(cls.__dict__.get("__annotations__", {}))
        specs: dict[str, Field] = {}
        for n in names:
            v = cls.__dict__.get(n, _MISSING)
            specs[n] = v if isinstance(v, Field) else Field(v)
            if isinstance(v, Field):
                if v.default is _MISSING:
                    delattr(cls, n)
                else:
                    setattr(cls, n, v.default)
        compared = tuple(n for n in names if specs[n].compare)
        setter = object.__setattr__

        def __init__(self, *args, **kw):
            if len(args) > len(names):
                raise TypeError(f"{cls.__name__}() takes {len(names)} fields, "
                                f"got {len(args)} positional arguments")
            for n, a in zip(names, args):
                if n in kw:
                    raise TypeError(f"{cls.__name__}() got field {n!r} twice")
                kw[n] = a
            for n in names:
                if n in kw:
                    setter(self, n, kw.pop(n))
                    continue
                s = specs[n]
                if s.factory is not None:
                    setter(self, n, s.factory())
                elif s.default is not _MISSING:
                    setter(self, n, s.default)
                else:
                    raise TypeError(f"{cls.__name__}() missing field {n!r}")
            if kw:
                raise TypeError(f"{cls.__name__}() got unknown fields {sorted(kw)}")

        def __repr__(self):
            inner = ", ".join(f"{n}={getattr(self, n)!r}" for n in names)
            return f"{cls.__name__}({inner})"

        def __eq__(self, other):
            if other.__class__ is not self.__class__:
                return NotImplemented
            return all(getattr(self, n) == getattr(other, n) for n in compared)

        cls.__init__, cls.__repr__, cls.__eq__ = __init__, __repr__, __eq__
        cls.__record_fields__ = names
        if frozen:
            def __setattr__(self, name, value):
                raise FrozenInstanceError(f"{cls.__name__} is frozen: cannot set {name!r}")

            def __hash__(self):
                return hash(tuple(getattr(self, n) for n in compared))
            cls.__setattr__, cls.__delattr__, cls.__hash__ = __setattr__, __setattr__, __hash__
        else:
            cls.__hash__ = None
        return cls
    return wrap if cls is None else wrap(cls)


def fields(obj_or_cls) -> tuple[str, ...]:
    return obj_or_cls.__record_fields__


def replace(obj, **changes):
    kw = {n: getattr(obj, n) for n in fields(obj)}
    kw.update(changes)
    return obj.__class__(**kw)


def asdict(obj):
    if hasattr(obj.__class__, "__record_fields__"):
        return {n: asdict(getattr(obj, n)) for n in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [asdict(x) for x in obj]
    if isinstance(obj, dict):
        return {k: asdict(v) for k, v in obj.items()}
    if isinstance(obj, (set, frozenset)):
        return sorted(asdict(x) for x in obj)
    return obj
