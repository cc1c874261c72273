"""``flask meisa ...``: the extension's command-line interface. The group is on every app,
so ``config-template`` and ``emulator`` work before ``init_app``."""

from __future__ import annotations

import functools
import itertools
import json
import math
import sqlite3
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING
from typing import Any
from typing import cast

import click
from flask import current_app
from flask.cli import AppGroup

from . import _cli_text
from ._engine import backfill
from ._engine import dead
from ._engine.delivery import Delivery
from ._engine.delivery import StoreBackfill
from ._engine.mounts import write_locked
from ._engine.store import STORE_ERRORS
from ._engine.store import ForAnotherMeisa
from ._process import stops_interrupt
from ._values import parse_rate_limit
from .config import config_template
from .errors import MeisaError
from .operations import Operation

if TYPE_CHECKING:
    from typing import TypeAlias

    from ._engine.base import DeliveryStatus
    from ._engine.celery import CeleryDispatcher
    from ._engine.redis_dead import RedisDeadLetters
    from ._runtime import MeisaState
    from .extension import Meisa

    DeadLetters: TypeAlias = dead.StoreDeadLetters | RedisDeadLetters

__all__ = ["meisa_cli"]


class _MeisaGroup(AppGroup):
    """A group whose commands end on a :class:`MeisaError` or a store error: no traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MeisaError as error:
            raise click.ClickException(str(error)) from None
        except (sqlite3.Error, ForAnotherMeisa) as error:  # locked past the busy timeout
            raise click.ClickException(f"the delivery store failed ({error})") from None


meisa_cli = _MeisaGroup("meisa", help="Meisa: check the connection, sync users, inspect delivery.")

_USES = {
    "contacts:write": "contact syncs (logins, plan changes, meisa.upsert, sync-users)",
    "events:track": "events (@track_event, meisa.track)",
    "emails:trigger": "transactional email (meisa.send)",
    "contacts:read": "the suppression list checked before every send",
}


def _extension(*, host: bool = False) -> Meisa:
    meisa = current_app.extensions.get("meisa")
    if meisa is None:
        raise click.ClickException("Meisa is not initialised on this app (call init_app).")
    if host and (state := meisa.state()).settings.delivery == "thread" and state.has_dispatcher():
        state.host_store()  # not this process's memory: refused where the file fell back
    return meisa  # type: ignore[no-any-return]


@meisa_cli.command("ping")
def ping_command() -> None:
    """Check the API key: its environment, scopes and product."""
    result = _extension().client.ping()
    product = result.product_name or result.product_id
    click.echo(_cli_text.plain(f"ok: {result.environment} key for {product}"))
    click.echo(f"scopes: {_cli_text.plain(', '.join(result.scopes)) or '(none)'}")
    missing = "".join(
        f"\n  {scope}: needed for {use}"
        for scope, use in _USES.items()
        if scope not in result.scopes
    )
    if missing:
        raise click.ClickException(f"the key lacks scopes this extension uses:{missing}")


@meisa_cli.command("suppressions")
@click.option("--check", "check", metavar="EMAIL", help="Say whether this address is suppressed.")
def suppressions_command(check: str | None) -> None:
    """Load the suppression set now and show its size (or check one address)."""
    suppression = (meisa := _extension()).state().suppression
    if not suppression.load():
        why = suppression.last_error or "unknown error"
        raise click.ClickException(f"could not load the suppression set: {why}")
    as_of = f"as of {_cli_text.plain(suppression.as_of or '?')}"
    click.echo(f"{suppression.count} suppressed addresses ({as_of})")
    if check is not None:
        suppressed = meisa.is_suppressed(check)
        click.echo(f"{check.strip()}: {'suppressed' if suppressed else 'not suppressed'}")


@meisa_cli.command("sequences")
@click.option("--all", "show_all", is_flag=True, help="Include paused and archived sequences.")
@click.option("--search", default=None, help="Only sequences whose name or slug contains this.")
def sequences_command(show_all: bool, search: str | None) -> None:
    """List the product's sequences with their slugs."""
    client = _extension().client
    sequences = client.list_sequences(status="all" if show_all else None, search=search)
    if not sequences:
        click.echo("no sequences")
    for sequence in sequences:
        click.echo(_cli_text.plain(sequence.slug, sequence.status or "", sequence.name or ""))


