"""A study's report from its runs on disk: report.md (verdicts, the rules, per-seed values,
figures) and verdicts.json (the same, for machines). Written by `bnexp reproduce NAME`, rebuilt
by `--report-only`; the claims themselves live in bnexp.studies.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from bnexp import stats
from bnexp.record import FINISHED
from bnexp.runs import Run
from bnexp.studies import MARGIN, RULES, STUDIES, Verdict

VERDICTS = "verdicts.json"


def _value(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def verdict_record(v: Verdict, root: Path) -> dict:
    """One claim as plain data: seeds as strings (JSON keys), run directories relative."""
    e = v.effect
    effect = None if e is None else {
        "kind": e.kind, "estimate": _value(e.estimate), "ci_low": _value(e.low),
        "ci_high": _value(e.high), "n": e.n, "per_seed": {str(s): x for s, x in
                                                          e.per_seed.items()},
        "unpaired_seeds": e.unpaired, "dropped_seeds": e.dropped}
    n = e.n if e is not None else max((sum(x is not None for x in vals.values())
                                       for vals in v.variants.values()), default=0)
    return {
        "id": v.id, "claim": v.claim, "metric": v.metric, "rule": v.rule,
        "variants": {label: {str(s): _value(x) for s, x in vals.items()}
                     for label, vals in v.variants.items()},
        "effect": effect, "ci_low": effect["ci_low"] if effect else None,
        "ci_high": effect["ci_high"] if effect else None, "n": n,
        "verdict": v.verdict, "measured": v.measured, "reason": v.reason,
        "runs": [_relative(p, root) for p in v.runs],
    }


def _relative(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(path)


def figures(base: str, results: list[Run], out: Path) -> list[Path]:
    """The study's figures as PNGs under out/ (matplotlib, headless)."""
    from bnexp import plots

    figs = plots.make_figures(results)
    if base == "ioffe2015_fig1":
        figs["percentiles"] = plots.percentile_figure(results)
    if base == "sigmoid_saturation":
        figs["layer_gradients"] = plots.layer_gradient_figure(results)
    if base == "input_normalization":
        figs["loss_curves"] = plots.loss_curves_figure(results)
    if base == "batch_size":
        figs["acc_vs_batch_size"] = plots.batch_size_figure(results)
    if base == "train_eval_modes":
        figs["modes_vs_batch_size"] = plots.modes_figure(results)
        figs["running_statistics"] = plots.running_statistics_figure(results)
    return plots.save(figs, out)


def report(study_name: str, runs: list[Run], sweep_dir: Path, command: str,
           manifest: dict) -> tuple[Path, list[Verdict]]:
    """Write report.md, verdicts.json and the figures into the sweep directory."""
    from bnexp.record import atomic_write_bytes

    base = study_name.removesuffix("_paper")
    study = STUDIES[base]
    results = [r for r in runs if r.status in FINISHED]
    verdicts = study.claims(results)
    pngs = figures(base, results, sweep_dir / "plots")
    statuses: dict[str, int] = {}
    for r in runs:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    seeds = sorted({r.seed for r in results if r.seed is not None})
    body = {
        "study": study_name, "title": study.title, "reference": study.reference,
        "command": command, "grid": manifest.get("swept", []),
        "runs": len(runs), "statuses": statuses, "seeds": seeds,
        "interval": stats.INTERVAL, "equivalence_margin": MARGIN,
        "claims": [verdict_record(v, sweep_dir) for v in verdicts],
    }
    atomic_write_bytes(sweep_dir / VERDICTS,
                       (json.dumps(body, indent=2, allow_nan=False) + "\n").encode())
    lines = [
        f"# {study.title}", "",
        f"Reference: {study.reference}.", "",
        f"Command: `{command}`", "",
        f"Grid: {', '.join(manifest.get('swept', []))}; {len(runs)} runs "
        f"({', '.join(f'{n} {s}' for s, n in sorted(statuses.items()))}); seeds {seeds}.", "",
        "## Verdicts", "",
        "| claim | measured | n | verdict |", "|---|---|---|---|",
    ]
    for v, rec in zip(verdicts, body["claims"]):
        measured = v.measured.replace("|", "\\|")  # a literal bar inside a table cell
        if v.reason:
            measured += f" — {v.reason.replace('|', chr(92) + '|')}"
        lines.append(f"| {v.claim} | {measured} | {rec['n']} | **{v.verdict}** |")
    if study.paper:
        lines += ["", f"The paper: {study.paper}. Where a verdict differs, the reason measured "
                  "here stands beside it in the table."]
    lines += ["", "## How verdicts are decided", "", RULES, "## Per-seed values", "",
              f"Every number above comes from these runs' summary.json files; "
              f"[{VERDICTS}]({VERDICTS}) has them all, with the run directories.", ""]
    for v in verdicts:
        cells = "; ".join(f"{label}: " + ", ".join(
            f"{s}→{'n/a' if x is None else f'{x:.4g}'}" for s, x in vals.items())
            for label, vals in v.variants.items())
        lines.append(f"- `{v.id}` (seed→value) {cells}")
    lines += ["", "## Figures", ""]
    lines += [f"![{p.stem}](plots/{p.name})" for p in pngs]
    path = sweep_dir / "report.md"
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path, verdicts
