# fiji-bridge — two entry points for a fresh Debian/Ubuntu machine:
#   make demo   the main job end to end (synthetic plate -> bridge -> batch -> results)
#   make test   the test suite
# Each installs what it needs (system packages when root, a venv, the package),
# idempotently; a second run installs nothing.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
# set FIJI_BRIDGE_OMERO=0 to skip the omero extra (zeroc-ice takes ~13 min to build once)
FIJI_BRIDGE_OMERO ?= 1
WHEELHOUSE ?= $(HOME)/.cache/fiji-bridge/wheelhouse
PYTEST_ARGS ?=

.PHONY: demo test system venv omero bench bytecode clean help

help:
	@echo "make demo   run the main job (installs what it needs)"
	@echo "make test   run the tests (installs what it needs)"
	@echo "make bench  run the benchmarks"

# make demo FIJI=/path/to/Fiji.app runs the same job on that Fiji
FIJI ?=
demo: system venv bytecode
	$(VENV)/bin/fiji-bridge demo $(if $(FIJI),--imagej "$(FIJI)")

test: system venv omero bytecode
	$(PY) -m pytest $(PYTEST_ARGS)

bench: system venv bytecode
	for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

# -- system packages: a JDK, ImageJ 1 (libij-java), Xvfb; compilers for zeroc-ice
system:
	@bash scripts/install-system.sh

# -- the virtual environment with the package and its test extra
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q -e '.[test]'
	# OpenHCS 0.8.6's sender line (polystore 0.2.x), kept apart from the 0.6.x one
	$(PIP) install -q --no-deps --upgrade --target $(HOME)/.cache/fiji-bridge/polystore-0.2 \
	    polystore==0.2.19 zmqruntime==0.2.24 arraybridge==0.3.8
	# OpenHCS 0.8.6's wheel, read (never imported) by the run_macro wire test
	$(PIP) download -q --no-deps openhcs==0.8.6 -d $(HOME)/.cache/fiji-bridge/openhcs-0.8.6
	touch $@

# -- the package's bytecode, as a non-editable pip install writes it: every process the bridge
#    spawns (engine workers, bridges) would otherwise compile its modules again where
#    PYTHONDONTWRITEBYTECODE is set (0.1-0.2 s each); stale files are recompiled, unchanged ones kept
bytecode: venv
	@$(PY) -m compileall -q fiji_bridge

# -- the optional omero extra (omero-py + a locally built zeroc-ice 3.6 wheel)
omero: venv
ifeq ($(FIJI_BRIDGE_OMERO),1)
	@if [ ! -f $(VENV)/.omero-installed ]; then \
	  PY=$(PY) WHEELHOUSE=$(WHEELHOUSE) bash scripts/build-zeroc-ice.sh && \
	  $(PIP) install -q --find-links $(WHEELHOUSE) -e '.[test,omero]' && \
	  touch $(VENV)/.omero-installed; \
	fi
else
	@echo "skipping the omero extra (FIJI_BRIDGE_OMERO=0)"
endif

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
