# moepath: `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.moepath-installed
# auto: zentorch on AMD CPUs with AVX-512, where vLLM 0.32 then runs its Zen platform; no: never
ZENTORCH ?= auto

.PHONY: setup test test-fast test-models test-parallel demo study lint bench clean

setup: $(STAMP)

# Re-install only when the project definition changes (stamp file).
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if nvidia-smi >/dev/null 2>&1; then extra=gpu; \
	  elif [ "$(ZENTORCH)" != no ] && grep -q AuthenticAMD /proc/cpuinfo 2>/dev/null \
	      && grep -q avx512 /proc/cpuinfo; then \
	    extra=cpu,zen; echo "moepath: AMD CPU with AVX-512: adding zentorch, vLLM's Zen kernels (ZENTORCH=no: without)"; \
	  else extra=cpu; fi; \
	  echo "moepath: installing -e .[$$extra,dev]"; \
	  $(PY) -m pip install -q -e ".[$$extra,dev]"
	@for m in torchvision torchaudio torchcodec; do \
	  if $(PY) -m pip show -q $$m >/dev/null 2>&1 && ! $(PY) -c "import $$m" >/dev/null 2>&1; then \
	    echo "moepath: removing $$m: PyPI's build does not load beside CPU torch and breaks transformers imports"; \
	    $(PY) -m pip uninstall -y -q $$m; \
	  fi; \
	done
	@touch $(STAMP)

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not vllm"

# Every toy architecture against an HF forward (one engine each; docs/models.md)
test-models: setup
	$(PY) -m pytest -q -m models tests/test_toy.py tests/test_capture.py

# Pipeline parallelism beyond the default suite: float32 exactness, a served pipeline
# (docs/parallel.md records the results)
test-parallel: setup
	$(PY) -m pytest -q -m parallel tests/test_pipeline.py

demo: setup
	$(VENV)/bin/moepath demo --out demo-out

# The multi-seed study of the demo's testbed (hours on 2 CPU cores; cached per seed, so it
# resumes): bench/grokking/README.md records its results.
study: setup
	$(PY) bench/grokking/study.py --out study-out --seeds 0 1 2

lint: setup
	$(VENV)/bin/ruff check .

# Every benchmark, one after the other (about an hour on 2 CPU cores); bench/README.md
# records each with its own command line.
bench: setup
	$(PY) bench/bench_metrics.py
	$(PY) bench/bench_capture.py
	$(PY) bench/bench_capture.py --prompt 256 --generate 1
	$(PY) bench/bench_overhead.py --mode compiled --interleave --samples 64 --rounds 8 --reps 2
	$(PY) bench/bench_overhead.py --mode eager --interleave --samples 64 --rounds 8 --reps 2
	$(PY) bench/bench_overhead.py --mode compiled --interleave --decode --samples 64 --rounds 8 --reps 2
	$(PY) bench/bench_overhead.py --mode eager --interleave --decode --samples 64 --rounds 8 --reps 2
	$(PY) bench/bench_overhead.py --mode compiled --interleave --samples 64 --shared-prefix 0.75
	$(PY) bench/bench_vs_hf.py
	$(PY) bench/bench_scaling.py
	$(PY) bench/bench_compare.py
	$(PY) bench/bench_memory.py
	$(PY) bench/bench_memory.py --metrics-samples 50000,200000
	$(PY) bench/bench_storage.py
	$(PY) bench/bench_cluster.py

clean:
	rm -rf $(VENV) demo-out study-out .pytest_cache
