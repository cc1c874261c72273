"""The rate budget kept in Redis: slots dated by answers, in-flight calls, the reserve
for sends, a backfill's share, leases of dead workers, pauses, waiters by lane and turn (a
due waiter of a higher lane holds its slot), and one budget per API key."""

from __future__ import annotations

import functools
import itertools
import socket
import time
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from flask_meisa._engine.celery_setup import REDIS_TIMEOUTS
from flask_meisa._engine.redis_budget import RedisBudget
from flask_meisa.client import MeisaClient
from flask_meisa.emulator import Emulator
from flask_meisa.errors import APITimeoutError
from flask_meisa.errors import ConfigurationError
from flask_meisa.errors import RateLimitError
from flask_meisa.operations import LANE_AUTOMATION
from flask_meisa.operations import LANE_BACKFILL
from flask_meisa.operations import LANE_NAMES
from flask_meisa.operations import LANE_ROUTINE
from flask_meisa.operations import LANE_TRANSACTIONAL
from flask_meisa.retry import RetryPolicy
from tests.celery_support import redis_url_fixture  # noqa: F401

KEY = "meisa_live_budget_test_key_0123456789"
LEASE = 5.0

MakeBudget = Callable[..., RedisBudget]


@pytest.fixture
def make_budget(redis_url: str) -> Iterator[MakeBudget]:
    """``make_budget(spec, key=KEY)``: a budget on its own Redis connection, like a
    worker on another machine would have."""
    clients: list[Any] = []

    def make(spec: str | None, key: str = KEY, **options: Any) -> RedisBudget:
        client = redis.Redis.from_url(redis_url)
        clients.append(client)
        return RedisBudget(client, spec, key, **options)

    yield make
    for client in clients:
        client.close()


def take(budget: RedisBudget, n: int, *, lane: int = LANE_ROUTINE) -> None:
    """Make ``n`` calls that are answered at once."""
    for _ in range(n):
        got = budget.acquire(lease=LEASE, lane=lane)
        assert got.token is not None
        budget.finish(got.token)


def taken_within(budget: RedisBudget, seconds: float, waiter: str, place: str) -> str:
    """The token ``waiter`` takes when it comes back each time it is told, within
    ``seconds`` (a failed assertion otherwise)."""
    deadline = time.monotonic() + seconds
    got = budget.acquire(lease=LEASE, waiter=waiter, place=place)
    while got.token is None:
        assert time.monotonic() < deadline, got
        time.sleep(got.wait)
        got = budget.acquire(lease=LEASE, waiter=waiter, place=place)
    return got.token


def one_of_two_in_flight(budget: RedisBudget) -> tuple[str, str, str]:
    """Two operations of one contact placed ("e0", then "e1") and the first's call taken:
    their places and its token."""
    first, second = budget.places([("e0", "c"), ("e1", "c")])
    got = budget.acquire(lease=LEASE, waiter="e0", place=first)
    assert got.token is not None
    return first, second, got.token


def test_slots_are_free_until_the_limit_then_a_wait(make_budget: MakeBudget) -> None:
    budget = make_budget("3/second")
    take(budget, 3)
    got = budget.acquire(lease=LEASE)
    assert got.token is None
    assert 0.0 < got.wait <= 1.0
    _, in_flight, remaining = budget.snapshot()
    assert (sum(in_flight.values()), remaining) == (0, {"3/second": 0})


def test_a_slot_is_dated_by_its_answer_not_its_start(make_budget: MakeBudget) -> None:
    budget = make_budget("1/second")
    got = budget.acquire(lease=LEASE)
    assert got.token is not None
    time.sleep(0.3)  # the call takes 0.3 s to be answered
    answered = time.monotonic()
    budget.finish(got.token)
    wait = budget.acquire(lease=LEASE).wait
    since = time.monotonic() - answered
    # Free again a second after its answer; dated by its start, 0.3 s sooner than that.
    # (What passed since the answer is measured: a busy machine may take a while.)
    assert 1.0 - since - 0.01 < wait <= 1.0, (wait, since)


def test_calls_in_flight_hold_their_slots(make_budget: MakeBudget) -> None:
    budget = make_budget("2/second")
    first = budget.acquire(lease=LEASE)
    second = budget.acquire(lease=LEASE)
    assert first.token and second.token
    blocked = budget.acquire(lease=LEASE)
    assert blocked.token is None
    assert blocked.wait <= 0.5  # only an answer frees a slot: look again soon
    assert budget.snapshot()[1] == {0: 0, 1: 0, 2: 2, 3: 0}  # in flight, by lane
    budget.finish(first.token, made=False)  # no request went out: the slot comes back
    assert budget.acquire(lease=LEASE).token is not None


def test_a_call_that_got_no_answer_in_time_is_dated_by_the_end_of_its_lease(
    make_budget: MakeBudget,
) -> None:
    budget = make_budget("1/second")
    started = time.monotonic()
    got = budget.acquire(lease=LEASE)
    assert got.token is not None
    budget.finish(got.token, timed_out=True)  # Meisa may count it until its lease ends
    wait = budget.acquire(lease=LEASE).wait
    since = time.monotonic() - started
    assert LEASE + 1.0 - since - 0.01 < wait <= LEASE + 1.0, (wait, since)
    assert sum(budget.snapshot()[1].values()) == 0  # not in flight: over, dated ahead


def test_a_slot_whose_call_got_no_answer_in_time_is_held_until_its_lease_ends(
    make_budget: MakeBudget,
) -> None:
    budget = make_budget("1/second")
    with pytest.raises(APITimeoutError), budget.slot(1.0, lease=LEASE) as got:
        assert got
        raise APITimeoutError("POST /emails/trigger/", "no answer within 0.3 s")
    assert budget.acquire(lease=LEASE).wait > LEASE


