"""Registration and configuration of the extension."""

from __future__ import annotations

import dataclasses
import logging
import threading
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from flask import Blueprint
from flask import Flask
from flask import current_app

from flask_meisa import ConfigurationError
from flask_meisa import Meisa
from flask_meisa import ValidationError
from flask_meisa.config import DEFAULTS
from flask_meisa.config import KEYS
from flask_meisa.config import MeisaSettings
from flask_meisa.testing import emulator_config
from flask_meisa.testing import record_operations

KEY = "meisa_live_0123456789abcdefSECRET"


def make_app(**config: Any) -> Flask:
    app = Flask(__name__)
    app.config.update({"MEISA_API_KEY": KEY, **config})
    return app


def test_init_app_registers_the_instance_and_sets_every_default() -> None:
    app = make_app()
    meisa = Meisa()
    meisa.init_app(app)
    assert app.extensions["meisa"] is meisa
    for key, default in DEFAULTS.items():
        if key != "MEISA_API_KEY":
            assert app.config[key] == default
    assert app.config["MEISA_RATE_LIMIT"] == "60/minute;1000/hour"


def test_constructor_with_app_calls_init_app() -> None:
    app = make_app()
    meisa = Meisa(app)
    assert app.extensions["meisa"] is meisa


def test_second_init_app_on_the_same_app_is_an_error() -> None:
    app = make_app()
    Meisa(app)
    with pytest.raises(RuntimeError, match="already been registered"):
        Meisa(app)
    with pytest.raises(RuntimeError, match="already been registered"):
        app.extensions["meisa"].init_app(app)


def test_one_instance_serves_two_apps_with_their_own_settings() -> None:
    meisa = Meisa()
    first, second = make_app(MEISA_TIMEOUT=1.0), make_app(MEISA_TIMEOUT=2.0)
    meisa.init_app(first)
    meisa.init_app(second)
    assert meisa.state(first).settings.timeout == 1.0
    assert meisa.state(second).settings.timeout == 2.0
    with second.app_context():
        assert meisa.client.timeout[1] == 2.0


def refusal(**config: Any) -> str:
    """The text of the error init_app raises for ``config``."""
    return refusal_of(make_app(**config))


def refusal_of(app: Flask) -> str:
    """The text of the error init_app raises for ``app``."""
    with pytest.raises(ConfigurationError) as caught:
        Meisa(app)
    assert "meisa" not in app.extensions
    return str(caught.value)


def test_a_celery_extension_that_is_no_celery_app_is_named_in_the_refusal() -> None:
    pytest.importorskip("flask_meisa._engine.celery_setup")  # the "celery" extra
    app = make_app(MEISA_DELIVERY="celery")
    app.extensions["celery"] = object()  # another extension's object under that name
    text = refusal_of(app)
    assert 'app.extensions["celery"] must be a celery.Celery instance' in text


def test_missing_api_key_is_a_clear_error_while_delivering() -> None:
    app = Flask(__name__)
    with pytest.raises(ConfigurationError, match="MEISA_API_KEY is not set") as caught:
        Meisa(app)
    assert "MEISA_ENABLED = False" in str(caught.value)
    assert "meisa" not in app.extensions


def test_disabled_needs_no_key_and_records_without_delivering() -> None:
    app = Flask(__name__)
    app.config["MEISA_ENABLED"] = False
    meisa = Meisa(app)
    with app.app_context(), record_operations() as recorded:
        meisa.upsert({"email": "ada@example.com"})
        result = meisa.send("welcome", "ada@example.com")
    assert [op.kind for op in recorded] == ["upsert", "send"]
    assert result.status == "disabled"
    assert result.reason == "delivery_suppressed"


def test_under_testing_no_key_is_needed_unless_delivery_is_forced_on() -> None:
    app = Flask(__name__)
    app.config["TESTING"] = True
    meisa = Meisa(app)
    assert not meisa.state(app).delivering()
    with app.app_context():
        assert meisa.send("welcome", "ada@example.com").status == "disabled"
    forced = Flask(__name__)
    forced.config.update(TESTING=True, MEISA_SUPPRESS_SEND=False)
    with pytest.raises(ConfigurationError, match="MEISA_API_KEY is not set"):
        Meisa(forced)


