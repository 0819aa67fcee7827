"""Bad input: whatever a client sends, the server answers in OpenAI's error shape, never with a 500.

- schemathesis fuzzes every operation of the server's own ``/openapi.json``
  (schema-valid and schema-invalid data) and checks statuses, content
  types and response bodies against the schema;
- hand-made hostile bodies: 10 MB, invalid UTF-8, lone surrogates, deep
  nesting, huge numbers, wrong content types;
- hypothesis properties of the request -> schedule translation: model
  names ``pacore-<preset or K>/<model>`` and ``extra_body`` forms either
  give the schedule they say or a 400, nothing else.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
from collections.abc import Iterator

import httpx
import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import positive_data_acceptance

from fakes import StreamingScriptedBackend
from pacore.backends.base import GenerationParams
from pacore.schedule import PRESETS, Schedule
from pacore.server import ServerConfig, create_app
from pacore.server.completions import Limits, parse_body, plan_request
from pacore.server.errors import describe
from server_harness import RunningServer, running_app
from test_server import error_body, metric, wait_for
from test_server_faults import asgi_errors  # noqa: F401 - a fixture

pytestmark = pytest.mark.http

LIMITS = Limits(max_rounds=4, max_trajectories=128)
DEFAULT = Schedule.parse([2])

# --- schemathesis ----------------------------------------------------------------------

fuzzed = schemathesis.openapi.from_asgi(
    "/openapi.json", create_app(ServerConfig(schedule=DEFAULT), StreamingScriptedBackend())
)


@fuzzed.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzzed_requests_get_no_500_and_match_the_schema(case):
    # Valid by the schema is not enough to be answered: a conversation needs a
    # user message, n must be 1... so only positive_data_acceptance is left out.
    case.call_and_validate(excluded_checks=[positive_data_acceptance])


def test_the_schema_describes_the_chat_request_and_its_errors():
    schema = fuzzed.raw_schema
    chat = schema["paths"]["/v1/chat/completions"]["post"]
    request = chat["requestBody"]["content"]["application/json"]["schema"]
    assert request == {"$ref": "#/components/schemas/ChatCompletionRequest"}
    assert schema["components"]["schemas"]["ChatCompletionRequest"]["required"] == ["messages", "model"]
    assert set(chat["responses"]) == {"200", "400", "401", "404", "413", "415", "429", "502", "503", "504"}
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    # FastAPI's 422 is never sent: validation errors are OpenAI's 400.
    assert not any("422" in op["responses"] for ops in schema["paths"].values() for op in ops.values())


# --- hostile bodies --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[RunningServer, StreamingScriptedBackend]]:
    backend = StreamingScriptedBackend()
    # The default body limit (8 MiB), as `pacore serve` has it.
    with running_app(backend, ServerConfig(schedule=DEFAULT)) as running:
        yield running, backend


def post(running: RunningServer, body: bytes, content_type: str | None = "application/json") -> httpx.Response:
    headers = {"Content-Type": content_type} if content_type else {}
    return httpx.post(f"{running.api_url}/chat/completions", content=body, headers=headers, timeout=30)


def request_with(content: str) -> bytes:
    """A valid request whose user message is ``content`` (raw JSON text, not re-encoded)."""
    return b'{"model": "m", "pacore": {"schedule": []}, "messages": [{"role": "user", "content": "%s"}]}' % (
        content.encode("utf-8", "surrogatepass")
    )


def test_a_10_mb_prompt_gets_413_by_default(server):
    running, backend = server
    prompt = "x" * (10 * 1024 * 1024)
    with pytest.raises(openai.APIStatusError) as caught:
        openai.OpenAI(base_url=running.api_url, api_key="unused", max_retries=0).chat.completions.create(
            model="scripted", messages=[{"role": "user", "content": prompt}]
        )
    assert caught.value.status_code == 413
    assert caught.value.body["code"] == "request_too_large"
    assert "limit of 8,388,608 bytes" in caught.value.body["message"]

    # Streamed in without a Content-Length, it is cut off once past the limit.
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "m", "messages": [{"role": "user", "content": "'
        for _ in range(100):
            yield b"y" * 100_000
        yield b'"}]}'

    response = httpx.post(f"{running.api_url}/chat/completions", content=chunks(), timeout=30)
    assert response.status_code == 413
    assert error_body(response)["code"] == "request_too_large"
    assert backend.calls == []


@contextlib.contextmanager
def partly_sent(running: RunningServer, content_length: int, body_start: bytes = b"") -> Iterator[socket.socket]:
    """A connection that sent a chat request's headers and ``body_start``, but not the rest of its body."""
    host, port = running.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (content_length, body_start)
        )
        yield connection


