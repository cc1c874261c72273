# flask-meisa configuration template.
#
# Copy the keys you need into your Flask config (config.py, app.config.from_mapping, ...).
# Every key is shown with its default. Set keys before Meisa(app) / meisa.init_app(app):
# init_app reads them once (except MEISA_ENABLED and MEISA_SUPPRESS_SEND, read on every
# operation). `flask meisa config-template` prints this file.
import os

# str, required while MEISA_ENABLED. The server-side API key from Meisa's dashboard
# (meisa_live_... or meisa_test_...). Read it from the environment; never commit it.
MEISA_API_KEY = os.environ.get("MEISA_API_KEY")

# str. Meisa's API root. Point it at the embedded emulator for local work, e.g.
# "http://127.0.0.1:8025/api/v1". Plain http:// is refused except on loopback.
MEISA_BASE_URL = os.environ.get("MEISA_BASE_URL", "https://api.meisa.io/api/v1")

# bool, default True. False turns delivery off: operations are still validated, recorded
# and signalled (operation_queued), but no call is made and no API key is needed.
MEISA_ENABLED = True

# bool or None, default None (= follow TESTING). True: like MEISA_ENABLED = False, nothing
# is delivered while everything is recorded and signalled. Read on every operation.
MEISA_SUPPRESS_SEND = None

# float seconds, default 10.0. Read timeout of every call to Meisa.
MEISA_TIMEOUT = 10.0

# float seconds, default 3.05. Connect timeout of every call to Meisa.
MEISA_CONNECT_TIMEOUT = 3.05

# int, default 5. Attempts of a call made in the caller's thread (meisa.send, CLI
# commands, meisa.client), the first included. Background delivery is not limited by a
# count: it retries until MEISA_RETRY_DEADLINE. Only connection errors, timeouts, 5xx and
# 429 are retried; any other 4xx is final.
MEISA_MAX_ATTEMPTS = 5

# float seconds, default 0.5. First backoff delay; doubles per attempt, with full jitter.
MEISA_RETRY_BASE_DELAY = 0.5

# float seconds, default 30.0. Cap on any one backoff delay (and on a honoured
# Retry-After).
MEISA_RETRY_MAX_DELAY = 30.0

# float seconds, default 600.0. Total time a background operation may spend retrying (an
# outage or a run of 429s shorter than this loses nothing); past it the operation is
# reported through delivery_failed, and kept as a dead letter with MEISA_OUTBOX.
MEISA_RETRY_DEADLINE = 600.0

# float seconds, default 10.0. Total time a synchronous meisa.send() may spend retrying
# before it raises; keep it well below your WSGI server's worker timeout.
MEISA_SEND_DEADLINE = 10.0

# str or None, default "60/minute;1000/hour". The key's rate budget, shared by every
# background call. Raise it when Meisa raises your key's limits; None turns it off.
MEISA_RATE_LIMIT = "60/minute;1000/hour"

# bool, default True. Upsert the user on Flask-Login's user_logged_in.
MEISA_SYNC_ON_LOGIN = True

# list of attribute names, or a mapping {custom field: attribute}, default (). User
# attributes the default contact mapper puts into custom_fields. A callable attribute is
# called; dates become ISO 8601 (UTC), Decimal a number, Enum its value. For example
# ["plan", "signup_date", "last_active", "signin_count"].
MEISA_CUSTOM_FIELDS = ()

# str or None, default None. `source` sent with every upsert made by the default mapper
# (api, import, manual, signup, initial_sync). Meisa keeps the source a contact was
# created with.
MEISA_DEFAULT_SOURCE = None

# float seconds, default 300.0. How long the suppression set (unsubscribed, bounced and
# complained addresses) is used before a background refresh.
MEISA_SUPPRESSION_TTL = 300.0

# bool, default False. Load the suppression set at startup instead of on the first send.
MEISA_SUPPRESSION_PRELOAD = False

# bool, default False. Release a request's syncs and events even when its view raised or
# answered 5xx.
MEISA_RELEASE_ON_ERROR = False

# "thread" (default), "sync" or "celery". "thread": a background engine delivers after the
# response, within MEISA_RATE_LIMIT. "sync": every operation is delivered inline (debugging,
# scripts). "celery": Celery workers deliver (pip install "flask-meisa[celery]"); the web
# process only publishes one task per operation. See flask_meisa/engine/celery.py.
MEISA_DELIVERY = "thread"

# int, default 10000. Operations the engine holds in memory; past that, events and then
# syncs are shed (reported through delivery_dropped); transactional sends never are.
MEISA_QUEUE_SIZE = 10_000

# int, default 1. Delivery threads per process.
MEISA_WORKERS = 1

# float seconds, default 5.0. How long interpreter exit waits to deliver what is pending.
MEISA_FLUSH_TIMEOUT = 5.0

# str or None, default "instance:meisa-outbox.sqlite3". Where background work waits for
# Meisa: a SQLite file every process of the host shares (one budget, one delivery order,
# one delivering process; nothing released is lost when a process is killed or
# redeployed). "instance:<name>" is a file in the app's instance folder (mount a volume
# there in a container). None (or "memory") keeps work in each process's memory only.
# Use a local filesystem (not NFS).
MEISA_OUTBOX = "instance:meisa-outbox.sqlite3"

# float seconds, default 1.0. How long an outbox write waits for another process's write
# to finish. Past that the operation is held in memory instead (logged), never raised.
MEISA_OUTBOX_BUSY_TIMEOUT = 1.0

# celery.Celery or None, default None (= app.extensions["celery"]). With MEISA_DELIVERY =
# "celery": the Celery app carrying the task flask_meisa.deliver. Set it, or
# app.extensions["celery"], before meisa.init_app(app).
MEISA_CELERY_APP = None

# str, default "meisa". With MEISA_DELIVERY = "celery": prefix of the lane queues
# <prefix>.transactional, <prefix>.sync and <prefix>.events and of the engine's Redis keys.
# Run workers with -Q meisa.transactional,meisa.sync,meisa.events (in that order) and
# broker_transport_options = {"queue_order_strategy": "priority"}.
MEISA_CELERY_QUEUE = "meisa"

# str or None, default None (= the Celery broker URL, when it is Redis). With
# MEISA_DELIVERY = "celery": the Redis holding the shared rate budget (MEISA_RATE_LIMIT,
# counted across every worker and machine), coalesced upserts and the pending count.
MEISA_CELERY_REDIS_URL = None

# bool, default True. With MEISA_DELIVERY = "celery": upserts of one contact waiting in the
# queue become one call with their fields merged.
MEISA_CELERY_COALESCE = True

# float seconds, default 86400.0 (a day). An upsert whose state Meisa already has (as
# last accepted from this app) makes no call; past this long Meisa is told again anyway.
MEISA_RESYNC_AFTER = 86400.0

# list of custom field names, default ("plan", "subscription_status"). An upsert that
# changes one of them goes ahead of routine syncs, with the changes that start Meisa's
# automations (plan changes, first upserts, events).
MEISA_PRIORITY_FIELDS = ("plan", "subscription_status")

# float seconds, default 3600.0. A routine sync waiting longer than this is promoted, so
# that nothing waits forever behind more urgent work.
MEISA_ROUTINE_MAX_AGE = 3600.0
