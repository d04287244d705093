"""The OpenAPI document covers every route, and /docs works from the app alone."""
from __future__ import annotations

import re

from app.routes.openapi import OPERATIONS, UNDOCUMENTED_ENDPOINTS, as_openapi_30


def test_every_route_is_documented(real_app):
    served = {rule.endpoint for rule in real_app.url_map.iter_rules()} - UNDOCUMENTED_ENDPOINTS
    assert served - set(OPERATIONS) == set(), "routes missing from app/routes/openapi.py"
    document = real_app.test_client().get("/openapi.json").get_json()
    documented = {(method.upper(), path) for path, operations in document["paths"].items() for method in operations}
    for rule in real_app.url_map.iter_rules():
        if rule.endpoint in UNDOCUMENTED_ENDPOINTS:
            continue
        path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule)
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert (method, path) in documented


def test_document_shape_and_request_schemas(client):
    document = client.get("/openapi.json").get_json()
    assert document["openapi"].startswith("3.0")
    chat = document["paths"]["/api/chat"]["post"]
    ref = chat["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = document["components"]["schemas"][ref.rsplit("/", 1)[-1]]
    assert {"prompt", "messages", "temperature", "max_new_tokens", "stop"} <= set(schema["properties"])
    assert schema["properties"]["temperature"]["maximum"] == 2.0
    completions = document["paths"]["/v1/chat/completions"]["post"]
    assert "text/event-stream" in completions["responses"]["200"]["content"]
    assert document["paths"]["/health"]["get"]["security"] == []
    assert "401" in chat["responses"]
    # nothing of JSON Schema 2020-12 that OpenAPI 3.0 lacks
    text = str(document)
    assert "'type': 'null'" not in text and "'const'" not in text


def test_nullable_conversion():
    assert as_openapi_30({"anyOf": [{"type": "string"}, {"type": "null"}]}) == {"type": "string", "nullable": True}
    assert as_openapi_30({"const": "a"}) == {"enum": ["a"]}


def test_docs_page_and_its_assets_are_served_locally(client):
    page = client.get("/docs")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert "http://" not in html and "https://" not in html  # no CDN
    for asset in re.findall(r'(?:src|href)="(/docs/assets/[^"]+)"', html):
        with client.get(asset) as response:  # a static file answers with an open file
            assert response.status_code == 200 and len(response.data) > 1000
