"""A cheaper `__init__` for the frozen, slotted dataclasses a decision builds by the dozen.

For a frozen dataclass, `dataclasses` writes an `__init__` that stores each field with
`object.__setattr__(self, name, value)`: a global and an attribute lookup, then the generic attribute
machinery, once per field. A served batch recipient builds a few dozen such objects (its profile, its
decision and shown items, its content and slots, its offers' plan and answer), and those `__init__`
calls were about 7 % of a batch worker's samples (py-spy, `nextbest bench email-batch`). Storing through
each slot's own descriptor does the same for about half the cost per field.

`fast_init` changes nothing else: the class is still the dataclass `@dataclass(frozen=True, slots=True)`
made (equality, hash, repr, `dataclasses.replace`, pickling, and `FrozenInstanceError` on assignment),
and the new `__init__` takes the same parameters with the same defaults and default factories.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


class _Factory:
    """The default of a field with a default factory ("call the factory"), shown as dataclasses shows it."""

    def __repr__(self) -> str:
        return "<factory>"


_FACTORY = _Factory()


def fast_init(cls: type[T]) -> type[T]:
    """Give `cls`, a `@dataclass(frozen=True, slots=True)` class, an `__init__` that stores each field through
    its slot descriptor. Put it above the `@dataclass` line. TypeError for any other kind of class."""
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen or "__slots__" not in cls.__dict__:
        raise TypeError(f"fast_init needs a @dataclass(frozen=True, slots=True) class, not {cls.__qualname__}")
    if hasattr(cls, "__post_init__"):
        raise TypeError(f"{cls.__qualname__} has __post_init__, which fast_init does not call")
    namespace: dict[str, Any] = {"__nb_factory": _FACTORY}
    positional: list[str] = []
    keyword_only: list[str] = []
    body: list[str] = []
    for k, f in enumerate(dataclasses.fields(cls)):  # type: ignore[arg-type]
        if not f.init:
            raise TypeError(f"{cls.__qualname__}.{f.name} is not an __init__ parameter, which fast_init does not do")
        namespace[f"__nb_set{k}"] = cls.__dict__[f.name].__set__
        if f.default is not dataclasses.MISSING:
            namespace[f"__nb_default{k}"] = f.default
            param = f"{f.name}=__nb_default{k}"
        elif f.default_factory is not dataclasses.MISSING:
            namespace[f"__nb_make{k}"] = f.default_factory
            param = f"{f.name}=__nb_factory"
            body.append(f"if {f.name} is __nb_factory: {f.name} = __nb_make{k}()")
        else:
            param = f.name
        (keyword_only if f.kw_only else positional).append(param)
        body.append(f"__nb_set{k}(self, {f.name})")
    signature = ", ".join(["self", *positional, *(["*", *keyword_only] if keyword_only else [])])
    source = f"def __init__({signature}) -> None:\n" + "".join(f"    {line}\n" for line in body or ["pass"])
    exec(source, namespace)
    init = namespace["__init__"]
    generated = cls.__init__  # type: ignore[misc]
    init.__qualname__ = generated.__qualname__
    init.__module__ = cls.__module__
    init.__annotations__ = dict(generated.__annotations__)
    init.__doc__ = generated.__doc__
    cls.__init__ = init  # type: ignore[method-assign]
    return cls
