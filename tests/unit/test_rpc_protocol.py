"""JSON-RPC 2.0 request and error objects, and the codes and headers both sides rely on."""

from __future__ import annotations

import json

from kaiju_tasks.rpc import protocol


def test_a_request_carries_version_method_params_and_id():
    body = protocol.request("orders.delete", {"expired": True}, "t:j:0:0")
    assert body == {
        "jsonrpc": "2.0",
        "method": "orders.delete",
        "params": {"expired": True},
        "id": "t:j:0:0",
    }
    assert json.loads(json.dumps(body)) == body  # plain JSON, as sent on the wire


def test_a_request_without_an_id_is_a_notification():
    assert "id" not in protocol.request("ping", [1], None)


def test_a_request_without_params_omits_them_but_keeps_empty_ones():
    assert "params" not in protocol.request("ping", None, 1)
    assert protocol.request("ping", [], 1)["params"] == []
    assert protocol.request("ping", {}, 0) == {
        "jsonrpc": "2.0",
        "method": "ping",
        "params": {},
        "id": 0,
    }


def test_an_error_carries_code_and_message_and_data_only_when_given():
    assert protocol.error(protocol.NOT_FOUND, "no task t") == {
        "code": -32002,
        "message": "no task t",
    }
    assert protocol.error(protocol.INVALID_PARAMS, "bad", {"field": "id"})["data"] == {
        "field": "id"
    }
    # A falsy payload is still a payload.
    assert protocol.error(protocol.CONFLICT, "no", 0)["data"] == 0


def test_standard_codes_are_the_specifications_and_ours_are_in_the_reserved_range():
    assert (
        protocol.PARSE_ERROR,
        protocol.INVALID_REQUEST,
        protocol.METHOD_NOT_FOUND,
        protocol.INVALID_PARAMS,
        protocol.INTERNAL_ERROR,
    ) == (-32700, -32600, -32601, -32602, -32603)
    ours = [
        protocol.NOT_AUTHORIZED,
        protocol.NOT_FOUND,
        protocol.CONFLICT,
        protocol.TIMEOUT,
        protocol.REJECTED,
        protocol.CANCELLED,
        protocol.REPLY_TOO_LARGE,
        protocol.RATE_LIMITED,
    ]
    assert len(set(ours)) == len(ours)
    assert all(-32099 <= code <= -32000 for code in ours)


def test_the_headers_of_a_stage_call_have_their_documented_names():
    assert protocol.CORRELATION_HEADER == "X-Correlation-Id"
    assert protocol.DEADLINE_HEADER == "X-Deadline"
    assert protocol.TIMEOUT_HEADER == "X-Timeout"
