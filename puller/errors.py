"""Error types of the registry side of the puller.

Every error carries enough context (reference, repository, digest, layer) for a
user to see *what* was wrong *with which input* without a traceback.
"""
from __future__ import annotations


class PullError(Exception):
    """Base class of every error the puller raises on purpose."""


class InvalidReference(PullError, ValueError):
    """An image reference string that cannot be parsed."""


class InvalidDigest(PullError, ValueError):
    """A digest string that is malformed or uses an unsupported algorithm."""


class RegistryError(PullError):
    """The registry answered with an error status or could not be reached."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class RegistryUnavailable(RegistryError):
    """No usable answer from the registry within the configured time budget."""


class AnswerTooLarge(RegistryError):
    """An answer longer than the limit set for it."""


class NotFound(RegistryError):
    """The registry says a manifest or blob does not exist (404)."""


class Unauthorized(RegistryError):
    """Authentication was asked for and failed."""


class VerificationError(PullError):
    """Content did not match its digest, size or diff_id."""


class ManifestError(PullError):
    """A manifest or index that is malformed, contradictory or unsupported."""


class PlatformNotFound(ManifestError):
    """An index has no entry for the requested platform."""


class LayerError(PullError):
    """Pulling, verifying or applying one layer failed; names the layer."""

    def __init__(self, layer: str, message: str) -> None:
        super().__init__(f"layer {layer}: {message}")
        self.layer = layer
