"""BENCHMARKS.md sections of the real-image benchmark, built from ``results.json`` of its runner."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from benchmarks.real_anatomy import STRUCTURES
from benchmarks.real_data import SOURCES, SYNTHESIS_VERSION, TASK_RUN_CONFIG, task_sites
from benchmarks.report import BENCHMARKS_MD, load_average, write_section

MODELS = ("federated", "federated-dp", "pooled", "local")
TITLES = {"donors": "Real anatomy (six donors, synthetic contrast)",
          "template": "Real T1 image, acquisition shift only (MNI152 template, four scanners)"}
SHOWN_RUN_CONFIG = ("preset", "plan", "model", "local-steps", "optimizer", "learning-rate", "memory-budget-mb",
                    "dp-noise-from-budget", "dp-max-grad-norm", "update-norm-bound-factor")


def write_benchmarks_sections(results: list[dict[str, Any]], *, command: str, path: Path = BENCHMARKS_MD,
                              section: str = "") -> None:
    """One section per task in BENCHMARKS.md (replaced on every write); a ``section`` name writes beside the task's
    main section instead (``real-<task>-<section>``, e.g. a comparison of networks)."""
    for task in dict.fromkeys(r["task"] for r in results):
        body = task_section([r for r in results if r["task"] == task], command=command)
        title = TITLES.get(task, task) + (f": {section}" if section else "")
        write_section(f"real-{task}" + (f"-{section}" if section else ""), title, body, path=path)


def task_section(results: list[dict[str, Any]], *, command: str) -> str:
    """Data provenance, grouping, acquisitions, then one block of tables per (dims, variant)."""
    first = results[0]
    sites, class_names = task_sites(first["task"])
    commands = " and ".join(f"`{c}`" for c in dict.fromkeys(r.get("command") or command for r in results))
    cases = first.get("cases")
    counted = f"; {cases['training']} training and {cases['validation']} validation cases per site" if cases else ""
    lines = [(f"Command: `.venv/bin/python -m pip install --no-deps --require-hashes --target "
             f"benchmarks/.data/real_tasks/packages -r benchmarks/requirements-real.txt` once, then {commands}."),
             (f"Written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} after the last run, load average then "
             f"{load_average()} (2 cores); seed {first['seed']}, {first['rounds']} rounds, synthesis version {SYNTHESIS_VERSION}."), "",
             (f"**Data.** {SOURCES[first['task']]}{counted}. Every case is a different random rigid + elastic deformation "
             "(about 2 mm mean, 6 mm largest displacement, +-6 degrees, +-5% scale) of the site's one anatomy, so "
             "**cases within a site share one anatomy**; validation cases are separate draws. Acquisition: "
             "slice-profile blur, bias field, resampling to the site's grid, gamma, Rician noise, int16 NIfTI in "
             "the site's own array orientation (the affine carries it).")]
    if first["task"] == "donors":
        lines += ["", ("Images: per-structure Gaussian-mixture intensities from the site's own contrast (SynthSeg, "
                  "Billot et al.), jittered per case."), "",
                  "| class | Desikan-Killiany labels grouped (left and right merged) |", "|---|---|"]
        for index, (name, ids) in enumerate(STRUCTURES):
            grouped = _ranges(ids) if ids else ("derived: unlabelled voxels the cortical ribbon encloses (3 mm "
                                                "closing, then holes in >= 2 of 3 slice orientations); holds the "
                                                "ventricles too")
            lines.append(f"| {index} {name} | {grouped} |")
        lines += ["", ("Unlabelled voxels inside the brain's hull (sulci) are CSF for the synthesis (own intensity) "
                  "and background in the label.")]
    else:
        lines += ["", ("Images: the template's own T1 intensities. Labels: the largest of the grey-matter, "
                  "white-matter and CSF (1 - gm - wm) probabilities inside the skull-stripped template.")]
    lines += ["", "| site | acquisition (RAS voxel mm) | stored as | contrast |", "|---|---|---|---|"]
    for acquisition in sites:
        spacing = " x ".join(f"{s:g}" for s in acquisition.spacing)
        lines.append(f"| {acquisition.site_id} | {acquisition.description} ({spacing}) | {acquisition.storage} "
                     f"| {acquisition.contrast} |")
    task_config = ", ".join(f"{k}={v}" for k, v in TASK_RUN_CONFIG[first["task"]].items())
    lines += ["", (f"Task run config: {task_config} (the data's grid); everything else is fedseg's harness default "
              "at the time of the run (below).")]
    for dims in dict.fromkeys(r["spatial_dims"] for r in results):
        lines += variants_table([r for r in results if r["spatial_dims"] == dims])
    for key in dict.fromkeys((r["spatial_dims"], r["variant"]) for r in results):
        lines += [""] + block([r for r in results if (r["spatial_dims"], r["variant"]) == key], class_names=class_names)
    return "\n".join(lines) + "\n"


def block(results: list[dict[str, Any]], *, class_names: tuple[str, ...]) -> list[str]:
    """Tables of one (spatial dims, variant): per site, per class, statuses and epsilon, times."""
    plain = next((r for r in results if not r["dp"] and r.get("runner", "harness") == "harness"), None)
    private = next((r for r in results if r["dp"] and r.get("runner", "harness") == "harness"), None)
    deployed = next((r for r in results if r.get("runner") == "deployment"), None)
    models = model_summaries(plain, private)
    if deployed is not None:
        models[f"deployed{'-dp' if deployed['dp'] else ''}"] = deployed["baselines"]["federated"]
    config = (plain or private or deployed)["run_config"]
    shown = ", ".join(f"{k}={config[k]}" for k in SHOWN_RUN_CONFIG if k in config)
    lines = [f"### {results[0]['spatial_dims']}D, {results[0]['variant']}", "", f"Run config: {shown}.", "",
             f"Plan: {plan_line((plain or private or deployed)['run_dir'])}.", "", *headline(models), "",
             (f"Mean Dice over the {len(class_names) - 1} structures per validation case, then over cases [bootstrap 95% interval]; "
             "HD95 in mm likewise:"), "",
             "| site | " + " | ".join(f"{m} Dice" for m in models) + " | " + " | ".join(f"{m} HD95" for m in models)
             + " |", "|---" * (1 + 2 * len(models)) + "|"]
    for site in _sites(models):
        cells = [_with_ci(models[m][site], "dice", 3) for m in models] + [_with_ci(models[m][site], "hd95", 1)
                                                                          for m in models]
        lines.append(f"| {site} | " + " | ".join(cells) + " |")
    lines.append("| **mean of sites** | " + " | ".join(f"**{_site_mean(models[m], 'dice'):.3f}**" for m in models)
                 + " | " + " | ".join(f"**{_site_mean(models[m], 'hd95'):.1f}**" for m in models) + " |")
    lines += ["", "Dice per structure (mean of sites):", "", "| model | " + " | ".join(class_names[1:]) + " |",
              "|---" * len(class_names) + "|"]
    for name, per_site in models.items():
        values = [_site_mean({s: v["per-class"][k] for s, v in per_site.items()}, "dice")
                  for k in range(len(class_names) - 1)]
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    lines += ["", "Rounds per site by `train-status` (ok / rejected / refused / failed) and final epsilon:", "",
              "| site | federated | federated-dp | epsilon (delta) |", "|---|---|---|---|"]
    for site in _sites(models):
        eps = ((private or {}).get("epsilon") or {}).get(site) or {}
        eps_text = f"{eps['epsilon']:.2f} ({eps['delta']:g})" if eps.get("epsilon") is not None else "-"
        lines.append(f"| {site} | {_statuses(plain, site)} | {_statuses(private, site)} | {eps_text} |")
    times = "; ".join(f"{_run_kind(r)} {r['seconds'] / 60:.1f} min" for r in results)
    lines += ["", f"Wall time per run (harness, data already written): {times}. Run folders: "
              + ", ".join(f"`{r['run_dir']}`" for r in results) + "."]
    return lines


def variants_table(results: list[dict[str, Any]]) -> list[str]:
    """One row per ``--compare`` variant of one spatial dims (e.g. one per network, same plan and rounds): weights,
    Dice and HD95 without and with DP (mean of sites), DP / no DP, seconds per round; nothing for one variant."""
    variants = list(dict.fromkeys(r["variant"] for r in results))
    if len(variants) < 2:
        return []
    lines = ["", f"### {results[0]['spatial_dims']}D, variants side by side", "",
             ("Mean of sites; seconds per round = the median of the rounds' `round-seconds` (every site's training "
              "and evaluation, 2 shared cores); weights = the final model file's (no DP / DP where the DP plan sized "
              "the network otherwise)."), "",
             "| variant | weights | Dice | HD95 | DP Dice | DP HD95 | DP / no DP Dice | s per round (no DP / DP) |",
             "|---|---|---|---|---|---|---|---|"]
    for variant in variants:
        runs = [r for r in results if r["variant"] == variant and r.get("runner", "harness") == "harness"]
        plain = next((r for r in runs if not r["dp"]), None)
        private = next((r for r in runs if r["dp"]), None)
        dice, hd95 = (_run_mean(plain, "dice"), _run_mean(plain, "hd95"))
        dp_dice, dp_hd95 = (_run_mean(private, "dice"), _run_mean(private, "hd95"))
        weights = " / ".join(dict.fromkeys(f"{r['parameters']:,}" for r in (plain, private)
                                           if r and r.get("parameters"))) or "-"
        ratio = dp_dice / dice if dice and not math.isnan(dice) and not math.isnan(dp_dice) else float("nan")
        seconds = " / ".join(_number(r.get("round_seconds") if r else None, 0) for r in (plain, private))
        lines.append(f"| {variant} | {weights} | {_number(dice, 3)} | {_number(hd95, 1)} "
                     f"| {_number(dp_dice, 3)} | {_number(dp_hd95, 1)} | {_number(ratio, 2, 'x')} | {seconds} |")
    return lines


def _run_kind(result: dict[str, Any]) -> str:
    if result["dp"]:
        return "DP"
    return "no DP (with baselines)" if result["baselines"].get("pooled") or result["baselines"].get("local") else "no DP"


def _run_mean(result: dict[str, Any] | None, key: str) -> float:
    return _site_mean(result["baselines"]["federated"], key) if result else float("nan")


def _number(value: float | None, digits: int, unit: str = "") -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}{unit}"


def plan_line(run_dir: str) -> str:
    """The run's plan in one line (``plan.json``), with its notes."""
    from pathlib import Path

    from server.plan_phase import describe
    from shared.plan import read_plan_file

    try:
        plan = read_plan_file(Path(run_dir) / "plan.json")
    except Exception as exc:  # noqa: BLE001 - a report line, never a failed report
        return f"not readable ({exc})"
    return describe(plan)


