"""GPU check of model_test (issue 29), run from the project root on a CUDA machine by
scripts/gpucheck/gpucheck.sh (docs/gpu-check.md says how).

Part A: transformers backend on CUDA (bf16 by default, LoRA merged) served over SSE, against bare
``model.generate`` on the same GPU, quiet and with every core but two busy; the batched sampler
against the per-row one on CUDA; the host's waits per step of the running batch. Part B:
llama-cpp-python built with CUDA (by gpucheck.sh in the background): the backend's load alone,
GGUF offload through run.py against in-process llama-cpp-python, and the CPU fallback. Weights
are random (a Qwen2.5-0.5B shape) with the real Qwen2 tokenizer: speed and behaviour are
measured, not answer quality. Results go to OUT/gpucheck.json, with each target of issue 29 and
whether it was met under "targets".

    python3 -m scripts.gpucheck.gpucheck --out OUT [--small] [--deadline EPOCH] [--llama-wait FILE] [--skip PART]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

RESULTS: dict = {}
PROMPT = "Write a long story about a lighthouse keeper and the sea."


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def save(out: Path):
    (out / "gpucheck.json").write_text(json.dumps(RESULTS, indent=1, default=str))


class BusyCpu:
    """Every core but two spinning in processes of their own, as the compiler was in issue 29's run."""

    def __init__(self, spare: int = 2):
        self.count = max(1, (os.cpu_count() or 2) - spare)
        self._procs = []

    def __enter__(self):
        self._procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.count)]
        time.sleep(1.0)  # the server's thread watcher (core.cpu_share) sees them
        return self

    def __exit__(self, *exc):
        for proc in self._procs:
            proc.kill()
        for proc in self._procs:
            proc.wait()


def build_model(small: bool, device: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    src = Path("models/tiny/qwen2.5")
    if not (src / "tokenizer.json").exists():
        src = Path(".gpu/qwen2.5")  # prepare.sh copies its tokenizer and config here
    dst = Path("models/q05")
    if (dst / "model.safetensors").exists() or (dst / "model.safetensors.index.json").exists():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (src / f).exists():
            shutil.copy(src / f, dst / f)
    cfg = AutoConfig.from_pretrained(src)
    if not small:
        cfg.hidden_size, cfg.intermediate_size = 896, 4864
        cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads = 24, 14, 2
        cfg.layer_types = ["full_attention"] * 24
        cfg.max_window_layers = 24
    else:
        cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers = 128, 256, 2
        cfg.num_attention_heads, cfg.num_key_value_heads = 4, 2
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).to(device)
    model.save_pretrained(dst)
    del model
    return dst


def build_lora(base: Path, device: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    out = Path("saves/q05/lora/rand")
    if (out / "adapter_config.json").exists():
        return out
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).to(device)
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules="all-linear",
                                                  init_lora_weights=False))
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out)
    del peft_model, model
    return out


class Server:
    def __init__(self, args: list[str], port: int, logfile: Path, env=None):
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.log = open(logfile, "w")
        self.proc = subprocess.Popen([sys.executable, "run.py", "--port", str(port), *args],
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, start_new_session=True)
        t0 = time.time()
        while time.time() - t0 < 120:
            try:
                if requests.get(self.base + "/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.5)
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}")
        self.started_s = time.time() - t0

    def load(self, body=None):
        t0 = time.time()
        r = requests.post(self.base + "/api/load_model", json=body or {}, timeout=600)
        return {"http": r.status_code, "load_s": round(time.time() - t0, 2), "status": self.status()}

    def status(self):
        return requests.get(self.base + "/api/model_status", timeout=10).json()

    def stop(self):
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(20)
        except Exception:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except Exception:
                pass
        self.log.close()


def sse_once(base: str, max_tokens: int, extra=None) -> dict:
    body = {"prompt": PROMPT, "temperature": 0, "max_new_tokens": max_tokens, "ignore_eos": True}
    body.update(extra or {})
    t0 = time.perf_counter()
    first = last = None
    n = 0
    done = None
    err = None
    with requests.post(base + "/api/chat_stream", json=body, stream=True, timeout=600) as r:
        event = None
        for raw in r.iter_lines(decode_unicode=True):
            if raw.startswith("event:"):
                event = raw[6:].strip()
            elif raw.startswith("data:"):
                if event == "token":
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    n += 1
                elif event == "done":
                    done = json.loads(raw[5:])
                elif event == "error":
                    err = raw[5:]
    res = {"events": n, "ttft_ms": round((first - t0) * 1000, 1) if first else None, "error": err}
    if done:
        res["usage"] = done.get("usage")
        res["server_timings"] = done.get("timings")
    toks = (done or {}).get("usage", {}).get("completion_tokens") or n
    if first and last and last > first:
        res["client_decode_tok_s"] = round((toks - 1) / (last - first), 1)
    res["wall_s"] = round(time.perf_counter() - t0, 3)
    res["tokens"] = toks
    return res


