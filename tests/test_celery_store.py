"""The engine's records in Redis: coalesced upserts, claims and leases, a contact known by
either name, what Meisa has of it, the pending sets per lane, recent answers."""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any

import pytest
import redis

from flask_meisa._engine.base import DeliveryStatus
from flask_meisa._engine.known import digest
from flask_meisa._engine.redis_store import ANSWERS_KEPT
from flask_meisa._engine.redis_store import RedisDeliveryStore
from flask_meisa._engine.redis_turns import GONE_AFTER
from flask_meisa.operations import LANE_AUTOMATION
from flask_meisa.operations import LANE_BACKFILL
from flask_meisa.operations import LANE_ROUTINE
from flask_meisa.operations import LANE_TRANSACTIONAL
from flask_meisa.operations import Operation
from tests.celery_support import SlowProxy
from tests.celery_support import redis_client_fixture  # noqa: F401
from tests.celery_support import redis_url_fixture  # noqa: F401


@pytest.fixture
def store(client: Any) -> RedisDeliveryStore:
    return RedisDeliveryStore(client, "meisa")


def upsert(**fields: Any) -> Operation:
    return Operation("upsert", {"email": "ada@example.com", "external_id": "42", **fields})


@pytest.fixture(name="contact")
def contact_fixture(store: RedisDeliveryStore) -> str:
    found = store.contact_of(upsert().payload)
    assert found is not None
    return found


def test_upserts_of_a_contact_merge_into_one_record(
    store: RedisDeliveryStore, contact: str
) -> None:
    ops = [
        upsert(custom_fields={"plan": "free", "seats": 1}, tag_names=["a"], source="signup"),
        upsert(custom_fields={"plan": "pro"}, tag_names=["b"], source="api"),
        upsert(first_name="Ada", tag_names=["a"]),
    ]
    versions = [store.coalesce(op, contact, LANE_ROUTINE) for op in ops]
    assert versions == [(1, False), (2, True), (3, True)]  # the later two joined the first
    assert store.pending() == 3

    claim = store.claim(contact, 1, lease=5.0)  # the oldest task runs first
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
    store.settle(claim)
    store.finish(claim.members, "delivered", 3)
    # The later tasks find their versions delivered.
    assert store.claim(contact, 2, lease=5.0).state == "covered"
    assert store.claim(contact, 3, lease=5.0).state == "covered"
    assert store.pending() == 0
    assert store.counters()["delivered"] == 3


def test_one_call_per_contact_at_a_time(store: RedisDeliveryStore, contact: str) -> None:
    store.coalesce(upsert(first_name="A"), contact, LANE_ROUTINE)
    store.coalesce(upsert(first_name="B"), contact, LANE_ROUTINE)
    held = store.claim(contact, 1, lease=5.0)
    busy = store.claim(contact, 2, lease=5.0)
    assert (held.state, busy.state) == ("deliver", "busy")
    assert 0 < busy.wait <= 0.25
    store.settle(held, delivered=False)  # e.g. the budget said wait
    again = store.claim(contact, 2, lease=5.0)
    assert again.state == "deliver"
    assert again.payload["first_name"] == "B"


def test_an_expired_lease_lets_another_worker_deliver(
    store: RedisDeliveryStore, contact: str
) -> None:
    store.coalesce(upsert(), contact, LANE_ROUTINE)
    assert store.claim(contact, 1, lease=0.5).state == "deliver"  # its worker dies mid-call
    assert store.claim(contact, 1, lease=5.0).state == "busy"
    time.sleep(0.55)  # the lease runs out
    assert store.claim(contact, 1, lease=5.0).state == "deliver"


def test_an_upsert_arriving_mid_call_is_delivered_next(
    store: RedisDeliveryStore, contact: str
) -> None:
    first, second = upsert(custom_fields={"plan": "free"}), upsert(custom_fields={"plan": "pro"})
    store.coalesce(first, contact, LANE_ROUTINE)
    claim = store.claim(contact, 1, lease=5.0)
    store.coalesce(second, contact, LANE_ROUTINE)  # while the call of version 1 is in flight
    store.settle(claim)
    store.finish(claim.members)
    assert store.pending_version([contact]) == (contact, 2)
    next_claim = store.claim(contact, 2, lease=5.0)
    assert next_claim.state == "deliver"
    assert next_claim.members == (second.id,)
    assert next_claim.payload["custom_fields"] == {"plan": "pro"}
    store.settle(next_claim)
    assert store.pending_version([contact]) is None


