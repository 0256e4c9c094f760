"""What every benchmark result records about where it was measured (imported by the scripts
beside it, which run as `python benchmarks/NAME.py`)."""

import subprocess
from pathlib import Path


def git_commit() -> str | None:
    """The short commit the benchmark ran at, or None outside a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
