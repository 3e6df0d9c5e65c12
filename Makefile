# The two everyday commands: `make plan` (offline plan of a stack) and `make test`. Each fills .venv on
# first use with what it needs, and no more: nothing else needs installing but Python 3.11.
# `make` alone lists the targets: the `##` comment after a target is its line in that list.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
STACK ?= prod
RESTORE_USAGE := make restore STAGE=prod|qa AT=latest|YYYYMMDDTHHMMSSZ TARGET=<database> [FORCE=1] [STOP_APPS=1] [DATABASE=<dumped database>] [SSH=user@host]

.DEFAULT_GOAL := help
.PHONY: help plan test plan-diff diagram discover preflight restore drill hearth clean

help: ## list the targets
	@awk 'BEGIN { FS = ":.*## " } /^[a-z-]+:.*## / { printf "  make %-10s %s\n", $$1, $$2 }' $(MAKEFILE_LIST)

# One virtualenv, filled in steps, each with its own stamp: the plan's SDKs, the operator tools, the tests.
$(PY):
	@test -n "$(PYTHON)" || { echo "Python 3.11 is needed: install python3.11 (with its venv module)" >&2; exit 2; }
	$(PYTHON) -m venv $(VENV)

$(VENV)/.plan-installed: requirements.txt | $(PY)
	$(PIP) -r requirements.txt
	@touch $@

$(VENV)/.tools-installed: requirements-tools.txt $(VENV)/.plan-installed
	$(PIP) -r requirements-tools.txt
	@touch $@

# pytest-xdist from its own lock, every file checked against its hash (requirements-xdist.in says how it is made).
$(VENV)/.test-installed: requirements-test.txt requirements-xdist.lock $(VENV)/.tools-installed
	$(PIP) -r requirements-test.txt
	$(PIP) --require-hashes --no-deps -r requirements-xdist.lock
	@touch $@

plan: $(VENV)/.plan-installed ## offline plan of STACK (default prod): summary, and build/plan-STACK.json
	@$(PY) -m tools.plan --stack $(STACK)

# One pytest-xdist worker per CPU; each test file runs whole on one worker, in order (some are scenarios
# sharing a module's live fixture), and each worker starts its own session servers. Bytecode is cached even
# where the environment says not to (PYTHONDONTWRITEBYTECODE): the tests start the tools dozens of times.
test: $(VENV)/.test-installed ## the whole test suite, on every core
	PYTHONDONTWRITEBYTECODE= $(PY) -m pytest -q -n logical --dist loadfile

plan-diff: $(VENV)/.plan-installed ## the offline plans of BASE (a git ref) and of the working tree compared, as markdown
	@$(PY) -m tools.plan_diff --base "$(BASE)"

# Read-only, with the operator's own credentials: AWS (environment or profile), the cluster
# (~/.kube/katforge-config or KUBECONFIG), the hosts over SSH. ARGS passes options, e.g. ARGS=--no-hosts.
discover: $(VENV)/.tools-installed ## what runs live, for STACK: build/discovered-STACK.json (ARGS=--help)
	@$(PY) -m tools.discover --stack $(STACK) $(ARGS)

# Offline, from build/discovered-STACK.json and Pulumi.STACK.yaml: exits 1 while the first `pulumi up` is unsafe.
preflight: $(VENV)/.tools-installed ## what the first pulumi up of STACK does to each live object, and its hazards
	@$(PY) -m tools.preflight --stack $(STACK) $(ARGS)

# The operators' command line (hearth status|logs|rollback), with their own kubeconfig and AWS credentials;
# editable, so it reads this checkout's tables and stack files. See the README's "Operating the estate".
hearth: $(VENV)/bin/hearth ## install the hearth command into .venv: .venv/bin/hearth status
	@echo "hearth: $(abspath $(VENV))/bin/hearth (put $(abspath $(VENV))/bin on PATH, or alias it)"

$(VENV)/bin/hearth: pyproject.toml $(VENV)/.tools-installed
	$(PIP) --no-deps -e .
	@rm -rf katforge_estate.egg-info  # setuptools' leftover in the checkout; the install keeps its own copy
	@touch $@

diagram: $(VENV)/.plan-installed ## docs/estate.svg and docs/estate.png from both stacks' plans (needs Graphviz)
	@$(PY) -m tools.diagram

# On the k3s host over SSH (SSH=user@host, default ubuntu@k3s.katforge.com), as the superuser there: only it can
# bring back every owner, extension and database setting, and the host's role reads the bucket. ssh joins its
# arguments into one remote command line, so only the words katforge-restore accepts are sent; they are read
# from the environment (make exports command-line variables), so no value is parsed by the shell first.
restore: ## restore a backup on the host: make restore STAGE=... AT=... TARGET=... (run it alone for the usage)
	@if [ -z "$(STAGE)" ] || [ -z "$(AT)" ] || [ -z "$(TARGET)" ]; then \
		echo "usage: $(RESTORE_USAGE)" >&2; exit 2; fi
	@for word in "$$STAGE" "$$TARGET" $${DATABASE:+"$$DATABASE"}; do printf '%s\n' "$$word" | grep -Eqx '[A-Za-z0-9_-]+' || \
		{ echo "make restore: '$$word': expected a stage or database name (letters, digits, _ and -)" >&2; exit 2; }; done
	@printf '%s\n' "$$AT" | grep -Eqx 'latest|[0-9]{8}T[0-9]{6}Z' || \
		{ echo "make restore: AT=$$AT: expected latest or a dump's UTC time such as 20270115T033000Z" >&2; exit 2; }
	ssh -t $(or $(SSH),ubuntu@k3s.katforge.com) sudo katforge-restore --stage '$(STAGE)' --at '$(AT)' --target '$(TARGET)' \
		$(if $(DATABASE),--database '$(DATABASE)') $(if $(filter 1 yes true,$(FORCE)),--force) \
		$(if $(filter 1 yes true,$(STOP_APPS)),--stop-apps)

# On the k3s host over SSH (SSH=user@host, default ubuntu@k3s.katforge.com), exactly as its monthly timer
# runs it; the result stays in the host's /var/lib/katforge/drill/STAGE.json and the bucket's STAGE/drill/latest.json.
drill: ## restore drill of STAGE on the host: latest dump into a scratch database, checked, timed, dropped
	@echo "$(STAGE)" | grep -Eqx '[a-z0-9-]+' || { echo "usage: make drill STAGE=prod|qa [SSH=ubuntu@k3s.katforge.com]" >&2; exit 2; }
	ssh $(or $(SSH),ubuntu@k3s.katforge.com) 'since=$$(date +%s); sudo systemctl start katforge-drill@$(STAGE).service; \
		status=$$?; sudo journalctl --unit=katforge-drill@$(STAGE).service --since=@$$since --output=cat --no-pager; exit $$status'

# On the k3s host over SSH (SSH=user@host, default ubuntu@k3s.katforge.com), once Pulumi.STAGE.yaml says
# katforge:database migrating and its pulumi up made RDS ready; the apps stop for the switch only.
.PHONY: migrate-database
migrate-database: $(VENV)/.plan-installed ## move STAGE's database to RDS, checked, and switch its apps: make migrate-database STAGE=...
	@echo "$(STAGE)" | grep -Eqx '[a-z0-9-]+' || { echo "usage: make migrate-database STAGE=prod|qa [SSH=ubuntu@k3s.katforge.com]" >&2; exit 2; }
	@$(PY) -m tools.migrate_database --stage '$(STAGE)' $(if $(SSH),--ssh '$(SSH)')

clean: ## remove .venv and build/
	rm -rf $(VENV) build