def test_testing_suppresses_delivery_by_default_and_is_read_lazily() -> None:
    app = make_app(MEISA_BASE_URL="http://127.0.0.1:9/api/v1")
    meisa = Meisa(app)
    with app.app_context():
        seen = [meisa.delivering]
        app.config["TESTING"] = True  # set after init_app: still honoured
        seen.append(meisa.delivering)
        app.config["MEISA_SUPPRESS_SEND"] = False
        seen.append(meisa.delivering)
    assert seen == [True, False, True]


def test_enabled_false_read_from_the_environment_sends_nothing(emulator: Any) -> None:
    # os.environ.get("MEISA_ENABLED") gives the string "false": it must mean False.
    app = Flask(__name__)
    app.config.update(emulator_config(emulator, MEISA_ENABLED="false"))
    meisa = Meisa(app)
    with app.app_context():
        result = meisa.send("verification_code", "ada@example.com", variables={"code": "1"})
    assert result.status == "disabled"
    assert emulator.sends() == []
    app.config["MEISA_ENABLED"] = " Yes "  # read on every operation, through the same parser
    with app.app_context():
        result = meisa.send("verification_code", "ada@example.com", variables={"code": "2"})
    assert result.status == "sent"
    assert len(emulator.sends()) == 1
    app.config["MEISA_SUPPRESS_SEND"] = "on"
    assert not meisa.state(app).delivering()
    app.config["MEISA_SUPPRESS_SEND"] = "sometimes"
    with pytest.raises(ConfigurationError, match="MEISA_SUPPRESS_SEND must be None, True or"):
        meisa.state(app).delivering()


@pytest.mark.parametrize("word", ["false", "0", " No ", ""])
def test_testing_false_read_from_the_environment_delivers(emulator: Any, word: str) -> None:
    # app.config.from_mapping(os.environ) gives TESTING the string "false": a production
    # app so configured must not have every send answer "disabled".
    app = Flask(__name__)
    app.config.update(emulator_config(emulator, TESTING=word, MEISA_SUPPRESS_SEND=None))
    meisa = Meisa(app)
    with app.app_context():
        result = meisa.send("verification_code", "ada@example.com", variables={"code": "1"})
    assert result.status == "sent"
    assert len(emulator.sends()) == 1


@pytest.mark.parametrize("word", [True, "true", "True", " yes ", "1", "ON"])
def test_boolean_keys_take_true_words(word: Any) -> None:
    app = make_app(MEISA_SYNC_ON_LOGIN=word, MEISA_ENABLED=word)
    assert Meisa(app).state(app).settings.sync_on_login is True


@pytest.mark.parametrize("word", [False, "false", "FALSE", " no", "0", "off"])
def test_boolean_keys_take_false_words(word: Any) -> None:
    app = make_app(MEISA_SYNC_ON_LOGIN=word, MEISA_ENABLED=word)
    meisa = Meisa(app)
    assert meisa.state(app).settings.sync_on_login is False
    assert not meisa.state(app).delivering()


@pytest.mark.parametrize("value", [2, -1, "", "y", "enabled", None, 1.0, [True]])
def test_boolean_keys_refuse_anything_else(value: Any) -> None:
    text = refusal(MEISA_ENABLED=value)
    assert 'MEISA_ENABLED must be True or False (or 1/0, or a string "true"/"false"' in text
    assert f"got {type(value).__name__}" in text or (value is None and "got None" in text)


