"""A run's report: per-site tables and plots, as Markdown and HTML, in the run folder.

Reads ``metrics.jsonl`` and ``summary.json`` and writes ``report.md``,
``report.html`` and PNG plots (matplotlib, headless) under ``plots/``:
global and per-site Dice per round, loss per round, and the cumulative epsilon
of every site per round when the sites trained with differential privacy.
Per-site results are always shown next to the aggregate, never only a mean.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from shared.atomic import atomic_write
from shared.run_rows import series

SITE_COLUMNS = (("dice", "Dice"), ("hd95", "HD95 mm"), ("loss", "val loss"), ("train-loss", "train loss"),
                ("epsilon", "epsilon"))


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    """All rows of ``metrics.jsonl``."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def final_site_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each site's latest value of every column, plus its round; the global row last."""
    latest: dict[str, dict[str, Any]] = {}
    for row in sorted(rows, key=lambda r: r["round"]):
        entry = latest.setdefault(row["site"], {"site": row["site"]})
        for key, _ in SITE_COLUMNS:
            if isinstance(row.get(key), (int, float)):
                entry[key] = row[key]
                entry[f"{key}-round"] = row["round"]
        status = [row.get(f"{p}-status") for p in ("train", "evaluate") if row.get(f"{p}-status") not in (None, "ok")]
        if "update-scale" in row:  # aggregated, scaled down to the round's norm bound
            status.append(f"update bounded (x{row['update-scale']:.3g})")
        if status:
            entry["note"] = f"round {row['round']}: {', '.join(status)}"
    sites = sorted(s for s in latest if s != "global")
    return [latest[s] for s in sites] + ([latest["global"]] if "global" in latest else [])


def plot_series(data: dict[str, list[tuple[int, float]]], *, title: str, ylabel: str, path: Path) -> Path | None:
    """Line plot of one metric per site (the global aggregate bold); None if there is no data."""
    if not data:
        return None
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    for site in sorted(data, key=lambda s: (s == "global", s)):
        rounds, values = zip(*sorted(data[site]))
        bold = site == "global"
        axes.plot(rounds, values, marker="o", linewidth=2.5 if bold else 1.0, color="black" if bold else None,
                  label=site, alpha=1.0 if bold else 0.8)
    axes.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes.set_title(title)
    axes.set_xlabel("round")
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    if len(data) <= 12:
        axes.legend(fontsize=7, loc="best")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda handle: figure.savefig(handle, format="png"))
    plt.close(figure)
    return path


def make_plots(run_dir: Path, rows: list[dict[str, Any]]) -> dict[str, Path]:
    """Write the report's plots; return ``{name: path}`` of those that had data."""
    plots_dir = run_dir / "plots"
    specs = {
        "dice": (series(rows, "dice"), "Dice per round (validation split of each site)", "Dice"),
        "loss": (series(rows, "loss"), "Validation loss per round", "Dice + CE loss"),
        "train-loss": (series(rows, "train-loss"), "Training loss per round", "Dice + CE loss"),
        "epsilon": ({s: v for s, v in series(rows, "epsilon").items() if s != "global"},
                    "Cumulative privacy spend per site", "epsilon"),
    }
    written = {}
    for name, (data, title, ylabel) in specs.items():
        path = plot_series(data, title=title, ylabel=ylabel, path=plots_dir / f"{name}.png")
        if path is not None:
            written[name] = path
    return written


