"""Between our types and the OpenAI wire: the request body a generation becomes, the stream events
an answer comes back as, and the error bodies servers send.

The servers this is for (vLLM, llama-server, TGI, Ollama, llama-cpp-python's server) speak
OpenAI's shapes with their own additions and omissions; each function says which it reads.
"""
from __future__ import annotations

import json
from typing import Iterator, Optional

from app.services.core.text_stream import StreamAssembler
from app.services.core.types import Chunk, GenerationParams, Prompt, TokenCandidate, TokenLogprob, Usage

ERROR_BODY_CHARS = 500  # of a remote error message relayed to the client
UNKNOWN_TOKEN_ID = -1  # token ids stay on the server; one entry per delta keeps the counts
# The context windows servers put in their /models entries: vLLM's max_model_len, and the
# context_length that LM Studio and OpenRouter-style servers use.
N_CTX_KEYS = ("max_model_len", "context_length", "context_window")
# llama-server and OpenAI end with "stop" or "length"; TGI says "eos_token" and "stop_sequence".
LENGTH_REASONS = {"length", "max_tokens", "model_length"}


class StreamFailed(Exception):
    """The answer cannot go on: the words say why, for the user."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


# -- requests -------------------------------------------------------------------------------
def request_body(model: str, prompt: Prompt, params: GenerationParams) -> dict:
    """The streamed chat (``prompt.messages``) or completions (``prompt.text``) request for these parameters."""
    body: dict = {
        "model": model,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
    }
    if prompt.messages is not None:
        body["messages"] = [m.to_dict() for m in prompt.messages]
    else:
        body["prompt"] = prompt.text
    if params.seed is not None:
        body["seed"] = params.seed
    if params.stop:
        body["stop"] = list(params.stop)  # the server stops there too; the assembler cuts the text either way
    if params.logit_bias:  # the ids are the remote server's own, as the client that sent them knows
        body["logit_bias"] = {str(token_id): value for token_id, value in params.logit_bias}
    if params.presence_penalty:
        body["presence_penalty"] = params.presence_penalty
    if params.frequency_penalty:
        body["frequency_penalty"] = params.frequency_penalty
    # Beyond OpenAI's schema, read by the servers this backend is for; each ignores the ones it
    # does not know. OpenAI's frequency_penalty is a different thing from the multiplicative
    # repetition penalty, so that goes under both names it has: repetition_penalty (vLLM, TGI)
    # and repeat_penalty (llama.cpp's servers, over their last 64 tokens). min_p 0 samples as
    # the local backends do (llama.cpp's servers default to 0.05).
    body.update(top_k=params.top_k, min_p=0.0, repetition_penalty=params.repetition_penalty,
                repeat_penalty=params.repetition_penalty)
    if params.ignore_eos:
        body["ignore_eos"] = True  # vLLM and llama-server
    if params.logprobs is not None:  # passed on; what the server sends back is passed through
        body.update({"logprobs": True, "top_logprobs": params.logprobs} if prompt.messages is not None
                    else {"logprobs": params.logprobs})
    return body


# -- answers --------------------------------------------------------------------------------
def remote_message(body: str) -> str:
    """The message in a remote error body, whichever server's shape it has."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.strip()[:ERROR_BODY_CHARS] or "(no message)"
    if isinstance(data, dict):
        error = data.get("error", data)  # OpenAI/vLLM/llama-server nest it under "error"; TGI gives a string there
        if isinstance(error, str):
            return error[:ERROR_BODY_CHARS]
        if isinstance(error, dict):
            for key in ("message", "detail", "msg"):
                if isinstance(error.get(key), str):
                    return error[key][:ERROR_BODY_CHARS]
            if "detail" in error:  # FastAPI's validation errors: a list of {loc, msg}
                return json.dumps(error["detail"])[:ERROR_BODY_CHARS]
    return body.strip()[:ERROR_BODY_CHARS]


def n_ctx_of(entry: dict) -> Optional[int]:
    """The context window a ``/models`` entry declares, if it declares one."""
    for key in N_CTX_KEYS:
        value = entry.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def usage_of(data: dict) -> Optional[Usage]:
    prompt, completion = data.get("prompt_tokens"), data.get("completion_tokens")
    if isinstance(prompt, int) and isinstance(completion, int):
        return Usage.of(prompt, completion)
    return None


def _candidate(token, logprob, piece=None) -> Optional[TokenCandidate]:
    if not isinstance(token, str) or not isinstance(logprob, (int, float)) or isinstance(logprob, bool):
        return None
    if isinstance(piece, list) and all(isinstance(b, int) and 0 <= b < 256 for b in piece):
        raw = bytes(piece)
    else:
        raw = token.encode("utf-8")
    return TokenCandidate(UNKNOWN_TOKEN_ID, raw, float(logprob))


def _chat_logprobs(data: dict) -> list[TokenLogprob]:
    out: list[TokenLogprob] = []
    for entry in data.get("content") or []:
        if not isinstance(entry, dict):
            continue
        chosen = _candidate(entry.get("token"), entry.get("logprob"), entry.get("bytes"))
        if chosen is None:
            continue
        top = [_candidate(t.get("token"), t.get("logprob"), t.get("bytes")) for t in entry.get("top_logprobs") or []
               if isinstance(t, dict)]
        out.append(TokenLogprob(chosen, tuple(t for t in top if t is not None)))
    return out


