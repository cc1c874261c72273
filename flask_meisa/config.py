"""The ``MEISA_*`` configuration keys: one table, :data:`KEYS`, from which the defaults, the
validation, :class:`MeisaSettings`, the template and the README's table are made."""

from __future__ import annotations

import difflib
import json
import logging
import re
import textwrap
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import _values
from ._values import INSTANCE_PREFIX
from .errors import _KEY_SHAPE
from .errors import ConfigurationError

__all__ = [
    "DEFAULTS",
    "INSTANCE_PREFIX",
    "KEYS",
    "Key",
    "MeisaSettings",
    "config_template",
    "is_delivering",
    "markdown_table",
    "resolve_keys",
]

logger = logging.getLogger("flask_meisa")


@dataclass(frozen=True)
class Key:
    """One ``MEISA_*`` key. ``parse`` turns a config value into the value used (or raises
    :class:`_values.InvalidValue`); ``meaning`` is one line, ``notes`` more for the template;
    ``default_note`` says what the default stands for; ``template`` is the template's value
    when not the default's literal; a ``secret`` value is never shown in an error; a key
    not ``resolved`` is read where it is used, not carried by :class:`MeisaSettings`."""

    name: str
    type: str
    default: Any
    parse: Callable[[Any], Any]
    meaning: str
    notes: str = ""
    default_note: str = ""
    template: str | None = None
    secret: bool = False
    resolved: bool = True

    @property
    def attribute(self) -> str:
        """Its :class:`MeisaSettings` attribute: ``MEISA_RETRY_DEADLINE`` → ``retry_deadline``."""
        return self.name.removeprefix("MEISA_").lower()


_SECONDS = "float seconds"
_ABOVE_0 = _values.seconds(0, inclusive=False)

