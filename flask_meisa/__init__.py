"""flask-meisa: sync a Flask app's users to Meisa and send transactional email through it."""

from ._engine.base import DeliveryStatus
from .client import MeisaClient
from .decorators import track_event
from .errors import APIConnectionError
from .errors import APIError
from .errors import APITimeoutError
from .errors import AuthenticationError
from .errors import BadRequestError
from .errors import ConfigurationError
from .errors import ConflictError
from .errors import DeliveryError
from .errors import MeisaError
from .errors import NotFoundError
from .errors import PermissionDeniedError
from .errors import RateLimitError
from .errors import ServerError
from .errors import UnprocessableEntityError
from .errors import ValidationError
from .extension import Meisa
from .operations import Operation
from .results import SendResult
from .retry import RetryPolicy
from .signals import contact_synced
from .signals import delivery_dropped
from .signals import delivery_failed
from .signals import email_sent
from .signals import email_suppressed
from .signals import event_tracked
from .signals import operation_queued
from .signals import plan_changed

__all__ = [
    "APIConnectionError",
    "APIError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "ConfigurationError",
    "ConflictError",
    "DeliveryError",
    "DeliveryStatus",
    "Meisa",
    "MeisaClient",
    "MeisaError",
    "NotFoundError",
    "Operation",
    "PermissionDeniedError",
    "RateLimitError",
    "RetryPolicy",
    "SendResult",
    "ServerError",
    "UnprocessableEntityError",
    "ValidationError",
    "contact_synced",
    "delivery_dropped",
    "delivery_failed",
    "email_sent",
    "email_suppressed",
    "event_tracked",
    "operation_queued",
    "plan_changed",
    "track_event",
]
