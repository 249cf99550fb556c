"""X-Forwarded-For is believed only from trusted proxies, walking from the right."""

from __future__ import annotations

import pytest

from inslytic_fast.config import ConfigError, resolve
from inslytic_fast.http.forwarded import TrustedProxies

from .test_config import no_flags


def test_the_client_is_the_right_most_address_a_trusted_proxy_did_not_add():
    proxies = TrustedProxies("10.0.0.0/8, 192.0.2.7")
    # A client-written left end is not believed over what the trusted proxies appended.
    assert proxies.client("10.0.0.2", b"6.6.6.6, 198.51.100.4, 192.0.2.7") == "198.51.100.4"
    assert proxies.client("10.0.0.2", b"198.51.100.4") == "198.51.100.4"
    assert proxies.client("10.0.0.2", b" 10.9.9.9 , 10.0.0.1") == "10.9.9.9"  # all trusted
    assert proxies.client("10.0.0.2", None) == "10.0.0.2"


def test_an_untrusted_peer_is_the_client_whatever_it_claims():
    assert TrustedProxies("10.0.0.0/8").client("203.0.113.5", b"10.0.0.1") == "203.0.113.5"
    assert TrustedProxies("").client("10.0.0.2", b"198.51.100.4") == "10.0.0.2"
    assert not TrustedProxies(" , ")


def test_a_bad_trusted_proxies_setting_is_refused_at_start():
    assert resolve(no_flags(trusted_proxies="::1, 10.0.0.0/8"), environ={})
    with pytest.raises(ConfigError, match="'proxy.internal' is not an IP address or network"):
        resolve(no_flags(trusted_proxies="10.0.0.1,proxy.internal"), environ={})
