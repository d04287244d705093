"""Which token ids end an answer: one rule per checkpoint format.

Both backends stop on these ids, the fidelity report shows them, and scripts/convert_to_gguf.py
writes a GGUF whose rule gives the same ids as its Hugging Face checkpoint's. A model that stops
on one runtime and rambles on the other is otherwise the commonest way a conversion looks broken.

* A Hugging Face checkpoint: the ``eos_token_id`` of ``generation_config.json`` (one id or a list),
  which is what ``generate`` stops on; without one, ``config.json``'s; without that, the
  tokenizer's EOS token. The first source that names any id decides; they are not merged.
* A GGUF: the end-of-sequence, end-of-turn and end-of-message tokens its header declares
  (``tokenizer.ggml.eos_token_id``, ``eot_token_id``, ``eom_token_id``). Not llama.cpp's wider
  end-of-generation set (``llama_vocab_is_eog``), which also takes tokens by their text
  (``<|endoftext|>``, ``<|fim_pad|>``, ``<|repo_name|>``, ``<|file_sep|>``, and ``</s>``, a plain
  BPE token in Qwen's vocabulary) whatever the checkpoint says.

A GGUF header has room for three such ids. ``gguf_end_tokens`` says how the ids of a generation
config are laid out in it: the EOS the converter wrote stays when it is one of them (chat
templates print it as ``eos_token``), and the others fill the end-of-turn, then the
end-of-message slot.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

# role -> the GGUF key declaring it, in the order the rule lists them
GGUF_STOP_KEYS: dict[str, str] = {
    "eos": "tokenizer.ggml.eos_token_id",
    "eot": "tokenizer.ggml.eot_token_id",
    "eom": "tokenizer.ggml.eom_token_id",
}


def _ids(value: Any) -> list[int]:
    """An ``eos_token_id`` value (an id, a list of them, or nothing) as a list of ids."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v >= 0]


def _unique(ids) -> tuple[int, ...]:
    return tuple(dict.fromkeys(ids))


def hf_stop_ids(generation_eos: Any, config_eos: Any = None, tokenizer_eos: Any = None) -> tuple[int, ...]:
    """The ids that end an answer of a Hugging Face checkpoint, from the ``eos_token_id`` of its
    generation config, its model config and its tokenizer: the first that names any."""
    for source in (generation_eos, config_eos, tokenizer_eos):
        ids = _ids(source)
        if ids:
            return _unique(ids)
    return ()


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _tokenizer_eos_id(model_dir: Path) -> Optional[int]:
    """The id of tokenizer_config.json's eos_token, looked up among tokenizer.json's added tokens."""
    eos = _read_json(model_dir / "tokenizer_config.json").get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    if not isinstance(eos, str):
        return None
    for token in _read_json(model_dir / "tokenizer.json").get("added_tokens") or []:
        if isinstance(token, dict) and token.get("content") == eos and isinstance(token.get("id"), int):
            return token["id"]
    return None


def hf_stop_ids_in(model_dir: Path) -> tuple[int, ...]:
    """``hf_stop_ids`` read from the files of a checkpoint folder (no model loaded)."""
    model_dir = Path(model_dir)
    generation = _read_json(model_dir / "generation_config.json").get("eos_token_id")
    config = _read_json(model_dir / "config.json")
    config_eos = config.get("eos_token_id")
    if not _ids(config_eos) and isinstance(config.get("text_config"), dict):  # multimodal configs nest it
        config_eos = config["text_config"].get("eos_token_id")
    if _ids(generation) or _ids(config_eos):
        return hf_stop_ids(generation, config_eos)
    return hf_stop_ids(None, None, _tokenizer_eos_id(model_dir))


def gguf_declared(metadata: Mapping[str, Any]) -> dict[str, Optional[int]]:
    """The end tokens a GGUF header declares, by role (eos, eot, eom); None where it declares none."""
    declared = {}
    for role, key in GGUF_STOP_KEYS.items():
        ids = _ids(metadata.get(key))
        declared[role] = ids[0] if ids else None
    return declared


def gguf_stop_ids(metadata: Mapping[str, Any]) -> tuple[int, ...]:
    """The ids that end an answer of a GGUF model: the EOS, EOT and EOM its header declares, each once."""
    return _unique(token for token in gguf_declared(metadata).values() if token is not None)


def gguf_end_tokens(wanted: Sequence[int], declared: Mapping[str, Optional[int]]) -> tuple[dict[str, Optional[int]], list[int]]:
    """How a GGUF header declares the ids ``wanted`` (a generation config's, in its order), given
    what the converter ``declared``: (role -> id, None for a role left undeclared) and the ids
    that did not fit. A header that already declares exactly ``wanted`` is kept as it is."""
    wanted = list(_unique(wanted))
    current = {role: declared.get(role) for role in GGUF_STOP_KEYS}
    if not wanted or set(wanted) == {token for token in current.values() if token is not None}:
        return current, []
    layout: dict[str, Optional[int]] = dict.fromkeys(GGUF_STOP_KEYS)
    if current["eos"] in wanted:
        layout["eos"] = current["eos"]
    rest = [token for token in wanted if token != layout["eos"]]
    for role in GGUF_STOP_KEYS:
        if layout[role] is None and rest:
            layout[role] = rest.pop(0)
    return layout, rest
