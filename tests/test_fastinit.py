"""`fast_init`: the same objects as the dataclass's own `__init__`, at about half the cost per field."""

import dataclasses
import inspect
import pickle
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import api.email
import api.offers
import api.signing
import engine.candidates
import engine.email
import engine.offers
import engine.pipeline
import engine.policies
import engine.types
import feature_store.caps
import feature_store.email_store
import feature_store.ingest
from engine.fastinit import fast_init


def _shape() -> type:
    """A new class of every kind of field each call: one stays as dataclasses made it, one gets fast_init."""

    @dataclass(frozen=True, slots=True)
    class Shape:
        a: int
        b: str = "b"
        c: tuple[int, ...] = ()
        d: dict[str, int] = field(default_factory=dict)
        e: float = field(default=0.5, kw_only=True)

    return Shape


Plain: Any = _shape()
Fast: Any = fast_init(_shape())


def _fields(obj: object) -> tuple[object, ...]:
    return tuple(getattr(obj, f.name) for f in dataclasses.fields(obj))  # type: ignore[arg-type]


@given(
    st.integers(),
    st.one_of(st.none(), st.text(max_size=5)),
    st.one_of(st.none(), st.tuples(st.integers())),
    st.one_of(st.none(), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)),
    st.one_of(st.none(), st.floats(allow_nan=False)),
)
def test_every_mix_of_given_and_default_arguments_builds_what_the_dataclass_builds(a, b, c, d, e):
    given_args = {k: v for k, v in {"b": b, "c": c, "d": d, "e": e}.items() if v is not None}
    assert _fields(Fast(a, **given_args)) == _fields(Plain(a, **given_args))
    if b is not None and c is not None and d is not None:
        assert _fields(Fast(a, b, c, d)) == _fields(Plain(a, b, c, d))


def test_the_class_keeps_everything_else_the_dataclass_gave_it():
    x = Fast(1, "x", (2,), {"k": 3}, e=1.5)
    assert x == Fast(1, "x", (2,), {"k": 3}, e=1.5) and x != Fast(2)
    assert repr(x) == repr(Plain(1, "x", (2,), {"k": 3}, e=1.5))
    with pytest.raises(dataclasses.FrozenInstanceError):
        x.a = 2  # type: ignore[misc]
    assert dataclasses.replace(x, a=7) == Fast(7, "x", (2,), {"k": 3}, e=1.5)
    shown = engine.types.ShownItem("i1", 1, 0.5, ("als",), 0.25)
    assert pickle.loads(pickle.dumps(shown)) == shown
    assert hash(shown) == hash(engine.types.ShownItem("i1", 1, 0.5, ("als",), 0.25)) and {shown: 1}[shown] == 1
    assert Fast(1).d == {} and Fast(1).d is not Fast(1).d  # the factory runs per object
    assert str(inspect.signature(Fast)) == str(inspect.signature(Plain))
    assert Fast.__init__.__qualname__ == Plain.__init__.__qualname__


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [((), {}), ((1, "b", (), {}, 0.5), {}), ((1,), {"z": 2}), ((1,), {"a": 2})],
)
def test_a_wrong_call_is_the_type_error_the_dataclass_gives(args, kwargs):
    with pytest.raises(TypeError) as ours:
        Fast(*args, **kwargs)
    with pytest.raises(TypeError) as theirs:
        Plain(*args, **kwargs)
    assert str(ours.value) == str(theirs.value)


def test_only_frozen_slotted_dataclasses_without_post_init_are_accepted():
    @dataclass(slots=True)
    class Mutable:
        a: int

    @dataclass(frozen=True)
    class NoSlots:
        a: int

    @dataclass(frozen=True, slots=True)
    class PostInit:
        a: int

        def __post_init__(self) -> None:
            pass

    @dataclass(frozen=True, slots=True)
    class Derived:
        a: int
        b: int = field(init=False, default=0)

    for cls in (Mutable, NoSlots, PostInit, Derived, int):
        with pytest.raises(TypeError):
            fast_init(cls)


HOT = [
    engine.offers.Customer,
    engine.offers.RankedOffer,
    engine.policies.Selection,
    engine.candidates.Candidates,
    engine.types.PurchaseSummary,
    engine.types.Profile,
    engine.types.Context,
    engine.types.ShownItem,
    engine.types.Decision,
    engine.email.EmailSlot,
    engine.email.EmailContent,
    engine.pipeline.Request,
    api.offers.OfferRequest,
    api.offers.OfferAnswer,
    api.offers.OfferPlan,
    api.email.SlotsRequest,
    api.email.EmailAnswer,
    api.signing.ClickToken,
    feature_store.ingest.LiveEvent,
    feature_store.caps.Reservation,
    feature_store.email_store.EmailRead,
]


@pytest.mark.parametrize("cls", HOT, ids=lambda c: c.__qualname__)
def test_the_hot_classes_take_the_parameters_their_fields_declare(cls):
    assert cls.__init__.__module__ == cls.__module__ and "__nb_set0" in cls.__init__.__code__.co_names
    params = list(inspect.signature(cls).parameters.values())
    declared = [f for f in dataclasses.fields(cls) if f.init]
    assert [p.name for p in params] == [f.name for f in declared]
    for p, f in zip(params, declared, strict=True):
        if f.default is not dataclasses.MISSING:
            assert p.default is f.default
        elif f.default_factory is dataclasses.MISSING:
            assert p.default is inspect.Parameter.empty