@pytest.mark.parametrize(("word", "on"), [("1", True), ("0", False), ("true", True)])
def test_booleans_read_by_from_prefixed_env_are_taken(
    word: str, on: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Flask's from_prefixed_env() reads each variable as JSON: "1" arrives as the int 1.
    for name in ("MEISA_ENABLED", "MEISA_SYNC_ON_LOGIN", "MEISA_RELEASE_ON_ERROR"):
        monkeypatch.setenv(f"FLASK_{name}", word)
    monkeypatch.setenv("FLASK_MEISA_SUPPRESS_SEND", "0" if on else "1")
    app = make_app()
    app.config.from_prefixed_env()
    meisa = Meisa(app)
    settings = meisa.state(app).settings
    assert (settings.sync_on_login, settings.release_on_error) == (on, on)
    assert meisa.state(app).delivering() is on


def test_numbers_and_lists_may_be_strings_as_read_from_the_environment() -> None:
    app = make_app(
        MEISA_TIMEOUT=" 2.5 ",
        MEISA_RETRY_DEADLINE="60",
        MEISA_MAX_ATTEMPTS="3",
        MEISA_QUEUE_SIZE=500.0,
        MEISA_CUSTOM_FIELDS="plan, signup_date,",
        MEISA_PRIORITY_FIELDS="plan,seats",
        MEISA_DELIVERY=" Sync ",
    )
    settings = Meisa(app).state(app).settings
    assert settings.timeout == 2.5
    assert settings.retry_deadline == 60.0
    assert settings.max_attempts == 3
    assert settings.queue_size == 500
    assert settings.custom_fields == {"plan": "plan", "signup_date": "signup_date"}
    assert settings.priority_fields == ("plan", "seats")
    assert settings.delivery == "sync"


@pytest.mark.parametrize(
    ("value", "fields"),
    [
        (' ["plan", "signup_date"] ', {"plan": "plan", "signup_date": "signup_date"}),
        ('{"Plan name": "plan"}', {"Plan name": "plan"}),
    ],
)
def test_custom_fields_may_be_json_as_an_environment_variable_holds_it(
    value: str, fields: dict[str, str]
) -> None:
    app = make_app(MEISA_CUSTOM_FIELDS=value, MEISA_PRIORITY_FIELDS='["plan", "seats"]')
    settings = Meisa(app).state(app).settings
    assert settings.custom_fields == fields
    assert settings.priority_fields == ("plan", "seats")


@pytest.mark.parametrize("word", ["None", " none ", "NULL"])
def test_keys_that_take_none_take_the_environments_word_for_it(word: str) -> None:
    app = make_app(MEISA_RATE_LIMIT=word, MEISA_OUTBOX=word, MEISA_DEFAULT_SOURCE=word)
    settings = Meisa(app).state(app).settings
    assert (settings.rate_limit, settings.outbox, settings.default_source) == (None, None, None)
    assert "must be a" in refusal(MEISA_TIMEOUT=word)  # a key that takes no None refuses it


@pytest.mark.parametrize("word", ["None", " none ", "NULL"])
def test_an_api_key_that_is_the_environments_word_for_none_is_not_set(word: str) -> None:
    # MEISA_API_KEY=None in an env file: said at init_app, not by a 401 on every call and
    # a dead letter of every sync.
    assert "MEISA_API_KEY is not set" in refusal(MEISA_API_KEY=word)


def test_the_new_keys_default_and_resolve() -> None:
    app = make_app()
    settings = Meisa(app).state(app).settings
    assert settings.resync_after == 86400.0
    assert settings.priority_fields == ("plan", "subscription_status")
    assert settings.routine_max_age == 3600.0
    app = make_app(
        MEISA_RESYNC_AFTER=3600, MEISA_PRIORITY_FIELDS=["seats"], MEISA_ROUTINE_MAX_AGE="90"
    )
    settings = Meisa(app).state(app).settings
    assert (settings.resync_after, settings.priority_fields) == (3600.0, ("seats",))
    assert settings.routine_max_age == 90.0


#: (key, value, what the error must say). Each was accepted by init_app once, or refused
#: without saying what is allowed.
REFUSED = [
    ("MEISA_BASE_URL", "http://api.meisa.io/api/v1", "must use https://"),
    ("MEISA_BASE_URL", "http://10.0.0.5/api/v1", "only for localhost or a loopback"),
    ("MEISA_BASE_URL", "https:///api/v1", "must name a host"),
    ("MEISA_BASE_URL", "https://api.meisa.io/api/v1?key=1", "must not have a query"),
    ("MEISA_BASE_URL", "https://api.meisa.io/api/v1#top", "or a fragment"),
    ("MEISA_BASE_URL", "ftp://api.meisa.io/api/v1", "must be an https:// URL"),
    ("MEISA_BASE_URL", "api.meisa.io/api/v1", "must be an https:// URL"),
    ("MEISA_BASE_URL", "", "must be the API's URL"),
    ("MEISA_TIMEOUT", float("inf"), "must be a finite number of seconds > 0"),
    ("MEISA_TIMEOUT", "ten", "must be a finite number of seconds > 0"),
    ("MEISA_TIMEOUT", 0, "must be a finite number of seconds > 0"),
    ("MEISA_TIMEOUT", 1e300, "must be at most"),
    ("MEISA_CONNECT_TIMEOUT", True, "must be a finite number of seconds > 0"),
    ("MEISA_RETRY_DEADLINE", 0, "must be a finite number of seconds > 0"),
    ("MEISA_SEND_DEADLINE", -1.0, "must be a finite number of seconds > 0"),
    ("MEISA_FLUSH_TIMEOUT", float("nan"), "must be a finite number of seconds >= 0"),
    ("MEISA_FLUSH_TIMEOUT", "nan", "must be a finite number of seconds >= 0"),
    ("MEISA_SUPPRESSION_TTL", 0.5, "must be a finite number of seconds >= 1"),
    ("MEISA_MAX_ATTEMPTS", 0, "must be a whole number from 1 to"),
    ("MEISA_QUEUE_SIZE", 2.5, "must be a whole number from 1 to"),
    ("MEISA_QUEUE_SIZE", 0, "must be a whole number from 1 to"),
    ("MEISA_WORKERS", "two", "must be a whole number from 1 to"),
    ("MEISA_WORKERS", 0, "must be a whole number from 1 to"),
    ("MEISA_WORKERS", True, "must be a whole number from 1 to"),
    ("MEISA_WORKERS", "1e308", "must be a whole number from 1 to 32"),
    ("MEISA_MAX_ATTEMPTS", 101, "must be a whole number from 1 to 100"),
    ("MEISA_QUEUE_SIZE", 10**400, "must be a whole number from 1 to 10_000_000"),
    ("MEISA_FLUSH_TIMEOUT", -1, "must be a finite number of seconds >= 0"),
    ("MEISA_ENABLED", "false-ish", "must be True or False"),
    ("MEISA_SUPPRESS_SEND", 2, "must be None, True or False"),
    ("MEISA_DELIVERY", "carrier-pigeon", 'must be one of "thread", "sync", "celery"'),
    ("MEISA_CUSTOM_FIELDS", 7, "must be a list of attribute names"),
    ("MEISA_CUSTOM_FIELDS", {"plan": ""}, "must map each custom field to a user attribute"),
    ("MEISA_CUSTOM_FIELDS", ["plan", ""], "must be a list of attribute names"),
    ("MEISA_CUSTOM_FIELDS", {"": "plan"}, "must have custom field names"),
    ("MEISA_CUSTOM_FIELDS", {3: "plan"}, "must have custom field names"),
    ("MEISA_CUSTOM_FIELDS", {"plan": 3}, "must map each custom field to a user attribute"),
    ("MEISA_CUSTOM_FIELDS", "plan seats", "must name user attributes"),
    ("MEISA_CUSTOM_FIELDS", {"plan": "the plan"}, "must name user attributes"),
    ("MEISA_CUSTOM_FIELDS", '["plan", "seats"', "must be valid JSON"),
    # The None of other keys: every user's sync would fail for want of a user.none.
    ("MEISA_CUSTOM_FIELDS", "none", "for none, leave it unset or empty"),
    ("MEISA_CUSTOM_FIELDS", "NULL", "for none, leave it unset or empty"),
    ("MEISA_CUSTOM_FIELDS", "plan, false", "for none, leave it unset or empty"),
    ("MEISA_PRIORITY_FIELDS", "[plan]", "must be valid JSON"),
    ("MEISA_BASE_URL", 5, "must be the API's URL"),
    ("MEISA_TIMEOUT", [5], "must be a finite number of seconds > 0"),
    ("MEISA_OUTBOX", "  ", "must be a SQLite file path"),
    ("MEISA_OUTBOX", 5, "must be a SQLite file path"),
    ("MEISA_OUTBOX", "instance: ", 'names no file: give "instance:<file name>"'),
    ("MEISA_OUTBOX", "false", 'for memory only, set None or "memory"'),
    ("MEISA_OUTBOX", "0", "for the default file, leave it unset"),
    ("MEISA_CELERY_QUEUE", " ", "must be a queue name without spaces"),
    ("MEISA_CELERY_REDIS_URL", "redis", "must be a redis://"),
    ("MEISA_PRIORITY_FIELDS", {"plan": "plan"}, "must be a list of names"),
    ("MEISA_PRIORITY_FIELDS", ["plan", 3], "must hold names only"),
    ("MEISA_RESYNC_AFTER", 0, "must be a finite number of seconds > 0"),
    ("MEISA_ROUTINE_MAX_AGE", "-5", "must be a finite number of seconds > 0"),
    ("MEISA_RATE_LIMIT", "", 'must be a budget such as "60/minute;1000/hour", or None'),
    ("MEISA_RATE_LIMIT", "lots/minute", "invalid rate limit"),
    ("MEISA_RATE_LIMIT", "60/fortnight", "invalid rate limit"),
    ("MEISA_RATE_LIMIT", 60, 'must be a budget such as "60/minute;1000/hour", or None'),
    ("MEISA_DEFAULT_SOURCE", "website", 'must be None or one of "api"'),
    ("MEISA_API_KEY", 123, "must be a string"),
    ("MEISA_CELERY_QUEUE", "two words", "must be a queue name without spaces"),
    ("MEISA_CELERY_REDIS_URL", "http://127.0.0.1:6379", "must be a redis://"),
    ("MEISA_CELERY_REDIS_URL", "unix:/tmp/redis.sock", "must be a redis://"),
    ("MEISA_CELERY_APP", "celery", "must be a celery.Celery instance"),
]


@pytest.mark.parametrize(("key", "value", "rule"), REFUSED)
def test_invalid_settings_are_refused_at_init_saying_what_is_allowed(
    key: str, value: Any, rule: str
) -> None:
    text = refusal(**{key: value})
    assert f"  - {key} " in text
    assert rule in text
    kind = type(value).__name__
    assert f"got {kind}" in text
    if key not in ("MEISA_API_KEY", "MEISA_CELERY_REDIS_URL") and isinstance(value, str):
        shown = repr(value).replace("?key=1", "?***").replace("#top", "#***")
        assert text.count(shown) == 1  # not a secret: shown once, by the caller, to find it by


@pytest.mark.parametrize(
    "key",
    [
        "meisa_live_0123456789\nabcdefSECRET",  # a line break pasted in
        "meisa_live_0123456789\tabcdefSECRET",
        "meisa_live_0123456789 abcdefSECRET",
        "meisa_live_0123456789\x00abcdefSECRET",
        "meisa_live_0123456789\u200babcdefSECRET",
        "meisa_live_0123456789\u00e9abcdefSECRET",  # printable, but not ASCII
    ],
)
def test_an_api_key_with_a_space_control_or_non_ascii_char_is_refused_unseen(key: str) -> None:
    text = refusal(MEISA_API_KEY=key)
    assert "MEISA_API_KEY must be the key alone" in text
    assert "got str (value not shown)" in text
    for part in key.split(key[21]):
        assert part not in text
        assert part[-5:] not in text


def test_surrounding_whitespace_of_the_key_is_dropped() -> None:
    app = make_app(MEISA_API_KEY=f"  {KEY}\n")
    assert Meisa(app).state(app).settings.api_key == KEY


def test_a_blank_api_key_counts_as_unset() -> None:
    assert "MEISA_API_KEY is not set" in refusal(MEISA_API_KEY="  \n")


@pytest.mark.parametrize(
    ("url", "taken"),
    [
        ("http://localhost:8080/api/v1/", "http://localhost:8080/api/v1"),
        ("http://127.0.0.1:8080/api/v1", "http://127.0.0.1:8080/api/v1"),
        ("http://[::1]/api/v1", "http://[::1]/api/v1"),
        # The store's target compares base URLs: the same Meisa whatever the host's case.
        (" HTTP://LocalHost:9/API/v1/ ", "http://localhost:9/API/v1"),
    ],
)
def test_plain_http_is_taken_for_localhost_the_host_in_lower_case(url: str, taken: str) -> None:
    app = make_app(MEISA_BASE_URL=url)
    assert Meisa(app).state(app).settings.base_url == taken


def test_custom_fields_may_map_each_field_to_another_attribute() -> None:
    app = make_app(MEISA_CUSTOM_FIELDS={" plan ": " subscription_plan "})
    assert Meisa(app).state(app).settings.custom_fields == {"plan": "subscription_plan"}


def test_a_default_source_is_taken_without_surrounding_whitespace() -> None:
    app = make_app(MEISA_DEFAULT_SOURCE=" signup ")
    assert Meisa(app).state(app).settings.default_source == "signup"


def test_the_bounds_of_durations_are_allowed() -> None:
    top = threading.TIMEOUT_MAX
    app = make_app(MEISA_FLUSH_TIMEOUT=0, MEISA_SUPPRESSION_TTL="1", MEISA_TIMEOUT=top)
    settings = Meisa(app).state(app).settings
    assert (settings.flush_timeout, settings.suppression_ttl, settings.timeout) == (0.0, 1.0, top)


@pytest.mark.parametrize(
    ("value", "path"),
    [
        (" /var/lib/app/outbox.sqlite3 ", "/var/lib/app/outbox.sqlite3"),
        (Path("/var/lib/app/outbox.sqlite3"), "/var/lib/app/outbox.sqlite3"),
        ("instance:outbox.sqlite3", "instance:outbox.sqlite3"),
    ],
)
def test_an_outbox_is_a_path_string_or_path_object(value: Any, path: str) -> None:
    values = {**DEFAULTS, "MEISA_OUTBOX": value, "MEISA_API_KEY": "meisa_live_" + "k" * 20}
    assert MeisaSettings.from_config(values).outbox == path


def test_a_url_is_shown_without_its_credentials_query_or_fragment() -> None:
    text = refusal(MEISA_BASE_URL="https://ada:hunter2secret@api.meisa.io/api/v1")
    assert "MEISA_BASE_URL must not hold a user name or password" in text
    assert "hunter2" not in text and "ada:" not in text
    assert "https://***@api.meisa.io/api/v1" in text
    text = refusal(MEISA_BASE_URL="https://ada@api.meisa.io/api/v1")  # a user name alone
    assert "MEISA_BASE_URL must not hold a user name or password" in text
    text = refusal(MEISA_BASE_URL=f"http://api.meisa.io/api/v1?api_key={KEY}")
    assert "'http://api.meisa.io/api/v1?***'" in text
    text = refusal(MEISA_CELERY_REDIS_URL="http://:hunter2secret@cache:6379/0")
    assert "hunter2" not in text and "got str (value not shown)" in text


def test_a_key_given_to_another_key_is_not_shown() -> None:
    # Two environment variables swapped, or the key pasted into the wrong one.
    key = "meisa_live_" + "Sw4pped" * 4
    text = refusal(MEISA_API_KEY=None, MEISA_BASE_URL=key, MEISA_RATE_LIMIT=f"60/minute;{key}")
    assert "MEISA_BASE_URL must be an https:// URL" in text
    assert "got str '[redacted]'" in text and "got str '60/minute;[redacted]'" in text
    assert key[-5:] not in text and key[11:23] not in text


def test_a_key_in_quotes_is_refused_at_init() -> None:
    # Docker's --env-file and some .env loaders keep MEISA_API_KEY="..."'s quotes: every
    # call would then be refused (401), the first one long after the deploy.
    text = refusal(MEISA_API_KEY=f'"{KEY}"')
    assert "MEISA_API_KEY must be the value alone: without quotes around it" in text
    assert KEY[-5:] not in text


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MEISA_OUTBOX", '"instance:meisa.db"'),  # else a file named with the quotes
        ("MEISA_CELERY_QUEUE", "'meisa'"),  # else a queue no worker consumes
        ("MEISA_DEFAULT_SOURCE", ' "signup" '),
        ("MEISA_ENABLED", '"false"'),
    ],
)
def test_any_value_in_an_env_files_quotes_is_refused_at_init(name: str, value: str) -> None:
    text = refusal(**{name: value})
    assert f"{name} must be the value alone: without quotes around it" in text