def test_a_call_made_over_the_budget_counts_unless_meisa_refuses_it(
    make_budget: MakeBudget, redis_url: str
) -> None:
    # Meisa counts a call it takes: the window left one short of its count lets another
    # worker's call through to a 429 (a killed worker's slots count until their leases end,
    # so the window can be fuller than Meisa's and a send then goes without a slot).
    budget = make_budget("1/minute")
    take(budget, 1, lane=LANE_TRANSACTIONAL)
    with budget.slot(0.01, lease=LEASE) as got:
        assert not got  # full for a minute: not waited for, the call goes anyway
    with pytest.raises(RateLimitError), budget.slot(0.01, lease=LEASE) as got:
        assert not got
        raise RateLimitError("POST /emails/trigger/", 429, "throttled", code="rate_limited")
    client = redis.Redis.from_url(redis_url)
    try:
        (window,) = client.keys("*:w60")
        assert client.zcard(window) == 2  # the first and the one Meisa took, not the refused
    finally:
        client.close()
    assert budget.snapshot()[1:] == ({lane: 0 for lane in LANE_NAMES}, {"1/minute": 0})


def test_calls_made_over_the_budget_that_meisa_refuses_give_their_slots_back(
    make_budget: MakeBudget, redis_url: str, emulator_factory: Callable[..., Emulator]
) -> None:
    emu = emulator_factory(rate_limit="1/minute")
    budget = make_budget("1/minute")
    base = MeisaClient(emu.live_key, emu.url, retry=RetryPolicy.never())
    client = base.with_options(slot=lambda seconds: budget.slot(seconds, LEASE))
    client.ping()  # the minute's one, in both windows
    for _ in range(3):  # over the budget: made anyway, and refused; the rest not made
        with pytest.raises(RateLimitError):  # while the workers are paused for its Retry-After
            client.ping()
    assert [r.status for r in emu.requests] == [200, 429]
    redis_client = redis.Redis.from_url(redis_url)
    try:
        (window,) = redis_client.keys("*:w60")
        assert redis_client.zcard(window) == 1  # Meisa counted none of the refused
    finally:
        redis_client.close()


def test_a_429_for_the_key_met_outside_the_workers_pauses_them_for_its_retry_after(
    make_budget: MakeBudget, emulator_factory: Callable[..., Emulator]
) -> None:
    # A synchronous send's 429 for the key pauses every worker, as one of their own does;
    # the send guardrail's (about one recipient) pauses nothing.
    emu = emulator_factory(rate_limit=None)
    emu.set_send_guardrail("1/hour")
    budget = make_budget(None)
    base = MeisaClient(emu.live_key, emu.url, retry=RetryPolicy.never())
    client = base.with_options(slot=lambda seconds: budget.slot(seconds, LEASE))
    client.trigger_email("receipt", "ada@example.com")
    with pytest.raises(RateLimitError, match="send_guardrail"):
        client.trigger_email("receipt", "ada@example.com")
    assert budget.snapshot()[0] == 0.0
    emu.faults.force_429(1, retry_after=30)
    with pytest.raises(RateLimitError, match="rate_limited"):
        client.ping()
    assert 29.0 < budget.snapshot()[0] <= 30.0
    # Nor is another call made outside them into that pause (past what it waits): it fails.
    with pytest.raises(RateLimitError, match="past the deadline; not made"):
        client.with_options(retry=RetryPolicy(max_attempts=1, deadline=2.0)).ping()
    assert len(emu.requests_to("/ping/")) == 1


def test_a_call_outside_the_workers_is_made_while_they_pause_for_an_outage(
    make_budget: MakeBudget, emulator: Emulator
) -> None:
    # Three calls in a row failed (Meisa looked down) and the workers paused for 30 s; Meisa is
    # back. A call outside them is made (a probe, as before any pause counted for it), not
    # failed at once with "calls paused 30.0 s more by a 429" when no 429 was seen.
    budget = make_budget(None)
    for _ in range(3):
        budget.finish(budget.acquire(lease=LEASE).token or "", outage=True)
    budget.pause(30.0)
    client = MeisaClient(emulator.live_key, emulator.url, retry=RetryPolicy(deadline=2.0))
    client.with_options(slot=lambda seconds: budget.slot(seconds, LEASE)).ping()
    assert len(emulator.requests_to("/ping/")) == 1


def test_a_call_made_over_the_budget_without_an_answer_in_time_counts_to_its_lease_end(
    make_budget: MakeBudget,
) -> None:
    # As a taken slot's: it may reach Meisa as late as that, and Meisa then counts it.
    budget = make_budget("1/second")
    take(budget, 1, lane=LANE_TRANSACTIONAL)
    with pytest.raises(APITimeoutError), budget.slot(0.0, lease=LEASE) as got:
        assert not got
        assert budget.snapshot()[1][LANE_TRANSACTIONAL] == 1  # in flight meanwhile
        raise APITimeoutError("POST /emails/trigger/", "no answer within 0.3 s")
    assert budget.acquire(lease=LEASE).wait > LEASE


def test_only_sends_use_the_reserve(make_budget: MakeBudget) -> None:
    budget = make_budget("20/minute")  # 5 % of 20: one slot held back for sends
    take(budget, 19)
    assert budget.acquire(lease=LEASE).token is None
    take(budget, 1, lane=LANE_TRANSACTIONAL)
    assert budget.acquire(lease=LEASE, lane=LANE_TRANSACTIONAL).token is None


def test_a_dead_workers_slot_is_freed_when_its_lease_ends(make_budget: MakeBudget) -> None:
    budget = make_budget("1/2s")
    started = time.monotonic()
    assert budget.acquire(lease=0.05).token is not None  # never finished: the worker died
    time.sleep(0.06)  # past the lease
    wait = budget.acquire(lease=LEASE).wait
    since = time.monotonic() - started
    # Counted as answered when its lease ended, then one period: not forever. (What passed
    # since is measured: a busy machine may take a while.)
    assert 0.0 < 2.05 - since - 0.01 < wait <= 2.0, (wait, since)
    assert sum(budget.snapshot()[1].values()) == 0


