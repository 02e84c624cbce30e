"""Hypothesis runs derandomized: every run (CI included) tries the same examples, so a property that
fails is reproducible from the test name alone and CI never turns red on a fresh draw. Set
HYPOTHESIS_PROFILE=explore to search with fresh random examples instead."""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
