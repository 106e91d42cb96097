"""`pip install .` must ship the configs inside the package."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from bnexp.config import GROUPS, config_dir, group_options

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_contains_every_config(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("bnexp-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "bnexp/configs/config.yaml" in names
    for group in GROUPS:
        for option in group_options(group):
            assert f"bnexp/configs/{group}/{option}.yaml" in names
    assert config_dir().is_dir()