def test_a_rate_limit_past_what_delivery_can_count_is_refused_at_init() -> None:
    text = refusal(MEISA_RATE_LIMIT=f"60/minute;1{'0' * 400}/hour")
    assert "MEISA_RATE_LIMIT must be a budget" in text
    assert "(part 2): at most 1_000_000_000 calls in at most" in text


def test_every_problem_is_listed_in_one_error() -> None:
    text = refusal(
        MEISA_API_KEY="meisa_live_0123456789 abcdefSECRET",
        MEISA_BASE_URL="http://api.example.com/api/v1",
        MEISA_TIMEOUT=float("inf"),
        MEISA_RETRY_DEADLINE=0,
        MEISA_FLUSH_TIMEOUT=float("nan"),
        MEISA_ENABLED="sure",
    )
    lines = text.splitlines()
    assert lines[0].startswith("invalid Meisa configuration (6 problems;")
    assert "flask meisa config-template" in lines[0]
    assert [line.split()[1] for line in lines[1:]] == [
        "MEISA_API_KEY",
        "MEISA_BASE_URL",
        "MEISA_ENABLED",
        "MEISA_TIMEOUT",
        "MEISA_RETRY_DEADLINE",
        "MEISA_FLUSH_TIMEOUT",
    ]
    assert "got float inf" in text and "got float nan" in text and "got int 0" in text
    assert "abcdefSECRET" not in text