# fmt: off
#: Every key, in the order the template and the README list them.
KEYS: tuple[Key, ...] = (
    Key("MEISA_API_KEY", "str", None, _values.api_key,
        "the server-side API key (`meisa_live_...` or `meisa_test_...`); not needed while"
        " delivery is off (`MEISA_ENABLED = False`, or under `TESTING`)",
        notes="From Meisa's dashboard. Read it from the environment; never commit it.",
        default_note="required while delivering", template='os.environ.get("MEISA_API_KEY")',
        secret=True),
    Key("MEISA_BASE_URL", "str", "https://api.meisa.io/api/v1", _values.base_url,
        "Meisa's API root: `https://`, or `http://` for localhost or a loopback address",
        notes="For local work point it at the embedded emulator (`flask meisa emulator`),"
              ' e.g. "http://127.0.0.1:8025/api/v1".',
        template='os.environ.get("MEISA_BASE_URL", "https://api.meisa.io/api/v1")'),
    Key("MEISA_ENABLED", "bool", True, _values.flag,
        "`False` turns delivery off: operations are still validated, recorded and signalled,"
        " no call is made and no key is needed; read on every operation",
        resolved=False),
    Key("MEISA_SUPPRESS_SEND", "bool/None", None, _values.optional_flag,
        "`True`: like `MEISA_ENABLED = False`; `None` follows `TESTING`; read on every operation",
        default_note="= `TESTING`", resolved=False),
    Key("MEISA_TIMEOUT", _SECONDS, 10.0, _ABOVE_0, "read timeout of every call to Meisa"),
    Key("MEISA_CONNECT_TIMEOUT", _SECONDS, 3.05, _ABOVE_0,
        "connect timeout (the name lookup included) of every call to Meisa"),
    Key("MEISA_MAX_ATTEMPTS", "int", 5, _values.count(100),
        "attempts of a call made in the caller's thread (`meisa.send`, CLI commands,"
        " `meisa.client`), the first included; background delivery retries until"
        " `MEISA_RETRY_DEADLINE`",
        notes="Only connection errors, timeouts, 5xx and 429 are retried; any other 4xx is"
              " final."),
    Key("MEISA_RETRY_BASE_DELAY", _SECONDS, 0.5, _values.seconds(0),
        "first backoff ceiling; doubles per attempt, with full jitter",
        notes="Background delivery probes a Meisa that looks down (3 failures in a row) at"
              " most once a second, however small this and MEISA_RETRY_MAX_DELAY are."),
    Key("MEISA_RETRY_MAX_DELAY", _SECONDS, 30.0, _values.seconds(0),
        "cap on any one backoff delay and on an honoured `Retry-After`"),
    Key("MEISA_RETRY_DEADLINE", _SECONDS, 600.0, _ABOVE_0,
        "total time a background operation may spend retrying, however many attempts (a"
        " send at most 3000 s: Meisa keeps its idempotency key an hour)",
        notes="An outage or a run of 429s shorter than this (and, for a send, than 3000 s)"
              " loses nothing; past it the operation is reported through delivery_failed (and"
              " kept as a dead letter: flask meisa dead-letters)."),
    Key("MEISA_SEND_DEADLINE", _SECONDS, 10.0, _ABOVE_0,
        "total time a synchronous `meisa.send()` may spend retrying before it raises",
        notes="Keep it well below your WSGI server's worker timeout."),
    Key("MEISA_RATE_LIMIT", "str/None", "60/minute;1000/hour", _values.rate_limit,
        "the key's rate budget, shared by every background call; `None` turns it off",
        notes='Parts separated by ";" or ",", each "<limit>/<unit>" or "<limit> per <unit>",'
              ' with a count of units if need be ("5/10 seconds"); units: second, minute,'
              " hour, day (or s, sec, m, min, h, hr, d). Raise it when Meisa raises your"
              " key's limits."),
    Key("MEISA_SYNC_ON_LOGIN", "bool", True, _values.flag,
        "upsert the user on Flask-Login's `user_logged_in`"),
    Key("MEISA_CUSTOM_FIELDS", "list or dict", (), _values.field_map,
        "user attributes the default mapper sends as `custom_fields`: names (a list, a"
        " comma-separated string or a JSON list), or `{custom field: attribute}`",
        notes="A callable attribute is called; dates become ISO 8601 (UTC), Decimal a"
              ' number, Enum its value. For example ["plan", "signup_date", "last_active",'
              ' "signin_count"].'),
    Key("MEISA_DEFAULT_SOURCE", "str/None", None, _values.source,
        "`source` of the upserts the default mapper makes: `api`, `import`, `manual`,"
        " `signup` or `initial_sync`",
        notes="Meisa keeps the source a contact was created with."),
    Key("MEISA_SUPPRESSION_TTL", _SECONDS, 300.0, _values.seconds(1),
        "how long the suppression set is used before a background refresh",
        notes="The set holds the unsubscribed, bounced and complained addresses."),
    Key("MEISA_SUPPRESSION_PRELOAD", "bool", False, _values.flag,
        "load the suppression set at startup instead of on the first send"),
    Key("MEISA_RELEASE_ON_ERROR", "bool", False, _values.flag,
        "release a request's syncs and events even when its view raised, answered 5xx or"
        " its streamed body raised"),
    Key("MEISA_DELIVERY", "str", "thread", _values.delivery,
        '`"thread"`: a background engine delivers after the response; `"sync"`: every'
        ' operation inline; `"celery"`: Celery workers deliver',
        notes='"sync" is for debugging and scripts. "celery" needs'
              ' pip install "flask-meisa[celery]"; the web process only publishes one task per'
              " operation (see docs/celery.md)."),
    Key("MEISA_QUEUE_SIZE", "int", 10_000, _values.count(10_000_000),
        "live operations that may wait; past it a flooding contact's latest, then the oldest"
        " routine syncs, then automation-lane work are shed (reported through"
        " `delivery_dropped`), never sends or backfill"),
    Key("MEISA_WORKERS", "int", 1, _values.count(32), "delivery threads per process"),
    Key("MEISA_FLUSH_TIMEOUT", _SECONDS, 5.0, _values.seconds(0),
        "how long interpreter exit waits to deliver what is pending"),
    Key("MEISA_RESYNC_AFTER", _SECONDS, 86400.0, _ABOVE_0,
        "after this long Meisa is told a contact's state again, even when nothing changed"),
    Key("MEISA_PRIORITY_FIELDS", "list", ("plan", "subscription_status"), _values.names,
        "custom fields whose change puts an upsert ahead of routine syncs (a list, or a"
        " comma-separated string)"),
    Key("MEISA_ROUTINE_MAX_AGE", _SECONDS, 3600.0, _ABOVE_0,
        "a routine sync waiting longer than this is promoted, so that nothing waits forever"),
    Key("MEISA_OUTBOX", "str/None", f"{INSTANCE_PREFIX}meisa-outbox.sqlite3", _values.outbox,
        "where background work waits for Meisa: a SQLite file every process of the host"
        f' shares (`"{INSTANCE_PREFIX}<name>"` or a relative path: in the instance folder),'
        f' or None (or `"{_values.MEMORY}"`) for each process\'s memory only',
        notes="With the file, the host's processes share one budget and one delivery order,"
              " one of them delivers, and nothing released is lost when a process is killed"
              " or redeployed; operations Meisa refused stay as dead letters (flask meisa"
              " dead-letters). In a container, mount a volume on the instance folder. Use a"
              " local disk: a file on a network filesystem (NFS, SMB, ...) is refused. Only"
              ' for MEISA_DELIVERY = "thread".'),
    Key("MEISA_OUTBOX_BUSY_TIMEOUT", _SECONDS, 1.0, _values.seconds(0),
        "how long an outbox write waits for another process's write; past it the operation"
        " is held in memory (logged)"),
    Key("MEISA_CELERY_APP", "Celery/None", None, _values.celery_app,
        'with `MEISA_DELIVERY = "celery"`: the Celery app that carries the task'
        " `flask_meisa.deliver`",
        notes='Set it, or app.extensions["celery"], before meisa.init_app(app).',
        default_note='= `app.extensions["celery"]`', resolved=False),
    Key("MEISA_CELERY_QUEUE", "str", "meisa", _values.queue_name,
        "with Celery: prefix of the lane queues (`<prefix>.transactional`, `.automation`,"
        " `.routine`, `.backfill`) and of the engine's Redis keys",
        notes="Run workers with -Q meisa.transactional,meisa.automation,meisa.routine,"
              'meisa.backfill (in that order) and broker_transport_options = '
              '{"queue_order_strategy": "priority"}.',
        resolved=False),
    Key("MEISA_CELERY_REDIS_URL", "str/None", None, _values.redis_url,
        "with Celery: the Redis holding the shared budget, coalesced upserts, what Meisa"
        " has of each contact and the pending count",
        default_note="= the broker's URL, when it is Redis", secret=True, resolved=False),
)
# fmt: on

