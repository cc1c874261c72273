"""Hypothesis strategies and checks shared by the property tests (``test_properties_*``).

The strategies aim at what real apps hand the extension by accident: text with CR/LF,
control, format and surrogate characters, huge strings and numbers, deep nesting, NaN and
infinities, datetimes with odd offsets, and values JSON has no form for.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import string
import uuid
from collections.abc import Mapping
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

from hypothesis import strategies as st

from flask_meisa.errors import ValidationError
from flask_meisa.operations import MAX_BODY_BYTES
from flask_meisa.operations import encode_body
from tests.test_payloads import BrokenOffset  # a hostile value the unit tests use too

#: Characters that break headers, log lines, JSON encoding or address parsing.
NASTY_CHARS = (
    "\r",
    "\n",
    "\t",
    "\x00",
    "\x1f",
    "\x7f",
    "\x85",
    "\u2028",
    "\u2029",
    "\u200b",  # zero-width space (format)
    "\u202e",  # right-to-left override (format)
    "\ufeff",
    "\ud800",  # lone surrogates: no UTF-8 form
    "\udfff",
    "\ue000",  # private use
    "İ",  # lowercases to two code points
    "é",
    "😀",
    "@",
    " ",
    "\u00a0",
)


def mostly(
    valid: st.SearchStrategy[Any], anything: st.SearchStrategy[Any]
) -> st.SearchStrategy[Any]:
    """``valid`` three times in four, else ``anything`` (shrinking towards ``valid``).

    ``st.one_of(valid, anything)`` would not do: it flattens nested ``one_of`` branches, so
    a ``valid`` among twenty branches of ``anything`` is drawn once in twenty-one.
    """
    return st.integers(0, 3).flatmap(lambda n: valid if n < 3 else anything)


characters = st.one_of(
    st.characters(),
    st.characters(categories=["Cs"]),
    st.sampled_from(NASTY_CHARS),
)
#: Any Python text, surrogates and control characters included.
texts = st.text(characters, max_size=40)
#: Plain identifiers: what a well-behaved app sends.
names = st.text(string.ascii_letters + string.digits + "_-. ", min_size=1, max_size=30)


class Plan(enum.Enum):
    """An app's enum with a plain value."""

    PRO = "pro"


class Level(enum.IntEnum):
    """An int-based enum."""

    HIGH = 3


class Strange(enum.Enum):
    """An enum whose value has no JSON form."""

    SET = frozenset({1})


class NoOffset(dt.tzinfo):
    """A tzinfo that does not know its offset: Python then treats the datetime as naive."""

    def utcoffset(self, value: dt.datetime | None) -> dt.timedelta | None:
        return None

    def dst(self, value: dt.datetime | None) -> dt.timedelta | None:
        return None

    def tzname(self, value: dt.datetime | None) -> str | None:
        return None


offsets = st.timedeltas(
    min_value=-dt.timedelta(hours=23, minutes=59), max_value=dt.timedelta(hours=23, minutes=59)
)
timezones = st.one_of(
    st.none(),
    st.just(dt.timezone.utc),
    st.builds(dt.timezone, offsets),
    st.just(NoOffset()),
    st.just(BrokenOffset()),
)
datetimes = st.one_of(
    st.datetimes(timezones=timezones),
    # The ends of the range overflow once moved to UTC.
    st.sampled_from([dt.datetime.min, dt.datetime.max]).flatmap(
        lambda edge: st.builds(edge.replace, tzinfo=st.builds(dt.timezone, offsets))
    ),
)
huge_ints = st.one_of(
    st.sampled_from([2**63, -(2**63) - 1, 10**300, -(10**300)]),
    # Past Python's 4,300-digit limit on writing out an int (built lazily: no repr).
    st.integers(4301, 5000).map(lambda digits: 10**digits),
)
numbers = st.one_of(
    st.integers(),
    huge_ints,
    st.floats(),  # NaN and infinities included
    st.decimals(),  # NaN, sNaN and infinities included
    st.sampled_from(
        [Decimal("1E+5000"), Decimal("1E+100000000"), Decimal("-0"), Decimal("1.5E+400")]
    ),
)
#: Scalars JSON has a form for once converted, and scalars it has none for.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    numbers,
    texts,
    datetimes,
    st.dates(),
    st.times(timezones=st.one_of(st.none(), st.builds(dt.timezone, offsets))),
    st.uuids(),
    st.sampled_from([Plan.PRO, Level.HIGH, Strange.SET]),
    st.binary(max_size=8),
    st.builds(bytearray, st.binary(max_size=4)),
    st.sets(st.integers(), max_size=3),
    st.frozensets(st.text(max_size=3), max_size=3),
    st.complex_numbers(),
    st.builds(object),
    st.just(print),
)
keys = st.one_of(texts, names, st.integers(), st.none(), st.tuples(st.integers()))


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(st.one_of(names, texts), children, max_size=4),
        st.dictionaries(keys, children, max_size=3),
    )


def nest(depth: int, leaf: Any = 1) -> Any:
    """``leaf`` wrapped in ``depth`` alternating lists and dicts."""
    value = leaf
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