def headline(models: dict[str, dict[str, Any]]) -> list[str]:
    """The issue's ratios: federated vs pooled (mean of sites), sites where federated beats local-only,
    DP vs no DP, deployment vs harness."""
    mean = {name: _site_mean(sites, "dice") for name, sites in models.items()}
    lines = []
    if "federated" in mean and "pooled" in mean:
        lines.append(f"- federated / pooled Dice (mean of sites): **{mean['federated'] / mean['pooled']:.3f}x**")
    if "federated" in models and "local" in models:
        wins = [s for s in models["local"] if models["federated"].get(s, {}).get("dice", float("nan"))
                > models["local"][s]["dice"]]
        lines.append(f"- federated above the site's own local-only model at **{len(wins)} of "
                     f"{len(models['local'])}** sites")
    if "federated" in mean and "federated-dp" in mean:
        lines.append(f"- DP / no DP federated Dice: **{mean['federated-dp'] / mean['federated']:.3f}x**")
    for name in ("deployed-dp", "deployed"):
        reference = "federated-dp" if name.endswith("dp") else "federated"
        if name in mean and reference in mean:
            lines.append(f"- deployment / harness ({reference}) Dice: **{mean[name] / mean[reference]:.3f}x**")
    return lines


def model_summaries(plain: dict[str, Any] | None, private: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Model name -> site -> summary (``simulations.baselines.summarise``), for the models that ran."""
    models: dict[str, dict[str, Any]] = {}
    if plain is not None:
        models["federated"] = plain["baselines"]["federated"]
    if private is not None:
        models["federated-dp"] = private["baselines"]["federated"]
    if plain is not None:
        models["pooled"] = plain["baselines"].get("pooled", {})
        local = plain["baselines"].get("local", {})
        models["local"] = {site: per_model[site] for site, per_model in local.items()}  # each site's own model
    return {name: sites for name, sites in models.items() if sites}


def _sites(models: dict[str, dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(site for sites in models.values() for site in sites))


def _with_ci(summary: dict[str, Any] | None, key: str, digits: int) -> str:
    if not summary or summary.get(key) is None or math.isnan(summary[key]):
        return "-"
    low, high = summary.get(f"{key}-ci") or (None, None)
    interval = f" [{low:.{digits}f}, {high:.{digits}f}]" if low is not None and high is not None else ""
    return f"{summary[key]:.{digits}f}{interval}"


def _site_mean(per_site: dict[str, Any], key: str) -> float:
    values = [s[key] for s in per_site.values() if s.get(key) is not None and not math.isnan(s[key])]
    return sum(values) / len(values) if values else float("nan")


def _statuses(result: dict[str, Any] | None, site: str) -> str:
    if result is None:
        return "-"
    counts = result["statuses"].get(site, {})
    return " / ".join(str(counts.get(s, 0)) for s in ("ok", "rejected", "refused", "failed"))


def _ranges(ids: tuple[int, ...]) -> str:
    """``(1, 2, 3, 42, 43)`` -> ``1-3, 42-43``."""
    parts, start = [], None
    for i, value in enumerate(sorted(ids)):
        start = value if start is None else start
        if i + 1 == len(ids) or sorted(ids)[i + 1] != value + 1:
            parts.append(f"{start}-{value}" if value != start else f"{value}")
            start = None
    return ", ".join(parts)
