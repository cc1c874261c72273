"""Sign up, verify the address, log in and out, reset a forgotten password."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from flask import Blueprint
from flask import current_app
from flask import flash
from flask import redirect
from flask import render_template
from flask import request
from flask import session
from flask import url_for
from flask.typing import ResponseReturnValue
from flask_login import current_user
from flask_login import login_user
from flask_login import logout_user
from werkzeug.security import check_password_hash
from werkzeug.security import generate_password_hash

from flask_meisa import ValidationError

from .contacts import sync_signup
from .db import get_db
from .emails import Outcome
from .emails import send_password_reset
from .emails import send_verification_code
from .extensions import limiter
from .extensions import meisa
from .models import User
from .models import utcnow
from .security import codes_match
from .security import reset_token_matches
from .security import user_id_from_reset_token

__all__ = ["bp"]

bp = Blueprint("auth", __name__)

#: Session key of the user who signed up (or tried to log in) but has not verified yet.
PENDING_KEY = "verify_user_id"
MIN_PASSWORD = 8
MAX_NAME = 100

# Compared against when the address is unknown, so that a login takes as long either way.
_NO_SUCH_USER_HASH = generate_password_hash("no such user")

# Shown when Meisa's suppression list holds the address (unsubscribed, bounced, complained).
_SUPPRESSED = (
    "We can't send email to {email}: it unsubscribed from our emails, or our emails to it"
    " bounced or were marked as spam. Use another address, or contact support."
)


def _flash_code_outcome(outcome: Outcome, email: str) -> None:
    if outcome == "sent":
        flash(f"We sent a 6-digit code to {email}.", "success")
    elif outcome == "suppressed":
        flash(_SUPPRESSED.format(email=email), "error")
    elif outcome == "skipped":
        flash("Email delivery is switched off here, so no code was sent.", "info")
    else:
        flash("We couldn't send the code just now. Try “Send a new code” in a minute.", "error")


def _log_in(user: User) -> None:
    # Counted and stored first: login_user() fires the extension's login sync, which
    # maps this very user object.
    user = get_db().record_login(user.id, utcnow())
    login_user(user)


def _pending_user() -> User | None:
    user_id = session.get(PENDING_KEY)
    if not isinstance(user_id, int):
        return None
    user = get_db().user(user_id)
    if user is None or user.email_verified:
        session.pop(PENDING_KEY, None)
        return None
    return user


# Browsers drop tabs and newlines from a URL and read a backslash as a slash.
_URL_DROPPED = re.compile(r"[\t\r\n]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _safe_next(target: str | None) -> str:
    """``target`` when it is a path on this site as a browser reads it; else the
    dashboard. (``/%09/evil.example/`` arrives as slash, tab, slash: a browser drops the
    tab and goes to ``//evil.example/``, another site.)"""
    if target:
        path = _URL_DROPPED.sub("", target).replace("\\", "/")
        parts = urlsplit(path)
        if (
            not parts.scheme
            and not parts.netloc
            and path.startswith("/")
            and not path.startswith("//")
            and not _CONTROL.search(path)
        ):
            return path
    return url_for("account.dashboard")


def _email_limit_per_address() -> str:
    return str(current_app.config["EXAMPLE_EMAIL_LIMIT_PER_ADDRESS"])


def _email_limit_per_client() -> str:
    return str(current_app.config["EXAMPLE_EMAIL_LIMIT_PER_CLIENT"])


def _reset_address() -> str:
    return request.form.get("email", "").strip().lower()


_TOO_MANY_EMAILS = "Too many emails were asked for. Wait a while, then try again."

#: Per client address, password resets and new codes share one count.
_emails_per_client = limiter.shared_limit(
    _email_limit_per_client,
    scope="emails",
    methods=["POST"],
    error_message=_TOO_MANY_EMAILS,
)


@bp.route("/signup", methods=["GET", "POST"])
def signup() -> ResponseReturnValue:
    """Create an account, sync it to Meisa (source "signup") and email a code."""
    if current_user.is_authenticated:
        return redirect(url_for("account.dashboard"))
    values = {"email": "", "name": ""}
    errors: dict[str, str] = {}
    if request.method == "POST":
        email = request.form.get("email", "").strip()
        name = " ".join(request.form.get("name", "").split())
        password = request.form.get("password", "")
        values = {"email": email, "name": name}
        if not name:
            errors["name"] = "Enter your name."
        elif len(name) > MAX_NAME:
            errors["name"] = f"Use at most {MAX_NAME} characters."
        if len(password) < MIN_PASSWORD:
            errors["password"] = f"Use at least {MIN_PASSWORD} characters."
        try:
            if meisa.is_suppressed(email):
                errors["email"] = _SUPPRESSED.format(email=email)
        except ValidationError:
            errors["email"] = "Enter a valid email address, like ada@example.com."
        if not errors:
            user = get_db().create_user(email, name, generate_password_hash(password), utcnow())
            if user is None:
                errors["email"] = "An account with this address exists already. Log in instead."
            else:
                sync_signup(user)
                _flash_code_outcome(send_verification_code(user), user.email)
                session[PENDING_KEY] = user.id
                return redirect(url_for("auth.verify"))
    return render_template("signup.html", values=values, errors=errors), 400 if errors else 200


@bp.route("/verify", methods=["GET", "POST"])
def verify() -> ResponseReturnValue:
    """Check the emailed code; on success the user is verified and logged in."""
    user = _pending_user()
    if user is None:
        if current_user.is_authenticated:
            return redirect(url_for("account.dashboard"))
        flash("Sign up or log in first.", "info")
        return redirect(url_for("auth.login"))
    error = None
    if request.method == "POST":
        config = current_app.config
        code = "".join(request.form.get("code", "").split())
        db = get_db()
        pending = db.verification(user.id)
        if pending is None:
            error = "There is no code waiting for you. Send a new one."
        elif (utcnow() - pending.sent_at).total_seconds() > 60 * config[
            "EXAMPLE_CODE_TTL_MINUTES"
        ]:
            error = "That code has expired. Send a new one."
        elif pending.attempts >= config["EXAMPLE_CODE_MAX_ATTEMPTS"]:
            error = "Too many wrong codes. Send a new one."
        elif not codes_match(user.id, code, pending.code_hash):
            db.count_wrong_code(user.id)
            error = "That code is not right. Check the email and try again."
        else:
            session.pop(PENDING_KEY, None)
            _log_in(db.mark_verified(user.id))
            flash(f"Your email address is verified. Welcome, {user.first_name}!", "success")
            return redirect(url_for("account.dashboard"))
    return render_template("verify.html", email=user.email, error=error), 400 if error else 200


@bp.post("/verify/resend")
@_emails_per_client
def resend_code() -> ResponseReturnValue:
    """Email a new code (the old one stops working)."""
    user = _pending_user()
    if user is None:
        return redirect(url_for("auth.login"))
    _flash_code_outcome(send_verification_code(user), user.email)
    return redirect(url_for("auth.verify"))


@bp.route("/login", methods=["GET", "POST"])
def login() -> ResponseReturnValue:
    """Log in; the extension syncs the user (signin_count, last_active) to Meisa."""
    if current_user.is_authenticated:
        return redirect(url_for("account.dashboard"))
    email = ""
    error = None
    if request.method == "POST":
        email = request.form.get("email", "").strip()
        password = request.form.get("password", "")
        user = get_db().user_by_email(email)
        stored = user.password_hash if user is not None else _NO_SUCH_USER_HASH
        if not check_password_hash(stored, password) or user is None:
            error = "That email and password don't match an account."
        elif not user.email_verified:
            session[PENDING_KEY] = user.id
            flash("Verify your email address first: enter the code we sent you.", "info")
            return redirect(url_for("auth.verify"))
        else:
            _log_in(user)
            flash(f"Welcome back, {user.first_name}!", "success")
            return redirect(_safe_next(request.args.get("next")))
    return render_template("login.html", email=email, error=error), 400 if error else 200


@bp.post("/logout")
def logout() -> ResponseReturnValue:
    """Log out."""
    logout_user()
    flash("You are logged out.", "info")
    return redirect(url_for("account.index"))


@bp.route("/forgot-password", methods=["GET", "POST"])
@limiter.limit(
    _email_limit_per_address,
    key_func=_reset_address,
    methods=["POST"],
    error_message=_TOO_MANY_EMAILS,
)
@_emails_per_client
def forgot_password() -> ResponseReturnValue:
    """Email a reset link. The answer is the same, in words and in time, whatever the
    address: with an account or without, suppressed by Meisa or not."""
    if request.method == "GET":
        return render_template("forgot.html", email="", error=None)
    email = request.form.get("email", "").strip()
    if not email:
        error = "Enter your email address."
        return render_template("forgot.html", email=email, error=error), 400
    user = get_db().user_by_email(email)
    if user is not None:
        send_password_reset(user)
    return render_template(
        "forgot_done.html",
        email=email,
        minutes=current_app.config["EXAMPLE_RESET_MAX_AGE"] // 60,
    )


@bp.route("/reset/<token>", methods=["GET", "POST"])
def reset_password(token: str) -> ResponseReturnValue:
    """Choose a new password through an emailed link (single use, expiring)."""
    found = user_id_from_reset_token(token, current_app.config["EXAMPLE_RESET_MAX_AGE"])
    user = get_db().user(found[0]) if found is not None else None
    if found is None or user is None or not reset_token_matches(user, found[1]):
        flash("That reset link has expired or was used already. Ask for a new one.", "error")
        return redirect(url_for("auth.forgot_password"))
    error = None
    if request.method == "POST":
        password = request.form.get("password", "")
        if len(password) < MIN_PASSWORD:
            error = f"Use at least {MIN_PASSWORD} characters."
        else:
            get_db().set_password(user.id, generate_password_hash(password))
            flash("Your password is changed. Log in with the new one.", "success")
            return redirect(url_for("auth.login"))
    return render_template("reset.html", token=token, error=error), 400 if error else 200
