"""``flask meisa ...``: the extension's command-line interface.

The group is registered on every app through the ``flask.commands`` entry point (and on
``app.cli`` by ``init_app``), so ``config-template`` and ``emulator``, which need neither
the extension nor a key, work before ``init_app`` is called; the other commands say
that Meisa is not initialised on such an app.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import TYPE_CHECKING
from typing import Any

import click
from flask import current_app
from flask.cli import AppGroup

from .config import config_template
from .engine.deadletters import DeadLetters
from .engine.hostlock import HostLock
from .engine.outbox import OUTBOX_ERRORS
from .engine.outbox import Outbox
from .errors import MeisaError

if TYPE_CHECKING:
    from .extension import Meisa

__all__ = ["meisa_cli"]

meisa_cli = AppGroup("meisa", help="Meisa: check the connection, sync users, inspect delivery.")


def _extension() -> Meisa:
    meisa = current_app.extensions.get("meisa")
    if meisa is None:
        raise click.ClickException("Meisa is not initialised on this app (call init_app).")
    return meisa  # type: ignore[no-any-return]


def _fail(error: MeisaError) -> click.ClickException:
    return click.ClickException(str(error))


@meisa_cli.command("ping")
def ping_command() -> None:
    """Check the API key: its environment, scopes and product."""
    try:
        result = _extension().client.ping()
    except MeisaError as error:
        raise _fail(error) from None
    click.echo(f"ok: {result.environment} key for {result.product_name or result.product_id}")
    click.echo(f"scopes: {', '.join(result.scopes) or '(none)'}")


@meisa_cli.command("suppressions")
@click.option("--check", "check", metavar="EMAIL", help="Say whether this address is suppressed.")
def suppressions_command(check: str | None) -> None:
    """Load the suppression set now and show its size (or check one address)."""
    meisa = _extension()
    suppression = meisa.state().suppression
    if not suppression.load():
        raise click.ClickException(
            f"could not load the suppression set: {suppression.last_error or 'unknown error'}"
        )
    click.echo(f"{suppression.count} suppressed addresses (as of {suppression.as_of or '?'})")
    if check is not None:
        try:
            suppressed = meisa.is_suppressed(check)
        except MeisaError as error:
            raise _fail(error) from None
        click.echo(f"{check.strip()}: {'suppressed' if suppressed else 'not suppressed'}")


@meisa_cli.command("sequences")
@click.option("--all", "show_all", is_flag=True, help="Include paused and archived sequences.")
@click.option("--search", default=None, help="Only sequences whose name or slug contains this.")
def sequences_command(show_all: bool, search: str | None) -> None:
    """List the product's sequences with their slugs."""
    try:
        sequences = _extension().client.list_sequences(
            status="all" if show_all else None, search=search
        )
    except MeisaError as error:
        raise _fail(error) from None
    if not sequences:
        click.echo("no sequences")
    for sequence in sequences:
        click.echo(f"{sequence.slug}\t{sequence.status or ''}\t{sequence.name or ''}")


@meisa_cli.command("sync-users")
@click.option(
    "--timeout",
    default=None,
    type=float,
    help="Seconds to wait for delivery at the end (default: until done).",
)
def sync_users_command(timeout: float | None) -> None:
    """Upsert every user from the query registered with @meisa.users_to_sync, within
    the rate budget."""
    meisa = _extension()
    query = meisa._users_to_sync
    if query is None:
        raise click.ClickException(
            "no user query registered: decorate a function returning the users with"
            " @meisa.users_to_sync"
        )
    users: Any = query()
    length = len(users) if hasattr(users, "__len__") else None
    queued = invalid = 0
    with click.progressbar(users, length=length, label="queueing users") as bar:
        for user in bar:
            try:
                payload = meisa.map_user(user)
            except MeisaError as error:
                invalid += 1
                click.echo(f"\nskipped a user: {error}", err=True)
                continue
            payload.setdefault("source", "initial_sync")
            meisa.upsert(payload)
            queued += 1
    click.echo(f"{queued} users queued, {invalid} skipped")
    _wait_for_delivery(meisa, timeout)


def _wait_for_delivery(meisa: Meisa, timeout: float | None) -> None:
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        step = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
        if meisa.flush(step):
            break
        status = meisa.status()
        click.echo(f"  {status.delivered} delivered, {status.pending} pending", err=True)
        if deadline is not None and time.monotonic() >= deadline:
            raise click.ClickException(f"{status.pending} operations still pending")
    status = meisa.status()
    click.echo(f"done: {status.delivered} delivered, {status.failed} failed")


@meisa_cli.command("flush")
@click.option("--timeout", default=30.0, show_default=True, type=float)
def flush_command(timeout: float) -> None:
    """Deliver everything pending in this process."""
    meisa = _extension()
    if not meisa.flush(timeout):
        raise click.ClickException(f"{meisa.status().pending} operations still pending")
    click.echo("nothing pending")


@meisa_cli.command("status")
def status_command() -> None:
    """Show the delivery engine of this process: queues, budget, counters."""
    status = _extension().status()
    click.echo(f"engine: {status.engine}")
    for lane, depth in status.queued.items():
        click.echo(f"queued {lane}: {depth}")
    click.echo(f"in flight: {status.in_flight}")
    click.echo(f"waiting to retry: {status.retry_waiting}")
    if status.budget_left is not None:
        for window, left in status.budget_left.items():
            click.echo(f"budget left {window}: {left}")
    if status.paused_for:
        click.echo(f"paused for: {status.paused_for:.1f}s")
    if status.holder is not None:
        role = "this process" if status.holder else "another process"
        click.echo(f"outbox: {status.stored} stored, delivered by {role}")
        click.echo(f"dead letters: {status.dead_letters}")
    click.echo(
        f"delivered: {status.delivered}  failed: {status.failed}  dropped: {status.dropped}"
    )


