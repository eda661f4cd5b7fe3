"""Shared pytest set-up: hypothesis runs a fixed (derandomized) set of examples under CI, so a CI run is
reproducible; locally it explores new examples every run."""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