def _completion_logprobs(data: dict) -> list[TokenLogprob]:
    out: list[TokenLogprob] = []
    tokens, values, tops = data.get("tokens") or [], data.get("token_logprobs") or [], data.get("top_logprobs") or []
    for index, (token, value) in enumerate(zip(tokens, values)):
        chosen = _candidate(token, value)
        if chosen is None:
            continue
        alternatives = tops[index] if index < len(tops) and isinstance(tops[index], dict) else {}
        top = sorted((c for c in (_candidate(t, v) for t, v in alternatives.items()) if c is not None),
                     key=lambda c: -c.logprob)
        out.append(TokenLogprob(chosen, tuple(top)))
    return out


def remote_logprobs(data, chat: bool) -> list[TokenLogprob]:
    """The server's log-probabilities for one stream event, as it sent them (OpenAI's chat shape,
    or the legacy completions lists); token ids are the server's to know. Anything malformed is
    left out rather than guessed."""
    if not isinstance(data, dict):
        return []
    return _chat_logprobs(data) if chat else _completion_logprobs(data)


def parse_event(payload: str, chat: bool) -> dict:
    """One stream event, with ``choices`` always a list; raises StreamFailed naming what makes it unreadable."""
    try:
        event = json.loads(payload)
    except ValueError:
        raise StreamFailed(f"the remote server sent a stream line that is not JSON: {payload[:200]!r}") from None
    if not isinstance(event, dict):
        raise StreamFailed(f"the remote server sent a stream event that is not a JSON object: {payload[:200]!r}")
    if "error" in event or event.get("object") == "error":
        raise StreamFailed(f"the remote server reported an error mid-stream: {remote_message(payload)}")
    choices = event.get("choices")
    if choices is None and isinstance(event.get("usage"), dict):
        event["choices"] = []  # a usage-only event without the empty list
        return event
    if not isinstance(choices, list):
        raise StreamFailed(f"the remote server sent a stream event without choices: {payload[:200]!r}")
    if choices:
        _check_choice(choices[0], chat, payload)
    return event


def _check_choice(choice, chat: bool, payload: str) -> None:
    if not isinstance(choice, dict):
        raise StreamFailed(f"the remote server sent a choice that is not a JSON object: {payload[:200]!r}")
    delta = choice.setdefault("delta", {}) if chat else choice
    if not isinstance(delta, dict):
        raise StreamFailed(f"the remote server sent a delta that is not a JSON object: {payload[:200]!r}")
    content = delta.get("content") if chat else delta.get("text")
    if content is not None and not isinstance(content, str):
        raise StreamFailed(f"the remote server sent content that is not text: {payload[:200]!r}")


class StreamReading:
    """One answer read from the server's stream events: the chunks they make, and what the
    server said about the end (its finish_reason, its usage, ``[DONE]``)."""

    def __init__(self, assembler: StreamAssembler, chat: bool, logprobs: bool):
        self.assembler = assembler
        self.chat = chat
        self.logprobs = logprobs
        self.events = 0
        self.usage: Optional[Usage] = None
        self.remote_reason: Optional[str] = None  # the server's finish_reason
        self.done = False  # the server sent [DONE]
        self.stopped = False  # a stop string ended the answer here

    def chunks(self, payloads: Iterator[str]) -> Iterator[Chunk]:
        """The chunks of each event until ``[DONE]``, a stop string or the end of ``payloads``;
        an unreadable event raises StreamFailed."""
        for payload in payloads:
            self.events += 1
            if payload == "[DONE]":
                self.remote_reason = self.remote_reason or "stop"
                self.done = True
                return
            yield from self._event_chunks(parse_event(payload, self.chat))
            if self.stopped:
                return

    def _event_chunks(self, event: dict) -> Iterator[Chunk]:
        if isinstance(event.get("usage"), dict):
            self.usage = usage_of(event["usage"]) or self.usage
        if not event["choices"]:
            return  # the usage chunk
        choice = event["choices"][0]
        text = choice["delta"].get("content") if self.chat else choice.get("text")
        if text:
            chunk = self.assembler.add_text(UNKNOWN_TOKEN_ID, text)
            if self.logprobs:
                chunk.logprobs = remote_logprobs(choice.get("logprobs"), self.chat)
            if chunk.text or chunk.logprobs:
                yield chunk
            if self.assembler.stopped_by_string:
                self.stopped = True
                return
        if choice.get("finish_reason"):
            self.remote_reason = choice["finish_reason"]  # the usage chunk may still follow

    def problem_at_end_of_body(self) -> Optional[str]:
        """What is wrong with a body that ended without ``[DONE]``, if anything."""
        if not self.events:
            # llama-cpp-python's server answers a prompt longer than its context this way
            return ("the remote server ended the stream without sending anything; its log says why "
                    "(a prompt longer than its context, for some servers)")
        if self.remote_reason is None:
            return "the remote server ended the stream without a finish_reason"
        return None

    def finish_reason(self) -> str:
        """Ours, for an answer that ended without error, cancel or stop string on the server's word."""
        return "length" if self.remote_reason in LENGTH_REASONS else "stop"
