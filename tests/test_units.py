"""The pieces under the routes: stop-string matching, UTF-8 assembly, the queue, settings."""
from __future__ import annotations

import pytest

from app.services.checkpoints.default_model import default_gguf_path
from app.services.core.errors import QueueFull
from app.services.core.text_stream import StopMatcher, StreamAssembler
from app.services.core.types import Timings
from app.services.engine.queue import GenerationQueue
from config.cli import parse_settings
from config.settings import Settings


def feed_all(matcher: StopMatcher, pieces):
    sent, hit = [], False
    for piece in pieces:
        text, hit = matcher.feed(piece)
        sent.append(text)
        if hit:
            break
    if not hit:
        sent.append(matcher.flush())
    return "".join(sent), hit


@pytest.mark.parametrize(
    "pieces, stops, expected, hit",
    [
        (["Hello", " wor", "ld"], ["world"], "Hello ", True),
        (["ab", "c<", "|e", "nd|>", "tail"], ["<|end|>"], "abc", True),
        (["a<", "|x"], ["<|end|>"], "a<|x", False),  # a held-back prefix that never completes is released
        (["1, 2, 3", ", 4"], ["4", "3"], "1, 2, ", True),  # the earliest stop wins
        (["no stops here"], [], "no stops here", False),
    ],
)
def test_stop_matcher(pieces, stops, expected, hit):
    assert feed_all(StopMatcher(stops), pieces) == (expected, hit)


def test_stop_matcher_holds_back_only_a_possible_prefix():
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("abcST") == ("abc", False)
    assert matcher.feed("x") == ("STx", False)


def test_assembler_joins_split_utf8_and_drops_a_cut_character():
    text = "北京"
    data = text.encode("utf-8")
    assembler = StreamAssembler(prompt_tokens=3, stops=())
    pieces = [data[0:1], data[1:4], data[4:5]]  # 北 split 1+2, 京 begun but cut off
    chunks = [assembler.add(i, p) for i, p in enumerate(pieces)]
    assert [c.text for c in chunks] == ["", "北", ""]
    last = assembler.finish("length")
    assert last.text == ""
    assert "\ufffd" not in "".join(c.text for c in chunks) + last.text
    assert last.usage.to_dict() == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}


def test_assembler_stop_string_across_tokens():
    assembler = StreamAssembler(prompt_tokens=1, stops=["</s>"])
    texts = [assembler.add(i, p.encode()).text for i, p in enumerate(["ok", "</", "s>"])]
    assert texts == ["ok", "", ""]
    assert assembler.stopped_by_string
    assert assembler.finish("stop").text == ""


def test_tokens_per_second_counts_decode_only():
    assert Timings(ttft_ms=500, prompt_ms=500, decode_ms=1000, completion_tokens=11).tokens_per_second == 10.0
    assert Timings(ttft_ms=5, prompt_ms=5, decode_ms=0, completion_tokens=1).tokens_per_second == 0.0


def test_queue_is_first_come_first_served_and_bounded():
    queue = GenerationQueue(max_waiting=2, retry_after_s=4)
    first, second, third = queue.enter(), queue.enter(), queue.enter()
    with pytest.raises(QueueFull) as refused:
        queue.enter()
    assert refused.value.retry_after_s == 4
    assert queue.enter(bypass_limit=True)  # a model switch may always line up
    assert queue.wait(first, 0) == 0
    assert queue.wait(third, 0) == 2
    queue.leave(first)
    assert queue.wait(second, 0) == 0
    assert queue.counts() == {"running": 1, "waiting": 2}


def test_settings_read_the_environment(monkeypatch):
    monkeypatch.setenv("MODEL_TEST_LLAMACPP__N_CTX", "1024")
    monkeypatch.setenv("MODEL_TEST_SERVER__PORT", "5123")
    monkeypatch.setenv("MODEL_TEST_MODEL", "/models/x.gguf")
    settings = Settings()
    assert settings.llamacpp.n_ctx == 1024
    assert settings.server.port == 5123
    assert settings.model == "/models/x.gguf"


def test_flags_override_the_environment(monkeypatch):
    monkeypatch.setenv("MODEL_TEST_LLAMACPP__N_CTX", "1024")
    monkeypatch.setenv("MODEL_TEST_LLAMACPP__N_BATCH", "64")
    settings = parse_settings(["--n-ctx", "8192", "--port", "6000", "--n-threads", "3", "--n-gpu-layers", "0", "--model", "m.gguf"])
    assert settings.llamacpp.n_ctx == 8192
    assert settings.llamacpp.n_batch == 64  # untouched by flags, still from the environment
    assert settings.llamacpp.n_threads == 3
    assert settings.llamacpp.n_gpu_layers == 0
    assert settings.server.port == 6000
    assert settings.model == "m.gguf"


def test_out_of_range_setting_is_refused(monkeypatch):
    monkeypatch.setenv("MODEL_TEST_LLAMACPP__N_CTX", "10")
    with pytest.raises(Exception, match="n_ctx"):
        Settings()


def test_default_model_is_the_embedded_smollm2():
    path = default_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes()[:4] == b"GGUF"
