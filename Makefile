# The two Quickstart commands: `make serve` and `make test`. Each installs what it needs first.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# llama-cpp-python compiles on install (no wheel on PyPI): portable build, no llava.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF
export CMAKE_BUILD_PARALLEL_LEVEL ?= 2
export HF_HUB_OFFLINE = 1

.PHONY: serve test install-engines install-dev lint

install-engines:
	$(PIP) install -q -e '.[engines]'

install-dev:
	$(PIP) install -q -e '.[engines,dev]'

serve: install-engines
	llmux serve

lint: install-dev
	ruff check src tests bench
	ruff format --check src tests bench
	mypy

test: lint
	# fonts-liberation: readable text in the status page screenshots on a bare image
	./scripts/ensure-tool.sh chromium "the status page test" chromium fonts-liberation
	./scripts/ensure-tool.sh wrk "the overhead-bench smoke tests" wrk
	./scripts/ensure-tool.sh valgrind "the instr_ab.py smoke test" valgrind
	$(PYTHON) -m pytest