def concurrent(base: str, k: int, max_tokens: int) -> dict:
    out = [None] * k

    def one(i):
        out[i] = sse_once(base, max_tokens, {"seed": i})

    t0 = time.perf_counter()
    ts = [threading.Thread(target=one, args=(i,)) for i in range(k)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    wall = time.perf_counter() - t0
    total = sum((o or {}).get("tokens") or 0 for o in out)
    return {"streams": k, "wall_s": round(wall, 2), "total_tokens": total,
            "aggregate_tok_s": round(total / wall, 1), "errors": [o.get("error") for o in out if o and o.get("error")]}


def part_transformers(out: Path, small: bool, device: str, max_tokens: int):
    import torch
    base = build_model(small, device)
    lora = build_lora(base, device)
    A = RESULTS.setdefault("transformers", {})
    srv = Server(["--backend", "transformers", "--model", str(base), "--adapter", str(lora)], 5600,
                 out / "server_transformers.log")
    try:
        A["server_start_s"] = round(srv.started_s, 2)
        A["load"] = srv.load()
        log("tf status", json.dumps(A["load"])[:400])
        sse_once(srv.base, 16)  # warm
        A["single"] = [sse_once(srv.base, max_tokens) for _ in range(2)]
        log("tf single", [s.get("client_decode_tok_s") for s in A["single"]])
        for k in (8,):  # the target's; the device budget leaves no room for 4
            A[f"concurrent_{k}"] = concurrent(srv.base, k, max_tokens)
            log("tf concurrent", k, A[f"concurrent_{k}"]["aggregate_tok_s"])
        with BusyCpu() as busy:
            A["busy_cores"] = busy.count
            A["busy_single"] = [sse_once(srv.base, max_tokens) for _ in range(2)]
            A["busy_concurrent_8"] = concurrent(srv.base, 8, max_tokens)
            log("tf busy", [s.get("client_decode_tok_s") for s in A["busy_single"]], A["busy_concurrent_8"]["aggregate_tok_s"])
        r = requests.post(srv.base + "/batch", json={"prompts": [PROMPT] * 16, "max_tokens": 64, "temperature": 0}, timeout=300)
        A["batch_16x64"] = {"http": r.status_code, "body": r.text[:300] if not r.ok else None}
        r = requests.post(srv.base + "/v1/chat/completions", json={
            "model": "x", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8,
            "logprobs": True, "top_logprobs": 3, "temperature": 0}, timeout=120)
        A["v1_logprobs"] = {"http": r.status_code, "body": r.text[:600]}
        r = requests.post(srv.base + "/api/score", json={"prompt": "Hello", "reference": "world and sea"}, timeout=120)
        A["score"] = {"http": r.status_code, "body": r.text[:400]}
        r = requests.get(srv.base + "/api/system", timeout=10)
        A["system"] = r.json() if r.ok else r.text[:300]
    finally:
        srv.stop()
    save(out)
    # bare baseline on the same GPU: the merged model, greedy, exactly max_tokens
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).to(device)
    model = PeftModel.from_pretrained(model, lora).merge_and_unload().eval()
    prompt = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt").to(device)
    bare = []
    with torch.inference_mode():
        model.generate(**ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
        for _ in range(3):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            o = model.generate(**ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
            if device == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            bare.append(round((o.shape[1] - ids["input_ids"].shape[1]) / dt, 1))
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        for k in (8,):
            batch = tok([prompt] * k, return_tensors="pt", padding=True).to(device)
            t0 = time.perf_counter()
            o = model.generate(**batch, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
            if device == "cuda":
                torch.cuda.synchronize()
            A[f"bare_batch_{k}_tok_s"] = round(k * max_tokens / (time.perf_counter() - t0), 1)
        with BusyCpu():
            t0 = time.perf_counter()
            o = model.generate(**ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
            if device == "cuda":
                torch.cuda.synchronize()
            A["busy_bare_generate_tok_s"] = round((o.shape[1] - ids["input_ids"].shape[1]) / (time.perf_counter() - t0), 1)
            batch = tok([prompt] * 8, return_tensors="pt", padding=True).to(device)
            t0 = time.perf_counter()
            o = model.generate(**batch, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
            if device == "cuda":
                torch.cuda.synchronize()
            A["busy_bare_batch_8_tok_s"] = round(8 * max_tokens / (time.perf_counter() - t0), 1)
    A["bare_generate_tok_s"] = bare
    log("tf bare", bare, A.get("bare_batch_8_tok_s"), "busy", A.get("busy_bare_generate_tok_s"), A.get("busy_bare_batch_8_tok_s"))
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    save(out)
    part_sampler(out, base, device)


def part_sampler(out: Path, base: Path, device: str):
    """The batched sampler against the per-row one on this device, and the host's waits per step."""
    from scripts.gpucheck.sampler_check import check
    from scripts.step_profile import measure

    A = RESULTS.setdefault("transformers", {})
    A["sampler_identical_to_per_row"] = check(device)
    log("sampler", A["sampler_identical_to_per_row"]["identical"])
    for rows in (1, 8):
        figures = measure(base, device, "bfloat16", rows, 32, 0.0, 25)
        (out / f"step_profile_rows{rows}.txt").write_text(figures.pop("profile"))
        A[f"step_profile_rows{rows}"] = figures
        log("step profile", rows, figures["host_waits_per_step_outside_forward"], figures["host_waits_per_step_in_forward"],
            figures["step_ms"])
    save(out)


def install_built_wheel(B: dict, deadline: float, wait_file: Path) -> bool:
    """Waits for the background CUDA build and installs its wheel; False when there is none."""
    while not wait_file.exists() and time.time() < deadline:
        time.sleep(3)
    if not wait_file.exists():
        B["build"] = "not finished by the deadline"
        return False
    rc = wait_file.read_text().strip()
    B["build_rc"] = rc
    if rc != "0":
        return False
    whl = sorted(Path(os.environ.get("LLAMA_WHEEL_DIR", "/tmp/llw")).glob("llama_cpp_python-*.whl"))
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(whl[0])],
                       capture_output=True, text=True)
    B["install_rc"] = r.returncode
    return True


def part_llamacpp(out: Path, deadline: float, wait_file: Path | None, max_tokens: int, small: bool):
    B = RESULTS.setdefault("llamacpp", {})
    if wait_file is not None and not install_built_wheel(B, deadline, wait_file):
        return
    import llama_cpp
    llama_cpp.llama_backend_init()  # before any other call into llama.cpp, as Llama() itself does
    B["supports_gpu_offload"] = bool(llama_cpp.llama_supports_gpu_offload())
    conv_dir = os.environ.get("LLAMA_CPP_CONVERTER_DIR")
    gguf = Path("models/q05.f16.gguf")
    if not gguf.exists():
        t0 = time.time()
        cmd = [sys.executable, "-m", "scripts.convert_to_gguf", "models/q05", "--outtype", "f16", "--out", str(gguf)]
        if conv_dir:
            cmd += ["--converter-dir", conv_dir]
        r = subprocess.run(cmd, capture_output=True, text=True)
        B["convert"] = {"rc": r.returncode, "s": round(time.time() - t0, 1), "tail": (r.stdout + r.stderr)[-800:]}
        if r.returncode != 0:
            save(out)
            return
    # in-process llama-cpp-python on the same offload first: the engine's own speed, and proof
    # that the wheel and the file work before the server is asked to load them
    llm = llama_cpp.Llama(model_path=str(gguf), n_gpu_layers=-1, n_ctx=2048, verbose=False)
    msgs = [{"role": "user", "content": PROMPT}]
    speeds = []
    for _ in range(3):
        first = last = None
        n = 0
        for chunk in llm.create_chat_completion(messages=msgs, max_tokens=max_tokens, temperature=0, stream=True):
            if chunk["choices"][0]["delta"].get("content"):
                now = time.perf_counter()
                first = first or now
                last = now
                n += 1
        if first and last and n > 1:
            speeds.append(round((n - 1) / (last - first), 1))
    B["llama_cpp_python_stream_tok_s"] = speeds
    log("llama-cpp-python in-process", speeds)
    del llm
    save(out)
    probe = subprocess.run([sys.executable, "-m", "scripts.gpucheck.load_probe", str(gguf)], capture_output=True, text=True,
                           timeout=180)
    B["load_probe"] = {"rc": probe.returncode, "stdout": probe.stdout[-800:], "stderr_tail": probe.stderr[-3000:]}
    log("backend load alone", probe.returncode, probe.stdout[-300:])
    save(out)
    srv = Server(["--model", str(gguf)], 5601, out / "server_llamacpp.log")
    try:
        B["load"] = srv.load()
        log("llama status", json.dumps(B["load"])[:400])
        sse_once(srv.base, 16)
        B["single"] = [sse_once(srv.base, max_tokens) for _ in range(3)]
        log("llama single", [s.get("client_decode_tok_s") for s in B["single"]])
        for k in (4, 8):
            B[f"concurrent_{k}"] = concurrent(srv.base, k, max_tokens)
            log("llama concurrent", k, B[f"concurrent_{k}"]["aggregate_tok_s"])
    except Exception as exc:  # noqa: BLE001
        B["server_failure"] = f"{exc!r}; server exit code {srv.proc.poll()}"
        log("llama server failed", B["server_failure"])
    finally:
        srv.stop()
    save(out)
    # CPU fallback: no GPU layers asked for, and no GPU visible
    for name, args, env in (("n_gpu_layers_0", ["--n-gpu-layers", "0"], None),
                            ("no_visible_gpu", [], {"CUDA_VISIBLE_DEVICES": ""})):
        try:
            srv = Server(["--model", str(gguf), *args], 5602, out / f"server_{name}.log", env=env)
            try:
                B[name] = srv.load()
                B[name + "_single"] = sse_once(srv.base, 64)
            finally:
                srv.stop()
        except Exception as exc:  # noqa: BLE001
            B[name] = f"failed: {exc}"
        save(out)


def _median(values):
    values = [v for v in values or [] if v]
    return statistics.median(values) if values else None


def _ratio(numerator, denominator):
    return round(numerator / denominator, 3) if numerator and denominator else None


def _status(part: dict, name: str) -> dict:
    """The model status a server answered after loading in the named run ({} when it failed)."""
    loaded = part.get(name)
    return (loaded.get("status") or {}) if isinstance(loaded, dict) else {}


def targets() -> dict:
    """Issue 29's targets from the figures above: each ratio and whether it is met."""
    A, B = RESULTS.get("transformers", {}), RESULTS.get("llamacpp", {})

    def decode(runs):
        return _median([r.get("client_decode_tok_s") for r in runs or []])

    found = {
        "llama_loads_on_cuda": (B.get("load") or {}).get("status", {}).get("device") == "CUDA",
        "llama_single_vs_llama_cpp_python": _ratio(decode(B.get("single")), _median(B.get("llama_cpp_python_stream_tok_s"))),
        "llama_4_streams_vs_1": _ratio((B.get("concurrent_4") or {}).get("aggregate_tok_s"), decode(B.get("single"))),
        "tf_single_vs_generate": _ratio(decode(A.get("single")), _median(A.get("bare_generate_tok_s"))),
        "tf_8_vs_generate_batch_8": _ratio((A.get("concurrent_8") or {}).get("aggregate_tok_s"), A.get("bare_batch_8_tok_s")),
        "tf_busy_single_vs_busy_generate": _ratio(decode(A.get("busy_single")), A.get("busy_bare_generate_tok_s")),
        "tf_busy_8_vs_busy_generate_batch_8": _ratio((A.get("busy_concurrent_8") or {}).get("aggregate_tok_s"),
                                                     A.get("busy_bare_batch_8_tok_s")),
        "sampler_identical_on_device": (A.get("sampler_identical_to_per_row") or {}).get("identical"),
        "host_waits_per_step_rows8": (A.get("step_profile_rows8") or {}).get("host_waits_per_step_outside_forward"),
        "fallback_n_gpu_layers_0_on_cpu": _status(B, "n_gpu_layers_0").get("device") == "CPU",
        "fallback_no_visible_gpu_says_why": bool((_status(B, "no_visible_gpu").get("gpu") or {}).get("note")),
    }
    bounds = {"llama_single_vs_llama_cpp_python": 0.9, "llama_4_streams_vs_1": 2.5, "tf_single_vs_generate": 0.8,
              "tf_8_vs_generate_batch_8": 1.0, "tf_busy_single_vs_busy_generate": 0.8, "tf_busy_8_vs_busy_generate_batch_8": 1.0}
    met = {name: (value is not None and value >= bounds[name]) if name in bounds else
           (value == 1.0 if name == "host_waits_per_step_rows8" else bool(value)) for name, value in found.items()}
    return {"figures": found, "bounds": bounds, "met": met, "all_met": all(met.values())}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--deadline", type=float, default=time.time() + 480)
    ap.add_argument("--llama-wait", type=Path, default=None)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--skip", action="append", default=[])
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    RESULTS["env"] = {"torch": torch.__version__, "device": device,
                      "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None}
    for name, fn in (("transformers", lambda: part_transformers(a.out, a.small, device, a.max_tokens)),
                     ("llamacpp", lambda: part_llamacpp(a.out, a.deadline, a.llama_wait, a.max_tokens, a.small))):
        if name in a.skip:
            continue
        t0 = time.time()
        try:
            fn()
        except Exception as exc:  # noqa: BLE001
            import traceback
            RESULTS.setdefault(name, {})["exception"] = traceback.format_exc()[-1500:]
            log(name, "failed", exc)
        RESULTS.setdefault(name, {})["part_s"] = round(time.time() - t0, 1)
        RESULTS["targets"] = targets()
        save(a.out)
    log("targets", json.dumps(RESULTS["targets"]["met"]))
    log("done")


if __name__ == "__main__":
    main()