def test_the_store_belongs_to_background_delivery_only() -> None:
    # The default MEISA_OUTBOX names a file; other deliveries have no store and ignore it.
    for delivery in ("sync", "celery"):
        config = {"MEISA_DELIVERY": delivery, "MEISA_OUTBOX": "outbox.sqlite3"}
        values = {**DEFAULTS, **config, "MEISA_API_KEY": "meisa_live_" + "k" * 20}
        assert MeisaSettings.from_config(values).outbox is None
    for memory in (None, "memory", " Memory "):
        values = {**DEFAULTS, "MEISA_OUTBOX": memory, "MEISA_API_KEY": "meisa_live_" + "k" * 20}
        assert MeisaSettings.from_config(values).outbox is None
    assert 'for memory only, set None or "memory"' in refusal(MEISA_OUTBOX=":memory:")


def test_a_misspelt_key_logs_one_warning_naming_the_closest_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = make_app(MEISA_RATELIMIT="5/second", MEISA_SEND_DEADLNE=3, MEISA_ZZZ=1)
    with caplog.at_level(logging.WARNING, logger="flask_meisa"):
        meisa = Meisa(app)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "flask-meisa: MEISA_RATELIMIT is not a Meisa setting and is ignored;"
        " did you mean MEISA_RATE_LIMIT?",
        "flask-meisa: MEISA_SEND_DEADLNE is not a Meisa setting and is ignored;"
        " did you mean MEISA_SEND_DEADLINE?",
        "flask-meisa: MEISA_ZZZ is not a Meisa setting and is ignored;"
        " see `flask meisa config-template`",
    ]
    settings = meisa.state(app).settings
    assert (settings.rate_limit, settings.send_deadline) == ("60/minute;1000/hour", 10.0)


