"""Who the client is behind a load balancer: X-Forwarded-For, believed only from trusted proxies.

Each proxy appends the address it received the request from, so the header's right end is the
most trustworthy: walking from the right, past the addresses of proxies we trust, the first
other address is the client (what nginx's real_ip_recursive and uvicorn's
--forwarded-allow-ips do). A client can write anything at the left end; it is never believed
over a hop a trusted proxy added. Used for the access log's ``client`` field.
"""

from __future__ import annotations

import ipaddress


class TrustedProxies:
    """Addresses and networks (``10.0.0.0/8``) whose X-Forwarded-For is believed."""

    __slots__ = ("networks",)

    def __init__(self, spec: str = "") -> None:
        """``spec``: comma-separated addresses or networks; ValueError names a bad one."""
        networks = []
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                networks.append(ipaddress.ip_network(part, strict=False))
            except ValueError:
                raise ValueError(f"{part!r} is not an IP address or network") from None
        self.networks = tuple(networks)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.networks)

    def client(self, peer: str, forwarded_for: bytes | None) -> str:
        """The client's address: ``peer`` itself unless it is a trusted proxy that sent an
        X-Forwarded-For; then the right-most address there that is not a trusted proxy."""
        if forwarded_for is None or not self.trusts(peer):
            return peer
        hops = [hop.strip() for hop in forwarded_for.decode("latin-1").split(",")]
        for hop in reversed(hops):
            if hop and not self.trusts(hop):
                return hop
        return hops[0] or peer  # every hop a trusted proxy: the first is the origin