def test_a_declared_oversize_body_is_refused_before_it_is_sent(server):
    running, _ = server
    # Headers only: a server that read the body first would wait here for 10 MB.
    with partly_sent(running, 10 * 1024 * 1024) as connection:
        reply = http.client.HTTPResponse(connection)
        reply.begin()
        assert reply.status == 413
        assert json.loads(reply.read())["error"]["code"] == "request_too_large"


def test_a_client_gone_before_its_body_arrived_is_counted_not_logged(server, asgi_errors):  # noqa: F811
    running, backend = server
    with partly_sent(running, 1000, b'{"model": "m", '):
        pass  # and hang up
    wait_for(lambda: metric(running, "pacore_requests_total", endpoint="/v1/chat/completions", status="499") == 1)
    assert asgi_errors == []
    assert backend.calls == []


@pytest.mark.parametrize(
    "body",
    [
        request_with("caf") + b"\xe9",  # Latin-1, not UTF-8
        request_with("bad \xff byte").replace("\xff".encode(), b"\xff"),
        b'{"model": "m", "messages": [{"role": "user", "content": "\xc0\xaf"}]}',  # overlong "/"
        b'{"model": "m", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}',  # encoded surrogate
        b'{"model": "m", "messages": [{"role": "user", "content": "cut \xe2\x82',  # truncated sequence
        b'{"mod\xfe": "m"}',
    ],
)
def test_invalid_utf8_gets_400(server, body):
    running, backend = server
    response = post(running, body)
    assert response.status_code == 400
    error = error_body(response)
    assert error["type"] == "invalid_request_error"
    assert "not valid UTF-8" in error["message"]
    assert backend.calls == []


@pytest.mark.parametrize(
    ("body", "words"),
    [
        # 10,000 levels: past the parser's nesting limit, under the JSON value limit (checked first).
        (b"[" * 10_000 + b"]" * 10_000, "nests arrays or objects too deeply"),
        (b'{"a":' * 10_000 + b"1" + b"}" * 10_000, "nests arrays or objects too deeply"),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": '
            + b"[" * 10_000
            + b"]" * 10_000
            + b"}",
            "nests arrays or objects too deeply",
        ),
        (request_with("lone \\ud800 surrogate"), "not valid JSON"),
        (request_with("lone \\udfff low surrogate"), "not valid JSON"),
        (b'{"model": "m", "seed": ' + b"9" * 5000 + b', "messages": []}', "not valid JSON"),
        (b'{"model": "m", "temperature": NaN, "messages": []}', "not valid JSON"),
        (b'{"model": "m", "top_p": Infinity, "messages": []}', "not valid JSON"),
        (b"", "not valid JSON"),
        (b"\xef\xbb\xbf{}", "not valid JSON"),  # a byte order mark
        (b'{"model": "m"} trailing', "not valid JSON"),
        (b'"just a string"', "must be a JSON object"),
    ],
)
def test_malformed_json_gets_400(server, body, words):
    running, backend = server
    response = post(running, body)
    assert response.status_code == 400
    assert words in error_body(response)["message"]
    assert backend.calls == []


def test_reasonable_nesting_is_parsed(server):
    running, _ = server
    tools = json.dumps([{"type": "function", "function": {"name": "f", "parameters": [[[[[[[[]]]]]]]]}}])
    body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": %s}' % tools.encode()
    response = post(running, body)
    # Parsed fine, then refused for what it asks (tool calling), not for its shape.
    assert response.status_code == 400
    assert error_body(response)["param"] == "tools"


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ("text/plain", 415),
        ("application/x-www-form-urlencoded", 415),  # curl -d without -H
        ("multipart/form-data; boundary=x", 415),
        ("application/xml", 415),
        ("application/json", 200),
        ("application/json; charset=utf-8", 200),
        ("Application/JSON", 200),
        ("application/vnd.api+json", 200),
        (None, 200),
    ],
)
def test_only_json_content_types_are_accepted(server, content_type, status):
    running, _ = server
    response = post(running, request_with("Hi"), content_type)
    assert response.status_code == status, response.text
    if status == 415:
        error = error_body(response)
        assert error["code"] == "unsupported_media_type"
        assert "must be JSON" in error["message"]