def test_a_short_lease_does_not_cut_a_longer_calls_slot_short(make_budget: MakeBudget) -> None:
    # Workers configured with different call timeouts (a rolling deploy): the short call's
    # lease must not end the record of the long one still in flight.
    budget = make_budget("2/minute")
    assert budget.acquire(lease=30.0).token is not None
    assert budget.acquire(lease=0.05).token is not None  # never finished
    time.sleep(1.2)  # past the short lease and the second its record outlives it
    got = budget.acquire(lease=LEASE)
    assert got.token is None and got.wait > 0, got  # one call in flight, one counted
    assert sum(budget.snapshot()[1].values()) == 1


def test_a_pause_holds_every_call_and_is_never_shortened(make_budget: MakeBudget) -> None:
    budget = make_budget("100/second")
    paused = time.monotonic()
    budget.pause(3.0)
    budget.pause(0.5)
    got = budget.acquire(lease=LEASE, lane=LANE_TRANSACTIONAL)
    left = budget.snapshot()[0]
    since = time.monotonic() - paused
    assert got.token is None
    # Three seconds from the first pause, whatever the second says (it would leave at most
    # 0.5 s); what passed since the first is measured: a busy machine may be slow.
    assert 3.0 - since - 0.01 < left <= got.wait <= 3.0, (got.wait, left, since)
    assert got.wait > 0.5


def test_a_contacts_waiters_come_back_a_slot_apart_in_turn_after_the_lanes_ahead(
    make_budget: MakeBudget,
) -> None:
    budget = make_budget("10/second")
    take(budget, 10)
    asked: list[tuple[float, float, float]] = []  # (before, wait, after) of each waiter
    places = []
    for n in range(4):  # one contact's: each a turn after the last
        before = time.monotonic()
        got = budget.acquire(lease=LEASE, waiter=f"r{n}", contact="flood")
        asked.append((before, got.wait, time.monotonic()))
        places.append(got.place)
    waits = [wait for _, wait, _ in asked]
    # Each after its contact's earlier one, a slot apart. Each wait counts from its own
    # call: the time between two calls (measured, as a busy machine may take a while) adds
    # to the difference of their waits to give their spacing.
    for (before, wait, after), (next_before, next_wait, next_after) in itertools.pairwise(asked):
        shortest = next_wait - wait + (next_before - after)
        longest = next_wait - wait + (next_after - before)
        assert shortest < 0.12 and longest > 0.08, asked
    # Asked again, a waiter keeps its place: it is not pushed back by its own.
    assert budget.acquire(lease=LEASE, waiter="r3", place=places[3]).wait <= waits[3]
    # Another contact's first goes as early as the flood's next; a send and an automation
    # change come back before the routine syncs waiting.
    assert budget.acquire(lease=LEASE, waiter="other", contact="other").wait < waits[1]
    assert budget.acquire(lease=LEASE, lane=LANE_TRANSACTIONAL).wait < waits[1]
    assert budget.acquire(lease=LEASE, lane=LANE_AUTOMATION, waiter="a").wait < waits[1]


def test_a_contacts_waiters_go_in_their_order_and_take_turns_with_the_others(
    make_budget: MakeBudget,
) -> None:
    budget = make_budget("2/second")
    take(budget, 2)
    flood = [budget.acquire(lease=LEASE, waiter=f"f{n}", contact="flood") for n in range(5)]
    other = budget.acquire(lease=LEASE, waiter="other", contact="other")
    assert other.wait < flood[2].wait  # the turn of the flood's first, not of its last
    time.sleep(max(got.wait for got in flood[:2]) + 0.05)  # both slots are free again
    # The flood's second is held for its first, which has not come back yet.
    assert budget.acquire(lease=LEASE, waiter="f1", place=flood[1].place).token is None
    for name, got in (("f0", flood[0]), ("other", other)):
        assert budget.acquire(lease=LEASE, waiter=name, place=got.place).token, name
    # Turns count from the last call made: a new contact's first goes with the flood's
    # next, before its later ones, though they asked long before it.
    newcomer = budget.acquire(lease=LEASE, waiter="new", contact="new")
    assert newcomer.wait < budget.acquire(lease=LEASE, waiter="f2", place=flood[2].place).wait


def test_a_contacts_last_turn_is_kept_while_its_work_waits(
    make_budget: MakeBudget, redis_url: str
) -> None:
    budget = make_budget("2/second")
    client = redis.Redis.from_url(redis_url)
    try:
        asked = [budget.acquire(lease=LEASE, waiter=f"c{n}", contact="c") for n in range(4)]
        # The first is in flight: the others wait for it (one call of a contact at a time).
        assert [got.token is None for got in asked] == [False, True, True, True]
        budget.finish(str(asked[0].token))
        with budget.slot(timeout=0, lease=LEASE):  # a send made outside: no contact
            pass
        assert len(client.keys("*:last:*")) == 1
        for n in (1, 2, 3):  # each comes back when told, and takes its slot
            budget.finish(taken_within(budget, 5, f"c{n}", asked[n].place))
        # Its last took its slot: kept while that call may run again, a lease and a grace.
        (last,) = client.keys("*:last:*")
        assert 0 < client.pttl(last) <= (LEASE + 1) * 1000, client.pttl(last)
    finally:
        client.close()


def test_a_task_waiting_for_its_contacts_upsert_goes_before_its_contacts_later_ones(
    make_budget: MakeBudget,
) -> None:
    budget = make_budget("3/second")
    # Two events of one contact, placed when released; the first waits for its contact's
    # upsert, not for a slot, and comes back in half a second.
    first, second = budget.places([("e0", "c"), ("e1", "c")])
    budget.hold("e0", LANE_ROUTINE, 0.5)
    # It holds no slot: another contact's call takes a free one.
    assert budget.acquire(lease=LEASE, waiter="other", contact="other").token is not None
    # Its contact's later one waits for it, though slots are free.
    later = budget.acquire(lease=LEASE, waiter="e1", place=second)
    assert later.token is None and later.wait >= 0.5
    got = budget.acquire(lease=LEASE, waiter="e0", place=first)
    assert got.token is not None
    budget.finish(got.token)
    assert budget.acquire(lease=LEASE, waiter="e1", place=second).token is not None


