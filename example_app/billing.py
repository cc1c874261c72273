"""Billing: upgrade, downgrade and cancel. Each change sends ``plan_changed``; the
extension syncs the new plan to Meisa right after the response."""

from __future__ import annotations

from typing import Any
from typing import cast

from flask import Blueprint
from flask import current_app
from flask import flash
from flask import redirect
from flask import render_template
from flask import url_for
from flask.typing import ResponseReturnValue
from flask_login import current_user
from flask_login import login_required

from flask_meisa import plan_changed

from .db import get_db
from .models import PLAN_NAMES
from .models import PLAN_PRICES
from .models import PLANS
from .models import User
from .models import plan_above
from .models import plan_below
from .models import subscription_status_for

__all__ = ["bp"]

bp = Blueprint("billing", __name__, url_prefix="/billing")


def _change_plan(new_plan: str | None, message: str) -> ResponseReturnValue:
    user: User = current_user
    if new_plan is None:
        flash("That change is not possible on your plan.", "error")
        return redirect(url_for("billing.plans"))
    updated = get_db().set_plan(user.id, new_plan, subscription_status_for(new_plan))
    app = cast(Any, current_app)._get_current_object()
    plan_changed.send(app, user=updated, old_plan=user.plan, new_plan=new_plan)
    flash(message.format(plan=PLAN_NAMES[new_plan]), "success")
    return redirect(url_for("billing.plans"))


@bp.get("/")
@login_required
def plans() -> ResponseReturnValue:
    """The plans, with the user's own marked."""
    return render_template(
        "billing.html",
        plans=PLANS,
        names=PLAN_NAMES,
        prices=PLAN_PRICES,
        up=plan_above(current_user.plan),
        down=plan_below(current_user.plan),
    )


@bp.post("/upgrade")
@login_required
def upgrade() -> ResponseReturnValue:
    """Move one plan up (a canceled user comes back on Standard)."""
    return _change_plan(plan_above(current_user.plan), "You are on the {plan} plan now.")


@bp.post("/downgrade")
@login_required
def downgrade() -> ResponseReturnValue:
    """Move one plan down."""
    return _change_plan(plan_below(current_user.plan), "You moved down to the {plan} plan.")


@bp.post("/cancel")
@login_required
def cancel() -> ResponseReturnValue:
    """Cancel the paid subscription: the plan becomes "churned"."""
    if current_user.plan not in ("standard", "pro"):
        flash("There is no paid subscription to cancel.", "error")
        return redirect(url_for("billing.plans"))
    return _change_plan("churned", "Your subscription is canceled.")
