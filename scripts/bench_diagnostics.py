"""What do bnexp's diagnostics cost? Trains the default mnist5k run with diagnostics off, on
(default cadence) and with landscape probes, interleaved, and prints per variant the median wall
and CPU time, their ratio to "off", and the share of the run spent inside the diagnostics
themselves (timed directly, so it is not drowned by the noise of a shared machine).

    python scripts/bench_diagnostics.py [--repeats 7] [OVERRIDES...]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

from bnexp import loop, probes
from bnexp.config import compose
from bnexp.run import Run

VARIANTS = {
    "diagnostics off": ["trainer.diagnostics=false"],
    "diagnostics on (default)": [],
    "on + landscape every 50": ["trainer.probe_every=50"],
}
inside = {"seconds": 0.0}


def timed(fn):  # noqa: ANN001, ANN201
    def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            inside["seconds"] += time.perf_counter() - start
    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    logging.disable(logging.INFO)
    Run.diagnose = timed(Run.diagnose)
    probes.mode_comparison = timed(probes.mode_comparison)
    base = ["trainer.progress=none", "trainer.checkpoint=false", "device=cpu", *args.overrides]
    rows: dict[str, dict[str, list[float]]] = {
        name: {"wall": [], "cpu": [], "share": []} for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        loop.train([compose(base)], [Path(tmp) / "warmup"])[0]
        for r in range(args.repeats):
            for name, extra in VARIANTS.items():  # interleaved: drift hits every variant alike
                cfg = compose([*base, *extra])
                inside["seconds"] = 0.0
                wall, cpu = time.perf_counter(), time.process_time()
                loop.train([cfg], [Path(tmp) / f"{r}-{list(VARIANTS).index(name)}"])[0]
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                rows[name]["wall"].append(wall)
                rows[name]["cpu"].append(cpu)
                rows[name]["share"].append(inside["seconds"] / wall)
    med = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in rows.items()}
    off = med["diagnostics off"]
    print(f"{'variant':<26}{'wall s':>8}{'ratio':>7}{'cpu s':>8}{'ratio':>7}"
          f"{'in diagnostics':>16}   (medians of {args.repeats})")
    for name, m in med.items():
        print(f"{name:<26}{m['wall']:>8.3f}{m['wall'] / off['wall']:>7.3f}{m['cpu']:>8.3f}"
              f"{m['cpu'] / off['cpu']:>7.3f}{m['share']:>15.1%}")
    print("'in diagnostics' for 'off' is the train/eval-mode comparison every run makes.")


if __name__ == "__main__":
    main()