def _a_number(context: click.Context, param: click.Parameter, value: float) -> float:
    """Refuse nan, which ``FloatRange`` lets through: a wait until nan never ends."""
    if math.isnan(value):
        raise click.BadParameter("nan is not a number.", context, param)
    return value


@meisa_cli.command("sync-users")
@click.option(
    "--max-share",
    type=click.FloatRange(0.01, 1.0),
    callback=_a_number,
    default=1.0,
    show_default=True,
    help="The most of the key's budget the backfill may use; live work always goes first.",
)
@click.option("--restart", is_flag=True, help="Start again from the first user.")
@click.option("--dry-run", is_flag=True, help="Print the plan and the first mapped users only.")
@click.option("--failures", is_flag=True, help="List the users the last run could not sync.")
def sync_users_command(max_share: float, restart: bool, dry_run: bool, failures: bool) -> None:
    """Backfill: upsert every user registered with @meisa.users_to_sync, behind live work,
    within the shared budget, resumable (run it again after an interruption)."""
    state = (meisa := _extension()).state()
    if failures:
        if restart or dry_run:
            extra = "--restart" if restart else "--dry-run"
            raise click.UsageError(f"--failures only lists the last run's failures: no {extra}")
        target = _backfill_target(state, start=False)
        backfills = [n for n in _dead_letters().find() if n.operation.priority == "backfill"]
        click.echo(_cli_text.failures(target.failures(), backfills, target.refused()))
        return
    if meisa.user_source is None:
        raise click.ClickException(
            "no user query registered: decorate a function returning the users with"
            " @meisa.users_to_sync"
        )
    query, count = meisa.user_source
    users: Any = backfill.before_run(query)
    total = backfill.before_run(count or getattr(users, "__len__", None), "the count of ")
    if isinstance(users, str | bytes | dict) or not isinstance(users, Iterable):
        raise click.ClickException(f"@meisa.users_to_sync returned {type(users).__name__}")
    if total is not None and (type(total) is not int or total < 0):  # a whole number
        raise click.ClickException(f"the count of @meisa.users_to_sync returned {total!r}")
    budget = state.settings.rate_limit
    per_hour = backfill.estimate_per_hour(parse_rate_limit(budget) if budget else (), max_share)
    resumable = state.settings.delivery in ("thread", "celery") and not restart
    done = _backfill_target(state, start=False).goes_on_from() if resumable else 0
    click.echo(_cli_text.plan(total, per_hour, done))
    if dry_run:
        for user in itertools.islice(users, 3):
            click.echo(json.dumps(meisa.map_user(user), sort_keys=True, default=str))
        return
    target = _backfill_target(state, start=True)

    def to_operation(user: Any) -> Operation:
        payload = meisa.map_user(user)
        payload.setdefault("source", "initial_sync")
        return Operation.checked("upsert", payload, priority="backfill")

    go = functools.partial(
        backfill.run,
        target,
        to_operation=to_operation,
        total=total,
        max_share=max_share,
        per_hour=per_hour,
        report=_cli_text.report,
    )
    try:  # a stop is Ctrl+C: noted stopped, a rerun need not wait
        with stops_interrupt():
            try:
                result = go(users, restart=restart)
            except backfill.UsersChanged as changed:
                click.echo(_cli_text.users_changed(changed), err=True)
                result = go(backfill.before_run(query), again=True)
    except KeyboardInterrupt:
        click.echo("interrupted: run the command again to go on from where it stopped", err=True)
        raise SystemExit(130) from None
    except backfill.KeyRefused as refused:
        raise click.ClickException(_cli_text.key_refused(refused, meisa.status())) from None
    except STORE_ERRORS as error:
        raise click.ClickException(_cli_text.store_failed(error)) from None
    click.echo(_cli_text.progress_line(result))
    if failed := result.run.failed + result.refused:
        raise click.ClickException(
            f"{failed} users were not synced: see 'flask meisa sync-users --failures'"
        )


