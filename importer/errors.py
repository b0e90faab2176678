"""Typed errors of a transfer.

Each error carries the `reason` that ends up in the image's Ready condition and the HTTP
status an uploader gets back. The server maps them to responses in one place
(`uploader/errors.py`); nothing else needs try/except per handler.
"""

from __future__ import annotations


class TransferError(Exception):
    """Base of every error a transfer can end with."""

    reason = "ProvisioningFailed"
    http_status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidImage(TransferError):
    """The image is corrupt or unsafe (backing file, encryption, out-of-range tables...)."""

    reason = "InvalidImage"
    http_status = 422


class UnsupportedFormat(TransferError):
    """A recognised format that we do not take (qcow v1, QED, DMG, ...)."""

    reason = "UnsupportedFormat"
    http_status = 422


class ImageTooLarge(TransferError):
    """The virtual size or the body exceeds the claim's capacity or the configured limit."""

    reason = "ImageTooLarge"
    http_status = 413


class BadImageChecksum(TransferError):
    """The bytes received do not match the checksum given in the spec."""

    reason = "BadImageChecksum"
    http_status = 422


class SourceUnreachable(TransferError):
    """The source of an import could not be read (network, TLS, 404, ...)."""

    reason = "SourceUnreachable"
    http_status = 502


class StartOver(SourceUnreachable):
    """The source broke off and cannot continue where it stopped; the whole transfer may be
    tried again from byte 0 (a bounded number of times)."""


class Suspended(TransferError):
    """The source stops here for now (the server is stopping): the pipeline saves a
    checkpoint of everything received, then ends without committing."""

    reason = "Suspended"
    http_status = 503


class StorageFull(TransferError):
    """The target ran out of space."""

    reason = "ProvisioningFailed"
    http_status = 507


class ProvisioningFailed(TransferError):
    """Any other failure while storing the image."""


class TransferInterrupted(TransferError):
    """The sender went away before the image was complete; the image can be uploaded again."""

    reason = "TransferInterrupted"
    http_status = 400
