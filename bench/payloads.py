"""Seeded, realistic ingest payloads and pre-encoded HTTP requests.

Events look like what a browser SDK sends: varied names, 0-4 string properties, real-looking
URLs, titles, referrers, UTM values, user agents' browser/OS and device types; ~300-600 bytes of
JSON each. The same seed always gives the same bytes, so runs are comparable.

The load generator never encodes anything while it runs: every request (request line, headers,
body) is built here once and the generator cycles through the finished bytes.
"""

from __future__ import annotations

import base64
import gzip
import random
from datetime import UTC, datetime, timedelta

import orjson

INGEST_PATH = "/v1/ingest"
# Distinct request bodies a generator process cycles through: enough that the server never sees
# one body over and over (no accidental cache), few enough to keep 1000-event bodies in memory
# (16 x ~450 KiB).
VARIANTS_FOR_EVENTS = {1: 256, 100: 64, 1000: 16}
DEFAULT_VARIANTS = 16

EVENT_NAMES = [
    "page_viewed", "page_viewed", "page_viewed", "button_clicked", "signup_started",
    "signup_completed", "checkout_started", "checkout_step_completed", "product_added_to_cart",
    "search_performed", "video_played", "form_submitted", "Order Completed", "file_downloaded",
]  # fmt: skip
SITES = ["https://shop.example.com", "https://www.example.org", "https://app.example.io"]
PAGES = [
    ("/", "Home"),
    ("/pricing", "Pricing - Plans for every team"),
    ("/docs/getting-started/installation", "Installation | Docs"),
    ("/blog/2026/02/why-we-self-host-our-analytics", "Why we self-host our analytics"),
    ("/products/ergonomic-chair-pro?color=graphite&size=L", "Ergonomic Chair Pro - Graphite"),
    ("/account/settings/billing", "Billing settings"),
    ("/search?q=wireless+noise+cancelling+headphones&page=2", "Search results"),
    ("/checkout/shipping", "Checkout - Shipping"),
]
REFERRERS = [
    "", "https://www.google.com/", "https://news.ycombinator.com/item?id=41234567",
    "https://t.co/AbCdEf123", "https://duckduckgo.com/?q=self+hosted+product+analytics&ia=web",
    "https://www.linkedin.com/feed/",
]  # fmt: skip
UTM = [
    (None, None, None),
    (None, None, None),
    ("newsletter", "email", "2026-02-launch"),
    ("google", "cpc", "brand-search-eu"),
    ("twitter", "social", None),
]
BROWSERS = ["Chrome", "Safari", "Firefox", "Edge", "Samsung Internet", "Opera"]
OSES = ["Windows", "macOS", "iOS", "Android", "Linux", "ChromeOS"]
DEVICES = ["desktop", "desktop", "mobile", "mobile", "tablet"]
PROPERTY_POOL = {
    "plan": ["free", "pro", "enterprise"],
    "button": ["cta-hero", "nav-signup", "footer-contact", "pricing-toggle-annual"],
    "currency": ["EUR", "USD", "GBP"],
    "value": ["19.99", "249.00", "5", "1299.50"],
    "experiment": ["checkout-v2:control", "checkout-v2:treatment"],
    "query": ["wireless headphones", "standing desk", "usb-c hub 7 in 1"],
    "step": ["1", "2", "3"],
    "sku": ["SKU-48213-GR-L", "SKU-10022-BK", "SKU-77310-WH-M"],
    "locale": ["en-US", "de-DE", "fr-FR", "nl-NL"],
}
BASE_TIME = datetime(2026, 2, 16, 10, 30, tzinfo=UTC)


def make_event(rng: random.Random) -> dict:
    site = rng.choice(SITES)
    path, title = rng.choice(PAGES)
    source, medium, campaign = rng.choice(UTM)
    when = BASE_TIME + timedelta(milliseconds=rng.randrange(86_400_000))
    event: dict = {
        "eventName": rng.choice(EVENT_NAMES),
        "timestamp": when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z",
        "anonymousId": f"anon-{rng.getrandbits(64):016x}",
        "sessionId": f"sess-{rng.getrandbits(48):012x}",
        "consentGiven": rng.random() < 0.9,
        "userId": f"user_{rng.randrange(1, 250_000)}" if rng.random() < 0.35 else None,
        "properties": {
            key: rng.choice(PROPERTY_POOL[key])
            for key in rng.sample(sorted(PROPERTY_POOL), rng.randrange(0, 5))
        },
        "pageUrl": site + path,
        "pageTitle": title,
        "utmSource": source,
        "utmMedium": medium,
        "utmCampaign": campaign,
        "deviceType": rng.choice(DEVICES),
        "browser": rng.choice(BROWSERS),
        "os": rng.choice(OSES),
    }
    referrer = rng.choice(REFERRERS)
    if referrer:  # SDKs omit an empty referrer (direct traffic)
        event["referrer"] = referrer
    return event


