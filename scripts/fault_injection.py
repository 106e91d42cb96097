"""Kill-and-resume on a real sweep: start `bnexp sweep`, SIGKILL its process group at a random
moment, a few times, then let it finish; print what survived each kill and check that every
file left behind parses.

    python scripts/fault_injection.py [--kills 3] [--jobs 6] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def statuses(sweep_dir: Path) -> dict[str, str]:
    out = {}
    for path in sorted(sweep_dir.glob("*/summary.json")):
        out[path.parent.name] = json.loads(path.read_text())["status"]
    return out


def check_files(sweep_dir: Path) -> int:
    """Parse every JSON and checkpoint file; return how many were checked."""
    import torch

    n = 0
    for path in sweep_dir.rglob("*"):
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".pt":
            torch.load(path, weights_only=False)
        else:
            continue
        n += 1
    leftovers = list(sweep_dir.rglob("*.tmp"))
    assert not leftovers, f"temporary files left behind: {leftovers}"
    return n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "BNEXP_OUTPUTS": tmp}
        cmd = [sys.executable, "-m", "bnexp", "sweep", "--name", "faults",
               "seed=" + ",".join(map(str, range(args.jobs))), "trainer.steps=600",
               "trainer.checkpoint_every=100", "trainer.progress=none", "device=cpu"]
        sweep_dir = Path(tmp) / "sweeps" / "faults"
        for kill in range(1, args.kills + 1):
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
            delay = rng.uniform(4.0, 12.0)
            time.sleep(delay)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            seen = statuses(sweep_dir)
            done = sum(s == "completed" for s in seen.values())
            unfinished = [f"{k}: {v}" for k, v in seen.items() if v != "completed"]
            print(f"kill {kill} after {delay:.1f} s: {done} completed, {len(unfinished)} "
                  f"unfinished ({', '.join(unfinished) or 'none'}); "
                  f"{check_files(sweep_dir)} files parse")
        final = subprocess.run(cmd, env=env, capture_output=True, text=True)
        seen = statuses(sweep_dir)
        line = next((ln for ln in final.stdout.splitlines() if "finished before" in ln), "")
        print(f"final run (exit {final.returncode}): {line.strip()}")
        print(f"statuses: {sorted(set(seen.values()))} over {len(seen)} jobs; "
              f"{check_files(sweep_dir)} files parse")
        ok = final.returncode == 0 and set(seen.values()) == {"completed"} and \
            len(seen) == args.jobs
        print("OK: nothing lost" if ok else "FAILED")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
