# Two commands do all the set-up on a fresh clone:
#   make run PROMPT="a kangaroo wearing boxing gloves"   # installs into .venv, then runs the main job
#   make test                                            # installs into .venv, then runs the tests
# TORCH picks the torch build: the default is the CPU wheel; on a GPU machine use e.g. TORCH="torch>=2.4".

VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
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
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed
	$(VENV)/bin/recdreamer-gs run "$(PROMPT)" $(ARGS)

# pytest's exit code 5 (no tests collected) must fail too.
test: $(VENV)/.installed
	$(PY) -m pytest -q $(ARGS); status=$$?; \
	if [ $$status -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi; exit $$status
