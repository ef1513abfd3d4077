"""The sandbox runs programs, grades them and kills them on time; tests/tasks/test_sandbox_escapes.py tries to get
out. Without an OS sandbox (tests/conftest.py then opts into plain subprocesses) these run unsandboxed, and
test_runs_in_the_os_sandbox says so by failing (on Linux)."""

import time

from tasks.sandbox_required import require_os_sandbox  # tests/tasks/sandbox_required.py

from t2ray.tasks import sandbox
from t2ray.tasks.sandbox import run_many, run_python


def test_runs_in_the_os_sandbox():
    require_os_sandbox()
    assert sandbox.isolation() == "bwrap"
    r = run_python("import os\nprint(os.getuid(), os.path.exists('/sandbox/program.py'))")
    assert r.passed and r.stdout.split()[1] == "True", r


def test_passes_correct_program():
    r = run_python("def f(x):\n    return x * 2\nassert f(4) == 8\nprint('ok')")
    assert r.passed and r.status == "passed" and r.returncode == 0
    assert r.stdout.strip() == "ok"


def test_fails_wrong_program():
    r = run_python("def f(x):\n    return x * 3\nassert f(4) == 8, 'wrong'")
    assert not r.passed and r.status == "failed"
    assert "AssertionError" in r.stderr and "wrong" in r.stderr


def test_syntax_error_is_error():
    r = run_python("def f(:\n  pass")
    assert r.status == "error" and "SyntaxError" in r.stderr


def test_kills_infinite_loop_quickly():
    start = time.monotonic()
    r = run_python("while True:\n    pass", timeout_s=1.0)
    assert r.status == "timeout" and not r.passed
    assert time.monotonic() - start < 5


def test_kills_sleeping_child_processes_too():
    # a program that ignores the timeout by sleeping; the whole group is killed
    start = time.monotonic()
    r = run_python("import time\ntime.sleep(60)", timeout_s=1.0)
    assert r.status == "timeout"
    assert time.monotonic() - start < 5


def test_memory_bomb_is_stopped():
    start = time.monotonic()
    r = run_python("x = []\nwhile True:\n    x.append(bytearray(10**7))", memory_mb=256)
    assert r.status == "memory" and not r.passed
    assert time.monotonic() - start < 10
    r = run_python("x = bytearray(2**36)", memory_mb=256)
    assert r.status == "memory"


def test_nonzero_exit_fails():
    assert run_python("import sys\nsys.exit(2)").status == "failed"
    assert run_python("import sys\nsys.exit(0)").passed


def test_run_many_keeps_order():
    res = run_many(["assert True", "assert False", "print(1)"], workers=2)
    assert [r.passed for r in res] == [True, False, True]
    assert run_many([]) == []


def test_early_exit_does_not_pass_when_completion_required():
    prog = "import sys\nsys.exit(0)\nassert False"
    assert run_python(prog).passed  # plain run: exit code 0 is a pass
    r = run_python(prog, require_completion=True)
    assert not r.passed and r.status == "failed"
    r = run_python("import os\nos._exit(0)", require_completion=True)
    assert not r.passed
    r = run_python("print('hello')", require_completion=True)
    assert r.passed and r.stdout.strip() == "hello"


def test_standard_library_only():
    assert run_python("import json, math, re, collections, heapq, itertools, fractions").passed
    r = run_python("import yaml")
    assert r.status == "failed" and "ModuleNotFoundError" in r.stderr
