"""The policy pack's entry point, which the Pulumi CLI runs (`--policy-pack policy`) with this directory
as the working directory: the repository's root goes on the path so `policy.pack` imports as in tests."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pulumi_policy import EnforcementLevel, PolicyPack  # noqa: E402

from policy.pack import POLICIES, keep_secrets_marked  # noqa: E402

keep_secrets_marked()
PolicyPack(name="katforge-estate", policies=POLICIES, enforcement_level=EnforcementLevel.MANDATORY)
