"""SFT data as LLaMA-Factory accepts it, normalised to chat messages and tokenised with labels.

Files: ``.json`` (a list of records) or ``.jsonl`` (one record per line). Each record is one of

- Alpaca: ``instruction``, optional ``input``, ``output``, optional ``system``, optional
  ``history`` (``[[user, assistant], ...]`` turns before the instruction);
- ShareGPT: ``conversations: [{from: human|user|gpt|assistant|system, value}]``, optional ``system``;
- OpenAI: ``messages: [{role: system|user|assistant, content}]``; with OpenAI's function-calling
  form, ``tools`` beside the messages, assistant turns with ``tool_calls`` (arguments as JSON
  text) and ``tool`` messages with their results after them.

Every record becomes a :class:`Conversation`, a list of ``{"role", "content"}`` dicts: an optional
system message, then user and assistant turns alternating (tool results between an assistant's
calls and its next turn), ending with an assistant turn; its ``tools`` go to the chat template. Anything else raises
:class:`DatasetError`, naming the file, the record (``record [i]`` is ``data[i]``, 0-based) and,
for JSONL, the line.

:func:`tokenize_for_sft` renders the model's own chat template and labels only what the
assistant says, up to and including its end-of-turn token.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable, Optional

log = logging.getLogger("sft_data")

IGNORE_INDEX = -100  # the label torch's cross entropy (and transformers' loss) skips

Message = dict[str, Any]


class Conversation(list):
    """One record's messages, and the tools the chat template renders for them (None: none)."""

    tools: Optional[list[dict]] = None

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
OPENAI_ROLES = ("system", "user", "assistant", "tool")


class DatasetError(ValueError):
    """The data cannot be used for training; the message says where and why."""


class NoTargetTokens(DatasetError):
    """A conversation kept no assistant token after truncation: there is nothing to learn from it."""


# --------------------------------------------------------------------------- loading


def load_sft_dataset(path: Path) -> list[Conversation]:
    """Every record of a .json or .jsonl file, as a list of messages."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in (".json", ".jsonl"):
        raise DatasetError(f"{path}: expected a .json (a list of records) or .jsonl (one record per line) file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text ({exc})") from None

    conversations: list[list[Message]] = []
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
        if not isinstance(data, list):
            raise DatasetError(f"{path}: a .json dataset must be a list of records, got {type(data).__name__}")
        for index, record in enumerate(data):
            conversations.append(normalize_record(record, f"{path}, record [{index}]"))
    else:
        index = 0
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue  # blank lines (a trailing newline, say) are not records
            where = f"{path}, line {lineno} (record [{index}])"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{where}: invalid JSON at column {exc.colno}: {exc.msg}") from None
            conversations.append(normalize_record(record, where))
            index += 1
    if not conversations:
        raise DatasetError(f"{path}: no records")
    return conversations


def normalize_record(record: Any, where: str) -> Conversation:
    """One Alpaca, ShareGPT or OpenAI record as messages; ``where`` prefixes any error."""
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    tools = None
    if "messages" in record:
        messages = _from_openai(record, where)
        tools = _tools(record, where)
    elif "conversations" in record:
        messages = _from_sharegpt(record, where)
    elif "instruction" in record or "output" in record:
        messages = _from_alpaca(record, where)
    else:
        raise DatasetError(
            f"{where}: unknown record format with keys {sorted(record)}; expected Alpaca "
            f"('instruction', 'output'), ShareGPT ('conversations') or OpenAI ('messages')"
        )
    _check_turns(messages, where)
    conversation = Conversation(messages)
    conversation.tools = tools
    return conversation


def _tools(record: dict, where: str) -> Optional[list[dict]]:
    tools = record.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) and isinstance(t.get("function"), dict)
                                              and isinstance(t["function"].get("name"), str) for t in tools):
        raise DatasetError(f"{where}: 'tools' must be a list of {{\"type\": \"function\", \"function\": {{\"name\", ...}}}}")
    return tools


def _tool_calls(item: dict, where: str, field: str) -> list[dict]:
    """An assistant turn's calls, their arguments as objects: templates write them with ``tojson``."""
    calls = item["tool_calls"]
    if not isinstance(calls, list) or not calls:
        raise DatasetError(f"{where}: {field}.tool_calls must be a non-empty list")
    parsed = []
    for number, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise DatasetError(f"{where}: {field}.tool_calls[{number}] must be {{\"function\": {{\"name\", \"arguments\"}}}}")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                raise DatasetError(f"{where}: {field}.tool_calls[{number}].function.arguments is not JSON") from None
        parsed.append({"id": call.get("id", f"call_{number}"), "type": "function",
                       "function": {"name": function["name"], "arguments": arguments}})
    return parsed


