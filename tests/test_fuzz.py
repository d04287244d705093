"""Fuzzing every route of /openapi.json with hypothesis, over HTTP against the real default model:
bodies drawn from each route's own schema (valid and nearly valid), arbitrary JSON, and bytes
that are no JSON at all. No answer may be a 5xx, none may hang, and the server keeps serving."""
from __future__ import annotations

import json
import string

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app import create_app
from config.settings import LimitSettings
from tests.support.servers import serve
from tests.support.settings import make_settings

pytestmark = pytest.mark.slow

REQUEST_TIMEOUT_S = 60  # a request that takes longer counts as hung
EXAMPLES_PER_ROUTE = 40

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


# Strings that break code that forgets them: a NUL (no path holds one), lone UTF-16 surrogates (no
# UTF-8 encoder writes one), formulas a spreadsheet would run, also after a bare CR (a new row) or
# a ";" (a new column in German and French Excel); and numbers past every bound.
ODD_STRINGS = ["model\x00.gguf", "\x00", "\ud800", "a\udfffb", "=HYPERLINK(\"http://x\")", "\ud83d", "x\r=1+1",
               "x;=1+1;y", "a\n@SUM(A1)\r\n-2", "\r=cmd", "{reference_block}"]
# Keys no schema has: a lone surrogate (an error message that quotes it must still encode), a NUL.
ODD_KEYS = ["\udc00", "\ud800x", "a\x00b", "\ud83d"]
HUGE_NUMBERS = [10**30, -10**30, 1e308, -1e308, 2**64]
# Whole bodies of odd bytes, sent to every route besides the drawn ones.
ODD_BODIES = [
    b"[" * 100_000,  # nesting past the JSON parser's recursion limit
    b"{\"a\":" * 50_000 + b"1" + b"}" * 50_000,
    b'{"model": "x\\u0000y", "prompt": "\\u0000", "messages": [{"role": "user", "content": "\\ud800"}]}',
    b'{"prompt": "\\udfff", "text": "\\ud800", "reference": "\\ud83d", "tokens": [1e400]}',
    b'{"\\udc00": 1, "text": "hi", "prompt": "hi", "messages": [{"role": "user", "content": "hi", "\\ud800": 2}]}',
    # a test set (for /api/eval, /api/divergence) whose cells smuggle rows and columns into a spreadsheet
    json.dumps({"test_set": json.dumps({"prompt": "x\r=1+1", "system": "a;=1+1;b", "reference": "\r@SUM(A1)"}) + "\n",
                "filename": "s.jsonl", "max_new_tokens": 2, "reference": {}, "candidate": {}}).encode(),
    b'{"max_new_tokens": ' + b"9" * 5000 + b', "prompt": "hi"}',  # past Python's int digit limit
    b'{"max_tokens": 1e400, "temperature": -1e400, "messages": [{"role": "user", "content": "hi"}]}',
    "{\"prompt\": \"caf\u00e9\"}".encode("latin-1"),  # not UTF-8
]


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_gguf):
    root = tmp_path_factory.mktemp("fuzz")
    # a small answer cap keeps the valid generations quick; larger asks are refused with a 400
    app = create_app(make_settings(root, results_dir=root / "results",
                                   limits=LimitSettings(max_new_tokens=8, max_test_set_rows=3)))
    httpd, thread = serve(app)
    url = f"http://127.0.0.1:{httpd.server_port}"
    document = requests.get(f"{url}/openapi.json", timeout=10).json()
    yield url, document
    app.extensions["eval_service"].cancel_running()
    app.extensions["compare_slots"].clear()
    httpd.shutdown()
    thread.join(timeout=10)