def make_body(rng: random.Random, events_per_request: int) -> bytes:
    return orjson.dumps({"events": [make_event(rng) for _ in range(events_per_request)]})


SEGMENT_PATH = "/v1/batch"
# Segment scenario: every messageId ends in this many hex digits, which the generator overwrites
# with a per-request serial number (bench/loadgen.py), so every message is new to the server's
# dedup table, as an SDK's would be.
MESSAGE_SERIAL_DIGITS = 12
MESSAGE_SERIAL_PLACEHOLDER = b"0" * MESSAGE_SERIAL_DIGITS


def make_segment_message(rng: random.Random, variant: int, index: int) -> dict:
    """A Segment-spec track/page/identify message like analytics.js sends, from make_event."""
    event = make_event(rng)
    kind = rng.choice(("track", "track", "track", "page", "identify"))
    url = event["pageUrl"]
    message: dict = {
        "type": kind,
        "messageId": f"bench-{variant:04x}-{index:04x}-"
        + MESSAGE_SERIAL_PLACEHOLDER.decode(),
        "anonymousId": event["anonymousId"],
        "timestamp": event["timestamp"],
        "context": {
            "library": {"name": "analytics.js", "version": "next-1.70.0"},
            "page": {"url": url, "title": event["pageTitle"],
                     "referrer": event.get("referrer", "")},
            "userAgent": f"Mozilla/5.0 ({event['os']}) {event['browser']}",
            "locale": "en-US",
        },
    }  # fmt: skip
    if event["userId"]:
        message["userId"] = event["userId"]
    properties = {**event["properties"], "amount": rng.randrange(1, 500) / 4, "ok": True}
    if kind == "track":
        message["event"] = event["eventName"]
        message["properties"] = properties
    elif kind == "page":
        message["name"] = event["pageTitle"]
        message["properties"] = {"url": url, "title": event["pageTitle"], "path": url}
    else:
        message["traits"] = {"plan": rng.choice(["free", "pro"]), "seats": rng.randrange(1, 50)}
    if event["utmSource"]:
        message["context"]["campaign"] = {"source": event["utmSource"],
                                          "medium": event["utmMedium"]}  # fmt: skip
    return message


def make_segment_body(rng: random.Random, variant: int, messages: int) -> bytes:
    batch = [make_segment_message(rng, variant, i) for i in range(messages)]
    return orjson.dumps({"batch": batch, "sentAt": BASE_TIME.isoformat()})


def build_request(
    host: str, port: int, key: str, body: bytes, use_gzip: bool, *, segment: bool = False
) -> bytes:
    """One complete keep-alive HTTP/1.1 POST, ready to write to a socket."""
    if segment:  # what the Segment SDKs send: Basic auth with the write key as user name
        authorization = "Basic " + base64.b64encode(f"{key}:".encode()).decode()
    else:
        authorization = f"Bearer {key}"
    headers = [
        f"POST {SEGMENT_PATH if segment else INGEST_PATH} HTTP/1.1",
        f"Host: {host}:{port}",
        "User-Agent: inslytic-bench",
        "Content-Type: application/json",
        f"Authorization: {authorization}",
    ]
    if use_gzip:
        # Level 6 is what most HTTP client libraries and SDKs default to.
        body = gzip.compress(body, compresslevel=6, mtime=0)
        headers.append("Content-Encoding: gzip")
    headers.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(headers) + "\r\n\r\n").encode("latin-1") + body


def build_requests(
    host: str,
    port: int,
    key: str,
    events_per_request: int,
    *,
    seed: int,
    use_gzip: bool = False,
    variants: int | None = None,
    segment: bool = False,
) -> tuple[list[bytes], int]:
    """Pre-encoded requests and the mean JSON bytes per event (before any gzip)."""
    count = variants or VARIANTS_FOR_EVENTS.get(events_per_request, DEFAULT_VARIANTS)
    rng = random.Random(seed)
    if segment:
        bodies = [make_segment_body(rng, v, events_per_request) for v in range(count)]
    else:
        bodies = [make_body(rng, events_per_request) for _ in range(count)]
    # The envelope {"events":[...]} is 12 bytes; the rest is events and commas.
    json_bytes = sum(len(b) - 12 for b in bodies)
    mean_event_bytes = round(json_bytes / (count * events_per_request))
    requests = [
        build_request(host, port, key, body, use_gzip and not segment, segment=segment)
        for body in bodies
    ]
    return requests, mean_event_bytes


def message_serial_offsets(request: bytes) -> list[int]:
    """Where a Segment request's messageId serial digits sit (see MESSAGE_SERIAL_DIGITS)."""
    offsets, at = [], request.find(b'"bench-')
    while at >= 0:
        end = request.index(b'"', at + 1)
        offsets.append(end - MESSAGE_SERIAL_DIGITS)
        at = request.find(b'"bench-', end)
    return offsets
