#!/bin/bash
# Runs on the GPU machine, from the project root, as `bash scripts/gpucheck/gpucheck.sh`, with the
# .gpu/ bundle that the shared tools/gpu/prepare.sh made beside it (docs/gpu-check.md).
# Installs the wheels the GPU image lacks, builds llama-cpp-python with CUDA in the background
# (about 200 s on 16 cores with flash-attention kernels left out: the app keeps flash attention
# off), runs scripts/gpucheck/gpucheck.py meanwhile, and leaves everything under $OUT.
set -u
T0=$(date +%s)
: "${OUT:=/tmp/gpu-out}"; mkdir -p "$OUT"
{
echo "== start $(date)"; nvidia-smi -L; nproc; python3 -V
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade .gpu/whl/*.whl && echo PIP_OK || echo PIP_FAIL
python3 -c "import flask, pydantic, transformers, peft, torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)"
rm -rf /tmp/llama-src && mkdir -p /tmp/llama-src && tar -xzf .gpu/llama-src.tar.gz -C /tmp/llama-src --strip-components=1
# the CPU flags the Makefile uses on x86-64 Linux (a GGML_NATIVE build turns on AMX where the CPU
# has it, and the guide records that crashing), plus CUDA
CPU_ARGS=$(sed -n 's/^LLAMA_CMAKE_ARGS := //p' Makefile)
echo "CMAKE_ARGS: $CPU_ARGS -DGGML_CUDA=on ..."
( cd /tmp/llama-src && CMAKE_ARGS="$CPU_ARGS -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCH:-90} -DLLAVA_BUILD=OFF -DGGML_CUDA_FA=OFF" \
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) nice -n 5 python3 -m pip wheel -v --no-build-isolation --no-deps -w /tmp/llw . \
  > /tmp/llama_build.log 2>&1; echo $? > /tmp/llw.rc; echo "== llama-cpp-python CUDA build done at $(( $(date +%s) - T0 )) s" ) &
LLAMA_CPP_CONVERTER_DIR=/tmp/llama-src/vendor/llama.cpp LLAMA_WHEEL_DIR=/tmp/llw PYTHONUNBUFFERED=1 \
  timeout $(( T0 + ${TOTAL_S:-560} - $(date +%s) )) python3 -m scripts.gpucheck.gpucheck --out "$OUT" \
  --deadline $(( T0 + ${BUILD_DEADLINE_S:-400} )) --llama-wait /tmp/llw.rc ${GPUCHECK_ARGS:-}
echo "== gpucheck rc=$? at $(( $(date +%s) - T0 )) s"
} > "$OUT/gpucheck.log" 2>&1
tail -60 /tmp/llama_build.log > "$OUT/llama_build_tail.log" 2>/dev/null
tail -45 "$OUT/gpucheck.log"
