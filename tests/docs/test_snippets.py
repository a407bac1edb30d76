"""Every Python block of the README and the docs runs as written (each in a fresh process on
one CPU device, in an empty directory, with the demo model and the data kit), and importing
ssah_jax keeps transformers' "PyTorch was not found" advice out of a user's torch-free session."""

import re
import subprocess
import sys
import textwrap

import pytest

from tests.helpers import ENV, REPO

FENCE = re.compile(r"^( *)```python\n(.*?)^\1```", re.M | re.S)


def snippets() -> list[tuple[str, str]]:
    """(``file:line``, code) of each Python block of README.md and docs/."""
    found = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]:
        text = path.read_text()
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            found.append((f"{path.relative_to(REPO)}:{line}", textwrap.dedent(match.group(2))))
    return found


SNIPPETS = snippets()


def test_the_docs_have_python_snippets_to_run():
    assert len(SNIPPETS) >= 7, [where for where, _ in SNIPPETS]


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.parametrize("where, code", SNIPPETS, ids=[where for where, _ in SNIPPETS])
def test_snippet_runs_as_written(where, code, tmp_path):
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, f"{where}:\n{done.stderr[-3000:]}"


NO_TORCH = """
import importlib.util, sys
find = importlib.util.find_spec  # as if torch were not installed
importlib.util.find_spec = lambda name, *a, **k: None if name.split(".")[0] == "torch" else find(name, *a, **k)
import {module}
"""


@pytest.mark.slow
def test_importing_ssah_jax_without_torch_keeps_transformers_advice_quiet():
    env = {k: v for k, v in ENV.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    plain, ours = (subprocess.run([sys.executable, "-c", NO_TORCH.format(module=m)], cwd=REPO, env=env,
                                  capture_output=True, text=True, timeout=300)
                   for m in ("transformers", "ssah_jax.checkpoints"))
    assert "PyTorch was not found" in plain.stderr  # the advice a user would see
    assert ours.returncode == 0 and "PyTorch was not found" not in ours.stderr, ours.stderr[-2000:]