def write_report(run_dir: Path) -> Path:
    """Write ``report.md``, ``report.html`` and the plots for ``run_dir``; return the Markdown path."""
    run_dir = Path(run_dir)
    rows = read_rows(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    plots = make_plots(run_dir, rows)
    if (run_dir / "plots" / "examples.png").exists():
        plots["examples"] = run_dir / "plots" / "examples.png"
    table = final_site_table(rows)
    markdown = _markdown(summary, table, plots, run_dir)
    atomic_write(run_dir / "report.md", lambda handle: handle.write(markdown.encode()))
    page = _html(summary, table, plots, run_dir)
    atomic_write(run_dir / "report.html", lambda handle: handle.write(page.encode()))
    return run_dir / "report.md"


def site_table_text(table: list[dict[str, Any]]) -> str:
    """The per-site table as Markdown (also readable on a console)."""
    columns = [label for _, label in SITE_COLUMNS]
    lines = ["| site | " + " | ".join(columns) + " | note |", "|---" * (len(columns) + 2) + "|"]
    for entry in table:
        cells = [_fmt(entry.get(key)) for key, _ in SITE_COLUMNS]
        lines.append(f"| {entry['site']} | " + " | ".join(cells) + f" | {entry.get('note', '')} |")
    return "\n".join(lines)


def comparison_text(run_dir: Path) -> str:
    """Federated vs pooled vs local-only per site (Markdown), from ``baselines.json``; '' if absent."""
    path = run_dir / "baselines.json"
    if not path.exists():
        return ""
    from shared.baselines import comparison_rows

    results = json.loads(path.read_text())
    rows = comparison_rows(results)
    kinds = [k for k in ("federated", "personal", "pooled", "local") if any(k in r for r in rows)]
    head = "| site | " + " | ".join(f"{k} Dice [95% CI] | {k} HD95 mm" for k in kinds) + " |"
    lines = [f"Each model evaluated on the same validation cases of every site; baselines trained "
             f"{results.get('steps')} steps (= local steps x rounds), without DP. Intervals: bootstrap over cases."
             + (" Personal: the global model with each site's own norm weights (local-norm), at its own site."
                if "personal" in kinds else ""),
             "", head, "|---" * (1 + 2 * len(kinds)) + "|"]
    for row in rows:
        cells = []
        for kind in kinds:
            entry = row.get(kind, {})
            interval = entry.get("dice-ci")
            ci = f" [{_fmt(interval[0])}, {_fmt(interval[1])}]" if interval and None not in interval else ""
            cells += [f"{_fmt(entry.get('dice'))}{ci}", _fmt(entry.get("hd95"))]
        label = f"{row['site']} (held out)" if row["holdout"] else row["site"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _markdown(summary: dict[str, Any], table: list[dict[str, Any]], plots: dict[str, Path], run_dir: Path) -> str:
    parts = [f"# fedseg run report: {run_dir.name}", "",
             f"{summary['rounds']} rounds, {len(summary['sites'])} sites; global Dice after round 1: "
             f"{_fmt(summary.get('first_round_dice'))}, after the last round: {_fmt(summary.get('final_dice'))}.", "",
             "## Per site (latest round each site reported)", "", site_table_text(table), ""]
    comparison = comparison_text(run_dir)
    if comparison:
        parts += ["## Federated vs baselines", "", comparison, ""]
    for name, path in plots.items():
        parts += [f"![{name}]({path.relative_to(run_dir)})", ""]
    return "\n".join(parts)


def _html(summary: dict[str, Any], table: list[dict[str, Any]], plots: dict[str, Path], run_dir: Path) -> str:
    header = "".join(f"<th>{html.escape(label)}</th>" for _, label in SITE_COLUMNS)
    body = "".join(
        f"<tr><td>{html.escape(e['site'])}</td>" + "".join(f"<td>{_fmt(e.get(k))}</td>" for k, _ in SITE_COLUMNS)
        + f"<td>{html.escape(e.get('note', ''))}</td></tr>" for e in table)
    images = "".join(f'<p><img src="{html.escape(str(p.relative_to(run_dir)))}" alt="{html.escape(n)}"></p>'
                     for n, p in plots.items())
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>fedseg {html.escape(run_dir.name)}</title>"
            "<style>body{font-family:sans-serif;margin:2em}td,th{border:1px solid #ccc;padding:4px 8px}"
            "table{border-collapse:collapse}</style></head><body>"
            f"<h1>fedseg run report: {html.escape(run_dir.name)}</h1>"
            f"<p>{summary['rounds']} rounds, {len(summary['sites'])} sites; global Dice after round 1: "
            f"{_fmt(summary.get('first_round_dice'))}, after the last round: {_fmt(summary.get('final_dice'))}.</p>"
            f"<h2>Per site</h2><table><tr><th>site</th>{header}<th>note</th></tr>{body}</table>"
            f"{_comparison_html(run_dir)}{images}"
            "</body></html>\n")


def _comparison_html(run_dir: Path) -> str:
    text = comparison_text(run_dir)
    if not text:
        return ""
    lines = text.splitlines()
    rows = [[html.escape(c.strip()) for c in line.strip("|").split("|")] for line in lines[2:] if "---" not in line]
    cells = "".join("<tr>" + "".join(f"<t{'h' if i == 0 else 'd'}>{c}</t{'h' if i == 0 else 'd'}>" for c in row)
                    + "</tr>" for i, row in enumerate(rows))
    return f"<h2>Federated vs baselines</h2><p>{html.escape(lines[0])}</p><table>{cells}</table>"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)
