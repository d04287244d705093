"""Which backend serves a spec; each backend module is imported only when it is chosen, so the
page starts fast and one backend's import error does not take down the others."""
from __future__ import annotations

from typing import Callable

from app.services.backends.base import Backend
from app.services.checkpoints.spec import ModelSpec
from app.services.core.errors import InvalidRequest
from config.settings import Settings

BackendFactory = Callable[[ModelSpec, Settings], Backend]


def make_backend(spec: ModelSpec, settings: Settings) -> Backend:
    """The backend for a spec; each backend module is imported only when it is chosen."""
    if spec.backend == "transformers":
        from app.services.backends.transformers.backend import TransformersBackend

        return TransformersBackend(spec, settings.transformers)
    if spec.is_remote:
        if spec.adapter is not None:
            raise InvalidRequest(
                "the remote backend cannot apply an adapter: serve the LoRA on the remote server under a name of its "
                "own (vLLM: --enable-lora --lora-modules myft=/path/to/adapter) and choose that name as the model "
                "(--remote-model myft, or POST /api/load_model {\"backend\": \"remote\", \"model\": \"myft\"})",
                field="adapter",
            )
        from app.services.backends.remote.backend import RemoteBackend

        return RemoteBackend(spec, settings.remote)
    # llama.cpp applies a LoRA only as a GGUF file (convert_lora_to_gguf.py); a PEFT folder is refused
    # here, and the backend's check() tells a .gguf that is no LoRA from one that is.
    if spec.adapter is not None and not (spec.adapter.suffix.lower() == ".gguf" or spec.adapter.is_file()):
        raise InvalidRequest(
            "LoRA adapter directories apply on the transformers backend; for a GGUF, merge the adapter "
            "(scripts/merge_lora.py) and convert the merged model, or convert the adapter to a GGUF LoRA "
            "(python -m scripts.convert_to_gguf --lora-only --adapter DIR --base DIR)",
            field="adapter",
        )
    from app.services.backends.llamacpp.backend import LlamaCppBackend

    return LlamaCppBackend(spec, settings.llamacpp)
