# make demo   set up .venv and run the main job (python -m jaxmoe.demo)
# make test   set up .venv and run the tests
#
# Overrides: PYTHON=/path/to/python3.12, EXTRA=cuda12 (GPU build of jax; default
# cuda13 when nvidia-smi answers, none otherwise), ARGS="--steps 50" for the demo,
# PYTEST_ARGS="-k offload" for the tests.

comma  := ,
VENV   := .venv
PY     := $(VENV)/bin/python
EXTRA  ?= $(shell nvidia-smi >/dev/null 2>&1 && echo cuda13)
EXTRAS := dev$(if $(EXTRA),$(comma)$(EXTRA))
STAMP  := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: demo test setup clean

demo: $(STAMP)
	$(PY) -m jaxmoe.demo $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

setup: $(STAMP)

$(PY):
	python=$$(tools/find_python.sh) && echo "Creating $(VENV) with $$python" && \
	  "$$python" -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	rm -f $(VENV)/.installed-* && touch $@

clean:
	rm -rf $(VENV) .pytest_cache
