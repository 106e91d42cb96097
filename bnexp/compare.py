"""Tables over many runs: the config keys that vary against their metrics, seeds aggregated,
and per-variant learning-rate statistics. No torch: `bnexp compare` answers instantly."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from typing import Any

from bnexp import metrics
from bnexp.record import FINISHED
from bnexp.runs import Run, distinct, varying_keys

DEFAULT_METRICS = ("final_val_acc", "best_val_acc", "steps_to_target", "train_loss_auc",
                   "diverged", "val_acc_train_mode")


def select(runs: list[Run], where: Sequence[str]) -> list[Run]:
    """Keep runs matching every `key=value` (a key may be shortened: norm=batch)."""
    out = runs
    for cond in where:
        if "=" not in cond:
            raise ValueError(f"--where {cond!r}: expected KEY=VALUE, e.g. model.norm=batch")
        key, value = cond.split("=", 1)
        out = [r for r in out if any(
            (k == key or k.endswith("." + key)) and str(v).lower() == value.lower()
            for k, v in r.config.items())]
    return out


def aggregate(runs: list[Run], keys: Sequence[str], names: Sequence[str],
              named: bool = False) -> list[dict]:
    """One row per distinct value of `keys`: n, and mean/std/count of each metric over seeds.
    Booleans (diverged) average to a fraction. named: each row says its runs' directories."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(tuple(run.config.get(k) for k in keys), []).append(run)
    def order(values: tuple) -> tuple:  # numbers by value, then everything else by text
        return tuple((0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool)
                     else (1, 0, str(v)) for v in values)

    rows = []
    for values, members in sorted(groups.items(), key=lambda item: order(item[0])):
        row: dict[str, Any] = dict(zip(keys, values))
        row["n"] = len(members)
        for name in names:
            mean, std, count = metrics.mean_std([m.metrics.get(name) for m in members])
            row[name] = {"mean": mean, "std": std, "n": count, "of": len(members)}
        if named:
            row["run"] = ", ".join(m.path.name for m in members)
        rows.append(row)
    return rows


def lr_table(runs: list[Run], variant_keys: Sequence[str], metric: str,
             tolerance: float) -> list[dict]:
    """Per variant (the varying keys other than optim.lr and seed): LR statistics."""
    variants: dict[tuple, dict[float, list[dict]]] = {}
    for run in runs:
        lr = run.config.get("optim.lr")
        key = tuple(run.config.get(k) for k in variant_keys)
        variants.setdefault(key, {}).setdefault(lr, []).append(run.metrics)
    rows = []
    for key, points in variants.items():
        row = dict(zip(variant_keys, key))
        row["lrs"] = len(points)
        row.update(metrics.lr_stats(points, metric, tolerance))
        rows.append(row)
    return rows


def compare(runs: list[Run], names: Sequence[str] = DEFAULT_METRICS, per_run: bool = False,
            lr_metric: str = "final_val_acc", tolerance: float = 0.01) -> dict[str, Any]:
    """The whole comparison: result runs only, grouped by the varying keys with seeds
    aggregated (or one row per run), plus LR statistics when optim.lr varies."""
    results, repeats = distinct([r for r in runs if r.status in FINISHED])
    keys = varying_keys(results)
    group_keys = [k for k in keys if per_run or k != "seed"]
    if per_run and "seed" not in group_keys:
        group_keys.append("seed")
    rows = aggregate(results, group_keys, names, named=per_run)
    lr_rows = []
    if "optim.lr" in keys:
        variant = [k for k in keys if k not in ("optim.lr", "seed")]
        lr_rows = lr_table(results, variant, lr_metric, tolerance)
    return {"rows": rows, "lr": lr_rows, "keys": keys, "runs": len(runs),
            "repeats": [{"run": str(r.path), "same_as": str(kept.path)} for r, kept in repeats],
            "skipped": {s: sum(r.status == s for r in runs) for s in {r.status for r in runs}
                        if s not in FINISHED}}


def sort_rows(rows: list[dict], by: str | None, descending: bool) -> list[dict]:
    if not by:
        return rows

    def key(row: dict) -> tuple:
        value = row.get(by)
        value = value["mean"] if isinstance(value, dict) else value
        missing = value is None or (isinstance(value, float) and math.isnan(value))
        return (missing, -value if descending and not missing else value if not missing else 0)

    return sorted(rows, key=key)


# ----------------------------------------------------------------------------- rendering


def cell(value: Any, plain: bool = False) -> str:
    if isinstance(value, dict):
        mean, std, n, of = value["mean"], value["std"], value["n"], value.get("of", value["n"])
        if mean is None:
            return "" if plain else "—"
        text = f"{mean:.4g}" if plain or n <= 1 else f"{mean:.4g} ± {std:.2g}"
        return text if plain or n == of else f"{text} ({n}/{of})"  # some seeds have no value
    if value is None:
        return "" if plain else "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def columns(rows: list[dict]) -> list[str]:
    cols: dict[str, None] = {}
    for row in rows:
        cols.update(dict.fromkeys(row))
    return list(cols)


def render(rows: list[dict], fmt: str, title: str = "") -> str:
    cols = columns(rows)
    if fmt == "json":
        return json.dumps(rows, indent=2, default=str)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out)
        flat_cols = []
        for c in cols:
            is_stat = any(isinstance(r.get(c), dict) for r in rows)
            flat_cols += [f"{c}_mean", f"{c}_std", f"{c}_n"] if is_stat else [c]
        writer.writerow(flat_cols)
        for r in rows:
            line = []
            for c in cols:
                v = r.get(c)
                line += [v["mean"], v["std"], v["n"]] if isinstance(v, dict) else [v]
            writer.writerow(["" if x is None else x for x in line])
        return out.getvalue()
    if fmt == "markdown":
        lines = [f"**{title}**", ""] if title else []
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "---|" * len(cols))
        lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
        return "\n".join(lines) + "\n"
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title or None)
    for c in cols:
        table.add_column(c, justify="left" if c in cols[:1] else "right")
    for r in rows:
        table.add_row(*(cell(r.get(c)) for c in cols))
    buffer = io.StringIO()
    Console(file=buffer, width=200).print(table)
    return buffer.getvalue()
