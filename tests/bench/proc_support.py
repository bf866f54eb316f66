# SPDX-License-Identifier: Apache-2.0
"""Process checks shared by the bench tests that start fake servers and engines."""

from pathlib import Path


def alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie or a dead one is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")
