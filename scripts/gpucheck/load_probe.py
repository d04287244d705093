"""On the GPU: the llama.cpp backend's load() on its own, outside the server, in this process.
If the server crashes at load and this does not, the server's side of the load is to blame (its
threads, its imports); if this crashes too, the backend's. faulthandler prints where.

    python3 -m scripts.gpucheck.load_probe models/q05.f16.gguf [--n-gpu-layers -1]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from app.logging_setup import enable_crash_traces


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="the llama.cpp backend's load() alone")
    parser.add_argument("gguf", type=Path)
    parser.add_argument("--n-gpu-layers", type=int, default=-1)
    args = parser.parse_args(argv)
    enable_crash_traces()
    from app.services.backends.llamacpp.backend import LlamaCppBackend
    from app.services.checkpoints.spec import ModelSpec
    from config.settings import LlamaCppSettings

    backend = LlamaCppBackend(ModelSpec("llamacpp", args.gguf), LlamaCppSettings(n_gpu_layers=args.n_gpu_layers))
    backend.load()
    info = backend.info().model_dump(mode="json")  # the facts the backend reports, as the status sends them
    print(json.dumps({key: info.get(key) for key in ("device", "n_gpu_layers", "gpu", "gpu_fallback", "build")}))
    backend.unload()
    return 0


if __name__ == "__main__":
    sys.exit(main())
