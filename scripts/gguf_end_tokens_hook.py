"""Runs one of llama.cpp's converter scripts so that the GGUF declares the checkpoint's end tokens.

llama.cpp's converter declares the tokenizer's EOS token (and for a few architectures an EOT),
while ``generate`` stops on every id of generation_config.json's ``eos_token_id``: Qwen2.5's
and Qwen3's name ``<|im_end|>`` and ``<|endoftext|>``, and the GGUF declares only the first.
scripts/convert_to_gguf.py runs the converter through this file, which wraps gguf-py's
``GGUFWriter.write_header_to_file`` (called once, after every key is set and before any is
written) to lay the ids out as ``checkpoints.stop_tokens.gguf_end_tokens`` says. A header that
already declares them is left as the converter wrote it.

    python scripts/gguf_end_tokens_hook.py IDS CONVERTER [CONVERTER ARGS...]

``IDS`` is comma-separated, in the generation config's order. The converter runs in this
process, with the vendored gguf-py that convert_to_gguf puts on PYTHONPATH.
"""
from __future__ import annotations

import importlib.util
import logging
import runpy
import sys
from pathlib import Path

log = logging.getLogger("end-tokens")


def _stop_tokens():
    # By file: importing the app package would start Flask's imports in the converter's process.
    path = Path(__file__).resolve().parents[1] / "app" / "services" / "checkpoints" / "stop_tokens.py"
    spec = importlib.util.spec_from_file_location("model_test_stop_tokens", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def set_end_tokens(writer, wanted: list[int], stop_tokens) -> None:
    """Declares ``wanted`` in the writer's tokenizer keys (the first table; split files share it)."""
    import gguf

    table = writer.kv_data[0]
    declared = {role: int(table[key].value) if key in table else None for role, key in stop_tokens.GGUF_STOP_KEYS.items()}
    layout, left_out = stop_tokens.gguf_end_tokens(wanted, declared)
    if layout == declared:
        log.info("end tokens as generation_config.json names them: %s", _describe(layout))
        return
    for role, key in stop_tokens.GGUF_STOP_KEYS.items():
        writer.remove_key(key)
        if layout[role] is not None:
            writer.add_key_value(key, layout[role], gguf.GGUFValueType.UINT32)
    log.info("end tokens set to generation_config.json's %s: %s (the converter declared %s)",
             wanted, _describe(layout), _describe(declared))
    if left_out:
        log.warning("a GGUF declares at most three end tokens (eos, eot, eom); %s left out", left_out)


def _describe(layout: dict) -> str:
    return ", ".join(f"{role} {token}" for role, token in layout.items() if token is not None) or "none"


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO)  # the converter's own format: LEVEL:name:message
    ids, script, *args = argv
    wanted = [int(token) for token in ids.split(",") if token]
    stop_tokens = _stop_tokens()
    import gguf

    writer = getattr(gguf, "GGUFWriter", None)
    original = getattr(writer, "write_header_to_file", None)
    if original is None:  # a gguf-py without the writer we know: the converter's own end tokens stand
        log.warning("cannot declare the end tokens %s: this gguf-py has no GGUFWriter.write_header_to_file", wanted)
    else:
        def write_header_to_file(self, *a, **kw):
            set_end_tokens(self, wanted, stop_tokens)
            return original(self, *a, **kw)

        writer.write_header_to_file = write_header_to_file
    sys.argv = [script, *args]
    sys.path.insert(0, str(Path(script).resolve().parent))  # as `python CONVERTER` would have it
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
