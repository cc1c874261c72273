"""What Meisa learns about a user: the contact mapper, and the signup sync.

The mapper follows Meisa's integration advice: ``external_id`` always sent with ``email``,
product data in ``custom_fields`` under stable names (billing: ``plan``,
``subscription_status``; lifecycle: ``signup_date``, ``last_active`` as ISO strings,
``signin_count``, ``onboarding_completed``; usage: ``reports_exported``). It returns plain
data only (strings, numbers, booleans), so nothing of the user object outlives the request.
"""

from __future__ import annotations

import logging
from typing import Any

from flask_meisa import MeisaError
from flask_meisa import RetryPolicy

from .extensions import meisa
from .models import User
from .models import iso

__all__ = ["SIGNUP_RETRY", "sync_signup", "user_to_contact"]

logger = logging.getLogger("example_app")

#: The signup sync runs while the visitor waits: a couple of quick tries, then it is
#: left to background delivery.
SIGNUP_RETRY = RetryPolicy(max_attempts=2, base_delay=0.2, max_delay=1.0, deadline=3.0)


@meisa.contact_mapper
def user_to_contact(user: User) -> dict[str, Any]:
    """The upsert payload of ``user`` (used for login syncs, plan changes, milestones)."""
    contact: dict[str, Any] = {
        "email": user.email,
        "external_id": str(user.id),
        "first_name": user.first_name,
        "custom_fields": {
            "plan": user.plan,
            "subscription_status": user.subscription_status,
            "signup_date": iso(user.signup_date),
            "last_active": iso(user.last_active),
            "signin_count": user.signin_count,
            "onboarding_completed": user.onboarding_completed,
            "reports_exported": user.reports_exported,
        },
    }
    if user.last_name:
        contact["last_name"] = user.last_name
    return contact


def sync_signup(user: User) -> None:
    """Create the contact with ``source="signup"`` before the first email to the user.

    Meisa keeps the source a contact was created with, and a transactional send creates
    the contact when it does not exist yet. An upsert made the usual way
    (``meisa.upsert``) waits until the response has been written, after the
    verification email, which would then create the contact with source ``api``. So this
    one upsert is made now, through the extension's client, with a short retry budget;
    when Meisa cannot take it now, it goes to background delivery (which retries for
    longer) and the send below creates the contact meanwhile.
    """
    payload = {**meisa.map_user(user), "source": "signup"}
    if not meisa.delivering:
        meisa.upsert(payload)  # delivery is off (tests): recorded and signalled only
        return
    try:
        meisa.client.with_options(retry=SIGNUP_RETRY).upsert_contact(**payload)
    except MeisaError as error:
        logger.warning("signup sync left to background delivery: %s", error)
        meisa.upsert(payload)
