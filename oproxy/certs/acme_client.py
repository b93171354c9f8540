"""
Certificates from an ACME server (Let's Encrypt, or any RFC 8555 CA).

The ``acme`` library (certbot's) speaks the protocol; it blocks, so every
call here runs in a thread (:mod:`oproxy.certs.renewal` sees to that).
One order covers all ``domains``; each name is proven with HTTP-01, whose
answers are handed to :class:`~oproxy.certs.challenge.ChallengeAnswers`
for the plain-HTTP listener to serve, and withdrawn once the order is
settled.

The account key is made once per ACME server and kept in the state
directory, private to the daemon's user (``0600``, in a ``0700``
directory): losing it loses nothing but the account, showing it would let
anyone act as the account.  Each certificate gets a key of its own, new at
every renewal, written with its chain into the certificate directory.

A certificate counts as this server's only if this server issued it (its
fingerprint is remembered beside the account): switching ``directory``
from ``staging`` to Let's Encrypt's production replaces the staging
certificate at once instead of serving it for two months.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import re
import threading
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import requests
from acme import challenges, client, crypto_util, messages
from acme import errors as acme_errors
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from josepy.jwk import JWKRSA

from oproxy import __version__
from oproxy.certs.challenge import ChallengeAnswers
from oproxy.certs.files import (
    PRIVATE_FILE,
    Held,
    held_for,
    keep_certificate,
    make_directory,
    private_key_pem,
    write_atomically,
)
from oproxy.certs.renewal import Stopped
from oproxy.config.certificates import AcmeConfig

#: Seconds one HTTP exchange with the ACME server may take.
NETWORK_TIMEOUT = 30
#: Seconds an order may take from the first challenge to the certificate.
ORDER_DEADLINE = 120

ACCOUNT_KEY = "account-key.pem"
ISSUED = "issued.sha256"


class AcmeFailure(Exception):
    """An order did not end in a certificate; ``str()`` says why."""


def account_directory(state_directory: str, directory_url: str) -> str:
    """``<state dir>/acme/<server host>-<hash of the URL>``: one account per server."""
    host = urlsplit(directory_url).hostname or "acme"
    digest = hashlib.sha256(directory_url.encode()).hexdigest()[:10]
    return os.path.join(state_directory, "acme", f"{host}-{digest}")


class AcmeJob:
    """
    Obtains the certificate for ``config.domains`` (blocking: in a thread).

    :param state_directory: where the account key is kept.
    :param certificates: the certificate directory.
    """

    kind = "acme"

    def __init__(
        self,
        config: AcmeConfig,
        state_directory: str,
        certificates: str,
        answers: ChallengeAnswers,
        *,
        timeout: int = NETWORK_TIMEOUT,
        deadline: float = ORDER_DEADLINE,
    ) -> None:
        self.config = config
        self.names: tuple[str, ...] = config.domains
        self.account = account_directory(state_directory, config.directory)
        self.certificates = certificates
        self.answers = answers
        self._timeout = timeout
        self._deadline = deadline

    @property
    def account_key_path(self) -> str:
        return os.path.join(self.account, ACCOUNT_KEY)

    def current(self) -> Held | None:
        held = held_for(self.certificates, self.names)
        if held is None:
            return None
        try:
            with open(os.path.join(self.account, ISSUED), encoding="ascii") as f:
                issued = f.read().split()
        except FileNotFoundError:
            return None
        return held if held.fingerprint in issued else None

    def account_key(self) -> JWKRSA:
        """The account's key, made (and kept, ``0600``) the first time."""
        try:
            with open(self.account_key_path, "rb") as f:
                key = serialization.load_pem_private_key(f.read(), password=None)
        except FileNotFoundError:
            make_directory(self.account)
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            write_atomically(self.account_key_path, private_key_pem(key), PRIVATE_FILE)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise AcmeFailure(f"{self.account_key_path} does not hold an RSA key")
        return JWKRSA(key=key)

    def _network(self, key: JWKRSA) -> client.ClientNetwork:
        # requests takes a CA file where the library's annotation says bool.
        verify: Any = self.config.ca_bundle or True
        return client.ClientNetwork(
            key,
            user_agent=f"oproxy/{__version__} acme-python",
            verify_ssl=verify,
            timeout=self._timeout,
        )

    def obtain(self, stopping: threading.Event) -> Held:
        key = self.account_key()
        network = self._network(key)
        try:
            acme = client.ClientV2(
                client.ClientV2.get_directory(self.config.directory, network), network
            )
            self._register(acme)
            _check(stopping)
            certificate_key = ec.generate_private_key(ec.SECP256R1())
            csr = crypto_util.make_csr(private_key_pem(certificate_key), list(self.names))
            order = acme.new_order(csr)
            chain = self._fulfil(acme, order, key, stopping)
        finally:
            network.session.close()
        held = keep_certificate(self.certificates, self.names, certificate_key, chain)
        if held is None:
            raise AcmeFailure("the certificate the ACME server issued does not match its key")
        self._remember(held)
        return held

    def _register(self, acme: client.ClientV2) -> None:
        """Make the account, or find it again (the server knows it by its key)."""
        registration = messages.NewRegistration.from_data(
            email=self.config.email, terms_of_service_agreed=True
        )
        try:
            acme.new_account(registration)
        except acme_errors.ConflictError as existing:
            acme.net.account = messages.RegistrationResource(
                uri=existing.location, body=messages.Registration()
            )

    def _fulfil(
        self,
        acme: client.ClientV2,
        order: messages.OrderResource,
        key: JWKRSA,
        stopping: threading.Event,
    ) -> list[x509.Certificate]:
        tokens: list[str] = []
        try:
            for authorization in order.authorizations:
                if authorization.body.status == messages.STATUS_VALID:
                    continue  # proven recently: the server remembers
                offered = authorization.body.challenges
                offer = next((c for c in offered if isinstance(c.chall, challenges.HTTP01)), None)
                if offer is None:
                    raise AcmeFailure(
                        f"{authorization.body.identifier.value}: the ACME server offers "
                        "no HTTP-01 challenge"
                    )
                response, answer = offer.response_and_validation(key)
                token = offer.chall.encode("token")
                self.answers.publish(token, answer)
                tokens.append(token)
                _check(stopping)
                acme.answer_challenge(offer, response)
            deadline = datetime.datetime.now() + datetime.timedelta(seconds=self._deadline)
            order = acme.poll_and_finalize(order, deadline=deadline)
        finally:
            for token in tokens:
                self.answers.withdraw(token)
        if not order.fullchain_pem:
            raise AcmeFailure("the ACME server finalized the order without a certificate")
        return x509.load_pem_x509_certificates(order.fullchain_pem.encode())

    def _remember(self, held: Held) -> None:
        """Note that this server issued ``held`` (the last few are kept)."""
        path = os.path.join(self.account, ISSUED)
        try:
            with open(path, encoding="ascii") as f:
                issued = f.read().split()
        except FileNotFoundError:
            issued = []
        issued = [*issued[-4:], held.fingerprint]
        write_atomically(path, ("\n".join(issued) + "\n").encode(), 0o644)

    def explain(self, error: Exception) -> str:
        return explain(error, self.config.directory)


