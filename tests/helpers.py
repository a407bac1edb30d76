"""Helpers shared by test files in several folders: running the ``ssah-jax`` command in a
subprocess and reading the one line a failed command prints."""

import os
import re
import subprocess
import sys
from pathlib import Path

from ssah_jax import cli

REPO = Path(__file__).resolve().parents[1]  # the checkout: the commands run from its root

# The CLI on one CPU device, without a traceback forced on by the caller's environment.
ENV = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", cli.TRACEBACK_ENV)}
# What libraries may log to stderr beside our line (absl-format records, Python warnings).
LIBRARY_LOG = re.compile(r"^([IWEF]\d{4} \d\d:\d\d:\d\d|WARNING:|\S+Warning: )")


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "ssah_jax.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env=env or ENV, timeout=600)


def error_line(result) -> str:
    """The one line a failed command printed: exit status 2, a single ``ssah-jax:`` line on
    stderr and nothing else there but library log records (no traceback)."""
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    ours = [line for line in lines if line.startswith("ssah-jax: ")]
    assert len(ours) == 1, result.stderr[-3000:]
    assert all(line in ours or LIBRARY_LOG.match(line) for line in lines), result.stderr[-3000:]
    return ours[0]
