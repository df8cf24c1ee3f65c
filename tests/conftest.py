"""Session-wide: mark every process the suite starts, and fail if any outlives the suite.

``RSPO_MEGA_TEST_OWNER`` is set at import, before any test starts a process, so every descendant
(forkserver, ranks, ``rspo-train`` launches, their helpers, grandchildren re-parented to init)
carries it in ``/proc/<pid>/environ``. After the last test the helpers of pytest itself are ended
(the harness's forkserver, the math verifier's worker, which otherwise end when pytest exits),
and any marked process still alive (other than pytest's resource tracker, which ends with
pytest) fails the session, and is killed.
"""

from __future__ import annotations

import os
import sys

import pytest

from tests import processes
from tests.distributed import stop_forkserver

OWNER = processes.session_owner()


@pytest.fixture(scope="session", autouse=True)
def _nothing_outlives_the_suite():
    """Binds this process's own helpers (checkpoint conversions run in it) like a rank's, then
    checks at the end of the session that no marked process survives."""
    from rspo_mega.parallel import bind_children_to_owner

    bind_children_to_owner()
    yield
    verifier = sys.modules.get("rspo_mega.tasks.symbolic_worker")
    if verifier is not None and verifier._worker is not None:  # the process-wide worker
        verifier._worker.close()
    own = [os.getpid(), *stop_forkserver()]
    processes.assert_none_left(
        lambda: processes.marked(processes.OWNER_ENV, OWNER, exclude=own),
        f"the test session (marker {processes.OWNER_ENV}={OWNER})",
    )
