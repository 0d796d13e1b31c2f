"""Test-only fault injection: kill the process at a named stage of a run.

``OBSDIFF_KILL_AT=<stage>`` makes :func:`reached` send the process ``SIGKILL`` when the run reaches
that stage (e.g. ``calibrate:1`` = while package 1 is calibrated), so tests can check that a
rerun resumes correctly after a kill at any point. Unset (always, outside tests) it does nothing.
A leaf (stdlib only).
"""

from __future__ import annotations

import os
import signal

ENV = "OBSDIFF_KILL_AT"


def reached(stage: str) -> None:
    """Kill the process now if ``OBSDIFF_KILL_AT`` names ``stage``."""
    if os.environ.get(ENV) == stage:
        os.kill(os.getpid(), signal.SIGKILL)
