# The README's two commands are `make demo` and `make test`; .ci/run calls `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo coco-demo selfcheck test lint bench gpu-wheels gpu-check clean-venv

install:            ## create .venv and install everything (idempotent; see scripts/install.sh)
	bash scripts/install.sh

demo: install       ## the main job on the embedded dataset: MABN at normalization batch 2 on Fashion-MNIST
	$(PY) train_imagenet.py experiment=fmnist norm=mabn batch=2

coco-demo: install  ## Mask R-CNN R50-FPN with MABN from scratch on the generated shapes set (one CPU process)
	$(PY) train_coco.py experiment=shapes norm=mabn

selfcheck: install  ## every registered norm on real Fashion-MNIST images (grouped contract, SGD, folding), ~10 s
	$(PY) -m mabn.selfcheck

test: install lint  ## the whole test suite, 2 workers, one thread each (two cores oversubscribed crawl)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -n 2 --dist loadgroup --timeout=1800 -q --durations=15

bench: install      ## layer, model and inference benchmarks on this machine -> results/performance.md
	$(PY) scripts/bench_layer.py $(BENCH_LAYER_ARGS)
	$(PY) scripts/bench_model.py $(BENCH_MODEL_ARGS)
	$(PY) scripts/bench_inference.py $(BENCH_INFERENCE_ARGS)
	$(PY) scripts/make_performance.py

gpu-wheels:         ## here, with the package index: the wheels a bare CUDA machine needs for gpu-check -> .whl/
	bash scripts/gpu_wheels.sh

gpu-check:          ## on a CUDA machine (no install, no network; .whl/ carried): GPU tests + benchmarks, ~8 min
	bash scripts/gpu_check.sh

lint: install
	$(VENV)/bin/ruff check .

clean-venv:
	rm -rf $(VENV) .cache/wheels
