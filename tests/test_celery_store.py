"""The engine's records in Redis: coalesced upserts, claims and leases, the pending set."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from flask_meisa.engine.redis_store import RedisDeliveryStore
from flask_meisa.operations import Operation
from tests.celery_support import redis_server_fixture  # noqa: F401
from tests.celery_support import redis_url_fixture  # noqa: F401

CONTACT = "ext:42"


@pytest.fixture
def client(redis_url: str) -> Iterator[Any]:
    connection = redis.Redis.from_url(redis_url)
    yield connection
    connection.close()


@pytest.fixture
def store(client: Any) -> RedisDeliveryStore:
    return RedisDeliveryStore(client, "meisa")


def upsert(**fields: Any) -> Operation:
    return Operation("upsert", {"email": "ada@example.com", "external_id": "42", **fields})


def test_upserts_of_a_contact_merge_into_one_record(store: RedisDeliveryStore) -> None:
    ops = [
        upsert(custom_fields={"plan": "free", "seats": 1}, tag_names=["a"], source="signup"),
        upsert(custom_fields={"plan": "pro"}, tag_names=["b"], source="api"),
        upsert(first_name="Ada", tag_names=["a"]),
    ]
    versions = [store.coalesce(op, CONTACT) for op in ops]
    assert versions == [1, 2, 3]
    assert store.pending() == 3

    claim = store.claim(CONTACT, 1, lease=5.0)  # the oldest task runs first
    assert claim.state == "deliver"
    assert claim.version == 3
    assert claim.members == tuple(op.id for op in ops)
    assert claim.payload == {
        "email": "ada@example.com",
        "external_id": "42",
        "custom_fields": {"plan": "pro", "seats": 1},
        "tag_names": ["a", "b"],
        "source": "signup",
        "first_name": "Ada",
    }
    store.settle(CONTACT, claim)
    store.finish(claim.members, "delivered", 3)
    # The later tasks find their versions delivered.
    assert store.claim(CONTACT, 2, lease=5.0).state == "covered"
    assert store.claim(CONTACT, 3, lease=5.0).state == "covered"
    assert store.pending() == 0
    assert store.counters()["delivered"] == 3


def test_one_call_per_contact_at_a_time(store: RedisDeliveryStore) -> None:
    store.coalesce(upsert(first_name="A"), CONTACT)
    store.coalesce(upsert(first_name="B"), CONTACT)
    held = store.claim(CONTACT, 1, lease=5.0)
    busy = store.claim(CONTACT, 2, lease=5.0)
    assert (held.state, busy.state) == ("deliver", "busy")
    assert 0 < busy.wait <= 0.25
    store.release(CONTACT, held)  # e.g. the budget said wait
    again = store.claim(CONTACT, 2, lease=5.0)
    assert again.state == "deliver"
    assert again.payload["first_name"] == "B"


def test_an_expired_lease_lets_another_worker_deliver(store: RedisDeliveryStore) -> None:
    store.coalesce(upsert(), CONTACT)
    assert store.claim(CONTACT, 1, lease=0.05).state == "deliver"  # its worker dies mid-call
    assert store.claim(CONTACT, 1, lease=5.0).state == "busy"
    time.sleep(0.06)  # the lease runs out
    assert store.claim(CONTACT, 1, lease=5.0).state == "deliver"


def test_an_upsert_arriving_mid_call_is_delivered_next(store: RedisDeliveryStore) -> None:
    first, second = upsert(custom_fields={"plan": "free"}), upsert(custom_fields={"plan": "pro"})
    store.coalesce(first, CONTACT)
    claim = store.claim(CONTACT, 1, lease=5.0)
    store.coalesce(second, CONTACT)  # while the call of version 1 is in flight
    store.settle(CONTACT, claim)
    store.finish(claim.members)
    assert store.upsert_pending([CONTACT])
    next_claim = store.claim(CONTACT, 2, lease=5.0)
    assert next_claim.state == "deliver"
    assert next_claim.members == (second.id,)
    assert next_claim.payload["custom_fields"] == {"plan": "pro"}
    store.settle(CONTACT, next_claim)
    assert not store.upsert_pending([CONTACT])


def test_a_lost_record_is_reported_missing(store: RedisDeliveryStore) -> None:
    assert store.claim(CONTACT, 7, lease=5.0).state == "missing"
    assert not store.upsert_pending([CONTACT, "email:nobody@example.com"])


def test_finishing_twice_leaves_no_count_behind(store: RedisDeliveryStore) -> None:
    op = Operation("send", {"trigger_key": "t", "to_email": "a@example.com"})
    store.add_pending(op)
    store.finish([op.id], "delivered", 1)
    store.finish([op.id])  # a redelivered task finishing again
    assert store.pending() == 0
    assert store.counters() == {"delivered": 1, "failed": 0, "skipped": 0, "dropped": 0}


def test_record_keys_name_no_address(store: RedisDeliveryStore, client: Any) -> None:
    store.coalesce(upsert(), "email:ada@example.com")
    names = b" ".join(client.keys("*"))
    assert b"contact" in names
    assert b"ada" not in names
    assert b"@" not in names
