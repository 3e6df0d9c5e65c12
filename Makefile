# The two everyday commands: `make plan` (offline plan of a stack) and `make test`.
# Both create and fill .venv on first use; nothing else needs installing but Python 3.11.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STACK ?= prod

.PHONY: plan test plan-diff diagram restore clean

$(VENV)/.installed: requirements.txt requirements-test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-test.txt
	touch $@

plan: $(VENV)/.installed
	$(PY) -m tools.plan --stack $(STACK)

test: $(VENV)/.installed
	$(PY) -m pytest -q

# The offline plans of BASE (a git ref) and of the working tree, compared: markdown on stdout.
plan-diff: $(VENV)/.installed
	@$(PY) -m tools.plan_diff --base "$(BASE)"

# docs/estate.svg and docs/estate.png from the offline plans of both stacks (needs Graphviz).
diagram: $(VENV)/.installed
	@$(PY) -m tools.diagram

# Restore a backup (README, "Backups and restore"): the operator's own AWS credentials, PostgreSQL through PG*.
#   make restore STAGE=prod AT=latest|YYYYMMDDTHHMMSSZ TARGET=<database> [FORCE=1] [DATABASE=<dumped database>]
restore:
	BACKUP_BUCKET="$${BACKUP_BUCKET:-$$(pulumi stack output backupBucket --stack prod)}" \
		bash infra/host/restore-database.sh --stage "$(STAGE)" --at "$(AT)" --target "$(TARGET)" \
		$(if $(DATABASE),--database "$(DATABASE)") $(if $(filter 1 yes true,$(FORCE)),--force)

clean:
	rm -rf $(VENV) build
