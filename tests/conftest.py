"""Shared pytest settings. Tests use real parts on loopback (HTTP servers, Ray local mode, torchrun/gloo)."""

import os

from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# CI runs property tests on a fixed sequence of examples (a clean clone has no example database, and a
# run that lands or not must not depend on the draw); locally each run explores new examples.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")
