# The two commands of the README:
#   make notebooks   create the environment, execute the ordered notebooks on this machine
#   make test        create the environment, run the unit tests and validate the notebooks
VENV ?= .venv
PY := $(VENV)/bin/python
DEVICE ?= auto
OUT ?= out/notebooks
# make lab LAB_DIR=labs/student opens a classroom lab's student notebooks
LAB_DIR ?= notebooks

.PHONY: env test-env notebooks smoke test lab clean

env: $(VENV)/.installed

# the test tools come only with `make test`: pytest, hypothesis, and on Linux x86-64 Triton
# (~290 MB, for the kernel tests in its interpreter), which the notebooks do not need
test-env: $(VENV)/.installed-test

$(VENV)/.installed: pyproject.toml tools/install.sh
	VENV=$(VENV) bash tools/install.sh
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip --disable-pip-version-check -q install -e ".[test]"
	touch $@

notebooks: env
	$(PY) -m workbench notebooks run --out $(OUT) --device $(DEVICE)

smoke: env
	$(PY) -m workbench notebooks run --out $(OUT) --device $(DEVICE) --smoke

test: test-env
	$(PY) -m pytest

lab: env
	$(VENV)/bin/jupyter lab $(LAB_DIR)

clean:
	rm -rf out/ .pytest_cache
