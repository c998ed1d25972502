"""Seeded tests: hypothesis draws the same examples on every run (no flaky CI).

The tests never write into the user's cache: unless RELEQ_TVM_CACHE is set, it points at a
folder of this session's pytest temporary directory.
"""

import os

import pytest
from hypothesis import settings

settings.register_profile("seeded", derandomize=True, print_blob=True)
settings.load_profile("seeded")


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    if "RELEQ_TVM_CACHE" in os.environ:
        yield
        return
    os.environ["RELEQ_TVM_CACHE"] = str(tmp_path_factory.mktemp("releq-tvm-cache"))
    yield
    os.environ.pop("RELEQ_TVM_CACHE", None)
