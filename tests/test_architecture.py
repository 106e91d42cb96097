"""Imports go one way (README, Architecture): each bnexp module imports only modules above it in
the flow, and only the CLI touches the Hydra plugins, which import bnexp, never the reverse."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "bnexp"
# The flow, from what everything uses to the shell around it. A module may import the ones
# before it, never one after it.
FLOW = ["catalog", "config", "interrupt", "metrics", "stats", "data", "models", "device",
        "record", "probes", "runs", "optim", "stacked", "steps", "run", "loop", "task",
        "cluster", "sweep", "compare", "plots", "studies", "reproduce", "cli", "__main__"]


def imports(path: Path) -> set[str]:
    """The bnexp modules and "hydra_plugins" a module imports at run time (imports under
    `if TYPE_CHECKING:` are for type hints only)."""
    tree = ast.parse(path.read_text())
    hints = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
             and getattr(node.test, "id", None) == "TYPE_CHECKING"
             for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in hints:
            continue
        names = ([node.module or ""] if isinstance(node, ast.ImportFrom) else
                 [a.name for a in node.names] if isinstance(node, ast.Import) else [])
        for name in names:
            if name == "bnexp" and isinstance(node, ast.ImportFrom):
                found |= {a.name for a in node.names}
            elif name.startswith("bnexp."):
                found.add(name.split(".")[1])
            elif name.startswith("hydra_plugins"):
                found.add("hydra_plugins")
    return found - {path.stem}


def test_every_module_imports_only_modules_above_it_in_the_flow() -> None:
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert modules == set(FLOW), "place each new module in FLOW"
    wrong = {m: sorted(d for d in imports(PACKAGE / f"{m}.py") if d in FLOW
                       and FLOW.index(d) > FLOW.index(m)) for m in FLOW}
    assert {m: d for m, d in wrong.items() if d} == {}


def test_only_the_cli_imports_the_hydra_plugins_and_the_plugins_import_bnexp() -> None:
    users = {m for m in FLOW if "hydra_plugins" in imports(PACKAGE / f"{m}.py")}
    assert users == {"cli"}
    plugins = PACKAGE.parent / "hydra_plugins" / "bnexp_sweeper"
    used = set().union(*(imports(p) for p in plugins.glob("*.py")))
    assert {"sweep", "steps", "run"} <= used  # the plugins build on bnexp, not beside it


def test_the_builders_cover_exactly_the_catalog() -> None:
    # config validates against catalog's names; data and models must build each of them.
    from bnexp import catalog, models

    assert tuple(models.NETWORKS) == catalog.NETWORKS
    assert tuple(models.ACTIVATIONS) == catalog.ACTIVATIONS
    knobs = models.Knobs()
    for norm in catalog.NORMS:  # norm_layer raises on a norm it does not know
        models.norm_layer(models.Knobs(norm, knobs.affine and norm != "none"), 4, spatial=True)
