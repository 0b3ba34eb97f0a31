"""The dashboard's plots as Plotly figures (JSON the page hands to Plotly.js, served from the plotly package).

Per-class Dice and HD95 per site over rounds (the global aggregate bold),
the global Dice with the baselines when ``baselines.json`` exists, every
site's cumulative epsilon against its budget, and the round times.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

import plotly.graph_objects as go

from server.dashboard.rounds_view import SiteView
from shared.baselines import comparison_rows, finite_mean
from shared.run_rows import series

#: Where each baseline's label sits on its line (federated, pooled, local): apart when the means are close.
BASELINE_LABEL_POSITIONS = ("bottom right", "top left", "top right")
PER_CLASS = re.compile(r"^(dice|hd95)-class-(\d+)$")
LAYOUT = {"height": 300, "margin": {"l": 55, "r": 15, "t": 40, "b": 40}, "template": "plotly_white",
          "xaxis": {"title": {"text": "round"}, "dtick": 1}, "legend": {"font": {"size": 10}}}


def metric_keys(rows: Iterable[dict[str, Any]]) -> list[str]:
    """The per-class keys present (``dice-class-1``, ``hd95-class-1``, ...), else ``dice``/``hd95``."""
    keys = {key for row in rows for key in row if PER_CLASS.match(key)}
    if not keys:
        return ["dice", "hd95"]
    return sorted(keys, key=lambda k: (PER_CLASS.match(k)[1], int(PER_CLASS.match(k)[2])))


def per_site_figure(data: dict[str, list[tuple[int, float]]], *, title: str, unit: str) -> dict[str, Any]:
    """One line per site; the global aggregate bold and black."""
    figure = go.Figure(layout={**LAYOUT, "title": {"text": title}, "yaxis": {"title": {"text": unit}}})
    for site in sorted(data, key=lambda s: (s == "global", s)):
        rounds, values = zip(*data[site])
        bold = site == "global"
        figure.add_scatter(x=rounds, y=values, name=site, mode="lines+markers",
                           line={"width": 3 if bold else 1.5, **({"color": "black"} if bold else {})})
    return figure.to_plotly_json()


def class_label(key: str, *, class_names: list[str]) -> str:
    """``Dice, class 1 (lesion)`` for ``dice-class-1``."""
    match = PER_CLASS.match(key)
    metric = "Dice" if key.startswith("dice") else "HD95"
    if not match:
        return f"{metric}, mean over foreground classes"
    index = int(match[2])
    name = f" ({class_names[index]})" if index < len(class_names) else ""
    return f"{metric}, class {index}{name}"


def global_dice_figure(rows: Iterable[dict[str, Any]], *, baselines: dict[str, Any] | None) -> dict[str, Any]:
    """The global model's Dice per round, with the baselines' mean Dice over sites as dashed lines."""
    points = series(rows, "dice").get("global", [])
    figure = go.Figure(layout={**LAYOUT, "title": {"text": "Global model: Dice per round"},
                               "yaxis": {"title": {"text": "Dice"}}})
    if points:
        rounds, values = zip(*points)
        figure.add_scatter(x=rounds, y=values, name="federated (per round)", mode="lines+markers",
                           line={"width": 3, "color": "black"})
    for (kind, mean), position in zip(baseline_means(baselines).items(), BASELINE_LABEL_POSITIONS):
        figure.add_hline(y=mean, line_dash="dash", annotation_text=f"{kind}: {mean:.3f}",
                         annotation_position=position)
    return figure.to_plotly_json()


def baseline_means(baselines: dict[str, Any] | None) -> dict[str, float]:
    """Mean Dice over the training sites of each model kind in ``baselines.json`` (NaN kinds left out)."""
    if not baselines or "federated" not in baselines:
        return {}
    rows = [row for row in comparison_rows(baselines) if not row["holdout"]]
    means = {}
    for kind in ("federated", "pooled", "local"):
        mean = finite_mean([row[kind].get("dice") for row in rows if kind in row])
        if not math.isnan(mean):
            means[f"{kind} (final, evaluated)" if kind == "federated" else kind] = mean
    return means


def epsilon_figure(rows: Iterable[dict[str, Any]], *, sites: list[SiteView]) -> dict[str, Any] | None:
    """Cumulative epsilon per site, each site's budget dotted; None without DP."""
    data = {site: points for site, points in series(rows, "epsilon").items() if site != "global"}
    if not data:
        return None
    figure = go.Figure(per_site_figure(data, title="Privacy spend: cumulative epsilon per site", unit="epsilon"))
    for budget in sorted({view.budget for view in sites if view.budget is not None}):
        holders = ", ".join(v.site for v in sites if v.budget == budget)
        figure.add_hline(y=budget, line_dash="dot", line_color="firebrick",
                         annotation_text=f"budget {budget:g} ({holders})", annotation_position="bottom right")
    return figure.to_plotly_json()


def run_figures(rows: tuple[dict[str, Any], ...], *, baselines: dict[str, Any] | None, sites: list[SiteView],
                class_names: list[str]) -> dict[str, dict[str, Any]]:
    """Every figure of a run page by id, in page order (figures without data are left out)."""
    figures = {"global-dice": global_dice_figure(rows, baselines=baselines)}
    for key in metric_keys(rows):
        data = series(rows, key)
        if data:
            unit = "Dice" if key.startswith("dice") else "HD95 (mm)"
            figures[key] = per_site_figure(data, title=class_label(key, class_names=class_names), unit=unit)
    epsilon = epsilon_figure(rows, sites=sites)
    if epsilon is not None:
        figures["epsilon"] = epsilon
    seconds = {s: p for s, p in series(rows, "round-seconds").items() if s == "global"}
    if seconds:
        figures["round-seconds"] = per_site_figure(seconds, title="Round time", unit="seconds")
    return figures
