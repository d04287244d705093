"""Runs the tester: ``python run.py`` serves the embedded SmolLM2-135M-Instruct at http://127.0.0.1:5000."""
from __future__ import annotations

import argparse
import logging

from config.settings import Settings

log = logging.getLogger("model_test")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="model_test: chat with your fine-tuned checkpoints.")
    parser.add_argument("--host", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default 5000)")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on the API (default: none; MODEL_TEST_SERVER__API_KEY)")
    parser.add_argument("--backend", choices=["llamacpp", "transformers", "openai"],
                        help="backend (default llamacpp; inferred from --model when it is a path); "
                        "openai forwards to a remote OpenAI-compatible server (--base-url)")
    parser.add_argument("--model", help="a .gguf file, a Hugging Face directory or a preset name (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--adapter", help="a LoRA adapter: a PEFT directory, merged into the model (transformers), or a GGUF LoRA file (llamacpp)")
    parser.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], help="transformers weights dtype (default auto)")
    parser.add_argument("--device", choices=["auto", "cuda", "mps", "cpu"], help="transformers device (default auto: CUDA, MPS, CPU)")
    parser.add_argument("--trust-remote-code", action="store_true", default=None, help="run the model's own code (Hunyuan needs it)")
    parser.add_argument("--n-ctx", type=int, help="context window in tokens (default 4096)")
    parser.add_argument("--n-threads", type=int, help="CPU threads (default: physical cores)")
    parser.add_argument("--n-gpu-layers", type=int, help="layers offloaded to Metal/CUDA; -1 = all (default), 0 = CPU only")
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--results-dir", help="where evals are saved (default: results/; MODEL_TEST_RESULTS_DIR)")
    remote = parser.add_argument_group("openai backend (a model on a remote OpenAI-compatible server: vLLM, llama-server, TGI, Ollama)")
    remote.add_argument("--base-url", help="the server's OpenAI API root, e.g. http://gpu-host:8000/v1 (MODEL_TEST_REMOTE__BASE_URL)")
    remote.add_argument("--remote-model", help="the model's name there, e.g. a vLLM --lora-modules name "
                        "(default: the server's only model; MODEL_TEST_REMOTE__MODEL)")
    remote.add_argument("--remote-api-key", help="API key sent to that server; --api-key is this tester's own (MODEL_TEST_REMOTE__API_KEY)")
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Flags given on the command line override the environment, which overrides the defaults."""
    overrides: dict = {}
    server = {
        k: v
        for k, v in {"host": args.host, "port": args.port, "log_level": args.log_level, "api_key": args.api_key}.items()
        if v is not None
    }
    llamacpp = {
        k: v
        for k, v in {"n_ctx": args.n_ctx, "n_threads": args.n_threads, "n_gpu_layers": args.n_gpu_layers}.items()
        if v is not None
    }
    transformers = {
        k: v
        for k, v in {"dtype": args.dtype, "device": args.device, "trust_remote_code": args.trust_remote_code,
                     "n_threads": args.n_threads, "n_ctx": args.n_ctx}.items()
        if v is not None
    }
    if server:
        overrides["server"] = server
    if llamacpp:
        overrides["llamacpp"] = llamacpp
    if transformers:
        overrides["transformers"] = transformers
    remote = {
        k: v
        for k, v in {"base_url": args.base_url, "model": args.remote_model, "api_key": args.remote_api_key,
                     "n_ctx": args.n_ctx}.items()
        if v is not None
    }
    if remote:
        overrides["remote"] = remote
    for name in ("backend", "model", "adapter", "results_dir"):
        if getattr(args, name):
            overrides[name] = getattr(args, name)
    return Settings(**overrides)


def main(argv=None) -> None:
    settings = settings_from_args(parse_args(argv))
    from app.hugepages import malloc_asks_for_hugepages, restart_with_hugepages, thp_mode

    if argv is None and settings.server.hugepages:
        restart_with_hugepages()  # the command line is this process's own, so it can start again with it
    from app import create_app
    from app.auth import warn_if_exposed
    from app.http_server import StreamingRequestHandler

    app = create_app(settings)
    warn_if_exposed(settings.server.host, settings.server.api_key is not None)
    log.info("huge pages: malloc %s, kernel THP mode %s",
             "asks for them" if malloc_asks_for_hugepages() else "does not ask", thp_mode() or "absent")
    log.info("serving on http://%s:%d", settings.server.host, settings.server.port)
    app.run(host=settings.server.host, port=settings.server.port, threaded=True, use_reloader=False,
            request_handler=StreamingRequestHandler)


if __name__ == "__main__":
    main()