def test_a_task_held_for_its_contacts_upsert_that_comes_back_late_still_goes_first(
    make_budget: MakeBudget,
) -> None:
    budget = make_budget("3/second")
    first, second = budget.places([("e0", "c"), ("e1", "c")])
    budget.hold("e0", LANE_ROUTINE, 0.1)
    # Its worker has its threads busy: it comes back more than a grace late, as a waiter
    # for a slot may; its contact's later one still waits for it (polling), a lease at most.
    time.sleep(1.2)
    assert budget.acquire(lease=LEASE, waiter="other", contact="other").token is not None
    later = budget.acquire(lease=LEASE, waiter="e1", place=second)
    assert later.token is None and later.wait < 0.5, later  # it looks again soon
    got = budget.acquire(lease=LEASE, waiter="e0", place=first)
    assert got.token is not None
    budget.finish(got.token)
    assert budget.acquire(lease=LEASE, waiter="e1", place=second).token is not None


def test_an_event_behind_a_part_that_went_before_a_held_event_waits_for_that_one(
    make_budget: MakeBudget,
) -> None:
    budget = make_budget("10/second")
    # An event answered 404 waits for its contact's upsert released after it (held), which
    # goes first (a part waits for no held event); the contact's next event follows the
    # upsert, and so waits for the held one too once the upsert is delivered.
    first, upsert, second = budget.places([("e0", "c"), ("u", "c"), ("e1", "c")])
    budget.hold("e0", LANE_ROUTINE, 0.2)
    got = budget.acquire(lease=LEASE, waiter="u", place=upsert, part=True)
    assert got.token is not None
    budget.finish(got.token)
    later = budget.acquire(lease=LEASE, waiter="e1", place=second)
    assert later.token is None and later.wait <= 0.3, later
    got = budget.acquire(lease=LEASE, waiter="e0", place=first)
    assert got.token is not None
    budget.finish(got.token)
    assert budget.acquire(lease=LEASE, waiter="e1", place=second).token is not None


def test_an_event_and_its_companion_behind_one_that_ended_both_wait_for_a_held_event(
    make_budget: MakeBudget,
) -> None:
    budget = make_budget("10/second")
    # The first is held for its contact's upsert; the second waits behind it, then ends
    # without a call. An event and its companion (placed together, both after the second)
    # come next: the companion's part goes before the held event, the event waits for it.
    first, second = budget.places([("e0", "c"), ("e1", "c")])
    budget.hold("e0", LANE_ROUTINE, 0.5)
    assert budget.acquire(lease=LEASE, waiter="e1", place=second).token is None
    budget.release("e1", second)
    companion, event = budget.places([("", "c"), ("e2", "c")])
    got = budget.acquire(lease=LEASE, waiter="u", place=companion, part=True, shared="x")
    assert got.token is not None
    budget.finish(got.token)
    later = budget.acquire(lease=LEASE, waiter="e2", place=event)
    assert later.token is None, later
    got = budget.acquire(lease=LEASE, waiter="e0", place=first)
    assert got.token is not None
    budget.finish(got.token)
    assert budget.acquire(lease=LEASE, waiter="e2", place=event).token is not None


def test_an_event_behind_a_part_another_task_delivered_before_held_events_waits_for_them(
    make_budget: MakeBudget,
) -> None:
    budget = make_budget("10/second")
    # The part's first upsert, two events after it held for that part, an upsert that joins
    # the part, and the contact's next event. The joined upsert's task delivers the part
    # under the part's shared waiter (the first upsert's id), before the held events.
    places = budget.places([("u", "c"), ("e0", "c"), ("e1", "c"), ("t", "c"), ("e2", "c")])
    _, first, second, joined, third = places
    budget.hold("e0", LANE_ROUTINE, 0.2)
    budget.hold("e1", LANE_ROUTINE, 0.2)
    got = budget.acquire(lease=LEASE, waiter="u", place=joined, part=True, shared="t")
    assert got.token is not None
    budget.finish(got.token)
    # The next event, behind the joined upsert, waits for the held ones.
    later = budget.acquire(lease=LEASE, waiter="e2", place=third)
    assert later.token is None, later
    # Those go in their order at once: neither waits for the other.
    for waiter, place in (("e0", first), ("e1", second), ("e2", third)):
        budget.finish(taken_within(budget, 1.0, waiter, place))


def test_a_contacts_call_in_flight_holds_its_next_one_but_nobody_elses(
    make_budget: MakeBudget, redis_url: str
) -> None:
    budget = make_budget("10/second")
    _, second, token = one_of_two_in_flight(budget)
    # Slots are free, but its contact's call is in flight: it looks again soon.
    later = budget.acquire(lease=LEASE, waiter="e1", place=second)
    assert later.token is None and 0 < later.wait <= 0.1
    # Another contact's call goes meanwhile.
    assert budget.acquire(lease=LEASE, waiter="other", contact="other").token is not None
    client = redis.Redis.from_url(redis_url)
    try:
        assert len(client.keys("*:calling:*")) == 2  # one key per contact in flight
        budget.finish(token)  # answered: the next one goes
        assert len(client.keys("*:calling:*")) == 1
    finally:
        client.close()
    assert budget.acquire(lease=LEASE, waiter="e1", place=second).token is not None