def _text(value: Any, where: str, field: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise DatasetError(f"{where}: {field} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DatasetError(f"{where}: {field} is empty")
    return value


def _system(record: dict, where: str) -> list[Message]:
    # An empty system string means "none" (as in LLaMA-Factory), so the template's default applies.
    if record.get("system") in (None, ""):
        return []
    return [{"role": "system", "content": _text(record["system"], where, "'system'")}]


def _from_alpaca(record: dict, where: str) -> list[Message]:
    instruction = _text(record.get("instruction", ""), where, "'instruction'", allow_empty=True)
    extra = _text(record.get("input") or "", where, "'input'", allow_empty=True)
    # LLaMA-Factory's alpaca converter joins them with a newline, so the same data trains the same.
    prompt = "\n".join(part for part in (instruction, extra) if part)
    if not prompt.strip():
        raise DatasetError(f"{where}: 'instruction' and 'input' are both empty")
    if "output" not in record:
        raise DatasetError(f"{where}: Alpaca record without 'output'")
    output = _text(record["output"], where, "'output'")

    messages = _system(record, where)
    history = record.get("history") or []
    if not isinstance(history, list):
        raise DatasetError(f"{where}: 'history' must be a list of [user, assistant] pairs")
    for turn, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise DatasetError(f"{where}: history[{turn}] must be a [user, assistant] pair")
        messages.append({"role": "user", "content": _text(pair[0], where, f"history[{turn}][0]")})
        messages.append({"role": "assistant", "content": _text(pair[1], where, f"history[{turn}][1]")})
    messages.append({"role": "user", "content": prompt})
    messages.append({"role": "assistant", "content": output})
    return messages


def _from_sharegpt(record: dict, where: str) -> list[Message]:
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise DatasetError(f"{where}: 'conversations' must be a non-empty list")
    messages = _system(record, where)
    for turn, item in enumerate(turns):
        field = f"conversations[{turn}]"
        if not isinstance(item, dict) or "from" not in item or "value" not in item:
            raise DatasetError(f"{where}: {field} must be an object with 'from' and 'value'")
        role = SHAREGPT_ROLES.get(item["from"]) if isinstance(item["from"], str) else None
        if role is None:
            raise DatasetError(
                f"{where}: {field} has unknown 'from' {item['from']!r}; expected one of {sorted(SHAREGPT_ROLES)}"
            )
        messages.append({"role": role, "content": _text(item["value"], where, f"{field}.value", allow_empty=role == "system")})
    return messages


def _from_openai(record: dict, where: str) -> list[Message]:
    turns = record["messages"]
    if not isinstance(turns, list) or not turns:
        raise DatasetError(f"{where}: 'messages' must be a non-empty list")
    messages = _system(record, where)
    for turn, item in enumerate(turns):
        field = f"messages[{turn}]"
        calls = isinstance(item, dict) and item.get("role") == "assistant" and item.get("tool_calls")
        if not isinstance(item, dict) or "role" not in item or ("content" not in item and not calls):
            raise DatasetError(f"{where}: {field} must be an object with 'role' and 'content'")
        role = item["role"]
        if role not in OPENAI_ROLES:
            raise DatasetError(f"{where}: {field} has unknown role {role!r}; expected one of {list(OPENAI_ROLES)}")
        if calls:
            content = item.get("content") or ""
            messages.append({"role": role, "content": _text(content, where, f"{field}.content", allow_empty=True),
                             "tool_calls": _tool_calls(item, where, field)})
            continue
        content = item["content"]
        if isinstance(content, list):
            # The multi-part form: only text parts can be trained on here.
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise DatasetError(f"{where}: {field}.content has non-text parts; only text is supported")
            content = "".join(p["text"] for p in content)
        message = {"role": role, "content": _text(content, where, f"{field}.content", allow_empty=role == "system")}
        if role == "tool" and isinstance(item.get("tool_call_id"), str):
            message["tool_call_id"] = item["tool_call_id"]
        messages.append(message)
    return messages


def _check_turns(messages: list[Message], where: str) -> None:
    """An optional leading system message, then user/assistant alternating, ending with the
    assistant; tool results come right after the assistant turn that called, and are followed
    by an assistant turn."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not body:
        raise DatasetError(f"{where}: no user or assistant turns")
    expected = "user"
    for turn, message in enumerate(body):
        if message["role"] == "tool":
            before = body[turn - 1] if turn else {}
            if not (before.get("role") == "tool" or before.get("tool_calls")):
                raise DatasetError(f"{where}: turn {turn}: a tool result must follow an assistant turn with tool_calls")
            expected = "assistant"
            continue
        if message["role"] != expected:
            if message["role"] == "system":
                problem = "a system message is only allowed first"
            else:
                article = "an" if expected == "assistant" else "a"
                problem = f"expected {article} {expected} turn, got {message['role']} (turns must alternate, starting with the user)"
            raise DatasetError(f"{where}: turn {turn}: {problem}")
        expected = "assistant" if message["role"] == "user" else "user"
    if body[-1]["role"] != "assistant":
        raise DatasetError(f"{where}: the last turn is the {body[-1]['role']}'s; a training example must end with the assistant's answer")


# --------------------------------------------------------------------------- tokenising


def _render(tokenizer, messages: list[Message], generation_prompt: bool, tools: Optional[list[dict]] = None) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt)


def _encode(tokenizer, text: str) -> list[int]:
    # The template already writes any BOS it wants; letting the tokenizer add one would double it.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def end_of_turn_ids(tokenizer) -> set[int]:
    # Chat models' tokenizers name the end-of-turn token as EOS (<|im_end|> for ChatML).
    return {tokenizer.eos_token_id} - {None}


def tokenize_for_sft(tokenizer, messages: list[Message], max_len: int, tools: Optional[list[dict]] = None) -> dict[str, list[int]]:
    """``input_ids``, ``labels`` and ``attention_mask`` for one conversation.

    Labels are ``-100`` everywhere except the assistant's turns: their content and closing
    end-of-turn token (``<|im_end|>`` for ChatML, so the model learns to stop), without the
    ``<|im_start|>assistant\\n`` header the generation prompt already supplies and without what
    the template writes after the end-of-turn token. ``tools`` are rendered by the template (its
    tools section), so a tool-calling turn is learned with the prompt it will be served with.

    The spans come from the template itself, rendered incrementally: assistant turn ``i`` is the
    tokens of ``messages[:i+1]`` beyond those of ``messages[:i]`` with the generation prompt.
    That holds only if each rendering is a token prefix of the next, so this checks it and
    raises :class:`DatasetError` otherwise (a template that rewrites earlier turns, as Qwen3's
    drops old reasoning, would otherwise be mislabelled in silence). Raises
    :class:`NoTargetTokens` when truncation to ``max_len`` leaves no assistant token.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be at least 1, got {max_len}")
    full_ids = _encode(tokenizer, _render(tokenizer, messages, generation_prompt=False, tools=tools))
    labels = [IGNORE_INDEX] * len(full_ids)
    stops = end_of_turn_ids(tokenizer)

    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt_ids = _encode(tokenizer, _render(tokenizer, messages[:i], generation_prompt=True, tools=tools))
        turn_ids = _encode(tokenizer, _render(tokenizer, messages[: i + 1], generation_prompt=False, tools=tools))
        if turn_ids[: len(prompt_ids)] != prompt_ids or full_ids[: len(turn_ids)] != turn_ids:
            raise DatasetError(
                f"the chat template is not prefix-stable for this conversation (assistant turn at message {i}): "
                f"rendering more messages changes the tokens of earlier ones, so the assistant's tokens "
                f"cannot be located safely"
            )
        start, end = len(prompt_ids), len(turn_ids)
        # Keep the end-of-turn token, drop what follows it (ChatML's newline): the model should
        # learn to stop, and what the template writes after the stop is never generated.
        last_stop = max((k for k in range(start, end) if full_ids[k] in stops), default=None)
        if last_stop is not None:
            end = last_stop + 1
        span_text = tokenizer.decode(full_ids[start:end], clean_up_tokenization_spaces=False)
        if message["content"].strip() not in span_text:
            raise DatasetError(
                f"the chat template does not render assistant message {i} verbatim after its generation "
                f"prompt, so its tokens cannot be located safely"
            )
        labels[start:end] = full_ids[start:end]

    input_ids, labels = full_ids[:max_len], labels[:max_len]
    if all(label == IGNORE_INDEX for label in labels):
        raise NoTargetTokens(
            f"no assistant token within max_len={max_len} (the conversation has {len(full_ids)} tokens)"
        )
    return {"input_ids": input_ids, "labels": labels, "attention_mask": [1] * len(input_ids)}


def tokenize_dataset(
    tokenizer, conversations: Iterable[list[Message]], max_len: int, source: Optional[Path] = None
) -> list[dict[str, list[int]]]:
    """Tokenise every conversation; skip (with a warning) those that truncation leaves without a target."""
    examples, skipped = [], 0
    prefix = f"{source}, " if source else ""
    for index, messages in enumerate(conversations):
        try:
            examples.append(tokenize_for_sft(tokenizer, messages, max_len, getattr(messages, "tools", None)))
        except NoTargetTokens as exc:
            skipped += 1
            log.warning("%srecord [%d] skipped: %s", prefix, index, exc)
        except DatasetError as exc:
            raise DatasetError(f"{prefix}record [{index}]: {exc}") from None
    if not examples:
        raise DatasetError(f"{prefix}no usable examples ({skipped} skipped); raise max_len?")
    if skipped:
        log.warning("%sskipped %d of %d records", prefix, skipped, skipped + len(examples))
    return examples
