"""Domain errors, one class per kind of failure; the gRPC layer maps each to one status code."""

import difflib


class ExtractorError(Exception):
    """Base of every error this project raises on purpose."""


class UnknownNameError(ExtractorError, KeyError):
    """A backbone, recipe, dataset, feature set or head name that does not exist."""

    SHOWN = 12  # known names quoted in the message; a store can hold hundreds of feature sets

    def __init__(self, kind: str, name: str, known):
        self.kind, self.name, self.known = kind, name, sorted(known)
        if len(self.known) <= self.SHOWN:
            message = f"known: {', '.join(self.known) or '(none)'}"
        else:
            closest = difflib.get_close_matches(name, self.known, n=self.SHOWN, cutoff=0)
            message = f"closest of the {len(self.known)} known: {', '.join(closest)}"
        super().__init__(f"unknown {kind} {name!r}; {message}")

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class UnknownFeatureSetError(UnknownNameError):
    """A feature set the store does not hold; the message says how to list them and the closest, one a line."""

    CLOSEST = 8

    def __init__(self, name: str, known, store_path):
        super().__init__("feature set", name, known)
        lines = [f"unknown feature set {name!r} in {store_path}: `extractor store info --store {store_path}` lists "
                 f"its {len(self.known)} feature sets"]
        closest = difflib.get_close_matches(name, self.known, n=self.CLOSEST, cutoff=0.3)
        if closest:
            lines += ["closest:", *(f"  {candidate}" for candidate in closest)]
        self.args = ("\n".join(lines),)


class InvalidInputError(ExtractorError, ValueError):
    """Input that cannot be used: undecodable bytes, a wrong shape or dtype, a bad option value."""


class LimitExceededError(ExtractorError):
    """A request over one of the configured limits (images per request, bytes, decoded pixels per image or request)."""

    def __init__(self, limit: str, value, maximum):
        self.limit, self.value, self.maximum = limit, value, maximum
        super().__init__(f"{limit} is {value}, over the limit of {maximum}")


class BusyError(LimitExceededError):
    """A call within its own limits that the server is too busy to take now: nothing is wrong with it, and it
    may be sent again after `retry_after` seconds (gRPC RESOURCE_EXHAUSTED, HTTP 429 with Retry-After)."""

    retry_after: float = 1.0


class BudgetBusyError(BusyError):
    """A request that did not get its share of a server-wide budget in time: other requests hold it."""

    def __init__(self, limit: str, value, maximum, waited: float, retry_after: float = 1.0):
        super().__init__(limit, value, maximum)
        self.waited, self.retry_after = waited, retry_after
        self.args = (f"{limit}: this request's {value} did not fit within the budget of {maximum} after waiting "
                     f"{waited:.1f} s (other requests hold it); retry later",)


class ServerBusyError(BusyError):
    """A call refused because the server already answers as many calls (or holds as many streams) as its cap
    allows."""

    def __init__(self, what: str, maximum: int, option: str, retry_after: float = 1.0):
        super().__init__(what, maximum, maximum)
        self.retry_after = retry_after
        self.args = (f"the server is at its cap of {maximum} {what} ({option}); retry after {retry_after:g} s",)


class ChecksumError(ExtractorError):
    """A weights or model file whose sha256 is not the expected one."""


class StoreError(ExtractorError):
    """A file that is not an embedding store, or a store that failed an integrity check."""


class StoreDamagedError(StoreError):
    """A store whose file SQLite reports as damaged (`store verify` lists what, `store repair` salvages the rest)."""


class StoreIOError(StoreError):
    """A store the system cannot write or read now: `cause` is "read-only", "I/O error", "locked" or
    "disk full" (StoreFullError); the service answers UNAVAILABLE, RESOURCE_EXHAUSTED for a full disk."""

    def __init__(self, message: str, cause: str):
        self.cause = cause
        super().__init__(message)


class StoreFullError(StoreIOError):
    """A store write refused because its disk (or file system quota) is full."""


class MissingDependencyError(ExtractorError):
    """An optional feature whose extra packages are not installed (the message says how to install them)."""


class NotReadyError(ExtractorError):
    """The service is starting up or shutting down."""


class AuthenticationError(ExtractorError):
    """A call to the service without the right credentials."""


class UntrustedModelError(ExtractorError):
    """A saved model that could run code when loaded: a pickle, a type outside the trusted list, a Keras
    layer that carries Python code, or a file reached through a link out of its folder."""