def test_a_contacts_call_that_got_no_answer_in_time_holds_its_next_one_until_its_lease_ends(
    make_budget: MakeBudget,
) -> None:
    budget = make_budget("10/second")
    started = time.monotonic()
    _, second, token = one_of_two_in_flight(budget)
    budget.finish(token, timed_out=True)  # it may still reach Meisa: not overtaken
    later = budget.acquire(lease=LEASE, waiter="e1", place=second)
    since = time.monotonic() - started
    # It looks again from a second before the lease ends, and goes once it has.
    assert later.token is None and LEASE - 1 - since < later.wait <= LEASE - 0.9, (later, since)
    assert budget.acquire(lease=LEASE, waiter="other", contact="other").token is not None
    time.sleep(LEASE - 0.9 - (time.monotonic() - started))  # asked again when told: still held
    later = budget.acquire(lease=LEASE, waiter="e1", place=second)
    assert later.token is None and later.wait <= 0.1


def test_a_contacts_operation_waiting_to_retry_holds_its_next_one_but_not_itself(
    make_budget: MakeBudget,
) -> None:
    budget = make_budget("10/second")
    first, second, token = one_of_two_in_flight(budget)
    budget.finish(token, again=0.5)  # a 503: it runs again in half a second
    later = budget.acquire(lease=LEASE, waiter="e1", place=second)
    assert later.token is None and 0.5 <= later.wait <= 0.6, later  # back once it is due
    retry = budget.acquire(lease=LEASE, waiter="e0", place=first)  # not held by its own
    assert retry.token is not None
    assert budget.acquire(lease=LEASE, waiter="e1", place=second).token is None  # in flight
    budget.finish(retry.token)
    assert budget.acquire(lease=LEASE, waiter="e1", place=second).token is not None


def test_a_retry_that_never_comes_holds_its_contacts_next_one_only_for_a_grace(
    make_budget: MakeBudget,
) -> None:
    budget = make_budget("10/second")
    _, second, token = one_of_two_in_flight(budget)
    budget.finish(token, again=0.2)  # its worker dies before it runs again
    taken_within(budget, 0.2 + 1.0 + 0.5, "e1", second)


def test_a_retry_that_ends_without_a_call_holds_its_contacts_next_one_no_longer(
    make_budget: MakeBudget,
) -> None:
    budget = make_budget("10/second")
    first, second, token = one_of_two_in_flight(budget)
    budget.release("e0", first)  # its call in flight holds still
    assert budget.acquire(lease=LEASE, waiter="e1", place=second).token is None
    budget.finish(token, again=0.2, late=LEASE)
    budget.release("e1", second)  # not the retry's waiter: nothing changes
    assert budget.acquire(lease=LEASE, waiter="e1", place=second).token is None
    budget.release("e0", first)  # its retry is skipped, or too late: no call
    taken_within(budget, 0.5, "e1", second)  # not 0.2 s + a lease later


def test_a_waiter_that_ends_without_a_call_lets_its_next_one_follow_its_earlier_one(
    make_budget: MakeBudget,
) -> None:
    budget = make_budget("10/second")
    places = budget.places([(f"e{i}", "c") for i in range(4)])
    held = budget.acquire(lease=LEASE, lane=LANE_AUTOMATION, waiter="other", contact="c")
    assert held.token is not None  # the contact's call: all four wait
    for i, place in enumerate(places):
        assert budget.acquire(lease=LEASE, waiter=f"e{i}", place=place).token is None
    # The second and third are skipped when they come back (the third first); the first,
    # still due, has not come back yet.
    budget.release("e2", places[2])
    budget.release("e1", places[1])
    budget.finish(held.token)
    # The last waits for the first, not for a lease, and takes its slot once it has.
    later = budget.acquire(lease=LEASE, waiter="e3", place=places[3])
    assert later.token is None and later.wait <= 0.3, later
    got = budget.acquire(lease=LEASE, waiter="e0", place=places[0])
    assert got.token is not None
    budget.finish(got.token)
    assert budget.acquire(lease=LEASE, waiter="e3", place=places[3]).token is not None


def test_a_contact_held_by_its_earlier_call_keeps_no_slot_from_other_contacts(
    make_budget: MakeBudget,
) -> None:
    budget = make_budget("1/second")
    _, second, token = one_of_two_in_flight(budget)
    budget.finish(token, again=3.0)  # a 503: it runs again in 3 s
    assert budget.acquire(lease=LEASE, waiter="e1", place=second).token is None  # held
    # Another contact's operation, released after e1, takes the slot once it frees (a
    # second after e0's answer): e1 waits for its contact, not for a slot.
    other = budget.places([("o0", "o")])[0]
    taken_within(budget, 1.5, "o0", other)


def test_a_retry_that_comes_late_still_goes_before_its_contacts_next_one(
    make_budget: MakeBudget,
) -> None:
    budget = make_budget("10/second")
    first, second, token = one_of_two_in_flight(budget)
    budget.finish(token, again=0.2, late=LEASE)  # its worker's threads may all be busy
    due = time.monotonic() + 0.2
    later = budget.acquire(lease=LEASE, waiter="e1", place=second)
    assert later.token is None and 0.2 <= later.wait <= 0.3, later  # back once it is due
    # Its retry starts 1.5 s late: its contact's next one, looking often, waits for it.
    while time.monotonic() < due + 1.5:
        time.sleep(later.wait)
        later = budget.acquire(lease=LEASE, waiter="e1", place=second)
        assert later.token is None and later.wait <= 0.1, later
    retry = budget.acquire(lease=LEASE, waiter="e0", place=first)
    assert retry.token is not None
    budget.finish(retry.token)
    assert budget.acquire(lease=LEASE, waiter="e1", place=second).token is not None


