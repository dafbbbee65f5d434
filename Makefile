# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
# torch is pinned in the same pip command as everything else, so pip takes the CPU build
# (torch 2.13.0) from this machine's disk and never pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIN    := torch==2.13.0 torchvision==0.28.0
# where the CPU wheel is not on disk (plain PyPI's torch 2.13.0 is the CUDA build), name PyTorch's CPU index:
#   make setup PIP_EXTRA='--extra-index-url https://download.pytorch.org/whl/cpu'
PIP_EXTRA ?=
export OMP_NUM_THREADS ?= 2
# looked for when a recipe runs (`=`, not `:=`), so the first run after `setup` installs it has it too
TCMALLOC = $(firstword $(wildcard /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 /usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4))
RUNENV = $(if $(TCMALLOC),LD_PRELOAD=$(TCMALLOC),)

.PHONY: setup demo test bench clean
setup: $(VENV)/.installed

$(VENV)/.installed: setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_EXTRA) $(PIN)
	$(PY) -m pip install -q $(PIP_EXTRA) -e '.[dev]' $(PIN)
	$(PY) -c "from uninet_feat._compat import install_startup_guard as g; g()"   # import timm before uninet_feat
	-(command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  (dpkg -s libtcmalloc-minimal4 >/dev/null 2>&1 || \
	   (apt-get update -qq && apt-get install -y -qq libtcmalloc-minimal4 >/dev/null)))
	touch $@

demo: setup
	$(RUNENV) $(PY) -m uninet_feat demo --out runs/demo

test: setup
	TRITON_INTERPRET=1 $(RUNENV) $(PY) -m pytest -q -p no:cacheprovider tests

bench: setup
	TRITON_INTERPRET=0 $(RUNENV) $(PY) -m pytest -q benchmarks --benchmark-only

clean:
	rm -rf $(VENV) runs .pytest_cache .benchmarks
