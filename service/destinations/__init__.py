"""Result destinations: push our DICOM results (SR, Secondary Capture; Part 10 bytes) to a peer.

Two transports, one contract (:class:`Destination`): ``dimse`` (C-STORE SCU, :mod:`service.destinations.dimse`) and
``stow`` (STOW-RS, :mod:`service.destinations.stow`). A ``send`` either delivers every object or raises:

- :class:`service.errors.TransientError` when trying again later may succeed (the peer is unreachable, timed out,
  aborted, rejected the association transiently, is out of resources, or answered HTTP 5xx/408/429);
- :class:`DeliveryRejected` when the peer understood and refused (a DIMSE failure status, HTTP 4xx, a STOW-RS
  FailedSOPSequence, an association rejected permanently): sending the same objects again will fail the same way;
- :class:`service.errors.InvalidInput` when one of our own objects cannot be read or encoded;
- :class:`service.errors.ConfigurationError` when the destination's TLS files cannot be loaded.

Retrying, backing off and recording the failed state are the caller's (the flows layer's): this package only
transports and classifies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from service.errors import ServiceError


class Destination(Protocol):
    """Somewhere results are pushed to."""

    @property
    def name(self) -> str:
        """The configured name, used in messages and audit events."""
        ...

    @property
    def kind(self) -> str:
        """The transport: ``"dimse"`` or ``"stow"``."""
        ...

    def send(self, objects: Sequence[bytes]) -> None:
        """Deliver every Part 10 object, or raise (see the module docstring for which error means what)."""
        ...


@dataclass(frozen=True)
class RefusedInstance:
    """One instance a peer refused, with the DIMSE status or PS3.18 FailureReason it gave (same code space)."""

    sop_instance_uid: str | None
    status: int

    def __str__(self) -> str:
        return f"{self.sop_instance_uid or '(no SOP Instance UID)'} (status 0x{self.status:04X})"


class DeliveryRejected(ServiceError):
    """The peer understood the push and refused it; retrying will not help.

    Attributes:
        destination: the destination's name.
        refused: the instances the peer refused and its status for each (empty when the refusal was of the whole
            request, such as an association rejected permanently or HTTP 401).
    """

    code = "delivery-rejected"
    http_status = 502

    def __init__(self, message: str, *, destination: str, refused: Sequence[RefusedInstance] = ()) -> None:
        super().__init__(message)
        self.destination = destination
        self.refused = tuple(refused)


def is_transient_status(status: int) -> bool:
    """A DIMSE status / PS3.18 FailureReason that reports the peer's temporary trouble, worth another try later.

    A7xx (Out of Resources) and 0110 (Processing Failure: the peer's own fault, often a full disk or a busy database).
    """
    return status & 0xFF00 == 0xA700 or status == 0x0110


def describe_refused(refused: Sequence[RefusedInstance], *, limit: int = 10) -> str:
    """``uid (status 0xC000), ...`` for a message, at most ``limit`` named so a message stays bounded."""
    named = ", ".join(str(r) for r in refused[:limit])
    if len(refused) > limit:
        named += f" and {len(refused) - limit} more"
    return named