def resolve(schema: dict, document: dict) -> dict:
    while "$ref" in schema:
        schema = document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def from_schema(schema: dict, document: dict, depth: int = 0) -> st.SearchStrategy:
    """Values that fit the schema, or nearly: numbers past their bounds and strings past their
    lengths are drawn too, since those are where validation must answer 400 rather than fail."""
    schema = resolve(schema, document)
    if depth > 4:
        return st.none()
    if "anyOf" in schema or "oneOf" in schema:
        return st.one_of([from_schema(s, document, depth + 1) for s in schema.get("anyOf", schema.get("oneOf"))])
    if "enum" in schema:
        base = st.sampled_from(schema["enum"])
    else:
        kind = schema.get("type")
        if kind == "object" or "properties" in schema:
            properties = schema.get("properties", {})
            required = set(schema.get("required", []))
            base = st.fixed_dictionaries(
                {name: from_schema(sub, document, depth + 1) for name, sub in properties.items() if name in required},
                optional={name: from_schema(sub, document, depth + 1) for name, sub in properties.items() if name not in required},
            )
            base = base | st.tuples(base, st.sampled_from(ODD_KEYS)).map(lambda drawn: {**drawn[0], drawn[1]: 1})
        elif kind == "array":
            base = st.lists(from_schema(schema.get("items", {}), document, depth + 1), max_size=5)
        elif kind == "string":
            base = st.text(alphabet=string.printable + "中文<>&\"'", max_size=40) | st.sampled_from(
                ["smollm2-135m-instruct-q4_1", "../../etc/passwd", "/etc/passwd", "", " ", "<img src=x onerror=alert(1)>"]
                + ODD_STRINGS)
        elif kind == "integer":
            base = st.integers(-5, 70000) | st.integers(-2**63, 2**63) | st.sampled_from(HUGE_NUMBERS)
        elif kind == "number":
            base = st.floats(-5, 10, allow_nan=False) | st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from(HUGE_NUMBERS)
        elif kind == "boolean":
            base = st.booleans()
        else:
            base = JSON_VALUES
    return base | st.none() if schema.get("nullable") else base


def fill_path(path: str, value: str) -> str:
    import re

    return re.sub(r"\{[^}]+\}", value, path)


def check(response: requests.Response, what: str) -> None:
    assert response.status_code < 500, f"{what}: {response.status_code} {response.text[:500]}"
    if response.headers.get("Content-Type", "").startswith("application/json"):
        response.json()


def call(url: str, method: str, path: str, **kwargs) -> requests.Response:
    response = requests.request(method, f"{url}{path}", timeout=REQUEST_TIMEOUT_S, stream=True, **kwargs)
    response.content  # reads an SSE answer to its end: a stream that never ends fails the timeout  # noqa: B018
    return response


def documented_operations() -> list[tuple[str, str]]:
    """(path, method) of every operation in the document, read at collection time so each route
    is a test of its own."""
    import tempfile
    from pathlib import Path

    from app import __version__
    from app.routes.openapi import build_openapi

    with tempfile.TemporaryDirectory(prefix="fuzz-collect-") as tmp:
        app = create_app(make_settings(Path(tmp)))
        document = build_openapi(app, __version__)
    return sorted((path, method) for path, methods in document["paths"].items() for method in methods)


OPERATIONS = documented_operations()


def test_every_documented_route_is_fuzzed():
    assert len(OPERATIONS) >= 30  # the document lists them all (tests/test_openapi.py checks that)


@pytest.mark.parametrize(("path", "method"), OPERATIONS, ids=[f"{method.upper()} {path}" for path, method in OPERATIONS])
def test_fuzz_route(server, path, method):
    url, document = server
    operation = document["paths"][path][method]
    body_schema = (operation.get("requestBody", {}).get("content", {}).get("application/json", {}) or {}).get("schema")
    bodies = from_schema(body_schema, document) if body_schema else st.none()
    path_values = st.text(alphabet=string.ascii_letters + string.digits + "-_.%", min_size=1, max_size=30)
    sent = []

    @settings(max_examples=EXAMPLES_PER_ROUTE, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])
    @given(body=bodies | JSON_VALUES, raw=st.binary(max_size=64), value=path_values, use_raw=st.booleans())
    def fuzz(body, raw, value, use_raw):
        target = fill_path(path, value)
        if use_raw:
            response = call(url, method.upper(), target, data=raw, headers={"Content-Type": "application/json"})
        else:
            response = call(url, method.upper(), target, data=json.dumps(body), headers={"Content-Type": "application/json"})
        check(response, f"{method.upper()} {target} {body if not use_raw else raw!r}")
        sent.append(response.status_code)

    fuzz()
    assert len(sent) >= EXAMPLES_PER_ROUTE, sent  # hypothesis really sent them (it may add shrink runs)
    for raw in ODD_BODIES:
        response = call(url, method.upper(), fill_path(path, "x"), data=raw, headers={"Content-Type": "application/json"})
        check(response, f"{method.upper()} {path} {raw[:60]!r}")
    # still serving, and the model still answers
    answer = requests.post(f"{url}/api/chat", json={"prompt": "Say hi.", "max_new_tokens": 4}, timeout=REQUEST_TIMEOUT_S)
    assert answer.status_code in (200, 409, 429), answer.text