def test_known_keys_log_no_warning(caplog: pytest.LogCaptureFixture) -> None:
    app = make_app(**{key: default for key, default in DEFAULTS.items() if key != "MEISA_API_KEY"})
    with caplog.at_level(logging.WARNING, logger="flask_meisa"):
        Meisa(app)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_the_settings_carry_every_key_that_is_read_once() -> None:
    fields = [field.name for field in dataclasses.fields(MeisaSettings)]
    assert fields == [key.attribute for key in KEYS if key.resolved]
    read_elsewhere = {key.name for key in KEYS if not key.resolved}
    assert read_elsewhere == {
        "MEISA_ENABLED",
        "MEISA_SUPPRESS_SEND",
        "MEISA_CELERY_APP",
        "MEISA_CELERY_QUEUE",
        "MEISA_CELERY_REDIS_URL",
    }


def test_the_key_never_appears_in_reprs() -> None:
    app = make_app()
    meisa = Meisa(app)
    state = meisa.state(app)
    for text in (repr(meisa), repr(state.settings), repr(state.client)):
        assert KEY not in text
        assert KEY[:-4] not in text


def test_a_short_key_shows_no_tail_in_any_repr() -> None:
    # Four characters of a short key are a large part of it: the client shows none.
    app = make_app(MEISA_API_KEY="short-key")
    state = Meisa(app).state(app)
    for text in (repr(state.settings), repr(state.client)):
        assert "-key" not in text and "'…'" in text