# --- properties of the request -> schedule translation ------------------------------------


def outcome(body: dict) -> tuple[Schedule | None, dict | None]:
    """``(schedule, None)`` when the request is accepted, ``(None, error)`` when refused with a 400."""
    try:
        plan = plan_request(
            parse_body(json.dumps(body).encode()), default=DEFAULT, params=GenerationParams(), limits=LIMITS
        )
    except Exception as exc:  # noqa: BLE001 - the property is about every exception
        reply = describe(exc)
        assert reply.status == 400, (body, exc)
        return None, reply.body.error.model_dump()
    return plan.schedule, None


def chat(model: str, **extra: object) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "Why?"}], **extra}


names = st.text(st.characters(codec="utf-8", exclude_characters="/"), max_size=20)
counts = st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=4)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(preset=st.sampled_from([p for p in PRESETS if p != "off"]), model=st.text(max_size=30), upper=st.booleans())
def test_a_preset_in_the_model_name_gives_that_preset(preset, model, upper):
    spec = preset.upper() if upper else preset
    assert outcome(chat(f"pacore-{spec}/{model}")) == (Schedule(PRESETS[preset]), None)


@settings(max_examples=200, deadline=None)
@given(ks=counts, model=st.text(max_size=30), spaced=st.booleans())
def test_counts_in_the_model_name_give_those_counts_or_a_400_naming_the_limit(ks, model, spaced):
    spec = (", " if spaced else ",").join(map(str, ks))
    schedule, error = outcome(chat(f"pacore-{spec}/{model}"))
    wanted = Schedule(tuple(ks)) if ks != [1] else Schedule(())  # pacore-1 is the pass-through
    if len(wanted.rounds) <= LIMITS.max_rounds and wanted.total_calls <= LIMITS.max_trajectories:
        assert (schedule, error) == (wanted, None)
    else:
        assert (error["param"], error["code"]) == ("model", "schedule_too_large")


@settings(max_examples=300, deadline=None)
@given(spec=st.text(max_size=30), model=st.one_of(st.none(), names))
def test_any_model_name_gives_a_schedule_or_a_400_about_the_model(spec, model):
    name = f"pacore-{spec}" + (f"/{model}" if model is not None else "")
    schedule, error = outcome(chat(name))
    assert (schedule is None) != (error is None)
    if error is not None:
        assert error["param"] == "model"


@settings(max_examples=300, deadline=None)
@given(value=json_values, model=st.sampled_from(["m", "pacore-high/m", "pacore-zzz/m"]))
def test_any_pacore_schedule_value_gives_a_schedule_or_a_400_about_it(value, model):
    schedule, error = outcome(chat(model, pacore={"schedule": value}))
    if value is None:
        return  # no schedule given: the model name decides (a 400 for "zzz")
    assert (schedule is None) != (error is None)
    if error is not None:
        assert error["param"].startswith("pacore.schedule")
    elif isinstance(value, list) and all(type(k) is int for k in value):
        assert schedule == Schedule(tuple(value))


@settings(max_examples=300, deadline=None)
@given(
    body=st.dictionaries(st.sampled_from(["model", "messages", "pacore", "stream", "n", "stop", "seed"]), json_values)
)
def test_any_json_object_is_a_request_or_a_400(body):
    outcome(body)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.binary(max_size=200), content_type=st.sampled_from([None, "application/json", "text/plain"]))
def test_any_bytes_are_a_request_or_a_4xx(body, content_type):
    try:
        parse_body(body, content_type)
    except Exception as exc:  # noqa: BLE001 - the property is about every exception
        assert describe(exc).status in (400, 415), exc
