"""The check of a generation's TLS certificate and key, run by the master before any worker starts.

A reload (the first one too) freezes the pair into the generation's snapshot and checks the
copies, so what was checked is what its workers, respawned ones included, serve. The check:
the key matches the certificate (`ssl.SSLContext.load_cert_chain`, the same OpenSSL call the
workers make), and every certificate in the file is valid now, with a warning when one
expires within `EXPIRY_WARNING`. A pair that fails raises `TLSError`: the reload fails with
its message and the serving generation keeps its own pair.

The dates come from the `cryptography` package: the standard library decodes a certificate's
dates only through a private function (`ssl._ssl._test_decode_cert`) or for CA certificates
(`SSLContext.get_ca_certs`), and a server certificate is not one.
"""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

EXPIRY_WARNING = datetime.timedelta(days=14)


class TLSError(Exception):
    """The certificate or key cannot be served; the message names the file and the problem."""


def _no_password() -> bytes:
    # An encrypted key has no password setting: fail at once rather than let OpenSSL ask on a terminal.
    raise TLSError("the key is encrypted; pypnm needs an unencrypted key file")


def check_pair(
    cert: Path, key: Path, *, shown_cert: str, shown_key: str, now: datetime.datetime | None = None
) -> list[str]:
    """Check a certificate file and its key file; the warnings (expiring soon), or TLSError.

    `cert` and `key` are the files read; `shown_cert` and `shown_key` the names the operator knows them by.
    """
    try:
        data = cert.read_bytes()
    except OSError as exc:
        raise TLSError(f"ssl_certfile {shown_cert!r}: cannot read it ({exc.strerror})") from None
    from cryptography import x509  # here, not at the top: a master without TLS never needs it (memory)

    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TLSError(f"ssl_certfile {shown_cert!r}: not a PEM certificate") from None
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=_no_password)
    except TLSError as exc:
        raise TLSError(f"ssl_keyfile {shown_key!r}: {exc}") from None
    except ssl.SSLError as exc:
        # OpenSSL's reason, e.g. KEY_VALUES_MISMATCH; the message is on one line.
        raise TLSError(
            f"ssl_keyfile {shown_key!r} does not match ssl_certfile {shown_cert!r} or is not a PEM key "
            f"({exc.reason or exc})"
        ) from None
    except OSError as exc:
        raise TLSError(f"ssl_keyfile {shown_key!r}: cannot read it ({exc.strerror})") from None

    now = now or datetime.datetime.now(datetime.UTC)
    warnings: list[str] = []
    for index, certificate in enumerate(certificates):
        which = f"ssl_certfile {shown_cert!r}" + (f" (certificate {index + 1} in the file)" if index else "")
        starts, ends = certificate.not_valid_before_utc, certificate.not_valid_after_utc
        if now < starts:
            raise TLSError(f"{which} is not valid yet: valid from {starts:%Y-%m-%d %H:%M:%S} UTC")
        if now > ends:
            raise TLSError(f"{which} has expired: valid until {ends:%Y-%m-%d %H:%M:%S} UTC")
        if ends - now < EXPIRY_WARNING:
            days = (ends - now) / datetime.timedelta(days=1)
            warnings.append(f"{which} expires in {days:.1f} days ({ends:%Y-%m-%d %H:%M:%S} UTC); renew it and reload")
    return warnings
