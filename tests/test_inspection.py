"""The inspection routes on the real default model, on both backends: /api/tokenize and
/api/detokenize round trips (Chinese included), and /api/apply_template giving exactly the
prompt generation sends, checked against the prompt tokens generation counts."""
from __future__ import annotations

import pytest

from app import create_app
from app.services.catalog import DEFAULT_HF_ID
from tests.support.settings import make_settings

TEXTS = [
    "Hello, world!",
    "你好，请介绍一下你自己",
    "用一句话解释什么是机器学习。",
    "  leading spaces, tabs\tand\nnew lines  ",
    "emoji 🐱 and accents: café, naïve",
    "<|im_start|>user\nHi<|im_end|>\n",
]
CONVERSATION = {
    "system": "You are a terse assistant.",
    "messages": [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Nice to meet you, Ada!"},
        {"role": "user", "content": "你好，请介绍一下你自己"},
    ],
}


@pytest.fixture(scope="module")
def hf_client(tmp_path_factory, default_hf_checkpoint):
    """The transformers backend on the checkpoint rebuilt from the default GGUF (the same vocabulary)."""
    app = create_app(make_settings(tmp_path_factory.mktemp("inspect-hf"), backend="transformers"))
    client = app.test_client()
    assert client.post("/api/load_model", json={"model": DEFAULT_HF_ID}).get_json()["state"] == "loaded"
    yield client
    app.extensions["model_service"].unload()


@pytest.fixture(params=["llamacpp", "transformers"])
def any_client(request):
    return request.getfixturevalue("client" if request.param == "llamacpp" else "hf_client")


def tokenize(client, text: str, **extra) -> dict:
    response = client.post("/api/tokenize", json={"text": text, **extra})
    assert response.status_code == 200, response.get_json()
    return response.get_json()


@pytest.mark.parametrize("text", TEXTS)
def test_tokenize_then_detokenize_gives_the_text_back(any_client, text):
    body = tokenize(any_client, text)
    assert body["count"] == len(body["tokens"]) == len(body["pieces"]) > 0
    assert all(isinstance(t, int) for t in body["tokens"]) and all(isinstance(p, str) for p in body["pieces"])
    back = any_client.post("/api/detokenize", json={"tokens": body["tokens"]})
    assert back.status_code == 200
    assert back.get_json() == {"text": text}


def test_special_tokens_in_text_are_single_tokens_and_stay_visible(any_client):
    body = tokenize(any_client, "<|im_start|>assistant\n")
    assert body["pieces"][0] == "<|im_start|>"
    assert "".join(body["pieces"][1:-1]) == "assistant"
    assert body["pieces"][-1] == "Ċ"  # the vocabulary's own strings: Ċ is byte-level BPE's newline
    end = tokenize(any_client, "<|im_end|>")
    assert end["count"] == 1
    assert any_client.post("/api/detokenize", json={"tokens": end["tokens"]}).get_json()["text"] == "<|im_end|>"


def test_add_special_tokens_only_adds_what_the_tokenizer_adds(any_client):
    plain = tokenize(any_client, "Hello")
    special = tokenize(any_client, "Hello", add_special_tokens=True)
    assert special["tokens"][len(special["tokens"]) - plain["count"]:] == plain["tokens"]


def test_both_backends_tokenize_alike(client, hf_client):
    # The checkpoint was rebuilt from the GGUF: one vocabulary, so the same ids and pieces.
    for text in TEXTS:
        assert tokenize(client, text) == tokenize(hf_client, text)
    llama = client.post("/api/apply_template", json=CONVERSATION).get_json()
    hf = hf_client.post("/api/apply_template", json=CONVERSATION).get_json()
    assert llama == hf


