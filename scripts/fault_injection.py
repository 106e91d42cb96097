"""Faults on the real CLI, each followed by the checks that matter: nothing finished is lost,
nothing runs twice, no summary is left `running` by a signal, every file left parses.

  sweep    SIGKILL a sweep's process group at random moments, a few times, then let it finish.
  startup  SIGINT / SIGTERM / SIGKILL a `bnexp train` at random moments of its first seconds.
  parent   SIGKILL only the parent of a `--jobs 2` sweep: its workers must stop by themselves,
           and the rerun must resume them, each step trained once.
  disk     a sweep on a small tmpfs that fills up (root only: it mounts one), then room is made
           and the rerun finishes everything.

    python scripts/fault_injection.py [--scenario all] [--kills 3] [--jobs 6] [--seed 0]
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
    return n


def no_leftovers(root: Path) -> None:
    """After a final, uninterrupted run: a kill mid-write may leave a temporary file, and the
    next start in that directory must have removed it."""
    leftovers = list(root.rglob(".*.tmp"))
    assert not leftovers, f"temporary files left behind: {leftovers}"


def sweep_scenario(args: argparse.Namespace, rng: random.Random) -> bool:
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
        no_leftovers(sweep_dir)
        return final.returncode == 0 and set(seen.values()) == {"completed"} and \
            len(seen) == args.jobs


def startup_scenario(args: argparse.Namespace, rng: random.Random) -> bool:
    ok = True
    for _ in range(args.kills * 3):
        how = rng.choice(["SIGINT", "SIGTERM", "SIGKILL"])
        delay = rng.uniform(0.2, 7.0)
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, "BNEXP_OUTPUTS": tmp}
            proc = subprocess.Popen([sys.executable, "-m", "bnexp", "train", "trainer.epochs=100",
                                     "trainer.progress=none", "device=cpu"], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            time.sleep(delay)
            os.killpg(proc.pid, getattr(signal, how))
            out = proc.communicate(timeout=120)[0].decode()
            found = [json.loads(p.read_text())["status"] for p in Path(tmp).rglob("summary.json")]
            dirs = list((Path(tmp) / "runs").glob("*")) if (Path(tmp) / "runs").is_dir() else []
            number = getattr(signal, how)
            # Killed by the signal itself (before bnexp's handlers exist) reads as 128 + N too.
            expected = (-number,) if how == "SIGKILL" else (128 + number, -number)
            good = proc.returncode in expected and "Traceback" not in out
            if how != "SIGKILL":  # a caught signal leaves nothing or an interrupted run
                good = good and set(found) <= {"interrupted"} and len(found) == len(dirs)
            print(f"{how} after {delay:.1f} s: exit {proc.returncode}, run directories "
                  f"{len(dirs)}, statuses {found or 'none'}{'' if good else '  <-- FAILED'}")
            ok = ok and good
    return ok


def steps_once(job: Path) -> bool:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(job), size_guidance={"scalars": 0})
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    return steps == sorted(set(steps))


def parent_scenario(args: argparse.Namespace, rng: random.Random) -> bool:
    from bnexp.interrupt import workers_of

    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "BNEXP_OUTPUTS": tmp}
        cmd = [sys.executable, "-m", "bnexp", "sweep", "--name", "parent", "--jobs", "2",
               "seed=0,1,2,3", "trainer.epochs=40", "trainer.checkpoint_every=50",
               "trainer.progress=none", "device=cpu"]
        sweep_dir = Path(tmp) / "sweeps" / "parent"
        ok = True
        for _ in range(args.kills):
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
            delay = rng.uniform(5.0, 15.0)
            time.sleep(delay)
            os.kill(proc.pid, signal.SIGKILL)  # the parent alone
            proc.wait()
            deadline = time.time() + 30
            while workers_of(proc.pid) and time.time() < deadline:
                time.sleep(0.2)
            left = workers_of(proc.pid)
            seen = statuses(sweep_dir)
            good = not left and "running" not in seen.values()
            print(f"parent killed after {delay:.1f} s: {len(left)} workers still alive; "
                  f"statuses {seen}{'' if good else '  <-- FAILED'}")
            ok = ok and good
        final = subprocess.run(cmd, env=env, capture_output=True, text=True)
        seen = statuses(sweep_dir)
        once = all(steps_once(job) for job in sweep_dir.glob("seed=*"))
        print(f"final run (exit {final.returncode}): statuses {sorted(set(seen.values()))}; "
              f"every step trained once: {once}; {check_files(sweep_dir)} files parse")
        no_leftovers(sweep_dir)
        return ok and once and final.returncode == 0 and set(seen.values()) == {"completed"}


def disk_scenario(args: argparse.Namespace, rng: random.Random) -> bool:
    if os.geteuid() != 0:
        print("disk: skipped (mounting a small tmpfs needs root)")
        return True
    with tempfile.TemporaryDirectory() as tmp:
        mount = Path(tmp)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], check=True)
        try:
            env = {**os.environ, "BNEXP_OUTPUTS": str(mount)}
            cmd = [sys.executable, "-m", "bnexp", "sweep", "--name", "full", "seed=0,1,2,3,4,5",
                   "trainer.steps=300", "trainer.checkpoint_every=100", "trainer.progress=none",
                   "device=cpu"]
            first = subprocess.run(cmd, env=env, capture_output=True, text=True)
            seen = statuses(mount / "sweeps" / "full")
            tracebacks = (first.stdout + first.stderr).count("Traceback")
            # One paragraph per failed job, not one from training and one from its finish.
            paragraphs = first.stderr.count("bnexp: error:")
            failed = sum(v == "failed" for v in seen.values())
            print(f"full disk: exit {first.returncode}, statuses {seen}, {tracebacks} tracebacks, "
                  f"{paragraphs} error paragraphs for {failed} failed jobs")
            ok = (first.returncode != 0 and "running" not in seen.values() and not tracebacks
                  and paragraphs <= failed)
            finished = {k: (mount / "sweeps" / "full" / k / "summary.json").read_bytes()
                        for k, v in seen.items() if v == "completed"}
            subprocess.run(["mount", "-o", "remount,size=400m", str(mount)], check=True)
            final = subprocess.run(cmd, env=env, capture_output=True, text=True)
            seen = statuses(mount / "sweeps" / "full")
            kept = all((mount / "sweeps" / "full" / k / "summary.json").read_bytes() == body
                       for k, body in finished.items())
            print(f"room made, rerun: exit {final.returncode}, statuses "
                  f"{sorted(set(seen.values()))}; the {len(finished)} finished before kept: {kept}")
            return ok and kept and final.returncode == 0 and set(seen.values()) == {"completed"}
        finally:
            subprocess.run(["umount", str(mount)], check=False)


SCENARIOS = {"sweep": sweep_scenario, "startup": startup_scenario, "parent": parent_scenario,
             "disk": disk_scenario}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=["all", *SCENARIOS], default="all")
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    results = {}
    for name in SCENARIOS if args.scenario == "all" else [args.scenario]:
        print(f"--- {name}")
        results[name] = SCENARIOS[name](args, rng)
    print("; ".join(f"{k}: {'OK' if v else 'FAILED'}" for k, v in results.items()))
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