_BY_NAME = {key.name: key for key in KEYS}

#: Every key with its default.
DEFAULTS: dict[str, Any] = {key.name: key.default for key in KEYS}


# -- validation -------------------------------------------------------------------------

#: The parts of a URL that can carry a secret: credentials, then a query or a fragment.
_CREDENTIALS, _QUERY = re.compile(r"(://)[^/@\s]*@"), re.compile(r"([?#])[^'\"]*")
#: The keys that turn delivery on and off, read on every operation.
_SWITCHES = ("MEISA_ENABLED", "MEISA_SUPPRESS_SEND")


def _shown(key: Key, value: object) -> str:
    """A refused value's type, and the value unless secret, long or not a plain scalar
    (a URL's credentials, query and fragment, and key-shaped words, masked)."""
    kind = type(value).__name__
    if value is None:
        return "None"
    if key.secret:
        return f"{kind} (value not shown)"
    if not isinstance(value, str | int | float):
        return kind
    text = _KEY_SHAPE.sub("[redacted]", repr(value))  # the key, set under another name
    if "://" in text:
        text = _QUERY.sub(r"\1***", _CREDENTIALS.sub(r"\1***@", text))
    return f"{kind} {text if len(text) <= 80 else text[:77] + '...'}"


def resolve_keys(config: Mapping[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """The parsed values of the keys ``names`` (a missing key takes its default).

    :raises ConfigurationError: one, listing every invalid key (and an unset
        ``MEISA_API_KEY`` among ``names`` while delivering).
    """
    values: dict[str, Any] = {}
    problems: list[str] = []
    for key in map(_BY_NAME.__getitem__, names):
        raw = config.get(key.name, key.default)
        # How the environment says None, for a key that takes it (the API key: unset).
        if isinstance(raw, str) and (key.type.endswith("/None") or key.default is None):
            raw = None if raw.strip().lower() in ("none", "null") else raw
        try:
            _values.unquoted(raw)
            values[key.name] = key.parse(raw)
        except _values.InvalidValue as error:
            problems.append(f"{key.name} {error}, got {_shown(key, raw)}")
    known = values.keys() >= {"MEISA_API_KEY", *_SWITCHES}
    if known and values["MEISA_API_KEY"] is None and is_delivering(config):
        problems.append(
            "MEISA_API_KEY is not set: set it to your Meisa API key, or turn delivery off"
            " (MEISA_ENABLED = False; under TESTING it is off unless MEISA_SUPPRESS_SEND ="
            " False)"
        )
    if problems:
        count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        lines = "".join(f"\n  - {problem}" for problem in problems)
        raise ConfigurationError(
            f"invalid Meisa configuration ({count}; `flask meisa config-template` describes"
            f" every key):{lines}"
        )
    return values


def is_delivering(config: Mapping[str, Any]) -> bool:
    """Whether operations are delivered now: ``MEISA_ENABLED`` and not
    ``MEISA_SUPPRESS_SEND`` (``TESTING`` while ``None``); a non-boolean raises."""
    switches = resolve_keys(config, _SWITCHES)
    suppress = switches["MEISA_SUPPRESS_SEND"]
    if suppress is None:  # TESTING as the environment gives it: "false" or "0" is False
        try:
            suppress = _values.flag(config.get("TESTING") or False)
        except _values.InvalidValue:
            suppress = bool(config.get("TESTING"))  # as Flask reads it
    return bool(switches["MEISA_ENABLED"]) and not suppress


def _warn_unknown_keys(config: Mapping[str, Any]) -> None:
    for name in config:
        upper = name.upper() if isinstance(name, str) else ""
        if upper.startswith("MEISA_") and name not in _BY_NAME:
            close = difflib.get_close_matches(upper, _BY_NAME, n=1)
            hint = f"did you mean {close[0]}?" if close else "see `flask meisa config-template`"
            logger.warning("flask-meisa: %s is not a Meisa setting and is ignored; %s", name, hint)


@dataclass(frozen=True)
class MeisaSettings:
    """The resolved, validated ``MEISA_*`` settings of one app (one attribute per key of
    :data:`KEYS` that is read once; see :attr:`Key.attribute`)."""

    api_key: str | None
    base_url: str
    timeout: float
    connect_timeout: float
    max_attempts: int
    retry_base_delay: float
    retry_max_delay: float
    retry_deadline: float
    send_deadline: float
    rate_limit: str | None
    sync_on_login: bool
    custom_fields: dict[str, str]
    default_source: str | None
    suppression_ttl: float
    suppression_preload: bool
    release_on_error: bool
    delivery: str
    queue_size: int
    workers: int
    flush_timeout: float
    resync_after: float
    priority_fields: tuple[str, ...]
    routine_max_age: float
    outbox: str | None
    outbox_busy_timeout: float

    @property
    def call_timeout(self) -> float:
        """The longest one call to Meisa takes: connecting, then reading its answer."""
        return self.connect_timeout + self.timeout

    def __repr__(self) -> str:
        # The key never appears in a repr: at most its last four characters.
        key = repr(_values.key_tail(self.api_key)) if self.api_key else "None"
        shown = f"base_url={self.base_url!r}, api_key={key}, delivery={self.delivery!r}"
        return f"MeisaSettings({shown})"

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> MeisaSettings:
        """Validate every key of ``config`` (a missing key takes its default) into
        settings, and warn about each ``MEISA_*`` key that is no setting (a misspelling).

        :raises ConfigurationError: one, naming every invalid key, the type of its value
            and what is allowed.
        """
        _warn_unknown_keys(config)
        values = resolve_keys(config, _BY_NAME)
        settings = {key.attribute: values[key.name] for key in KEYS if key.resolved}
        if settings["delivery"] != "thread":
            settings["outbox"] = None  # only background delivery has a store
        return cls(**settings)


# -- documentation ---------------------------------------------------------------------


def _literal(value: Any) -> str:
    """``value`` as Python source, in the project's style (double quotes, 10_000)."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, tuple):
        return f"({', '.join(map(_literal, value))}{',' if len(value) == 1 else ''})"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 10_000:
        return f"{value:_}"
    return repr(value)


def _default_text(key: Key) -> str:
    note = f" ({key.default_note})" if key.default_note else ""
    return f"`{_literal(key.default)}`{note}"


_TEMPLATE_HEADER = """\
# flask-meisa configuration: every MEISA_* key with its type, default and meaning.
#
# Copy the keys you need into your Flask config (config.py, app.config.from_mapping, ...).
# Set them before meisa.init_app(app): it reads them once and refuses invalid values, all
# of them in one error; MEISA_ENABLED and MEISA_SUPPRESS_SEND are read on every operation.
# Values read from the environment arrive as strings, and are accepted: "true"/"false",
# "yes"/"no", "on"/"off" or "1"/"0" for a bool, "2.5" for a number, "a, b" or a JSON list
# for a list, "none" or "null" for None (a key of type .../None). A value in quotes (an env
# file's, kept by docker --env-file) is refused.
# `flask meisa config-template` prints this file.
import os
"""


def config_template() -> str:
    """The configuration template (``flask meisa config-template``): a Python config
    file assigning every key its default, each under a comment saying what it is."""
    parts = [_TEMPLATE_HEADER]
    for key in KEYS:
        meaning = key.meaning.replace("`", "")
        text = f"{key.type}, default {_default_text(key)}. {meaning[0].upper()}{meaning[1:]}."
        text = f"{text} {key.notes}".replace("`", "").strip()
        lines = textwrap.wrap(text, width=89, break_long_words=False, break_on_hyphens=False)
        comment = "".join(f"# {line}\n" for line in lines)
        parts.append(f"{comment}{key.name} = {key.template or _literal(key.default)}\n")
    return "\n".join(parts)


def markdown_table() -> str:
    """The README's table of keys: key, type, default, meaning."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    rows += [
        f"| `{key.name}` | {key.type} | {_default_text(key)} | {key.meaning} |" for key in KEYS
    ]
    return "\n".join(rows) + "\n"
