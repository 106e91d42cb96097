"""`bnexp board` serves TensorBoard with the runs in it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from conftest import write_summary
from torch.utils.tensorboard import SummaryWriter


def test_board_serves_the_runs(tmp_path: Path) -> None:
    for name in ("lr=0.1,norm=batch", "lr=0.1,norm=none"):
        write_summary(tmp_path / "sweep" / name)
        writer = SummaryWriter(str(tmp_path / "sweep" / name))
        writer.add_scalar("val/acc", 0.5, 1)
        writer.close()
    proc = subprocess.Popen([sys.executable, "-m", "bnexp", "board", str(tmp_path / "sweep")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True,
                            # as from a terminal: a shell's background job inherits SIGINT ignored
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = ""
        deadline = time.time() + 60
        while "http" not in line and time.time() < deadline:
            line = proc.stdout.readline()
        url = re.search(r"http://\S+", line).group(0).rstrip("/")
        runs: list = []
        while time.time() < deadline:
            try:
                runs = json.loads(urllib.request.urlopen(f"{url}/data/runs", timeout=5).read())
            except OSError:
                runs = []
            if len(runs) == 2:
                break
            time.sleep(0.5)
        assert sorted(runs) == ["lr=0.1,norm=batch", "lr=0.1,norm=none"]
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)