def test_a_contacts_waiter_that_comes_back_late_still_goes_before_its_contacts_next_one(
    make_budget: MakeBudget,
) -> None:
    budget = make_budget("10/second")
    first, second, third = budget.places([("e0", "c"), ("e1", "c"), ("e2", "c")])
    token = budget.acquire(lease=LEASE, waiter="e0", place=first).token
    assert token is not None
    # The second waits for the first's call; the third follows it.
    assert budget.acquire(lease=LEASE, waiter="e1", place=second).token is None
    assert budget.acquire(lease=LEASE, waiter="e2", place=third).token is None
    # The second's worker has its threads busy: it comes back more than a grace late.
    time.sleep(1.2)
    budget.finish(token)
    assert budget.acquire(lease=LEASE, waiter="other", contact="other").token is not None
    later = budget.acquire(lease=LEASE, waiter="e2", place=third)
    assert later.token is None and later.wait <= 0.1, later  # it looks again soon
    got = budget.acquire(lease=LEASE, waiter="e1", place=second)
    assert got.token is not None
    budget.finish(got.token)
    assert budget.acquire(lease=LEASE, waiter="e2", place=third).token is not None


def test_a_contacts_waiter_that_never_comes_back_holds_its_next_one_for_a_lease(
    make_budget: MakeBudget,
) -> None:
    budget = make_budget("10/second")
    first, second = budget.places([("e0", "c"), ("e1", "c")])
    held = budget.acquire(lease=0.3, lane=LANE_AUTOMATION, waiter="other", contact="c")
    assert held.token is not None  # the contact's call: the first waits
    assert budget.acquire(lease=0.3, waiter="e0", place=first).token is None
    budget.finish(held.token)
    # The first never comes back (its worker died): its next one waits at most a second's
    # grace past the first's return, or a lease if longer.
    deadline = time.monotonic() + 2.5
    got = budget.acquire(lease=0.3, waiter="e1", place=second)
    while got.token is None:
        assert time.monotonic() < deadline, got
        time.sleep(got.wait)
        got = budget.acquire(lease=0.3, waiter="e1", place=second)


def test_a_late_waiter_holds_its_next_one_for_a_lease_past_its_return_not_more(
    make_budget: MakeBudget,
) -> None:
    budget = make_budget("10/second")
    lease = 2.0
    first, second = budget.places([("e0", "c"), ("e1", "c")])
    held = budget.acquire(lease=lease, lane=LANE_AUTOMATION, waiter="other", contact="c")
    assert held.token is not None
    asked = time.monotonic()
    got = budget.acquire(lease=lease, waiter="e0", place=first)
    assert got.token is None
    returns = asked + got.wait  # it never comes back
    budget.finish(held.token)
    # Its next one looks again when told, and goes once a lease has passed since the
    # first's return (not a lease and a grace).
    got = budget.acquire(lease=lease, waiter="e1", place=second)
    while got.token is None:
        time.sleep(got.wait)
        got = budget.acquire(lease=lease, waiter="e1", place=second)
    assert time.monotonic() - returns < lease + 0.4, time.monotonic() - returns


def test_a_waiter_behind_a_late_one_looks_again_less_often_as_it_gets_later(
    make_budget: MakeBudget,
) -> None:
    budget = make_budget(None)
    lease = 20.0
    first, second = budget.places([("e0", "c"), ("e1", "c")])
    held = budget.acquire(lease=lease, lane=LANE_AUTOMATION, waiter="other", contact="c")
    assert held.token is not None
    got = budget.acquire(lease=lease, waiter="e0", place=first)
    assert got.token is None
    returns = time.monotonic() + got.wait  # its worker is busy: it comes back late
    budget.finish(held.token)
    later = budget.acquire(lease=lease, waiter="e1", place=second)
    runs = 1
    while time.monotonic() < returns + 4.0:
        assert later.token is None, later
        time.sleep(later.wait)
        later = budget.acquire(lease=lease, waiter="e1", place=second)
        runs += 1
    # Every 0.1 s for the first second or so of its lateness, less often after it.
    assert later.token is None and later.wait >= 0.3, later
    assert runs < 30, runs  # every 0.1 s: over 40
    got = budget.acquire(lease=lease, waiter="e0", place=first)
    assert got.token is not None
    budget.finish(got.token)
    assert budget.acquire(lease=lease, waiter="e1", place=second).token is not None


@pytest.mark.parametrize("lane", [LANE_ROUTINE, LANE_BACKFILL])
def test_a_waiter_held_for_its_contacts_late_one_keeps_no_slot_from_the_others(
    make_budget: MakeBudget, lane: int
) -> None:
    budget = make_budget("1/second")
    first, second = budget.places([("e0", "c"), ("e1", "c")])
    held = budget.acquire(lease=LEASE, lane=LANE_AUTOMATION, waiter="other", contact="c")
    assert held.token is not None  # the contact's call: the first waits
    assert budget.acquire(lease=LEASE, waiter="e0", place=first).token is None
    budget.finish(held.token)
    # The first is due when the window frees (a second); its worker is busy (or died):
    # a grace later it is late.
    time.sleep(2.2)
    assert budget.acquire(lease=LEASE, waiter="e1", place=second).token is None
    # The next waits for the late one, which holds no slot: nor does the next meanwhile.
    got = budget.acquire(lease=LEASE, lane=lane, waiter="d0", contact="d")
    assert got.token is not None, got


def test_a_waiter_behind_one_held_for_its_contacts_late_one_keeps_no_slot_either(
    make_budget: MakeBudget,
) -> None:
    budget = make_budget("1/second")
    first, second, third = budget.places([("e0", "c"), ("e1", "c"), ("e2", "c")])
    held = budget.acquire(lease=LEASE, lane=LANE_AUTOMATION, waiter="other", contact="c")
    assert held.token is not None  # the contact's call: the first waits
    assert budget.acquire(lease=LEASE, waiter="e0", place=first).token is None
    budget.finish(held.token)
    time.sleep(2.2)  # the first is late
    assert budget.acquire(lease=LEASE, waiter="e1", place=second).token is None
    # The third waits for the second, which waits for the late one: none holds a slot.
    assert budget.acquire(lease=LEASE, waiter="e2", place=third).token is None
    got = budget.acquire(lease=LEASE, waiter="d0", contact="d")
    assert got.token is not None, got
    budget.finish(got.token)
    # The first comes back: its contact's operations then take the next slots in turn.
    for waiter, place in (("e0", first), ("e1", second), ("e2", third)):
        budget.finish(taken_within(budget, 1.5, waiter, place))


