# The two everyday commands: `make plan` (offline plan of a stack) and `make test`.
# Both create and fill .venv on first use; nothing else needs installing but Python 3.11.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STACK ?= prod

.PHONY: plan test clean

$(VENV)/.installed: requirements.txt requirements-test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-test.txt
	touch $@

plan: $(VENV)/.installed
	$(PY) -m tools.plan --stack $(STACK)

test: $(VENV)/.installed
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build
