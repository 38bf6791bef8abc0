"""Fire lock details mutation testing found unchecked: who an owner is, and that a claim is not
a done marker (`is_done` answers a bool)."""

from __future__ import annotations

import os
import re
import socket
from datetime import timedelta

from workers.locks import LocalFireLock, owner_name

KEY = "monthly-invoices:2025-01"


def test_an_owner_names_host_process_and_four_random_bytes() -> None:
    name = owner_name()
    host, pid, token = name.rsplit(":", 2)
    assert (host, pid) == (socket.gethostname(), str(os.getpid()))
    assert re.fullmatch(r"[0-9a-f]{8}", token)
    assert owner_name() != name


def test_a_local_claim_is_not_done_until_finished() -> None:
    lock = LocalFireLock(clock=lambda: 100.0)
    assert lock.claim(KEY, timedelta(seconds=30))
    assert lock.is_done(KEY) is False
    lock.finish(KEY, timedelta(days=1))
    assert lock.is_done(KEY) is True