def deliver(store: RedisDeliveryStore, contact: str, version: int) -> tuple[Any, ...]:
    """Claim ``version``'s task, settle it as delivered: ``(version, members, payload)``."""
    claim = store.claim(contact, version, lease=5.0)
    assert claim.state == "deliver"
    store.settle(claim)
    return claim.version, claim.members, claim.payload


def test_upserts_of_a_contact_at_another_address_are_delivered_after_the_earlier_ones(
    store: RedisDeliveryStore, contact: str
) -> None:
    moved = Operation("upsert", {"email": "new@example.com", "external_id": "42"})
    first, second, third = upsert(first_name="A"), upsert(last_name="L"), moved
    store.coalesce(first, contact, LANE_ROUTINE)
    claim = store.claim(contact, 1, lease=5.0)
    # While its call is in flight, one upsert joins it, one at another address cannot.
    assert store.coalesce(second, contact, LANE_ROUTINE) == (2, True)
    assert store.coalesce(third, contact, LANE_ROUTINE) == (3, False)
    store.settle(claim)
    assert store.pending_version([contact]) == (contact, 3)
    # The task of version 3 delivers the earlier part first (then runs again).
    version, members, payload = deliver(store, contact, 3)
    assert (version, members) == (2, (second.id,))
    assert payload == {**first.payload, **second.payload}
    assert deliver(store, contact, 3) == (3, (third.id,), moved.payload)
    assert store.pending_version([contact]) is None
    assert store.claim(contact, 2, lease=5.0).state == "covered"


def test_a_backfill_snapshot_at_a_former_address_joins_the_live_sync_it_is_older_than(
    store: RedisDeliveryStore, contact: str
) -> None:
    live = Operation("upsert", {"email": "new@example.com", "external_id": "42"})
    snapshot = upsert(custom_fields={"plan": "free"})
    snapshot.priority = "backfill"
    store.coalesce(live, contact, LANE_ROUTINE)
    store.coalesce(snapshot, contact, LANE_ROUTINE)
    version, members, payload = deliver(store, contact, 1)
    assert (version, members) == (2, (live.id, snapshot.id))
    assert payload == {**snapshot.payload, "email": "new@example.com"}


def test_a_lost_record_is_reported_missing(store: RedisDeliveryStore, contact: str) -> None:
    assert store.claim(contact, 7, lease=5.0).state == "missing"
    assert store.pending_version([contact, "0" * 32]) is None


def test_the_task_of_a_lost_record_holds_its_contacts_lease_for_its_call(
    store: RedisDeliveryStore, contact: str
) -> None:
    # Its task delivers its own payload: a newer upsert's call must not overlap it, nor go
    # before it (the older would land last).
    lost = store.claim(contact, 7, lease=5.0)
    assert lost.state == "missing"
    store.coalesce(upsert(custom_fields={"plan": "pro"}), contact, LANE_ROUTINE)
    assert store.claim(contact, 1, lease=5.0).state == "busy"
    store.settle(lost)
    assert store.claim(contact, 1, lease=5.0).state == "deliver"


def test_finishing_twice_leaves_no_count_behind(store: RedisDeliveryStore) -> None:
    op = Operation("send", {"trigger_key": "t", "to_email": "a@example.com"})
    store.add_pending(op, LANE_TRANSACTIONAL)
    store.finish([op.id], "delivered", 1)
    store.finish([op.id])  # a redelivered task finishing again
    assert store.pending() == 0
    assert store.counters() == {
        "delivered": 1,
        "failed": 0,
        "skipped": 0,
        "dropped": 0,
        "unchanged": 0,
    }


def test_a_refusal_reported_again_counts_once(store: RedisDeliveryStore) -> None:
    # The worker that counted a backfill upsert refused was killed before it settled its
    # claim: the task runs again on another worker, Meisa refuses it again, it is counted
    # again. One operation, one refused user for sync-users.
    refused, live = upsert(), upsert(external_id="43")
    store.add_pending(refused, LANE_BACKFILL)
    store.add_pending(live, LANE_ROUTINE)
    store.refused([refused.id, live.id])
    store.refused([refused.id, live.id])
    assert store.counters()["backfill_refused"] == 1


