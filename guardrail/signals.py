"""SIGHUP while the gateway cannot reload: ignored, never fatal.

SIGHUP reloads the policy once the app's event loop runs (``guardrail.app``). Before
that (the policies and models still loading) and after (the shutdown drain), its
default action would end the process a policy reloader or an operator meant to reload.
Kept apart from ``guardrail.app``, whose imports take seconds: ``serve`` sets this first.
"""

from __future__ import annotations

import signal
import threading


def ignore_sighup() -> None:
    """Let a SIGHUP that comes while no reload handler is in place do nothing.

    A handler that does nothing rather than ``SIG_IGN``, which a program the process
    runs (the embedded backend's build) would inherit. Main thread only, as every
    signal handler; elsewhere, and where there is no SIGHUP, it does nothing.
    """
    if hasattr(signal, "SIGHUP") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGHUP, sighup_ignored)


def sighup_ignored(signum: int, frame: object) -> None:
    """The SIGHUP handler while no reload can run (see :func:`ignore_sighup`)."""
