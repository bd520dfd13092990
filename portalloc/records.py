"""`NamedTuple`, `TypedDict` and frozen `dataclass` for the modules on the read path,
without importing `typing` or `dataclasses`.

`portalloc env` for a live lease should cost little more than the interpreter's own
start. `import typing` adds a third of that, and `import dataclasses` (which imports
`inspect`, `ast`, `dis` and `tokenize`) most of another (bench/README.md). Type checkers
see `typing.NamedTuple`, `typing.TypedDict` and `dataclasses.dataclass`, `field` and
`replace` themselves.
At run time:

- `class Lease(NamedTuple)` becomes the `collections.namedtuple` typing's own
  NamedTupleMeta makes of it: fields from the annotations, defaults, methods,
  properties and docstring.
- `class RawLease(TypedDict)` is a class holding its annotations: the keys, for code
  that reads them (`RawLease.__annotations__`); values are plain dicts.
- `@dataclass(frozen=True)` gives what a frozen dataclass has (`__init__` calling
  `__post_init__`, `__eq__` and `__hash__` over the compared fields, `__repr__`, no
  assignment, `field(default_factory=..., compare=..., repr=...)`), and becomes a real
  dataclass (`dataclasses` imported then) the first time anything asks for its
  `__dataclass_fields__`: `dataclasses.replace`, `fields`, `asdict`, `is_dataclass`.

Modules off the read path use `typing` and `dataclasses` directly.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from dataclasses import dataclass as dataclass
    from dataclasses import field as field
    from dataclasses import replace as replace
    from typing import NamedTuple as NamedTuple
    from typing import TypedDict as TypedDict
else:
    from collections import namedtuple

    # Names namedtuple() defines that a class body must not replace (as typing says).
    _PROHIBITED = frozenset(
        {"__new__", "__init__", "__slots__", "__getnewargs__", "_fields", "_field_defaults",
         "_make", "_replace", "_asdict", "_source"}
    )  # fmt: skip
    _SPECIAL = frozenset({"__module__", "__name__", "__annotations__", "__qualname__"})

    class _NamedTupleMeta(type):
        def __new__(mcls, name, bases, namespace):
            if not bases:  # NamedTuple itself
                return super().__new__(mcls, name, bases, namespace)
            types = namespace.get("__annotations__", {})
            defaults = []
            for key in types:
                if key in namespace:
                    defaults.append(namespace[key])
                elif defaults:
                    raise TypeError(f"{name}: field {key} without a default follows one with")
            cls = namedtuple(name, types, defaults=defaults, module=namespace["__module__"])
            cls.__annotations__ = dict(types)
            cls.__qualname__ = namespace.get("__qualname__", name)
            for key, value in namespace.items():
                if key in _PROHIBITED:
                    raise AttributeError(f"cannot overwrite NamedTuple attribute {key}")
                if key not in _SPECIAL and key not in types:
                    setattr(cls, key, value)
            return cls

    class NamedTuple(metaclass=_NamedTupleMeta):
        """Base class: `class Lease(NamedTuple): ...` as with typing.NamedTuple."""

    class TypedDict:
        """Base class of a raw JSON shape: at run time only its annotations (the keys)."""

    class _Missing:
        def __repr__(self):
            return "MISSING"

    MISSING = _Missing()

    class _Field:
        __slots__ = ("compare", "default", "default_factory", "name", "repr")

        def __init__(self, default, default_factory, compare, repr):
            self.name = ""
            self.default = default
            self.default_factory = default_factory
            self.compare = compare
            self.repr = repr

    def field(*, default=MISSING, default_factory=MISSING, compare=True, repr=True):
        return _Field(default, default_factory, compare, repr)

    class FrozenInstanceError(AttributeError):
        """As dataclasses.FrozenInstanceError (which is the one raised once upgraded)."""

    _MADE = ("__init__", "__eq__", "__hash__", "__repr__", "__setattr__", "__delattr__")

    class _Upgrade:
        """`__dataclass_fields__`: makes the class a real dataclass when first asked."""

        def __get__(self, instance, owner):
            import dataclasses

            for name in (*_MADE, "__dataclass_fields__"):
                delattr(owner, name)
            for spec in owner.__record_fields__:
                default = dataclasses.MISSING if spec.default is MISSING else spec.default
                if spec.default_factory is not MISSING or not spec.compare or not spec.repr:
                    factory = spec.default_factory
                    setattr(
                        owner,
                        spec.name,
                        dataclasses.field(
                            default=default,
                            default_factory=dataclasses.MISSING if factory is MISSING else factory,
                            compare=spec.compare,
                            repr=spec.repr,
                        ),
                    )
            dataclasses.dataclass(frozen=True)(owner)
            return owner.__dict__["__dataclass_fields__"]

    def dataclass(*, frozen):
        if not frozen:
            raise TypeError("portalloc.records.dataclass makes frozen classes only")
        return _frozen

    def _frozen(cls):
        specs = []
        # Not inspect.get_annotations: importing inspect is what this module avoids.
        for name in cls.__dict__.get("__annotations__", {}):  # noqa: RUF063
            value = cls.__dict__.get(name, MISSING)
            spec = value if isinstance(value, _Field) else _Field(value, MISSING, True, True)
            spec.name = name
            if spec.default is MISSING and name in cls.__dict__:
                delattr(cls, name)
            elif spec.default is not MISSING:
                setattr(cls, name, spec.default)
            specs.append(spec)
        names = tuple(spec.name for spec in specs)
        compared = tuple(spec.name for spec in specs if spec.compare)
        shown = tuple(spec.name for spec in specs if spec.repr)
        title = f"{cls.__name__}.__init__()"

        def __init__(self, *args, **kwargs):
            if len(args) > len(names):
                raise TypeError(
                    f"{title} takes {len(names) + 1} positional arguments "
                    f"but {len(args) + 1} were given"
                )
            values = dict(zip(names, args, strict=False))
            for key, value in kwargs.items():
                if key not in names:
                    raise TypeError(f"{title} got an unexpected keyword argument {key!r}")
                if key in values:
                    raise TypeError(f"{title} got multiple values for argument {key!r}")
                values[key] = value
            for spec in specs:
                if spec.name in values:
                    value = values[spec.name]
                elif spec.default_factory is not MISSING:
                    value = spec.default_factory()
                elif spec.default is not MISSING:
                    value = spec.default
                else:
                    raise TypeError(f"{title} missing 1 required argument: {spec.name!r}")
                object.__setattr__(self, spec.name, value)
            post_init = getattr(self, "__post_init__", None)
            if post_init is not None:
                post_init()

        def __eq__(self, other):
            if other.__class__ is not self.__class__:
                return NotImplemented
            mine = tuple(getattr(self, name) for name in compared)
            return mine == tuple(getattr(other, name) for name in compared)

        def __hash__(self):
            return hash(tuple(getattr(self, name) for name in compared))

        def __repr__(self):
            shown_fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in shown)
            return f"{self.__class__.__qualname__}({shown_fields})"

        def __setattr__(self, name, value):
            if type(self) is cls or name in names:
                raise FrozenInstanceError(f"cannot assign to field {name!r}")
            super(cls, self).__setattr__(name, value)

        def __delattr__(self, name):
            if type(self) is cls or name in names:
                raise FrozenInstanceError(f"cannot delete field {name!r}")
            super(cls, self).__delattr__(name)

        for function in (__init__, __eq__, __hash__, __repr__, __setattr__, __delattr__):
            function.__qualname__ = f"{cls.__qualname__}.{function.__name__}"
            setattr(cls, function.__name__, function)
        cls.__match_args__ = names
        cls.__record_fields__ = tuple(specs)
        cls.__dataclass_fields__ = _Upgrade()
        return cls

    def replace(obj, /, **changes):
        """As dataclasses.replace: a new record with CHANGES, validated as any other."""
        for spec in type(obj).__record_fields__:
            if spec.name not in changes:
                changes[spec.name] = getattr(obj, spec.name)
        return obj.__class__(**changes)
