"""Tests that prove the code sandbox holds must run wherever it should exist: on Linux they fail, not skip, when
bubblewrap cannot build a sandbox, unless the person running them says the machine has none (NO_SANDBOX_ENV=1)."""

from __future__ import annotations

import os
import sys

import pytest

from t2ray.tasks import sandbox

NO_SANDBOX_ENV = "T2RAY_TEST_WITHOUT_OS_SANDBOX"  # =1: skip the sandbox's tests on a Linux machine known to have none


def require_os_sandbox() -> None:
    """Return if bubblewrap builds a sandbox here; skip off Linux or when opted out; fail otherwise, saying why."""
    if not sys.platform.startswith("linux"):
        pytest.skip(f"the OS sandbox is bubblewrap, Linux only (here: {sys.platform})")
    reason = sandbox._probe()
    if reason is None:
        return
    if os.environ.get(NO_SANDBOX_ENV) == "1":
        pytest.skip(f"no OS sandbox here: {reason} (skipped: {NO_SANDBOX_ENV}=1)")
    pytest.fail(
        f"no OS sandbox here: {reason}. On Linux these tests must run; set {NO_SANDBOX_ENV}=1 to skip them on a "
        "machine known to have no user namespaces",
        pytrace=False,
    )