def test_calls_outside_an_app_context_say_what_is_missing() -> None:
    meisa = Meisa(make_app())
    with pytest.raises(RuntimeError, match="needs an application context"):
        meisa.upsert({"email": "ada@example.com"})


def test_calls_on_an_unregistered_app_say_so() -> None:
    meisa = Meisa(make_app())
    other = make_app()
    with other.app_context(), pytest.raises(RuntimeError, match="not registered"):
        meisa.flush()


def test_the_app_may_be_given_as_current_app_but_must_be_an_app() -> None:
    app = make_app()
    meisa = Meisa(app)
    with app.app_context():
        assert meisa.state(current_app) is meisa.state(app)
        with pytest.raises(ValidationError, match=r"^app: must be a Flask app, not str$"):
            meisa.state("app")  # type: ignore[arg-type]
        assert meisa.close(current_app, timeout=0) == 0


def test_init_app_takes_current_app_as_the_app_behind_it() -> None:
    # A factory's "with app.app_context(): meisa.init_app(current_app)": the proxy itself
    # cannot be held weakly (TypeError, after the app's state was made).
    app = make_app(TESTING=True)
    meisa = Meisa()
    with app.app_context():
        meisa.init_app(current_app)
    assert app.extensions["meisa"] is meisa
    with app.app_context(), record_operations(app) as operations:
        meisa.track("exported_report", email="ada@example.com")
    assert [operation.kind for operation in operations] == ["track"]


