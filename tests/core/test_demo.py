"""`./dev demo` fails loudly: its runner (dags/run_demo.py) exits 1 when an example fails, naming the
example and showing its last lines; a part that works passes with a summary. Run on the fast parts
only: the whole demo takes minutes, and its parts are the examples the other suites test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# This environment is one of ./dev's (.dev/venv/core): the others lie beside it.
VENVS = Path(sys.prefix).parent


def demo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "dags" / "run_demo.py"), "--venv-dir", str(VENVS), *args], capture_output=True, text=True, timeout=600)


@pytest.mark.usefixtures("docker_engine")
def test_a_broken_example_makes_the_demo_exit_1_naming_it_with_its_last_lines(tmp_path):
    # A copy of the engine-neutral example whose crunch node raises inside its container.
    source = (ROOT / "dags" / "submit_example.py").read_text()
    assert "    total = sum(i * i for i in range(n))\n" in source
    broken = tmp_path / "submit_example.py"
    broken.write_text(source.replace("    total = sum(i * i for i in range(n))\n", "    raise ValueError('crunch broken on purpose')\n"))
    (tmp_path / "skyvm.yaml").symlink_to(ROOT / "dags" / "skyvm.yaml")
    out = demo("--only", "submit", "--only", "status", "--replace", f"submit={broken}")
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"demo: example 'submit' (python {broken}) FAILED with exit code 1" in out.stderr
    assert "ValueError: crunch broken on purpose" in out.stderr  # from its last lines
    assert "demo FAILED: submit" in out.stderr
    # The other parts still ran, and the summary says which failed.
    summary = out.stdout.split("==> summary")[1]
    assert [line.split()[:2] for line in summary.splitlines()[2:4]] == [["submit", "FAILED"], ["status", "ok"]]


def test_parts_that_pass_end_with_a_summary_and_exit_0():
    out = demo("--only", "status")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "==> summary" in out.stdout and "every part passed" in out.stdout
    assert "demo part 'status': started" in out.stderr and "demo part 'status': done in " in out.stderr  # progress, without a terminal


def test_an_unknown_part_or_script_is_a_clear_error(tmp_path):
    out = demo("--replace", f"nope={tmp_path / 'missing.py'}")
    assert out.returncode == 2 and "expected PART=SCRIPT with PART one of submit, prefect-flow" in out.stderr