def _backfill_target(state: MeisaState, *, start: bool) -> backfill.Target:
    # Redis under Celery, else the store, whose delivery ``start`` starts (if none runs).
    delivery = state.settings.delivery
    if start and (delivery not in ("thread", "celery") or not state.delivering()):
        needs = 'background delivery (MEISA_DELIVERY = "thread" or "celery", delivery on)'
        raise click.ClickException(f"sync-users needs {needs}")
    if delivery == "celery":
        return cast("CeleryDispatcher", state.dispatcher).backfill(state.settings.resync_after)
    store, engine = state.host_store(), cast(Delivery, state.dispatcher)
    if not start:
        return StoreBackfill(store, resync_after=state.settings.resync_after)
    if not store.durable:
        click.echo("note: MEISA_OUTBOX is memory: the backfill cannot resume after an exit")
    # Delivery taken over first, where no process delivers: a store last delivered for
    # another Meisa (the host switched keys) takes this one's rows from then on.
    engine.first_pass(5.0)
    return StoreBackfill(store, engine.refuse_foreign, state.settings.resync_after)


def _flushed(meisa: Meisa, timeout: float) -> tuple[bool, DeliveryStatus]:
    """Whether all was delivered within ``timeout`` s, and the status then; if not (or at
    Ctrl+C), this process stops delivering now, not in ``MEISA_FLUSH_TIMEOUT`` at exit."""
    flushed = False
    try:
        flushed, status = meisa.flush(timeout), meisa.status()
    finally:
        if not flushed:
            meisa.close(current_app, 0)
    return flushed, status


@meisa_cli.command("flush")
@click.option(
    "--timeout", default=30.0, show_default=True, type=click.FloatRange(min=0), callback=_a_number
)
def flush_command(timeout: float) -> None:
    """Wait until the host has delivered everything pending (this process delivers when
    no other does)."""
    flushed, status = _flushed(meisa := _extension(host=True), timeout)
    if not flushed:
        state = meisa.state()
        locked = state.settings.delivery == "thread" and write_locked(state.host_store())
        raise click.ClickException(_cli_text.not_flushed(status, timeout, locked))
    # What failed is no longer pending, but not delivered either.
    dead = f"; {status.dead_letters} dead letter(s): see 'flask meisa dead-letters'"
    click.echo(f"nothing pending{dead if status.dead_letters else ''}")


@meisa_cli.command("status")
def status_command() -> None:
    """Show delivery for the whole host: pending work per lane and its age, latency,
    retries, dead letters, budget, which process delivers, counters, the backfill."""
    state, status = (meisa := _extension(host=True)).state(), meisa.status()
    now = _backfill_target(state, start=False).clock() if status.backfill else time.time()
    click.echo(_cli_text.status_report(status, state.store_path(), now))


@meisa_cli.command("config-template", with_appcontext=False)
def config_template_command() -> None:
    """Print the configuration template: every MEISA_* key with its default."""
    click.echo(config_template(), nl=False)


# -- dead letters -----------------------------------------------------------------------


def _dead_letters() -> DeadLetters:
    state = _extension().state()
    if state.settings.delivery == "celery":
        return cast("CeleryDispatcher", state.dispatcher).dead_letters
    if state.settings.delivery != "thread":
        raise click.ClickException(
            'dead letters are kept by MEISA_DELIVERY = "thread" or "celery", not'
            f" {state.settings.delivery!r}"
        )
    store = state.host_store()
    return dead.StoreDeadLetters(store, cast(Delivery, state.dispatcher).refuse_foreign)


def _letters(letters: DeadLetters, ids: list[int]) -> list[dead.DeadLetter]:
    """The dead letters ``ids``, oldest first; an unknown ID is an error."""
    # An ID SQLite cannot hold is no dead letter's (and would raise OverflowError).
    found = letters.find([seq for seq in ids if -(2**63) <= seq < 2**63])
    seqs = {letter.seq for letter in found}
    unknown = [seq for seq in ids if seq not in seqs]
    if unknown:
        raise click.ClickException(f"no dead letter with ID {_cli_text.first_ids(unknown)}")
    return found