def test_refused_upserts_finished_leave_nothing_to_count_them_once_by(
    store: RedisDeliveryStore, client: Any
) -> None:
    # A run whose every upsert Meisa refuses (a payload Meisa rejects) must not leave a
    # week of ids in Redis: once finished, an operation is no longer pending and cannot
    # count again anyway.
    ops = [upsert(external_id=str(n)) for n in range(1_000)]
    for op in ops:
        store.add_pending(op, LANE_BACKFILL)
    store.refused([op.id for op in ops])
    store.finish([op.id for op in ops], "failed", len(ops))
    store.refused([op.id for op in ops])  # a task run again after its worker was killed
    assert store.counters()["backfill_refused"] == 1_000
    assert [key for key in client.scan_iter(f"{store.prefix}:*") if b"refused" in key] == []


def test_record_keys_name_no_address(store: RedisDeliveryStore, client: Any) -> None:
    payload = {"email": "ada@example.com", "first_name": "Ada"}
    contact = store.contact_of(payload)
    assert contact is not None
    store.coalesce(Operation("upsert", payload), contact, LANE_ROUTINE)
    store.remember({**payload, "external_id": "42"}, time.time())
    names = b" ".join(client.keys("*"))
    assert b"contact" in names and b"known" in names and b"alias" in names
    assert b"ada" not in names
    assert b"@" not in names
    assert b"42" not in names


def test_a_contact_is_one_contact_by_either_name(store: RedisDeliveryStore) -> None:
    both = {"email": "Ada@Example.com", "external_id": "42"}
    by_email, by_id = {"email": "ada@example.com"}, {"external_id": "42"}
    assert store.contact_of(by_email) != store.contact_of(by_id)  # not yet linked
    store.coalesce(Operation("upsert", both), store.contact_of(both) or "", LANE_ROUTINE)
    assert store.contact_of(by_email) == store.contact_of(by_id) == store.contact_of(both)
    # The record of an upsert by either name is the one the event's names find.
    contacts = store.contacts(by_email)
    assert store.pending_version(contacts) == (store.contact_of(by_id), 1)


def test_what_meisa_has_is_remembered_merged_and_forgotten_by_any_name(
    store: RedisDeliveryStore,
) -> None:
    first = {"email": "ada@example.com", "external_id": "42", "custom_fields": {"plan": "free"}}
    later = {"external_id": "42", "first_name": "Ada", "custom_fields": {"seats": 3}}
    store.remember(first, 1000.0)
    store.remember(later, 2000.0)
    had = store.known(store.contact_of({"email": "ada@example.com"}))
    assert had is not None
    assert had.accepted_at == 2000.0
    assert had.has(digest(first)) and had.has(digest(later))
    assert not had.has(digest({**first, "custom_fields": {"plan": "pro"}}))
    store.forget([{"email": "ada@example.com"}, None])  # an event by email answered 404
    assert store.known(store.contact_of({"external_id": "42"})) is None


def test_pending_operations_are_counted_per_lane_with_their_age(
    store: RedisDeliveryStore,
) -> None:
    old = Operation("upsert", {"email": "a@example.com"}, created_at=time.time() - 30)
    new = Operation("track", {"event_name": "x", "email": "a@example.com"})
    store.add_pending(old, LANE_ROUTINE)
    store.add_pending(new, LANE_AUTOMATION)
    store.add_pending(old, LANE_AUTOMATION)  # promoted: it waited too long
    status = DeliveryStatus(engine="celery")
    store.describe(status)
    assert status.queued == {"transactional": 0, "automation": 2, "routine": 0, "backfill": 0}
    assert 29.0 < status.oldest_wait["automation"] < 40.0
    assert store.pending(LANE_AUTOMATION) == 2
    epoch, pending, unfinished, _ = store.look([old.id, "gone"])
    assert (pending, unfinished) == (2, [True, False])
    assert store.look([])[0] == epoch


def test_latency_covers_recent_answers_and_keeps_a_bounded_number(
    store: RedisDeliveryStore, client: Any
) -> None:
    now = store.clock()
    for n in range(ANSWERS_KEPT + 500):
        store.finish([], answer=(LANE_AUTOMATION, 0.001 * (n % 100), now))
    key = next(k for k in client.keys("*answers*"))
    assert client.llen(key) == ANSWERS_KEPT
    status = DeliveryStatus(engine="celery")
    store.describe(status)
    p50, p99 = status.latency["automation"]
    assert 0.045 <= p50 <= 0.055 and 0.097 <= p99 <= 0.1
    assert "routine" not in status.latency


