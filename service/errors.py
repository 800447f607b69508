"""One exception root for the service, each subclass with a stable code.

Edges translate these: the API into HTTP status + body (OperationOutcome on FHIR routes, PS3.18
FailureReason on DICOMweb), the worker into a failed job with its stage.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Root of every error the service raises on purpose."""

    code = "internal"
    http_status = 500

    def __init__(self, message: str, *, code: str | None = None, expression: list[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.expression = expression  # FHIRPath of the element at fault, for OperationOutcome.issue.expression


class InvalidInput(ServiceError):
    """The caller sent something we cannot accept (bad DICOM, bad FHIR, bad parameter)."""

    code = "invalid"
    http_status = 400


class Unprocessable(InvalidInput):
    """Well-formed, but against a business rule (FHIR: a reference that does not resolve, a conflicting id)."""

    code = "unprocessable"
    http_status = 422


class PreconditionFailed(ServiceError):
    """A condition of the request does not hold (FHIR: If-Match on another version, an ambiguous conditional)."""

    code = "precondition-failed"
    http_status = 412


class Gone(ServiceError):
    """The resource existed and was deleted (FHIR: 410)."""

    code = "deleted"
    http_status = 410


class MethodNotAllowed(ServiceError):
    code = "not-allowed"
    http_status = 405


class PayloadTooLarge(InvalidInput):
    code = "too-large"
    http_status = 413


class UnsupportedMediaType(InvalidInput):
    code = "unsupported-media-type"
    http_status = 415


class NotAcceptable(ServiceError):
    code = "not-acceptable"
    http_status = 406


class NotFound(ServiceError):
    code = "not-found"
    http_status = 404


class Conflict(ServiceError):
    code = "conflict"
    http_status = 409


class Unauthenticated(ServiceError):
    code = "unauthenticated"
    http_status = 401


class Forbidden(ServiceError):
    code = "forbidden"
    http_status = 403


class ModelError(ServiceError):
    """A model in the repository is unusable (bad manifest, hash mismatch, graph mismatch)."""

    code = "model-invalid"
    http_status = 500


class TransientError(ServiceError):
    """Worth retrying: a dependency was briefly unavailable."""

    code = "transient"
    http_status = 503


class ConfigurationError(ServiceError):
    code = "configuration"
