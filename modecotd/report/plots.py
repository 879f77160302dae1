"""The report's PNG plots: accuracy by task and system, training curves, mixture weights, weight search."""
from __future__ import annotations

from pathlib import Path

from modecotd.config import MIXTURE
from modecotd.report.collect import systems_in


def _pyplot():
    """matplotlib's pyplot drawing to files only (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_accuracy(report: dict, path: Path) -> None:
    plt = _pyplot()
    names = list(report["tasks"])
    systems = ["majority", *systems_in(report)]
    width = 0.8 / len(systems)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(names)), 4))
    for i, system in enumerate(systems):
        values = []
        for name in names:
            t = report["tasks"][name]
            value = t["majority"]["accuracy"] if system == "majority" else t["eval"].get(system, {}).get("accuracy")
            values.append(100 * value if value is not None else 0.0)
        ax.bar([x + i * width for x in range(len(names))], values, width, label=system)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(names))])
    ax.set_xticklabels([f"{n}\n({report['tasks'][n]['role']})" for n in names], fontsize=8)
    ax.set_ylabel(f"accuracy (%, {report['scoring']})")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title(f"run {report['run']}: accuracy by task and system")
    _save(fig, path)


def plot_training(curves: dict[str, dict], path: Path) -> None:
    """Training loss per optimizer step (and validation loss where there is one) for every expert."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, curve in curves.items():
        n = curve["accumulation"]
        losses = curve["losses"]
        steps = [sum(losses[i:i + n]) / len(losses[i:i + n]) for i in range(0, len(losses), n)]
        (line,) = ax.plot(range(1, len(steps) + 1), steps, label=f"{name} train", linewidth=1)
        if curve["validation"]:
            xs, ys = zip(*curve["validation"])
            ax.plot(xs, ys, "o--", color=line.get_color(), label=f"{name} validation", markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (target tokens)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("expert training")
    _save(fig, path)


def plot_mixture_weights(report: dict, path: Path) -> None:
    """A heat map of the chosen weights: one row per target task, one column per expert."""
    plt = _pyplot()
    mixed = {(name if system == MIXTURE else f"{name} {system.removeprefix(MIXTURE + '-')}", name): m["weights"]
             for name, t in report["tasks"].items() for system, m in t.get("mixtures", {}).items() if m["weights"]}
    experts = sorted({e for weights in mixed.values() for e in weights})
    grid = [[weights.get(e, 0.0) for e in experts] for weights in mixed.values()]
    limit = max([abs(v) for row in grid for v in row] + [1e-9])
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(experts), 1.2 + 0.5 * len(mixed)))
    image = ax.imshow(grid, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:+.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(experts)), experts, fontsize=8, rotation=20)
    ax.set_yticks(range(len(mixed)), [f"{label} ({report['tasks'][n]['role']})" for label, n in mixed], fontsize=8)
    ax.set_xlabel("expert")
    fig.colorbar(image, ax=ax)
    ax.set_title("mixture weights")
    _save(fig, path)


def plot_search(curves: dict[str, list[float]], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), curve, label=name, linewidth=1.2)
    ax.set_xlabel("objective evaluation")
    ax.set_ylabel("best objective so far (few-shot loss + L1)")
    ax.legend(fontsize=8)
    ax.set_title("mixture weight search")
    _save(fig, path)