def test_a_retry_waiting_for_a_slot_tells_its_contacts_next_one_when_to_look_again(
    make_budget: MakeBudget,
) -> None:
    budget = make_budget("10/second")
    first, second = budget.places([("e0", "c"), ("e1", "c")])
    backfill = functools.partial(budget.acquire, lease=LEASE, lane=LANE_BACKFILL, share=0.01)
    got = backfill(waiter="e0", place=first)  # its run's one slot a second
    assert got.token is not None
    budget.finish(got.token, again=0.2, late=LEASE)  # a 503: it runs again in 0.2 s
    time.sleep(0.2)
    retry = backfill(waiter="e0", place=first)
    assert retry.token is None and retry.wait > 0.5, retry  # its share frees in 0.8 s
    # Its contact's next one, on a lane with free slots, looks again once the retry does,
    # not every 0.1 s meanwhile.
    later = budget.acquire(lease=LEASE, lane=LANE_AUTOMATION, waiter="e1", place=second)
    assert later.token is None and retry.wait - 0.05 <= later.wait <= retry.wait + 0.1, later
    time.sleep(retry.wait)
    assert backfill(waiter="e0", place=first).token is not None


def test_a_contacts_call_whose_worker_died_holds_its_next_one_until_its_lease_ends(
    make_budget: MakeBudget,
) -> None:
    budget = make_budget("10/second")
    first, second = budget.places([("e0", "c"), ("e1", "c")])
    assert budget.acquire(lease=0.3, waiter="e0", place=first).token is not None  # never over
    later = budget.acquire(lease=LEASE, waiter="e1", place=second)
    assert later.token is None
    taken_within(budget, 5, "e1", second)  # it comes back when told: not for good


def test_a_waiter_that_never_comes_back_holds_the_others_only_for_a_grace(
    make_budget: MakeBudget,
) -> None:
    budget = make_budget("1/0.5 seconds")
    take(budget, 1)
    gone = budget.acquire(lease=LEASE, waiter="a-gone", contact="gone")  # its worker dies
    later = budget.acquire(lease=LEASE, waiter="b-later", contact="later")
    assert gone.token is None and later.token is None
    time.sleep(later.wait + 0.05)  # the slot is free, and the first in turn is due
    assert budget.acquire(lease=LEASE, waiter="b-later", place=later.place).token is None
    time.sleep(gone.wait + 1.1)  # past its time and a grace: it holds nothing now
    granted = budget.acquire(lease=LEASE, waiter="b-later", place=later.place).token
    assert granted is not None
    budget.finish(granted)
    # Back at last (a late retry), it keeps its turn: ahead of a waiter who came meanwhile.
    third = budget.acquire(lease=LEASE, waiter="c-third", contact="third")
    back = budget.acquire(lease=LEASE, waiter="a-gone", place=gone.place)
    assert back.wait < budget.acquire(lease=LEASE, waiter="c-third", place=third.place).wait


def test_a_due_waiter_of_a_higher_lane_holds_its_slot(make_budget: MakeBudget) -> None:
    budget = make_budget("1/0.5 seconds")
    take(budget, 1)
    urgent = budget.acquire(lease=LEASE, lane=LANE_AUTOMATION, waiter="urgent")
    assert urgent.token is None
    time.sleep(urgent.wait + 0.05)  # the slot is free now, and the urgent one is due
    routine = budget.acquire(lease=LEASE, waiter="routine")
    assert routine.token is None  # held for the urgent one
    granted = budget.acquire(lease=LEASE, lane=LANE_AUTOMATION, waiter="urgent").token
    assert granted is not None
    budget.finish(granted)
    gone = budget.acquire(lease=LEASE, lane=LANE_AUTOMATION, waiter="gone")
    assert gone.token is None
    time.sleep(gone.wait + 1.1)  # past its time and a grace: one that never came back
    assert budget.acquire(lease=LEASE, waiter="routine").token  # holds nothing


def test_a_backfill_uses_at_most_its_share(make_budget: MakeBudget) -> None:
    budget = make_budget("40/minute")  # 2 held back for sends: 38, half of it 19
    for _ in range(19):
        assert budget.acquire(lease=LEASE, lane=LANE_BACKFILL, share=0.5).token
    assert budget.acquire(lease=LEASE, lane=LANE_BACKFILL, share=0.5).token is None
    take(budget, 19)  # live work has the rest


def test_workers_on_one_key_share_one_budget(make_budget: MakeBudget, redis_url: str) -> None:
    first, second = make_budget("4/minute"), make_budget("4/minute")
    other_key = make_budget("4/minute", key="meisa_live_another_key_987654321")
    take(first, 2)
    take(second, 2)
    assert first.acquire(lease=LEASE).token is None
    assert second.acquire(lease=LEASE).token is None
    take(other_key, 4)  # another key, another budget
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        names = " ".join(str(name) for name in client.keys("*"))
    finally:
        client.close()
    assert "budget" in names
    assert KEY not in names
    assert "meisa_live" not in names


@pytest.mark.parametrize("spec", ["", "ten/second", "0/minute"])
def test_an_invalid_budget_is_refused(make_budget: MakeBudget, spec: str) -> None:
    with pytest.raises(ConfigurationError):
        make_budget(spec)


def test_failures_in_a_row_let_one_probe_through_until_one_is_answered(
    make_budget: MakeBudget,
) -> None:
    first, second = make_budget("100/second"), make_budget("100/second")
    for n in range(1, 4):  # three calls without an answer, from either worker
        got = (first if n % 2 else second).acquire(lease=LEASE)
        assert got.token is not None
        assert first.finish(got.token, outage=True) == n
    probe = first.acquire(lease=LEASE)
    assert probe.token is not None
    held = second.acquire(lease=LEASE, lane=LANE_TRANSACTIONAL)  # one probe at a time
    assert held.token is None
    assert 0.0 < held.wait <= 1.0
    assert first.finish(probe.token, answered=True) == 0
    assert second.acquire(lease=LEASE).token is not None  # answered: all may call again


