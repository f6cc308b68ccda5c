"""Test configuration: Hypothesis runs a fixed set of examples on CI."""

import os

from hypothesis import settings

# CI (which sets CI=true) replays the same examples on every run, so a result
# does not depend on the luck of a draw; local runs keep exploring new ones.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