@meisa_cli.command("config-template", with_appcontext=False)
def config_template_command() -> None:
    """Print the configuration template: every MEISA_* key with its default."""
    click.echo(config_template(), nl=False)


def _outbox() -> Outbox:
    outbox = _extension().state().outbox
    if outbox is None:
        raise click.ClickException("MEISA_OUTBOX is not set: there is no outbox.")
    return outbox


def _when(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


@meisa_cli.command("outbox")
def outbox_command() -> None:
    """Show the outbox: its file, what waits in it, and which process delivers."""
    outbox = _outbox()
    try:
        counts = outbox.counts()
    except OUTBOX_ERRORS as error:
        raise click.ClickException(f"cannot read the outbox: {error}") from None
    holder = HostLock.holder(outbox.path + ".lock")
    click.echo(f"outbox: {outbox.path}")
    click.echo(f"waiting: {counts.pending + counts.claimed}")
    click.echo(f"dead letters: {counts.dead}")
    click.echo(f"delivering process: {'none' if holder is None else holder or 'unknown pid'}")


@meisa_cli.group("dead-letters", invoke_without_command=True)
@click.pass_context
def dead_letters_group(context: click.Context) -> None:
    """Operations Meisa refused or that ran out of retries: list, show, retry, purge."""
    if context.invoked_subcommand is None:
        context.invoke(dead_letters_list)


def _chosen(ids: tuple[int, ...], every: bool) -> list[int] | None:
    if every and ids:
        raise click.UsageError("give IDs or --all, not both")
    if not every and not ids:
        raise click.UsageError("give the IDs of dead letters (see 'list'), or --all")
    return None if every else list(ids)


def _missing(outbox: Outbox, ids: list[int] | None) -> None:
    if ids is None:
        return
    found = {letter.seq for letter in DeadLetters(outbox).list(ids)}
    unknown = [str(seq) for seq in ids if seq not in found]
    if unknown:
        raise click.ClickException(f"no dead letter with ID {', '.join(unknown)}")


@dead_letters_group.command("list")
def dead_letters_list() -> None:
    """List dead letters, oldest first, with their errors (no payload values)."""
    letters = DeadLetters(_outbox()).list()
    if not letters:
        click.echo("no dead letters")
        return
    for letter in letters:
        merged = f", {letter.merged} merged" if letter.merged > 1 else ""
        error = " ".join(
            part
            for part in (
                f"HTTP {letter.status}" if letter.status is not None else "",
                f"[{letter.code}]" if letter.code else "",
                letter.message,
            )
            if part
        )
        click.echo(
            f"{letter.seq}\t{letter.operation.describe()}\t{error}\t"
            f"{letter.attempts} attempt(s){merged}\t{_when(letter.failed_at)}"
        )
    click.echo(f"{len(letters)} dead letter(s)")


@dead_letters_group.command("show")
@click.argument("seq", metavar="ID", type=int)
def dead_letters_show(seq: int) -> None:
    """Print one dead letter with its payload, as JSON."""
    letters = DeadLetters(_outbox()).list([seq])
    if not letters:
        raise click.ClickException(f"no dead letter with ID {seq}")
    letter = letters[0]
    record = {
        "id": letter.seq,
        "operation": letter.operation.to_dict(),
        "error": {"status": letter.status, "code": letter.code, "message": letter.message},
        "attempts": letter.attempts,
        "failed_at": _when(letter.failed_at),
    }
    click.echo(json.dumps(record, indent=2, sort_keys=True))


@dead_letters_group.command("retry")
@click.argument("ids", metavar="[ID]...", nargs=-1, type=int)
@click.option("--all", "every", is_flag=True, help="Retry every dead letter.")
@click.option(
    "--timeout",
    default=30.0,
    show_default=True,
    type=float,
    help="Seconds to wait for delivery (0: queue them and return).",
)
def dead_letters_retry(ids: tuple[int, ...], every: bool, timeout: float) -> None:
    """Queue dead letters for delivery again, then wait for them."""
    outbox = _outbox()
    chosen = _chosen(ids, every)
    _missing(outbox, chosen)
    queued = DeadLetters(outbox).requeue(chosen)
    click.echo(f"{queued} operation(s) queued again")
    if timeout <= 0 or not queued:
        return
    meisa = _extension()
    if not meisa.state().delivering():
        raise click.ClickException("delivery is off here (MEISA_ENABLED / MEISA_SUPPRESS_SEND)")
    delivered = meisa.flush(timeout)
    dead = outbox.counts().dead
    if not delivered:
        raise click.ClickException(f"not all delivered within {timeout:g}s; {dead} dead letters")
    click.echo(f"done; {dead} dead letter(s) left")


@dead_letters_group.command("purge")
@click.argument("ids", metavar="[ID]...", nargs=-1, type=int)
@click.option("--all", "every", is_flag=True, help="Delete every dead letter.")
@click.option("--yes", is_flag=True, help="Do not ask before deleting every dead letter.")
def dead_letters_purge(ids: tuple[int, ...], every: bool, yes: bool) -> None:
    """Delete dead letters for good."""
    outbox = _outbox()
    chosen = _chosen(ids, every)
    _missing(outbox, chosen)
    if chosen is None and not yes:
        click.confirm(f"Delete all {outbox.counts().dead} dead letters?", abort=True)
    click.echo(f"{DeadLetters(outbox).purge(chosen)} dead letter(s) deleted")


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
