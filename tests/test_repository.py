"""The repository as the device machine receives it: every call copies the tracked tree plus what ``carry`` names,
64 MiB in all (the device tool's limit), and the device scripts carry the ``datasets`` wheels (~0.84 MiB, `.whl/`,
docs/results/table_long_h200/run.sh). A tree past the limit would make every device call fail, so it is checked
here, with the wheels' room kept."""

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CARRY_LIMIT = 64 * 2**20  # bytes a device call may copy: the tracked tree and the carried paths together
WHEELS = 1 * 2**20  # room for the carried wheels (datasets, dill, multiprocess: 0.84 MiB)


def test_tracked_tree_leaves_room_for_the_device_calls_carry():
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    names = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    paths = [REPO / n for n in names.decode().split("\0") if n]
    size = sum(p.stat().st_size for p in paths if p.is_file())
    assert size > 20 * 2**20  # the bundled models alone are ~37 MiB: a listing that missed them would pass below
    assert size <= CARRY_LIMIT - WHEELS, (
        f"tracked files total {size / 2**20:.1f} MiB: with the wheels a device call would pass its 64 MiB; "
        "compress or drop raw outputs (docs/results) before adding more")
