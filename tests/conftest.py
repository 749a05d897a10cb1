"""Shared pytest fixtures: a real control host and real agents on loopback.

gevent is patched here first, as in the entry points, because the API and
the engine under test are gevent code.
"""

from gevent import monkey

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
