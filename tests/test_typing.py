"""mtp_lib type-checks: mypy, configured by [tool.mypy] in pyproject.toml, reports no errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_mypy_finds_no_errors_in_mtp_lib(tmp_path: Path) -> None:
    # a fresh cache in tmp_path: works on a read-only checkout, and no stale cache hides an error
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "mypy_cache"), "mtp_lib"],
        cwd=REPO, capture_output=True, text=True,
    )
    assert result.returncode == 0, f"mypy exited with {result.returncode}:\n{result.stdout}{result.stderr}"
