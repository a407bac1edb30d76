"""What a result was computed on and with which code: the machine (``machine``,
``describe_machine``) and the commit that last changed the checkout's code (``code_version``).
It imports nothing of ssah_jax: tests run ``code_version`` from a copy of this file."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any


def code_version() -> str | None:
    """The commit that last changed the code of the checkout ssah_jax runs from: its package,
    experiments, configs, scripts and setup.py, not its docs, tests or results, so a commit of
    those leaves the version of a run in progress as it was. ``"<short sha>+local changes"``
    when that code differs from the commit (new files included); None outside a git checkout
    (an installed wheel)."""
    root = Path(__file__).resolve().parents[2]  # the checkout: <root>/ssah_jax/runs/provenance.py
    try:
        git = lambda *a: subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True,  # noqa: E731
                                        check=True, timeout=10).stdout.strip()
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root:  # e.g. a venv inside a checkout
            return None
        code = ("ssah_jax", "experiments", "configs", "scripts", "setup.py", ":!experiments/results")
        commit = git("log", "-1", "--format=%h", "HEAD", "--", *code) or git("rev-parse", "--short", "HEAD")
        return commit + ("+local changes" if git("status", "--porcelain", "--", *code) else "")
    except (OSError, subprocess.SubprocessError):
        return None


def machine() -> dict[str, Any]:
    """What a measurement ran on: CPU model and count, jax version and devices."""
    import jax

    return {"machine": platform.machine(), "processor": _cpu_name(), "cpus": os.cpu_count(),
            "jax": jax.__version__, "devices": [str(d.device_kind) for d in jax.devices()],
            "processes": jax.process_count()}


def describe_machine(m: dict[str, Any] | None = None) -> str:
    """``m`` (a recorded ``machine()``; this machine by default) in one line, for reports and
    benchmark output."""
    m = m or machine()
    processes = f" in {m['processes']} processes" if m.get("processes", 1) > 1 else ""
    return (f"{m['processor']} ({m['machine']}), {m['cpus']} cores, jax {m['jax']} on "
            f"{len(m['devices'])} x {m['devices'][0]}{processes}")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