def test_a_budget_without_a_limit_still_pauses_and_probes(make_budget: MakeBudget) -> None:
    budget = make_budget(None)
    take(budget, 50)
    assert budget.snapshot() == (0.0, {0: 0, 1: 0, 2: 0, 3: 0}, None)
    budget.pause(0.5)
    assert budget.acquire(lease=LEASE).token is None
    assert budget.snapshot()[0] > 0.4


def test_a_task_placed_again_does_not_wait_for_its_own_follower_forever(
    make_budget: MakeBudget,
) -> None:
    # A waiter that asks without a place is placed when it first asks. Asking again the
    # same way, it is placed again: after the contact's next waiter, which was placed
    # after its first ask and waits for it. Each then waits for the other, however free
    # the budget.
    budget = make_budget("100/second")
    budget.pause(0.3)  # both wait a moment
    assert budget.acquire(lease=LEASE, waiter="o", contact="c").token is None
    follower = budget.acquire(lease=LEASE, waiter="p", contact="c")
    again = budget.acquire(lease=LEASE, waiter="o", contact="c")  # the same task, again
    assert follower.token is None and again.token is None
    started = time.monotonic()
    due = {"o": started + again.wait, "p": started + follower.wait}
    places = {"o": again.place, "p": follower.place}
    granted: list[str] = []
    while not granted and time.monotonic() - started < 3.0:  # each comes back when told
        name = min(due, key=due.__getitem__)
        time.sleep(max(due[name] - time.monotonic(), 0.0))
        got = budget.acquire(lease=LEASE, waiter=name, place=places[name])
        if got.token is not None:
            budget.finish(got.token)
            granted.append(name)
        due[name] = time.monotonic() + got.wait
    assert granted, "neither of the contact's two waiters ever got a slot"


def test_a_crafted_turn_does_not_take_the_turns_away_from_everyone_after_it(
    make_budget: MakeBudget,
) -> None:
    # A task's meta is data from the broker: one whose turn is out of range sets the
    # current turn to it, and every place given after it was a negative number that the
    # budget reads as no turn at all (for good: the current turn has no expiry).
    budget = make_budget("100/second")
    got = budget.acquire(lease=LEASE, waiter="crafted", place="x 99999999999999999999.5 ")
    assert got.token is not None
    budget.finish(got.token)
    place = budget.places([("next", "someone")])[0]
    assert " -" not in place, place


def test_a_waiter_ranked_past_a_full_window_comes_back_when_its_slot_frees(
    make_budget: MakeBudget,
) -> None:
    budget = make_budget("10/second")  # no reserve: 5 % of 10 is no whole slot
    started = time.monotonic()
    take(budget, 10)
    waits = [budget.acquire(lease=LEASE, waiter=f"w{n}", contact=f"c{n}").wait for n in range(21)]
    since = time.monotonic() - started
    # Ten slots free a second after the calls made, the next ten a second after those: no
    # waiter is told to come back before its slot can be free (what passed is measured).
    for number, wait in enumerate(waits):
        due = 1.0 + number // 10
        assert due - since - 0.01 < wait <= due, (number, waits, since)


def test_a_backfill_waiter_behind_the_lanes_ahead_comes_back_when_its_slot_frees(
    make_budget: MakeBudget,
) -> None:
    # The waiters of the lanes ahead take slots at their own lane's pace (19 a window
    # here), not at the backfill's share (4): counted at the share, they would hold the
    # backfill back windows after its slot is free.
    budget = make_budget("20/second")  # 1 held back for sends: 19; a quarter of it: 4
    take(budget, 19)
    routine = [budget.acquire(lease=LEASE, waiter=f"r{n}", contact=f"c{n}") for n in range(19)]
    asked = time.monotonic()
    backfill = budget.acquire(lease=LEASE, lane=LANE_BACKFILL, share=0.25, waiter="b")
    assert backfill.token is None
    told = asked + backfill.wait  # the earliest it comes back
    time.sleep(max(got.wait for got in routine) + 0.01)  # the 19 slots are free again
    answered = []
    for n, got in enumerate(routine):  # each routine waiter takes its slot, in turn
        granted = budget.acquire(lease=LEASE, waiter=f"r{n}", place=got.place).token
        assert granted is not None, n
        budget.finish(granted)
        answered.append(time.monotonic())
    # The backfill may go once at most 3 calls are in the window: a second after the 16th
    # routine call was answered. It was told to come back long after that.
    free = answered[15] + 1.0
    time.sleep(max(free + 0.01 - time.monotonic(), 0.0))
    assert budget.acquire(
        lease=LEASE, lane=LANE_BACKFILL, share=0.25, waiter="b", place=backfill.place
    ).token, "the backfill's slot is free"
    assert told <= free + 0.1, (backfill.wait, free - asked)


def test_a_redis_refusing_connections_is_logged_once_not_per_call(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every slot asked of a Redis that refuses connections fails at once and the call is
    made without one; the warning is said once, not on every send."""
    with socket.socket() as unused:  # a loopback port that nothing listens on
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    url = f"redis://127.0.0.1:{port}/0"  # made as the engine makes its client
    client = redis.Redis.from_url(url, health_check_interval=30, **REDIS_TIMEOUTS)
    budget = RedisBudget(client, "10/second", KEY)
    began = time.monotonic()
    for _ in range(5):
        with budget.slot(1.0, lease=LEASE) as got:
            assert got is False  # made without a slot
    assert time.monotonic() - began < 2.0  # refused at once: no stall waited out
    warned = [r for r in caplog.records if "no budget slot from Redis" in r.getMessage()]
    assert len(warned) == 1
    assert "ConnectionError" in warned[0].getMessage()
    client.close()
