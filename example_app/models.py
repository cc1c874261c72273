"""The user, as the app keeps it, and the plans it can be on."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

__all__ = [
    "PAID_PLANS",
    "PLANS",
    "PLAN_NAMES",
    "PLAN_PRICES",
    "SUBSCRIPTION_LABELS",
    "User",
    "iso",
    "plan_above",
    "plan_below",
    "subscription_status_for",
    "utcnow",
]

#: Plans from lowest to highest; "churned" (a canceled subscription) is outside the ladder.
PLANS = ("free", "standard", "pro")
PAID_PLANS = ("standard", "pro")
PLAN_NAMES = {"free": "Free", "standard": "Standard", "pro": "Pro", "churned": "Canceled"}
PLAN_PRICES = {"free": 0, "standard": 29, "pro": 99, "churned": 0}
SUBSCRIPTION_LABELS = {"none": "No subscription", "active": "Active", "canceled": "Canceled"}


def utcnow() -> dt.datetime:
    """Now, in UTC, to the second."""
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def iso(moment: dt.datetime) -> str:
    """``2026-01-02T03:04:05Z``: the ISO 8601 form Meisa's docs ask for."""
    return moment.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def plan_above(plan: str) -> str | None:
    """The next plan up (a canceled user comes back on Standard); ``None`` at the top."""
    if plan == "churned":
        return "standard"
    index = PLANS.index(plan)
    return PLANS[index + 1] if index + 1 < len(PLANS) else None


def plan_below(plan: str) -> str | None:
    """The next plan down; ``None`` on Free or when canceled."""
    if plan not in PAID_PLANS:
        return None
    return PLANS[PLANS.index(plan) - 1]


def subscription_status_for(plan: str) -> str:
    """The subscription status that goes with a plan reached by upgrade or downgrade."""
    if plan == "churned":
        return "canceled"
    return "active" if plan in PAID_PLANS else "none"


@dataclass(frozen=True)
class User:
    """A row of the ``users`` table; also the Flask-Login user object.

    Immutable: a change is written to the database and the row read again, so what the
    contact mapper sees is what was stored.
    """

    id: int
    email: str
    name: str
    password_hash: str
    email_verified: bool
    plan: str
    subscription_status: str
    signup_date: dt.datetime
    last_active: dt.datetime
    signin_count: int
    onboarding_completed: bool
    reports_exported: int
    #: Counts password resets; a session remembers the version it logged in with.
    session_version: int

    # Flask-Login's user protocol.
    @property
    def is_authenticated(self) -> bool:
        """Always true for a stored user (Flask-Login)."""
        return True

    @property
    def is_active(self) -> bool:
        """Whether the user may log in (Flask-Login): once the email is verified."""
        return self.email_verified

    @property
    def is_anonymous(self) -> bool:
        """Never anonymous (Flask-Login)."""
        return False

    def get_id(self) -> str:
        """The id Flask-Login keeps in the session: ``"<id>:<session version>"``.

        Flask-Login's alternative id: a password reset raises the version, which ends
        every session made with the old one (the user loader refuses it).
        """
        return f"{self.id}:{self.session_version}"

    @property
    def first_name(self) -> str:
        """The first word of the name."""
        return self.name.split()[0] if self.name.split() else ""

    @property
    def last_name(self) -> str:
        """The rest of the name after the first word (may be empty)."""
        parts = self.name.split(None, 1)
        return parts[1] if len(parts) > 1 else ""

    @property
    def plan_name(self) -> str:
        """The plan's display name."""
        return PLAN_NAMES.get(self.plan, self.plan)

    @property
    def subscription_label(self) -> str:
        """The subscription status, for people."""
        return SUBSCRIPTION_LABELS.get(self.subscription_status, self.subscription_status)