def _chosen(ids: tuple[int, ...], every: bool) -> tuple[DeadLetters, list[int] | None]:
    """The dead letters and those a command names: ``ids`` (checked), or ``None``: all."""
    letters = _dead_letters()
    if every and ids:
        raise click.UsageError("give IDs or --all, not both")
    if not every and not ids:
        raise click.UsageError("give the IDs of dead letters (see 'list'), or --all")
    if not every:
        _letters(letters, list(ids))
    return letters, None if every else list(ids)


@meisa_cli.group("dead-letters", invoke_without_command=True)
@click.pass_context
def dead_letters_group(context: click.Context) -> None:
    """Operations Meisa refused or that ran out of retries: list, show, retry, purge."""
    if context.invoked_subcommand is None:
        context.invoke(dead_letters_list)


@dead_letters_group.command("list")
def dead_letters_list() -> None:
    """List dead letters, oldest first, with their errors (no payload values)."""
    for letter in (letters := _dead_letters().find()):
        click.echo(_cli_text.letter_line(letter))
    click.echo(f"{len(letters)} dead letter(s)" if letters else "no dead letters")


@dead_letters_group.command("show")
@click.argument("seq", metavar="ID", type=int)
def dead_letters_show(seq: int) -> None:
    """Print one dead letter with its payload, as JSON."""
    (letter,) = _letters(_dead_letters(), [seq])
    click.echo(_cli_text.letter_json(letter))


@dead_letters_group.command("retry")
@click.argument("ids", metavar="[ID]...", nargs=-1, type=int)
@click.option("--all", "every", is_flag=True, help="Retry every dead letter.")
@click.option(
    "--timeout",
    default=30.0,
    show_default=True,
    type=float,
    callback=_a_number,
    help="Seconds to wait for delivery (0: queue them and return).",
)
@click.option("--force", is_flag=True, help="Retry upserts whose fields were set again since.")
def dead_letters_retry(ids: tuple[int, ...], every: bool, timeout: float, force: bool) -> None:
    """Queue dead letters for delivery again, then wait for them; an upsert a field of
    which was set again after it failed stays, unless ``--force``."""
    letters, chosen = _chosen(ids, every)
    # --all: the failures; work released for another Meisa goes to this one only by ID.
    found = letters.find() if chosen is None else []
    if aside := [letter.seq for letter in found if letter.code == dead.OTHER_MEISA]:
        chosen = [letter.seq for letter in found if letter.code != dead.OTHER_MEISA]
        click.echo(_cli_text.set_aside(aside))
    queued, kept = letters.retry(chosen, force=force)
    if kept:
        click.echo(_cli_text.kept(kept))
    click.echo(f"{queued} operation(s) queued again")
    if timeout <= 0 or not queued:
        return
    if not (meisa := _extension()).state().delivering():
        raise click.ClickException("delivery is off here (MEISA_ENABLED / MEISA_SUPPRESS_SEND)")
    delivered, status = _flushed(meisa, timeout)
    left = f"{status.dead_letters} dead letter(s){_cli_text.stopped_run(status)}"
    if not delivered:
        raise click.ClickException(f"not all delivered within {timeout:g}s; {left}")
    click.echo(f"done; {left} left")


@dead_letters_group.command("purge")
@click.argument("ids", metavar="[ID]...", nargs=-1, type=int)
@click.option("--all", "every", is_flag=True, help="Delete every dead letter.")
@click.option("--yes", is_flag=True, help="Do not ask before deleting every dead letter.")
def dead_letters_purge(ids: tuple[int, ...], every: bool, yes: bool) -> None:
    """Delete dead letters for good."""
    letters, chosen = _chosen(ids, every)
    if chosen is None and not yes:
        count = _extension().status().dead_letters
        click.confirm(f"Delete all {count} dead letters?", abort=True)
    click.echo(f"{letters.purge(chosen)} dead letter(s) deleted")


@meisa_cli.command(
    "emulator",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
    with_appcontext=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def emulator_command(context: click.Context, args: tuple[str, ...]) -> None:
    """Serve the embedded Meisa emulator (options: --help)."""
    from .emulator.__main__ import main

    raise SystemExit(main(list(args), prog=context.command_path))