def test_apply_template_is_the_prompt_generation_uses(any_client):
    rendered = any_client.post("/api/apply_template", json=CONVERSATION)
    assert rendered.status_code == 200
    body = rendered.get_json()
    prompt = body["prompt"]
    assert prompt.startswith("<|im_start|>system\nYou are a terse assistant.<|im_end|>\n")
    assert "<|im_start|>assistant\nNice to meet you, Ada!<|im_end|>\n" in prompt
    assert prompt.endswith("<|im_start|>user\n你好，请介绍一下你自己<|im_end|>\n<|im_start|>assistant\n")
    assert body["token_count"] == tokenize(any_client, prompt)["count"]
    # Generation counts exactly these tokens as its prompt, on both chat APIs.
    chat = any_client.post("/api/chat", json={**CONVERSATION, "temperature": 0, "max_new_tokens": 4}).get_json()
    assert chat["usage"]["prompt_tokens"] == body["token_count"]
    messages = [{"role": "system", "content": CONVERSATION["system"]}, *CONVERSATION["messages"]]
    service = any_client.post("/chat", json={"messages": messages, "temperature": 0, "max_tokens": 4}).get_json()
    assert service["usage"]["prompt_tokens"] == body["token_count"]


def test_apply_template_takes_a_prompt_as_chat_does(client):
    body = client.post("/api/apply_template", json={"prompt": "Hi"}).get_json()
    # SmolLM2's template puts its own default system prompt first when none is given
    assert body["prompt"].endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    chat = client.post("/api/chat", json={"prompt": "Hi", "temperature": 0, "max_new_tokens": 2}).get_json()
    assert chat["usage"]["prompt_tokens"] == body["token_count"]


BAD_INPUT = [
    pytest.param("/api/tokenize", {}, "text", id="tokenize-no-text"),
    pytest.param("/api/tokenize", {"text": 5}, "text", id="tokenize-text-not-a-string"),
    pytest.param("/api/tokenize", {"text": "Hi", "add_special_tokens": "yes"}, "add_special_tokens", id="tokenize-flag-not-bool"),
    pytest.param("/api/detokenize", {}, "tokens", id="detokenize-no-tokens"),
    pytest.param("/api/detokenize", {"tokens": "1 2 3"}, "tokens", id="detokenize-not-a-list"),
    pytest.param("/api/detokenize", {"tokens": [1, "2"]}, "tokens.1", id="detokenize-id-not-int"),
    pytest.param("/api/detokenize", {"tokens": [1, 2.5]}, "tokens.1", id="detokenize-id-float"),
    pytest.param("/api/detokenize", {"tokens": [1, -1]}, "tokens.1", id="detokenize-negative-id"),
    pytest.param("/api/detokenize", {"tokens": [1, 2, 49152]}, "tokens.2", id="detokenize-id-past-the-vocab"),
    pytest.param("/api/detokenize", {"tokens": [10**12]}, "tokens.0", id="detokenize-huge-id"),
    pytest.param("/api/apply_template", {}, "prompt", id="template-nothing"),
    pytest.param("/api/apply_template", {"messages": []}, "messages", id="template-empty-messages"),
    pytest.param("/api/apply_template", {"messages": [{"role": "system", "content": "Be brief."}]}, "messages", id="template-only-system"),
    pytest.param("/api/apply_template", {"messages": [{"role": "bot", "content": "Hi"}]}, "messages.0.role", id="template-bad-role"),
    pytest.param("/api/apply_template", {"system": "A", "messages": [{"role": "system", "content": "B"}, {"role": "user", "content": "Hi"}]},
                 "system", id="template-two-system-prompts"),
]


@pytest.mark.parametrize("route, body, field", BAD_INPUT)
def test_bad_input_is_a_400_naming_the_field(client, route, body, field):
    response = client.post(route, json=body)
    assert response.status_code == 400, response.get_json()
    error = response.get_json()
    assert error["field"] == field and error["type"] == "invalid_request_error" and error["error"]
    # llama.cpp never saw an id outside its vocabulary: the server is still there
    assert tokenize(client, "still here")["count"] > 0


def test_an_id_past_the_vocabulary_is_refused_by_the_transformers_backend_too(hf_client):
    response = hf_client.post("/api/detokenize", json={"tokens": [0, 49152]})
    assert response.status_code == 400
    assert response.get_json()["field"] == "tokens.1"
    assert "49151" in response.get_json()["error"]