#: Any value an app might put in ``custom_fields``, ``properties`` or ``variables``.
values = st.one_of(
    st.recursive(scalars, _containers, max_leaves=12),
    st.integers(0, 40).map(nest),  # around MAX_DEPTH
    st.integers(400_000, 600_000).map(lambda n: "x" * n),  # around MAX_BODY_BYTES
)
#: JSON objects, mostly: what a ``custom_fields`` argument usually is.
objects = st.one_of(
    st.dictionaries(st.one_of(names, texts), values, max_size=4),
    values,
)

#: JSON data as a well-behaved app sends it.
plain_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), names),
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(names, children, max_size=3)
    ),
    max_leaves=6,
)
#: ``None`` or a plain JSON object.
plain_objects = st.one_of(st.none(), st.dictionaries(names, plain_values, max_size=3))

_local = st.text(string.ascii_letters + string.digits + "._+-", min_size=1, max_size=20)
_label = st.text(string.ascii_lowercase + string.digits, min_size=1, max_size=12)
_domain = st.lists(_label, min_size=2, max_size=3).map(".".join)
valid_emails = st.builds(lambda local, domain: f"{local}@{domain}", _local, _domain)


def _insert(email: str, position: int, piece: str) -> str:
    position %= len(email) + 1
    return email[:position] + piece + email[position:]


#: Strings that are or are nearly email addresses, and things that are not strings.
emails = st.one_of(
    valid_emails,
    valid_emails.map(str.upper),
    valid_emails.map(lambda e: f"  {e}\n"),
    st.builds(_insert, valid_emails, st.integers(0, 60), st.sampled_from(NASTY_CHARS)),
    st.builds(_insert, valid_emails, st.integers(0, 60), texts),
    st.builds(lambda n, d: "İ" * n + "@" + d, st.integers(1, 64), _domain),
    st.integers(50, 300).map(lambda n: "a" * n + "@example.com"),
    texts,
    st.none(),
    st.integers(),
    st.binary(max_size=20),
    st.lists(valid_emails, max_size=2),
)
#: Short names (event names, trigger keys, tags, first names...), good and bad.
labels = st.one_of(names, texts, st.integers(200, 300).map(lambda n: "n" * n), scalars)
#: Values for ``external_id``.
external_ids = st.one_of(
    st.integers(), huge_ints, names, texts, st.uuids(), st.floats(), st.booleans(), st.none()
)


def upsert_payloads() -> st.SearchStrategy[dict[str, Any]]:
    """Mappings for ``meisa.upsert({...})``: known fields with any value, plus strays."""
    fields = st.fixed_dictionaries(
        {"email": mostly(valid_emails, emails)},
        optional={
            "external_id": external_ids,
            "first_name": labels,
            "last_name": labels,
            "display_name": labels,
            "source": st.one_of(st.sampled_from(["api", "signup", "initial_sync"]), labels),
            "custom_fields": objects,
            "tag_names": st.one_of(st.lists(labels, max_size=4), labels),
            "status": st.just("unsubscribed"),
            "tags": st.just(["x"]),
        },
    )
    return st.one_of(fields, st.dictionaries(st.one_of(names, keys), values, max_size=3))


def user_objects() -> st.SearchStrategy[Any]:
    """Flask-Login style user objects with arbitrary attribute values (some callables)."""

    def build(
        email: Any, user_id: Any, first: Any, last: Any, plan: Any, callable_name: bool
    ) -> Any:
        return SimpleNamespace(
            email=email,
            get_id=lambda: user_id,
            first_name=(lambda: first) if callable_name else first,
            last_name=last,
            plan=plan,
        )

    return st.one_of(
        st.builds(build, emails, external_ids, labels, labels, values, st.booleans()),
        st.builds(object),
        texts,
        st.integers(),
        st.dictionaries(names, values, max_size=2).map(lambda d: SimpleNamespace(**d)),
    )


def assert_validation_error(error: ValidationError) -> None:
    """A ``ValidationError`` as documented: a ``field`` and a one-line message."""
    assert isinstance(error.field, str)
    assert isinstance(error.message, str) and error.message
    assert str(error) == f"{error.field}: {error.message}"
    assert "\n" not in error.message and "\r" not in error.message


def assert_sendable(payload: Mapping[str, Any], max_bytes: int = MAX_BODY_BYTES) -> None:
    """``payload`` is plain JSON that survives a strict round trip and encodes as the
    client's request body (of at most ``max_bytes``)."""
    text = json.dumps(payload, allow_nan=False)
    assert json.loads(text) == payload
    encode_body(payload, max_bytes)


def json_texts(value: Any) -> list[str]:
    """Every string leaf of a (possibly non-JSON) value, for checks on error text."""
    found: list[str] = []
    pending = [value]
    while pending and len(found) < 200:
        item = pending.pop()
        if isinstance(item, str):
            found.append(item)
        elif isinstance(item, Mapping):
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
    return found


def assert_no_values_in(error: BaseException, given: Any) -> None:
    """The error's text repeats none of the longer string values it was given."""
    text = f"{error} {error!r}"
    field = getattr(error, "field", "")
    for value in json_texts(given):
        if len(value) >= 10 and value not in field and value.strip() not in field:
            assert value not in text, "the error text repeats a payload value"


def uuid_text() -> str:
    """A fresh unique string (for identities that must not collide between examples)."""
    return uuid.uuid4().hex
