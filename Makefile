# Two commands do all the set-up on a fresh clone (README, "Set-up"):
#   make run PROMPT="a kangaroo wearing boxing gloves"   # installs into .venv, then runs the main job
#   make test                                            # installs into .venv, then runs the tests
# Which torch is installed first (and then printed, with the GPU it sees):
#   TORCH=REQ  the torch requirement, default torch==2.13.0 from the package index: on Linux x86-64 PyPI gives
#              the CUDA build (with several GB of NVIDIA libraries); CI's pip setup resolves it to a CPU wheel.
#   CPU=1      take TORCH from PyTorch's CPU-only wheel index instead (much smaller; no GPU use), for machines
#              without an NVIDIA GPU: e.g. `make CPU=1 test`. To switch builds later: rm -rf .venv first.
#   TORCH_INDEX=...  any other pip index option for torch, e.g. a CUDA version's index (README, GPU set-up).

VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
CPU    ?=
TORCH_INDEX := $(if $(filter 1 yes true,$(CPU)),--index-url https://download.pytorch.org/whl/cpu)
PROMPT ?= a kangaroo wearing boxing gloves
ARGS   ?=

.PHONY: install run test

$(VENV)/.installed: pyproject.toml
	@# open3d loads libusb and libgomp at import; install them where apt is available (as root).
	@if ! ldconfig -p 2>/dev/null | grep -q libusb-1.0; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && apt-get install -y -qq libusb-1.0-0 libgomp1) >/dev/null 2>&1 || true; \
	  else echo "note: install libusb-1.0-0 (needed by open3d for --init-from and its tests)"; fi; \
	fi
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@echo "installing $(TORCH) $(if $(TORCH_INDEX),with $(TORCH_INDEX),from the package index (PyPI's Linux x86-64 \
	wheel is the CUDA build; CPU=1 picks the CPU-only one))"
	$(PY) -m pip install -q "$(TORCH)" $(TORCH_INDEX)
	@$(PY) -m recdreamer_gs.doctor --short
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed
	$(VENV)/bin/recdreamer-gs run "$(PROMPT)" $(ARGS)

# The import layers first (pyproject.toml, [tool.importlinter]), then the tests: one pytest worker per core
# (pytest-xdist), each file's tests on one worker (its module fixtures made once) except that a test class may go
# to another worker than the rest of its file (loadscope), the files in the order tests/conftest.py gives them
# (the slowest first). Plugins load by name only (PYTEST_DISABLE_PLUGIN_AUTOLOAD): others in the environment, such
# as dash's, would be imported and assertion-rewritten in every worker. pytest's exit code 5 (no tests collected)
# must fail too.
test: $(VENV)/.installed
	$(VENV)/bin/lint-imports
	PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 $(PY) -m pytest -p xdist.plugin -p pytest_timeout -q -n auto --dist loadscope \
	  --no-loadscope-reorder $(ARGS); status=$$?; \
	if [ $$status -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi; exit $$status
