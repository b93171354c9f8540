"""
Certificates the daemon makes, renews and serves itself.

The rooms:

* :mod:`~oproxy.certs.files` — the certificate directory: what a PEM file
  holds, written atomically (a private key never readable by others),
  read back by every process;
* :mod:`~oproxy.certs.tls` — TLS 1.2 and later with modern ciphers on every
  listener, and the ``tls:`` listener's certificates chosen by SNI from the
  directory, re-read when a file changes, without a restart;
* :mod:`~oproxy.certs.schedule` — when to renew and how long to wait after
  a failure (pure arithmetic);
* :mod:`~oproxy.certs.renewal` — the service that keeps each certificate
  fresh, its blocking work in a thread, and the status file every process
  reads;
* :mod:`~oproxy.certs.local` — a certificate authority of the daemon's own
  (mkcert-style), for names and addresses on a LAN;
* :mod:`~oproxy.certs.acme` — certificates from an ACME server (Let's
  Encrypt) with the ``acme`` library;
* :mod:`~oproxy.certs.challenge` — the plain-HTTP site: HTTP-01 answers,
  and a redirect to HTTPS for everything else;
* :mod:`~oproxy.certs.report` — what ``/v1/health``, ``/metrics`` and
  ``oproxy certs status`` say about the certificates;
* :mod:`~oproxy.certs.commands` — ``oproxy certs local|ca-path|status``;
* :mod:`~oproxy.certs.wiring` — how the composition root adds all this to a
  process's tree.
"""
