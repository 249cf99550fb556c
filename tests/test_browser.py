"""A real headless Chromium (Debian's, driven by Playwright for Python): a page on another
origin sends with fetch + keepalive on pagehide, sendBeacon (text/plain, key in the body), and
gzip bodies from CompressionStream; the --cors-origins allowlist holds in the browser and on
the server. Skipped only where Chromium or Playwright is not installed (.ci/run installs both).
"""

from __future__ import annotations

import http.server
import re
import shutil
import threading
import time

import pytest

from inslytic_fast.storage.query import run_query

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)"
)
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip
DEADLINE_S = 60

PAGE = b"""<!doctype html><html><head><title>shop</title></head><body>
<script>
const event = (name) => ({eventName: name, timestamp: new Date().toISOString(),
  anonymousId: 'browser', sessionId: 's1', consentGiven: true, properties: {page: 'x'}});
const gzip = async (text) => new Response(
  new Blob([text]).stream().pipeThrough(new CompressionStream('gzip'))).arrayBuffer();
// What a page does with its events on the way out: the requests outlive the page.
window.sendOnExit = (api, key, tag) => addEventListener('pagehide', () => {
  fetch(api + '/v1/ingest', {method: 'POST', keepalive: true,
    headers: {'Content-Type': 'application/json', 'Authorization': 'Bearer ' + key},
    body: JSON.stringify({events: [event(tag + '-fetch-keepalive')]})});
  navigator.sendBeacon(api + '/v1/ingest', new Blob(
    [JSON.stringify({writeKey: key, events: [event(tag + '-beacon')]})], {type: 'text/plain'}));
  navigator.sendBeacon(api + '/v1/batch', new Blob([JSON.stringify({writeKey: key,
    batch: [{type: 'track', event: tag + '-segment-beacon', anonymousId: 'browser',
             messageId: tag + '-m1', properties: {amount: 42}}]})], {type: 'text/plain'}));
});
window.sendGzip = async (api, key, tag) => {
  const body = await gzip(JSON.stringify({events: [event(tag + '-gzip-header')]}));
  const answer = await fetch(api + '/v1/ingest', {method: 'POST', body,
    headers: {'Content-Type': 'application/json', 'Content-Encoding': 'gzip',
              'Authorization': 'Bearer ' + key}});
  const beacon = await gzip(JSON.stringify({writeKey: key, events: [event(tag + '-gzip-beacon')]}));
  const queued = navigator.sendBeacon(api + '/v1/ingest', new Blob([beacon], {type: 'text/plain'}));
  return [answer.status, queued];
};
window.tryFetch = async (api, key, tag) => {
  try {
    const answer = await fetch(api + '/v1/ingest', {method: 'POST',
      headers: {'Content-Type': 'application/json', 'Authorization': 'Bearer ' + key},
      body: JSON.stringify({events: [event(tag + '-fetch')]})});
    return 'read ' + answer.status;
  } catch (error) { return 'blocked'; }
};
</script></body></html>"""


class _Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def page_origins():
    """Two sites on other loopback ports: the shop (allowed) and a stranger (not)."""
    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Page) for _ in range(2)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield [f"http://127.0.0.1:{s.server_address[1]}" for s in servers]
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def names(server, like: str) -> list[str]:
    return [r[0] for r in run_query(
        server.data_dir, f"SELECT event_name FROM events WHERE event_name LIKE '{like}' ORDER BY 1"
    )[1]]  # fmt: skip


def refused(server, status: str) -> int:
    _, _, page = server.request("GET", "/metrics")
    return sum(
        int(float(n))
        for n in re.findall(
            rf'inslytic_http_requests_total{{route="/v1/[a-z]+",status="{status}"}} (\S+)',
            page.decode(),
        )
    )


def wait_for(condition, what: str):
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_page_on_another_origin_sends_every_way_a_browser_can(make_server, page_origins,
                                                                browser):  # fmt: skip
    shop, stranger = page_origins
    server = make_server("--workers", "1", "--events-per-minute", "0", "--cors-origins", shop)
    api, key = server.url, server.first_run_key
    tab = browser.new_page()
    tab.goto(shop + "/")
    assert tab.evaluate("([api, key, tag]) => sendGzip(api, key, tag)", [api, key, "shop"]) == [
        202, True,
    ]  # fmt: skip
    tab.evaluate("([api, key, tag]) => sendOnExit(api, key, tag)", [api, key, "shop"])
    tab.goto("about:blank")  # pagehide: the keepalive fetch and the beacons leave with the page
    expected = sorted(["shop-beacon", "shop-fetch-keepalive", "shop-gzip-beacon",
                       "shop-gzip-header", "shop-segment-beacon"])  # fmt: skip
    wait_for(lambda: names(server, "shop-%") == expected, f"{expected} to be stored")
    [(amount,)] = run_query(
        server.data_dir,
        "SELECT properties_json->>'$.amount' FROM events WHERE message_id = 'shop-m1'",
    )[1]
    assert amount == "42"

    # The stranger's page: the browser hides the answer (no Access-Control-Allow-Origin for
    # it), and the server refuses the request itself, beacons included (they skip CORS).
    other = browser.new_page()
    other.goto(stranger + "/")
    assert other.evaluate("([api, key, tag]) => tryFetch(api, key, tag)",
                          [api, key, "stranger"]) == "blocked"  # fmt: skip
    other.evaluate("([api, key, tag]) => sendOnExit(api, key, tag)", [api, key, "stranger"])
    other.goto("about:blank")
    # The fetches carry Authorization, so their preflight fails in the browser; the two
    # beacons need no preflight and reach the server, which refuses them.
    wait_for(lambda: refused(server, "403") >= 2, "the stranger's beacons to be refused")
    assert names(server, "stranger-%") == []