def test_operations_no_worker_ran_are_handed_back_less_often_the_older_they_get(
    store: RedisDeliveryStore, client: Any
) -> None:
    old = Operation("track", {"event_name": "e", "email": "a@example.com"})
    old.created_at -= 100.0
    new = upsert()
    for op in (old, new):
        store.add_pending(op, LANE_AUTOMATION)
        store.keep(LANE_AUTOMATION, op.to_dict(), {"lane": LANE_AUTOMATION})
    handed = store.unseen(after=0.0)
    assert [(lane, op["id"], meta) for lane, op, meta in handed] == [
        (LANE_AUTOMATION, old.id, {"lane": LANE_AUTOMATION}),
        (LANE_AUTOMATION, new.id, {"lane": LANE_AUTOMATION}),
    ]
    assert store.unseen(after=0.0) == []  # another process looked within the second

    def look_again() -> list[str]:
        client.delete("meisa:meisa:sweep")
        return [op["id"] for _, op, _ in store.unseen(after=0.0)]

    store.finish([new.id])
    assert store.seen(new.id)[0] is False  # finished: a copy of its message does nothing
    assert look_again() == []  # the old one comes back once twice as old, not before
    assert store.seen(old.id)[0] is True  # a worker ran it (still pending)
    assert look_again() == [old.id]
    store.finish([old.id])
    assert look_again() == []
    assert not client.exists("meisa:meisa:tasks", "meisa:meisa:seen")


def test_an_operation_whose_kept_task_is_lost_stays_pending(
    store: RedisDeliveryStore, client: Any
) -> None:
    op = upsert()
    store.add_pending(op, LANE_AUTOMATION)
    store.keep(LANE_AUTOMATION, op.to_dict(), {"lane": LANE_AUTOMATION})
    client.delete("meisa:meisa:tasks")  # Redis evicted the kept tasks
    assert store.unseen(after=0.0) == []  # nothing to hand back...
    assert store.pending(LANE_AUTOMATION) == 1  # ...and nothing finished: it still counts
    assert not client.exists("meisa:meisa:seen")


def test_a_task_kept_for_an_operation_already_finished_is_forgotten_not_handed_back(
    store: RedisDeliveryStore, client: Any
) -> None:
    # Kept after its finish (a worker delivered it as the dispatcher kept it), and kept
    # then finished by a worker of a version that kept nothing.
    late, old = upsert(), Operation("track", {"event_name": "e", "email": "a@example.com"})
    for op in (late, old):
        store.keep(LANE_AUTOMATION, op.to_dict(), {"lane": LANE_AUTOMATION})
    assert store.seen(late.id)[0] is False  # not pending: its run does nothing
    assert store.unseen(after=0.0) == []  # the other is not handed back either
    assert not client.exists("meisa:meisa:tasks", "meisa:meisa:seen")