@pytest.mark.parametrize("not_an_app", [None, "app", Blueprint("reports", __name__)])
def test_init_app_refuses_what_is_no_app_in_one_clear_error(not_an_app: Any) -> None:
    with pytest.raises(ValidationError, match=r"^app: must be a Flask app, not \w+$"):
        Meisa().init_app(not_an_app)


def test_current_app_given_outside_an_app_context_asks_for_one() -> None:
    # Not "must be a Flask app, not LocalProxy": current_app is one, once in a context.
    meisa = Meisa(make_app())
    with pytest.raises(RuntimeError, match="needs an application context"):
        meisa.state(current_app)
    with pytest.raises(RuntimeError, match="needs an application context"):
        meisa.close(current_app, timeout=0)


def test_a_wait_of_any_real_number_of_seconds_is_taken() -> None:
    # As before the check: an exact fraction, or a whole number past what a float holds
    # (no limit, as infinity), and not an OverflowError.
    app = make_app(MEISA_ENABLED=False)
    meisa = Meisa(app)
    with app.app_context():
        assert meisa.flush(Fraction(1, 10))  # type: ignore[arg-type]
        assert meisa.flush(10**400)
    assert meisa.close(app, 10**400) == 0


def test_what_is_called_later_must_be_a_function_when_registered() -> None:
    # Refused at registration, not at the first login or backfill, with the last good
    # registration kept.
    def mapper(user: Any) -> dict[str, Any]:
        return {"email": user.email}

    meisa = Meisa(contact_mapper=mapper)
    with pytest.raises(ValidationError, match=r"^contact_mapper: must be a function, not dict$"):
        meisa.contact_mapper({"email": "email"})  # type: ignore[type-var]
    with pytest.raises(ValidationError, match=r"^contact_mapper: must be a function, not int$"):
        Meisa(contact_mapper=5)  # type: ignore[arg-type]
    meisa.users_to_sync(list, count=int)
    with pytest.raises(ValidationError, match=r"^users_to_sync: must be a function, not list$"):
        meisa.users_to_sync([])  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match=r"^count: must be a function, not int$"):
        meisa.users_to_sync(list, count=5)  # type: ignore[arg-type]

    # Called where nothing awaits it, an async one would only make a coroutine: every
    # login's sync lost, and "coroutine was never awaited".
    async def later(user: Any) -> dict[str, Any]:
        return {"email": user.email}

    async def users() -> Any:
        yield None

    plain = r"must be a plain function, not an async one$"
    with pytest.raises(ValidationError, match=f"^contact_mapper: {plain}"):
        meisa.contact_mapper(later)
    with pytest.raises(ValidationError, match=f"^users_to_sync: {plain}"):
        meisa.users_to_sync(users)
    with pytest.raises(ValidationError, match=f"^count: {plain}"):
        meisa.users_to_sync(list, count=later)  # type: ignore[arg-type]
    assert meisa._contact_mapper is mapper
    assert meisa.user_source == (list, int)
