"""The container health probe: ``python -m inslytic_fast.observe.healthcheck`` exits 0 if
GET /health on this host's port answers 200, over HTTP or, for a server started with
--tls-cert, over HTTPS.

The port is INSLYTIC_PORT, else PORT, else 8080 (as ``serve`` resolves them). The HTTPS probe
does not verify the certificate: it asks the process on 127.0.0.1 whether it is alive, and a
self-signed or expired certificate is not its business (clients will say so).
"""

from __future__ import annotations

import http.client
import os
import ssl
import sys
import urllib.request

TIMEOUT_S = 3.0


def probe(port: str) -> bool:
    unverified = ssl.create_default_context()
    unverified.check_hostname = False
    unverified.verify_mode = ssl.CERT_NONE
    for scheme, context in (("http", None), ("https", unverified)):
        url = f"{scheme}://127.0.0.1:{port}/health"
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT_S, context=context) as response:
                return response.status == 200
        except (OSError, http.client.HTTPException):  # refused, reset, TLS or HTTP mismatch
            continue
    return False


def main() -> int:
    port = os.environ.get("INSLYTIC_PORT") or os.environ.get("PORT") or "8080"
    return 0 if probe(port) else 1


if __name__ == "__main__":
    sys.exit(main())