def test_a_backfill_upsert_is_queued_in_bounded_time_beside_a_stream_of_live_ones(
    store: RedisDeliveryStore, contact: str
) -> None:
    # 16 threads upsert the contact nonstop, each a WATCH transaction on its record: the
    # backfill's, which also reads what Meisa has of it in its transaction, was retried
    # without bound (p50 1.5 s, up to 12.6 s). Now a few tries, then the contact's line.
    stop, made = threading.Event(), [0] * 16

    def live(n: int) -> None:
        while not stop.is_set():
            store.coalesce(upsert(custom_fields={"n": n}), contact, LANE_ROUTINE)
            made[n] += 1

    threads = [threading.Thread(target=live, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    took = []
    try:
        for _ in range(20):
            op = Operation("upsert", upsert(first_name="Ada").payload, priority="backfill")
            started = time.monotonic()
            assert store.coalesce(op, contact, LANE_BACKFILL, read_at=time.time()) is not None
            took.append(time.monotonic() - started)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    print(f"queueing took p50 {statistics.median(took):.3f} s, max {max(took):.3f} s;", made)
    assert max(took) < 1.0
    assert min(made) > 0  # and each live one went too, in turn


def test_upserts_of_one_contact_all_go_through_a_slow_redis(
    store: RedisDeliveryStore, contact: str, client: Any
) -> None:
    # 0.7 s a round trip: the first in the contact's line takes longer than GONE_AFTER to
    # write. It watched the line, so the one that took it as gone (or a newcomer joining)
    # failed its write; it joined again at the end, and so did the next first: for minutes.
    proxy = SlowProxy(client.connection_pool.connection_kwargs["port"], 0.35)
    slow = redis.Redis(port=proxy.port, socket_timeout=30)
    done = [0] * 4

    def live(n: int) -> None:
        for k in range(2):
            ours = RedisDeliveryStore(slow, "meisa")
            ours.coalesce(upsert(custom_fields={"n": n, "k": k}), contact, LANE_ROUTINE)
            done[n] += 1

    threads = [threading.Thread(target=live, args=(n,), daemon=True) for n in range(4)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 75  # about 30 s
    try:
        for thread in threads:
            thread.join(max(deadline - time.monotonic(), 0.0))
        assert done == [2] * 4
        assert store.version(contact) == 8
    finally:
        proxy.stop()
        for thread in threads:
            thread.join()
        slow.close()


def test_a_transaction_in_line_whose_process_was_killed_holds_the_others_briefly(
    store: RedisDeliveryStore, contact: str, client: Any
) -> None:
    client.rpush(f"meisa:meisa:line:{{{contact}}}", "killed")  # first in line, never writes
    started = time.monotonic()
    assert store.coalesce(upsert(), contact, LANE_ROUTINE) == (1, False)
    assert GONE_AFTER <= time.monotonic() - started < GONE_AFTER + 1.0
    assert not client.exists(f"meisa:meisa:line:{{{contact}}}")  # out of the line too


def test_a_contacts_transactions_go_through_a_pool_of_one_connection(redis_url: str) -> None:
    # max_connections in MEISA_CELERY_REDIS_URL bounds the client's pool: one thread's
    # transaction must fit in one connection (N threads in N), as before its reads were
    # pipelined on a second connection.
    bounded = redis.Redis.from_url(f"{redis_url}?max_connections=1")
    try:
        store = RedisDeliveryStore(bounded, "meisa")
        contact = store.contact_of(upsert().payload)
        assert contact is not None
        assert store.coalesce(upsert(first_name="Ada"), contact, LANE_ROUTINE) == (1, False)
        claim = store.claim(contact, 1, lease=5.0)
        assert claim.state == "deliver"
        store.settle(claim)
        assert store.claim(contact, 1, lease=5.0).state == "covered"
    finally:
        bounded.close()


def test_contacts_in_line_on_pools_of_one_connection_each_write_in_turn(redis_url: str) -> None:
    # Four processes (each its own pool of one) on one contact: they fail each other's
    # writes, join its line and take turns, each turn on the connection it watched with.
    clients = [redis.Redis.from_url(f"{redis_url}?max_connections=1") for _ in range(4)]
    done = [0] * 4

    def live(n: int) -> None:
        ours = RedisDeliveryStore(clients[n], "meisa")
        for k in range(25):
            ours.coalesce(upsert(custom_fields={"n": n, "k": k}), "c", LANE_ROUTINE)
            done[n] += 1

    threads = [threading.Thread(target=live, args=(n,)) for n in range(4)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert done == [25] * 4
        assert RedisDeliveryStore(clients[0], "meisa").version("c") == 100
    finally:
        for client in clients:
            client.close()


def test_a_transaction_that_raises_in_its_turn_leaves_the_line_on_a_pool_of_one(
    redis_url: str, contact: str
) -> None:
    bounded = redis.Redis.from_url(f"{redis_url}?max_connections=1")
    line = f"meisa:meisa:line:{{{contact}}}"
    try:
        bounded.rpush(line, "killed")  # first in line: this one joins it, then goes first
        bounded.hset(f"meisa:meisa:contact:{{{contact}}}", "closed", "[")  # unreadable
        with pytest.raises(ValueError):  # its own error, not the pool's
            RedisDeliveryStore(bounded, "meisa").coalesce(upsert(), contact, LANE_ROUTINE)
        assert not bounded.exists(line)  # out of the line: the next one waits for nobody
    finally:
        bounded.close()
