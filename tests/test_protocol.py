"""The HTTP protocol, bytes in / bytes out over a mock transport (no sockets)."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from inslytic_fast.http.parsing import IDLE, LINGER, MAX_DISCARDED_BODY_BYTES
from inslytic_fast.http.protocol import LINGER_SECONDS, PARSE_SLICE

from .protocol_helpers import get, make_conn, post, split_responses, statuses


def test_keep_alive_serves_many_requests_on_one_connection():
    conn, transport, _ = make_conn()
    for i in range(3):
        conn.data_received(get(f"/r{i}"))
    answers = split_responses(transport.take())
    assert [a[0] for a in answers] == [200, 200, 200]
    assert [orjson.loads(a[2])["path"] for a in answers] == ["/r0", "/r1", "/r2"]
    assert not transport.closed


def test_every_response_has_content_type_length_and_date():
    conn, transport, _ = make_conn()
    conn.data_received(get("/x"))
    [(status, headers, body)] = split_responses(transport.take())
    assert headers["content-type"] == "application/json"
    assert int(headers["content-length"]) == len(body)
    assert headers["date"].endswith("GMT")


def test_pipelined_responses_keep_request_order_while_an_earlier_one_commits():
    conn, transport, app = make_conn()
    conn.data_received(post("/slow", b"{}") + get("/a") + get("/b"))
    assert transport.take() == b"", "nothing may overtake the held first response"
    app.release()
    answers = split_responses(transport.take())
    assert [a[0] for a in answers] == [202, 200, 200]
    assert [a[2] for a in answers[1:]] == [b'{"path":"/a","body":0}', b'{"path":"/b","body":0}']


def test_a_request_fed_one_byte_at_a_time():
    conn, transport, app = make_conn()
    raw = post("/x", b'{"events":[]}', "Authorization: Bearer k\r\n")
    for i in range(len(raw)):
        conn.data_received(raw[i : i + 1])
    [(status, _, body)] = split_responses(transport.take())
    assert status == 200
    assert app.requests[0].body == b'{"events":[]}'
    assert app.requests[0].authorization == b"Bearer k"


@pytest.mark.parametrize(
    "name", [b"Authorization", b"authorization", b"AUTHORIZATION", b"aUtHoRiZaTiOn"]
)
def test_header_names_are_case_insensitive(name):
    conn, transport, app = make_conn()
    raw = post("/x", b"{}", (name + b": Bearer k\r\nCONTENT-TYPE: text/plain\r\n").decode())
    conn.data_received(raw)
    assert statuses(transport.take()) == [200]
    assert app.requests[0].authorization == b"Bearer k"
    assert app.requests[0].content_type == b"text/plain"


def test_chunked_body_is_reassembled():
    conn, transport, app = make_conn()
    raw = (
        b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    conn.data_received(raw)
    assert statuses(transport.take()) == [200]
    assert app.requests[0].body == b"hello world"


def test_query_string_is_not_part_of_the_path():
    conn, _, app = make_conn()
    conn.data_received(get("/health?probe=1"))
    assert app.requests[0].path == b"/health"


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello
        b"POST /x HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST /x HTTP/1.1\r\nContent-Length : 5\r\n\r\nhello",
        b"POST /x HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        b"POST /x HTTP/1.1\r\nTransfer-Encoding: ,chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        b"POST /x HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: a\nb\r\n\r\n",
        b"POST /x HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n",
    ],
)
def test_malformed_or_ambiguous_requests_get_400_and_close(raw):
    conn, transport, app = make_conn()
    conn.data_received(raw)
    [(status, headers, body)] = split_responses(transport.take())
    assert status == 400
    assert headers["connection"] == "close"
    assert orjson.loads(body)["error"] == "Bad Request"
    assert app.requests == []
    assert transport.eof_written and conn.phase == LINGER


def test_nothing_after_a_malformed_pipelined_request_is_processed():
    conn, transport, app = make_conn()
    conn.data_received(get("/a") + get("/b") + b"BROKEN\r\n\r\n" + get("/c"))
    assert statuses(transport.take()) == [200, 200, 400]
    assert [r.path for r in app.requests] == [b"/a", b"/b"]
    conn.data_received(get("/d"))  # lingering: input is drained, not parsed
    assert transport.take() == b""


def test_headers_over_the_cap_get_431():
    conn, transport, _ = make_conn(max_header_bytes=1024)
    conn.data_received(get("/x", "X-Big: " + "a" * 2000 + "\r\n"))
    assert statuses(transport.take()) == [431]


def test_a_never_ending_header_line_is_cut_at_the_cap_across_reads():
    conn, transport, _ = make_conn(max_header_bytes=1024)
    conn.data_received(b"GET /x HTTP/1.1\r\nX-Long: ")
    for _ in range(100):
        conn.data_received(b"a" * 100)
        if transport.buffer:
            break
    assert statuses(transport.take()) == [431]


def test_a_long_url_gets_431():
    conn, transport, _ = make_conn(max_header_bytes=1024)
    conn.data_received(get("/" + "u" * 5000))
    assert statuses(transport.take()) == [431]


def test_content_length_over_the_cap_is_refused_before_the_body_arrives():
    conn, transport, app = make_conn(max_body_bytes=100)
    conn.data_received(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\n\r\n")
    [(status, headers, _)] = split_responses(transport.take())
    assert status == 413 and headers["connection"] == "close"
    assert app.requests == []


def test_chunked_body_over_the_cap_is_refused_as_soon_as_it_passes():
    conn, transport, app = make_conn(max_body_bytes=100)
    conn.data_received(b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    conn.data_received(b"40\r\n" + b"a" * 64 + b"\r\n")
    assert transport.buffer == b""
    conn.data_received(b"40\r\n" + b"a" * 64 + b"\r\n")
    assert statuses(transport.take()) == [413]
    assert app.requests == []


def test_expect_100_continue_is_answered_before_the_body():
    conn, transport, _ = make_conn()
    conn.data_received(
        b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
    )
    assert transport.take() == b"HTTP/1.1 100 Continue\r\n\r\n"
    conn.data_received(b"{}")
    assert statuses(transport.take()) == [200]


def test_expect_100_continue_refused_on_its_headers_gets_the_refusal_and_no_invitation():
    conn, transport, app = make_conn()
    conn.data_received(
        b"POST /refused HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n"
        b"Expect: 100-continue\r\n\r\n"
    )
    data = transport.take()
    assert b"100 Continue" not in data
    [(status, headers, _)] = split_responses(data)
    assert status == 401 and headers["connection"] == "close"
    assert conn.phase == LINGER and transport.eof_written  # a body sent anyway is discarded
    conn.data_received(b"x" * 65536)
    assert transport.take() == b"" and app.requests == []


def test_expect_100_continue_behind_a_pending_answer_is_refused_in_order():
    conn, transport, _ = make_conn()
    conn.data_received(
        post("/slow", b"{}") + b"POST /refused HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n"
        b"Expect: 100-continue\r\n\r\n"
    )
    assert transport.take() == b""  # the refusal waits for the answer owed before it
    conn.app.release()
    assert statuses(transport.take()) == [202, 401]


@pytest.mark.parametrize(
    ("hosts", "detail"), [("", "needs a Host header"), ("Host: a\r\nHost: b\r\n", "only one")]
)
def test_http11_requests_without_exactly_one_host_are_400(hosts, detail):
    conn, transport, app = make_conn()
    conn.data_received(f"GET /x HTTP/1.1\r\n{hosts}\r\n".encode())
    [(status, _, body)] = split_responses(transport.take())
    assert status == 400 and detail in orjson.loads(body)["details"][0]
    assert app.requests == []


def test_http10_needs_no_host_and_keep_alive_is_confirmed():
    conn, transport, _ = make_conn()
    conn.data_received(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    [(status, headers, _)] = split_responses(transport.take())
    # RFC 9112 s9.3: an HTTP/1.0 client keeps the connection only if the response says so.
    assert status == 200 and headers["connection"] == "keep-alive"
    conn.data_received(b"GET /b HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
    assert statuses(transport.take()) == [200] and not transport.closed
    conn.data_received(get("/c", "Connection: keep-alive\r\n"))  # HTTP/1.1: implied, not said
    [(_, headers, _)] = split_responses(transport.take())
    assert "connection" not in headers


def test_connection_close_request_closes_after_the_answer():
    conn, transport, _ = make_conn()
    conn.data_received(get("/x", "Connection: close\r\n") + get("/ignored"))
    [(status, headers, _)] = split_responses(transport.take())
    assert status == 200 and headers["connection"] == "close"
    assert transport.closed


def test_http10_without_keep_alive_closes():
    conn, transport, _ = make_conn()
    conn.data_received(b"GET /x HTTP/1.0\r\n\r\n")
    assert statuses(transport.take()) == [200]
    assert transport.closed


def test_upgrade_requests_are_answered_then_closed():
    conn, transport, _ = make_conn()
    conn.data_received(get("/x", "Upgrade: websocket\r\nConnection: upgrade\r\n"))
    assert statuses(transport.take()) == [200]
    assert transport.closed


def test_an_app_error_becomes_a_500_and_the_connection_keeps_serving():
    conn, transport, _ = make_conn()
    conn.data_received(get("/boom") + get("/after"))
    assert statuses(transport.take()) == [500, 200]
    assert not transport.closed


def test_reading_pauses_with_too_many_requests_in_flight_and_resumes_below_low_water():
    conn, transport, app = make_conn(max_pipelined=4)
    conn.data_received(post("/slow", b"") * 5)
    assert transport.read_paused
    app.release()  # 4 in flight: still above the low-water mark of 2
    assert transport.read_paused
    app.release()
    app.release()  # 2 in flight
    assert transport.read_paused
    app.release()  # 1 in flight
    assert not transport.read_paused
    app.release()
    assert statuses(transport.take()) == [202] * 5


def test_reading_pauses_while_the_write_buffer_is_over_high_water():
    conn, transport, _ = make_conn()
    conn.pause_writing()
    assert transport.read_paused
    conn.pause_writing()  # safe to call twice
    conn.resume_writing()
    assert not transport.read_paused
    conn.resume_writing()


def test_slow_headers_time_out_with_408():
    conn, transport, _ = make_conn(header_timeout=10)
    start = conn.state.now
    conn.data_received(b"GET /x HTTP/1.1\r\nHost")
    conn.check_timeouts(start + 9.5)
    assert transport.buffer == b""
    conn.check_timeouts(start + 10)
    [(status, headers, _)] = split_responses(transport.take())
    assert status == 408 and headers["connection"] == "close"


def test_a_stalled_body_times_out_but_a_trickling_one_does_not():
    conn, transport, _ = make_conn(body_timeout=30)
    t0 = conn.state.now
    conn.data_received(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab")
    conn.state.now = t0 + 29
    conn.data_received(b"cd")  # activity resets the body idle clock
    conn.check_timeouts(t0 + 58)
    assert transport.buffer == b""
    conn.check_timeouts(t0 + 59)
    assert statuses(transport.take()) == [408]


def test_idle_keep_alive_connections_are_closed_quietly():
    conn, transport, _ = make_conn(keepalive_timeout=60)
    conn.data_received(get("/x"))
    transport.take()
    conn.check_timeouts(conn.state.now + 59)
    assert not transport.closed
    conn.check_timeouts(conn.state.now + 60)
    assert transport.closed and transport.buffer == b""


def test_no_timeout_while_the_server_owes_an_answer():
    conn, transport, app = make_conn(keepalive_timeout=1)
    conn.data_received(post("/slow", b"{}"))
    conn.check_timeouts(conn.state.now + 100)
    assert not transport.closed
    app.release()
    assert statuses(transport.take()) == [202]


def test_lingering_close_ends_after_a_bound():
    conn, transport, _ = make_conn()
    conn.data_received(b"NOPE\r\n\r\n")
    assert conn.phase == LINGER and not transport.closed
    conn.check_timeouts(conn.phase_since + LINGER_SECONDS)
    assert transport.closed


def test_connections_over_the_cap_get_503():
    conn, transport, _ = make_conn(max_connections=1)
    state = conn.state
    from inslytic_fast.http.protocol import HttpProtocol

    from .protocol_helpers import MockTransport

    extra = HttpProtocol(conn.app, state)
    extra_transport = MockTransport()
    extra.connection_made(extra_transport)
    assert statuses(extra_transport.take()) == [503]
    assert extra_transport.closed
    assert len(state.connections) == 1


def test_a_commit_finishing_after_the_client_left_is_harmless():
    conn, transport, app = make_conn()
    conn.data_received(post("/slow", b"{}"))
    conn.connection_lost(None)
    app.release()  # must not raise or write
    assert transport.buffer == b""
    assert conn not in conn.state.connections


def test_half_closed_client_still_gets_its_answers():
    conn, transport, app = make_conn()
    conn.data_received(post("/slow", b"{}"))
    assert conn.eof_received() is True
    assert not transport.closed
    app.release()
    assert statuses(transport.take()) == [202]
    assert transport.closed


def test_draining_server_answers_with_connection_close():
    conn, transport, _ = make_conn()
    conn.state.draining = True
    conn.data_received(get("/x"))
    [(_, headers, _)] = split_responses(transport.take())
    assert headers["connection"] == "close"
    assert transport.closed


def test_headers_split_across_reads_then_a_large_body_is_not_431():
    conn, transport, app = make_conn(max_header_bytes=1024)
    raw = post("/x", b"a" * 20_000)
    conn.data_received(raw[:30])
    conn.data_received(raw[30:])
    assert statuses(transport.take()) == [200]
    assert len(app.requests[0].body) == 20_000


def test_a_blocked_output_stops_parsing_not_only_reading_and_answers_resume_in_order():
    conn, transport, app = make_conn()
    conn.pause_writing()  # the transport's write buffer is over its high-water mark
    requests = [get(f"/r{i}") for i in range(2000)]
    requests[1500] = b"GET /bad HTTP/1.1\r\nContent-Length: x\r\n\r\n"
    data = b"".join(requests)
    assert len(data) > 2 * PARSE_SLICE
    conn.data_received(data)  # one big read, as uvloop hands over up to 256 KiB
    assert transport.take() == b"" and app.requests == []
    assert transport.read_paused
    conn.resume_writing()
    answers = split_responses(transport.take())
    assert [body for _, _, body in answers[:1500]] == [
        b'{"path":"/r%d","body":0}' % i for i in range(1500)
    ]
    assert [status for status, _, _ in answers[1500:]] == [400]


def test_a_client_that_leaves_answers_unsent_is_aborted_after_the_send_timeout():
    conn, transport, _ = make_conn(send_timeout=5)
    conn.data_received(get("/a"))
    transport.unsent = 80_000
    conn.pause_writing()
    conn.check_timeouts(conn.state.now + 4)
    assert not transport.closed
    conn.check_timeouts(conn.state.now + 5)
    assert transport.closed


def test_overload_is_refused_on_the_headers_and_the_body_never_parsed():
    conn, transport, app = make_conn()
    conn.data_received(
        b"POST /overloaded HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n" + b"[" * 1000
    )
    [(status, headers, _)] = split_responses(transport.take())
    assert status == 503 and headers["retry-after"] == "1" and headers["connection"] == "close"
    assert conn.phase == LINGER and transport.eof_written  # the rest is read and discarded
    conn.data_received(b"x" * 65536)
    assert transport.take() == b"" and app.requests == []


def test_an_overload_refusal_drops_a_modest_body_and_keeps_the_connection():
    conn, transport, app = make_conn()
    body = b'{"events":[' + b"x" * 49_000
    head = b"POST /overloaded HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (len(body) + 2)
    conn.data_received(head + body[:10_000])
    # Answered on the headers, before the body is in, and without "Connection: close".
    [(status, headers, _)] = split_responses(transport.take())
    assert status == 503 and headers["retry-after"] == "1" and "connection" not in headers
    for at in range(10_000, len(body), 7_000):  # the rest in reads of any size
        conn.data_received(body[at : at + 7_000])
        assert conn.body_parts == []  # dropped, not kept
    conn.data_received(b"]}" + get("/after") + post("/overloaded", b"{}"))
    # The connection reads on: the next request is handled, the next refusal answered.
    assert [r.path for r in app.requests] == [b"/after"]
    assert statuses(transport.take()) == [200, 503]
    assert not transport.closed and not transport.eof_written and conn.phase == IDLE


@pytest.mark.parametrize(
    "head",
    [
        # The client waits for 100-continue: it sends no body to drop.
        b"HTTP/1.1\r\nContent-Length: 100\r\nExpect: 100-continue\r\n",
        # A body longer than the server drops on an open connection.
        b"HTTP/1.1\r\nContent-Length: %d\r\n" % (MAX_DISCARDED_BODY_BYTES + 1),
        # No length known in advance.
        b"HTTP/1.1\r\nTransfer-Encoding: chunked\r\n",
        # The client closes after this request anyway.
        b"HTTP/1.1\r\nContent-Length: 100\r\nConnection: close\r\n",
        # HTTP/1.0, even asking for keep-alive.
        b"HTTP/1.0\r\nContent-Length: 100\r\nConnection: keep-alive\r\n",
    ],
)
def test_an_overload_refusal_closes_when_the_body_is_not_worth_dropping(head):
    conn, transport, app = make_conn()
    conn.data_received(b"POST /overloaded " + head + b"Host: x\r\n\r\n")
    [(status, headers, _)] = split_responses(transport.take())
    assert status == 503 and headers["connection"] == "close"
    assert conn.phase == LINGER and transport.eof_written and app.requests == []


def test_a_held_request_stops_reading_and_is_answered_in_order_after_the_hold():
    async def main():
        conn, transport, app = make_conn()
        conn.data_received(post("/held", b"{}") + get("/after"))
        # Held: nothing handled or answered yet, and the connection is not read meanwhile.
        assert app.requests == [] and transport.buffer == b"" and transport.read_paused
        deadline = asyncio.get_running_loop().time() + 30
        while len(statuses(transport.buffer)) < 2:
            assert asyncio.get_running_loop().time() < deadline, "the hold never ended"
            await asyncio.sleep(0.01)
        assert [r.path for r in app.requests] == [b"/held", b"/after"]
        assert statuses(transport.take()) == [200, 200] and not transport.read_paused

    asyncio.run(main())
