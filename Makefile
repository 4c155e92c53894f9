# infc: `make install` then `make test` on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
INFC   := $(VENV)/bin/infc
STAMP  := $(VENV)/.installed

# `make artifacts MODEL=resnet18_v1 TARGET=x86-mkldnn`, or many at once with
# `make artifacts MODELS="a b" TARGETS="x86-mkldnn jetson"`.
MODEL      ?= resnet18_v1
TARGET     ?= x86-mkldnn
MODELS     ?= $(MODEL)
TARGETS    ?= $(TARGET)
OUT        ?= artifacts
INFC_FLAGS ?=
PYTEST_ARGS ?=

MANIFESTS := $(foreach m,$(MODELS),$(foreach t,$(TARGETS),$(OUT)/$(m)/$(t)/manifest.json))

.PHONY: install test test-fast artifacts clean clean-artifacts

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

# pytest exits 5 when it collects nothing; make treats every non-zero as failure.
test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS) tests

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS) tests

artifacts: $(MANIFESTS)

# The stem is MODEL/TARGET.
$(OUT)/%/manifest.json: | $(STAMP)
	$(INFC) compile $(patsubst %/,%,$(dir $*)) --target $(notdir $*) --out $(OUT) $(INFC_FLAGS)

clean-artifacts:
	find $(OUT) -mindepth 1 -maxdepth 1 ! -name .keep -exec rm -rf {} +

clean: clean-artifacts
	rm -rf $(VENV) build *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
