"""The landing page, the dashboard and the one in-product action: exporting a report."""

from __future__ import annotations

from typing import Any

from flask import Blueprint
from flask import flash
from flask import redirect
from flask import render_template
from flask import request
from flask import url_for
from flask.typing import ResponseReturnValue
from flask_login import current_user
from flask_login import login_required

from flask_meisa import track_event

from .db import get_db
from .extensions import meisa
from .models import utcnow

__all__ = ["REPORT_FORMATS", "bp"]

bp = Blueprint("account", __name__)

#: Report formats the export offers.
REPORT_FORMATS = {"csv": "CSV", "pdf": "PDF"}


def _report_format() -> str:
    fmt = request.form.get("format", "csv")
    return fmt if fmt in REPORT_FORMATS else "csv"


def _export_properties() -> dict[str, Any]:
    # Evaluated by @track_event once the view has succeeded.
    return {"format": _report_format(), "report": "usage_summary"}


@bp.get("/")
def index() -> ResponseReturnValue:
    """The landing page; the dashboard for a logged-in user."""
    if current_user.is_authenticated:
        return redirect(url_for("account.dashboard"))
    return render_template("index.html")


@bp.get("/app")
@login_required
def dashboard() -> ResponseReturnValue:
    """The user's plan, usage and onboarding checklist."""
    return render_template("dashboard.html", formats=REPORT_FORMATS)


@bp.post("/reports/export")
@login_required
@track_event("exported_report", properties=_export_properties)
def export_report() -> ResponseReturnValue:
    """Export a report: counts it, syncs the usage counter (a milestone for Meisa) and,
    through ``@track_event``, records the ``exported_report`` event after the response."""
    fmt = _report_format()
    user = get_db().record_export(current_user.id, utcnow())
    # Upserts made in a request wait for the response, and go before this request's event.
    meisa.upsert(user)
    flash(
        f"Your usage report is exported as {REPORT_FORMATS[fmt]}"
        f" ({user.reports_exported} so far).",
        "success",
    )
    return redirect(url_for("account.dashboard"))
