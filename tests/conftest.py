"""Shared pytest fixtures: a real control host and real agents on loopback.

gevent is patched here first, as in the entry points, because the API and
the engine under test are gevent code.
"""

import warnings

from gevent import monkey

# pytest loads its plugins (schemathesis brings requests/urllib3, anyio) before this
# file, so ssl is already imported; only those libraries keep the unpatched ssl
# names, and none of ctrl-exec's code is among them.  Patch, and say so once here
# rather than in every run's summary.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Monkey-patching ssl after ssl has already been imported")
    monkey.patch_all()

import os  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fleet import Fleet  # noqa: E402


@pytest.fixture
def fleet(tmp_path):
    """A control host (CA, dispatcher cert, ctrl-exec.conf, registry) plus agents.

    ``fleet.add_agent(name, scripts={...}, tags={...})`` enrolls and starts a
    real agent process on its own 127.0.0.x address; all are stopped after
    the test.
    """
    built = Fleet(str(tmp_path))
    try:
        yield built
    finally:
        built.stop_all()
