# infc: `make install` then `make test` on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
INFC   ?= $(VENV)/bin/infc
STAMP  := $(VENV)/.installed

# `make artifacts MODEL=resnet18_v1 TARGET=x86-mkldnn`, or many at once with
# `make artifacts MODELS="a b" TARGETS="x86-mkldnn jetson"`; `make bundles` packs
# each build into OUT/MODEL/TARGET.tar.gz. Extra compile flags go in INFC_FLAGS
# (e.g. INFC_FLAGS=--random-init offline). TARGETS_DIR holds the target specs.
MODEL       ?= resnet18_v1
TARGET      ?= x86-mkldnn
MODELS      ?= $(MODEL)
TARGETS     ?= $(TARGET)
OUT         ?= artifacts
INFC_FLAGS  ?=
TARGETS_DIR ?= targets
SHA256      ?= sha256sum
PYTEST_ARGS ?=

# A build lands in OUT/MODEL/<canonical target name>, so an alias (jetson) is
# resolved to the file that declares it (jetson-orin.toml); an unknown name is
# kept and fails in its stamp rule with a message.
alias_file = $(firstword $(shell grep -lE '^[[:space:]]*aliases[[:space:]]*=.*"$(1)"' $(TARGETS_DIR)/*.toml 2>/dev/null))
canonical  = $(if $(wildcard $(TARGETS_DIR)/$(1).toml),$(1),$(if $(call alias_file,$(1)),$(basename $(notdir $(call alias_file,$(1)))),$(1)))

RESOLVED_TARGETS := $(sort $(foreach t,$(TARGETS),$(call canonical,$(t))))
MANIFESTS := $(foreach m,$(MODELS),$(foreach t,$(RESOLVED_TARGETS),$(OUT)/$(m)/$(t)/manifest.json))
BUNDLES   := $(MANIFESTS:%/manifest.json=%.tar.gz)
STAMP_DIR := $(OUT)/.make
TARGET_STAMPS := $(foreach t,$(RESOLVED_TARGETS),$(STAMP_DIR)/target-$(t).sha256)

# Building artifacts installs infc only when it is missing; `make install`
# refreshes an existing install.
INFC_READY := $(if $(wildcard $(INFC)),,$(STAMP))

.PHONY: install system-deps test test-fast artifacts bundles clean clean-artifacts FORCE

install: $(STAMP) system-deps

# Graphviz draws the network pictures (`infc profile`); Chromium renders the
# HTML report in its test. Installed with apt when missing and we are root.
system-deps:
	@missing=""; command -v dot >/dev/null 2>&1 || missing="$$missing graphviz"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing$$missing with apt-get"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  else \
	    echo "make: missing$$missing: install them (Debian/Ubuntu: sudo apt-get install$$missing)" >&2; exit 1; \
	  fi; \
	fi

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

# pytest exits 5 when it collects nothing; make treats every non-zero as failure.
test: $(STAMP) system-deps
	$(PY) -m pytest $(PYTEST_ARGS) tests

test-fast: $(STAMP) system-deps
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS) tests

artifacts: $(MANIFESTS)

bundles: $(BUNDLES)

# A target's stamp holds the hash of its TOML file and is rewritten only when
# the hash changes: a content change rebuilds that target's manifests, a touch
# rebuilds nothing. (Make re-reads the stamp's mtime after the recipe runs.)
$(TARGET_STAMPS): $(STAMP_DIR)/target-%.sha256: FORCE
	@test -f $(TARGETS_DIR)/$*.toml || { echo "make: unknown target '$*': no $(TARGETS_DIR)/$*.toml" \
	  "and no file there lists it in aliases (see \`infc targets\`)" >&2; exit 2; }
	@mkdir -p $(@D)
	@sum="$$($(SHA256) < $(TARGETS_DIR)/$*.toml)" && \
	  if [ "$$(cat $@ 2>/dev/null)" != "$$sum" ]; then echo "$$sum" > $@.tmp && mv -f $@.tmp $@; fi

FORCE:

# The stem is MODEL/TARGET. infc holds a lock per build directory, so two makes
# building the same pair wait for each other instead of interleaving files.
# The touch keeps make's view right when infc finds the build cached.
.SECONDEXPANSION:
$(MANIFESTS): $(OUT)/%/manifest.json: $$(STAMP_DIR)/target-$$(notdir $$*).sha256 | $$(INFC_READY)
	INFC_TARGETS_DIR=$(abspath $(TARGETS_DIR)) $(INFC) compile $(patsubst %/,%,$(dir $*)) --target $(notdir $*) --out $(OUT) $(INFC_FLAGS)
	@touch $@

$(BUNDLES): $(OUT)/%.tar.gz: $(OUT)/%/manifest.json | $$(INFC_READY)
	$(INFC) package $(OUT)/$* -o $@

clean-artifacts:
	@if [ -d "$(OUT)" ]; then find $(OUT) -mindepth 1 -maxdepth 1 ! -name .keep -exec rm -rf {} +; fi

clean: clean-artifacts
	rm -rf $(VENV) build *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
