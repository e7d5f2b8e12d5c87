# The two Quick start commands. Each sets up everything it needs from a fresh clone.
#   make fox    train 16 soft prompts on the default model (CPU, a few minutes)
#   make test   the whole test suite, with its reference oracles (transformers, peft, ...)

PYTHON ?= python3
# A CPU build of torch where the machine's pip finds one (it does here); an unpinned torch would pull
# several GB of CUDA packages. On a CUDA machine: make TORCH="torch" ...
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
WEIGHTS := weights/smollm2-135m-instruct

.PHONY: fox code test setup weights browser

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test,plot]"
	touch $@

setup: $(VENV)/.installed

$(WEIGHTS)/tokenizer_config.json: | $(VENV)/.installed
	$(PY) -m minipeft.tools.default_model --out $(WEIGHTS)

weights: $(WEIGHTS)/tokenizer_config.json

fox: setup weights
	$(PY) train_fox.py

# train_code.py with each decoder block compiled (torch.compile, which needs a C++ compiler): on a 2-core Xeon
# with AMX 4 min 52 s against 5 min 51 s eager (bench/RESULTS.md). `make code CODE_FLAGS=` runs it eager.
CODE_FLAGS ?= --compile

code: setup weights
	$(PY) train_code.py $(CODE_FLAGS)

# The page's test drives a real browser: Debian's Chromium and its driver, installed once if missing.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver)

test: setup weights browser
	$(PY) -m pytest -q
