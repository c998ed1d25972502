"""Seeded tests: hypothesis draws the same examples on every run (no flaky CI)."""

from hypothesis import settings

settings.register_profile("seeded", derandomize=True, print_blob=True)
settings.load_profile("seeded")
