#!/bin/bash
# Run here (no GPU needed), from the project root: bash scripts/gpucheck/prepare.sh
# (the shared tools/gpu/prepare.sh, made to work in a git worktree too: .gitignore ignores .gpu/).
# Makes .gpu/: the wheels the GPU image lacks (for its Python 3.12), the pinned llama-cpp-python
# sdist without docs, models and other GPU backends (about 7 MB instead of 77), and the tiny
# Qwen2.5 tokenizer and config. The check's scripts are the
# tree's own (scripts/gpucheck/). Then, on the CUDA machine, from the project root, with .gpu/
# carried along: OUT=<folder> bash scripts/gpucheck/gpucheck.sh
set -eu
root=$(git rev-parse --show-toplevel)
cd "$root"
git check-ignore -q .gpu/whl || { echo ".gpu/ must be ignored (.gitignore)" >&2; exit 1; }
rm -rf .gpu && mkdir -p .gpu/whl
PY=${PY:-.venv/bin/python}
# the app's runtime packages that the GPU image lacks or has at another version; torch, numpy and
# the CUDA libraries stay the image's own
$PY -m pip download -q --only-binary=:all: --no-deps --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d .gpu/whl \
  flask==3.1.3 werkzeug itsdangerous blinker pydantic==2.14.3 pydantic-core==2.50.4 annotated-types typing-inspection \
  pydantic-settings==2.16.3 python-dotenv gguf==0.19.0 transformers==5.23.0 tokenizers huggingface-hub==2.4.0 \
  httpx2 httpcore2 truststore hf-xet peft==0.21.2 swagger-ui-bundle==1.1.0 diskcache
# keep one version of each (pydantic-core, tokenizers and friends must match their parents' pins)
ls .gpu/whl
version=$(sed -n 's/^LLAMA_CPP_VERSION := //p' Makefile)
tmp=$(mktemp -d)
$PY -m pip download -q --no-binary :all: --no-deps "llama-cpp-python==$version" -d "$tmp"
tar -xzf "$tmp"/llama_cpp_python-"$version".tar.gz -C "$tmp"
src="$tmp/llama_cpp_python-$version"
rm -rf "$src/.git" "$src/examples" "$src/docs" "$src"/vendor/llama.cpp/{docs,models,benches,tools/ui} \
       "$src"/vendor/llama.cpp/tools/server/public* "$src"/vendor/llama.cpp/tools/mtmd/test-*
for b in virtgpu cann openvino webgpu et metal hexagon sycl vulkan opencl; do rm -rf "$src/vendor/llama.cpp/ggml/src/ggml-$b"; done
tar -czf .gpu/llama-src.tar.gz -C "$tmp" "llama_cpp_python-$version"
rm -rf "$tmp"
mkdir -p .gpu/qwen2.5
cp models/tiny/qwen2.5/{config.json,tokenizer.json,tokenizer_config.json,generation_config.json} .gpu/qwen2.5/
cp models/tiny/qwen2.5/chat_template.jinja .gpu/qwen2.5/ 2>/dev/null || true
du -sh .gpu
echo "next, on the CUDA machine from the project root: OUT=<folder> bash scripts/gpucheck/gpucheck.sh"