def _check(stopping: threading.Event) -> None:
    if stopping.is_set():
        raise Stopped()


_ERRNO = re.compile(r"\[Errno -?\d+\] ([^'\")\]]+)")


def explain(error: Exception, directory: str) -> str:
    """One line for the log and ``/v1/health``: what went wrong, in words."""
    if isinstance(error, requests.exceptions.SSLError):
        return (
            f"cannot verify the ACME server at {directory} (its certificate is not trusted: "
            "set certificates.acme.ca_bundle for a private CA)"
        )
    if isinstance(error, requests.exceptions.Timeout):
        return f"the ACME server at {directory} did not answer in time"
    if isinstance(error, requests.exceptions.ConnectionError):
        reason = _ERRNO.search(str(error))
        because = reason.group(1).strip().lower() if reason else "connection failed"
        return f"cannot reach the ACME server at {directory}: {because}"
    if isinstance(error, acme_errors.ValidationError):
        return "the ACME server could not validate: " + "; ".join(
            _failed_authorization(each) for each in error.failed_authzrs
        )
    if isinstance(error, acme_errors.TimeoutError):
        return f"the order was not settled within {ORDER_DEADLINE} seconds"
    if isinstance(error, messages.Error):
        return f"the ACME server refused: {error.detail or error.description or error.typ}"
    if isinstance(error, AcmeFailure | OSError):
        return str(error)
    return f"{type(error).__name__}: {error}"


def _failed_authorization(authorization: messages.AuthorizationResource) -> str:
    name = authorization.body.identifier.value
    problems: Sequence[str] = [
        str(c.error.detail or c.error.typ) for c in authorization.body.challenges if c.error
    ]
    return f"{name}: {', '.join(problems) or authorization.body.status}"
