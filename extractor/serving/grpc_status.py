"""The gRPC doors' one table from errors to status codes."""

from __future__ import annotations

from concurrent.futures import CancelledError

import grpc

from extractor.errors import (AuthenticationError, InvalidInputError, LimitExceededError, NotReadyError, StoreError,
                              StoreFullError, UnknownNameError)

# Status details travel percent-encoded in trailing metadata, which grpc caps at 8-16 KiB: an error quoting
# a client's 20 kB name would otherwise reach the client as a transport error instead of its own status.
MAX_DETAILS_CHARS = 500

STATUS_BY_ERROR = (
    (UnknownNameError, grpc.StatusCode.NOT_FOUND),
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (LimitExceededError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (NotReadyError, grpc.StatusCode.UNAVAILABLE),
    (StoreFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),  # the disk, named in the message
    (StoreError, grpc.StatusCode.UNAVAILABLE),             # read-only, I/O error, damaged
    (AuthenticationError, grpc.StatusCode.UNAUTHENTICATED),
    (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (CancelledError, grpc.StatusCode.CANCELLED),
)


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The one mapping from errors to status codes and the message the client sees (both gRPC doors).

    Anything not listed is INTERNAL with a fixed message: its details stay in the server's log.
    """
    for kind, code in STATUS_BY_ERROR:
        if isinstance(error, kind):
            message = str(error) or code.name.lower().replace("_", " ")
            if len(message) > MAX_DETAILS_CHARS:
                message = message[:MAX_DETAILS_CHARS - 3] + "..."
            return code, message
    return grpc.StatusCode.INTERNAL, "internal error; the server logged the details"
