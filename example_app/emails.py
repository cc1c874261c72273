"""The app's transactional email, sent through the extension's ``meisa.send``.

The verification code is sent while the visitor waits, who is told how it went:
``"sent"`` (sent or scheduled by Meisa), ``"suppressed"`` (Meisa says not to email the
address: unsubscribed, bounced or complained), ``"skipped"`` (not sent on purpose, e.g.
delivery is off) or ``"failed"`` (Meisa could not be reached or refused; logged). The
password reset is sent after the response, and its visitor is told nothing about it.
"""

from __future__ import annotations

import logging
from typing import Any
from typing import Literal

from flask import current_app
from flask import url_for

from flask_meisa import MeisaError
from flask_meisa import SendResult
from flask_meisa import UnprocessableEntityError

from .db import get_db
from .extensions import meisa
from .models import User
from .models import utcnow
from .security import code_hash
from .security import new_code
from .security import reset_token

__all__ = ["Outcome", "send_password_reset", "send_verification_code"]

logger = logging.getLogger("example_app")

Outcome = Literal["sent", "suppressed", "skipped", "failed"]


def _outcome(result: SendResult) -> Outcome:
    if result.status in ("sent", "scheduled"):
        return "sent"
    if result.status == "suppressed":
        return "suppressed"
    return "skipped"


def _send(
    trigger_key: str,
    user: User,
    variables: dict[str, Any],
    idempotency_key: str | None = None,
) -> Outcome:
    try:
        result = meisa.send(
            trigger_key, user.email, variables=variables, idempotency_key=idempotency_key
        )
    except UnprocessableEntityError as error:
        # Meisa's list is newer than the local suppression set.
        if error.code == "recipient_suppressed":
            return "suppressed"
        logger.error("%s not sent: %s", trigger_key, error)
        return "failed"
    except MeisaError as error:
        logger.error("%s not sent: %s", trigger_key, error)
        return "failed"
    return _outcome(result)


def send_verification_code(user: User) -> Outcome:
    """Make a new 6-digit code for ``user``, store its hash, and email it.

    The idempotency key names the purpose, the user and the code (Meisa's advice), so a
    retry or a double submit of the same code never sends two emails, and a new code
    always sends one.
    """
    code = new_code()
    get_db().set_verification(user.id, code_hash(user.id, code), utcnow())
    return _send(
        "verification_code",
        user,
        variables={"code": code},
        idempotency_key=f"verify:{user.id}:{code}",
    )


def send_password_reset(user: User) -> None:
    """Email ``user`` a link to choose a new password (valid ``EXAMPLE_RESET_MAX_AGE``),
    after the response.

    ``background=True`` makes no call to Meisa during the request, so a known address
    is answered as fast as an unknown one (which sends nothing): the time taken does not
    tell whether an account exists. A suppressed address or a failed send is reported
    by the extension (its signals and log), not to the visitor.
    """
    reset_url = url_for("auth.reset_password", token=reset_token(user), _external=True)
    max_age = int(current_app.config["EXAMPLE_RESET_MAX_AGE"])
    meisa.send(
        "password_reset",
        user.email,
        variables={"reset_url": reset_url, "expires_in_minutes": max_age // 60},
        background=True,
    )
