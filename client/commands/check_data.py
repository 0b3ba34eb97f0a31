"""``python -m client check-data DATALIST``: read every case exactly as training would.

Prints one line per problem (``<file>: <problem>``), warnings (``<file>:
warning: ...``) and a summary table; exit 0 when all is well, 1 when problems
were found, 2 on usage errors. Never writes anything (no cache either).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from client.data.case_checks import check_not_empty_label
from client.data.datalist import load_datalist
from client.data.dicom import dicom_modality
from client.data.loading import preprocess_case
from client.data.site_data import check_task, preprocess_settings
from client.data.transforms import loading, resampling
from shared.config import RunConfig
from shared.errors import ConfigError, DataError, WeightsError
from shared.plan import Plan, manual_plan


@dataclass(frozen=True)
class CaseSummary:
    """What one readable case looks like as stored (after reorientation to RAS)."""

    name: str
    section: str
    modality: str
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    label_counts: dict[int, int]


@dataclass
class CheckReport:
    """Everything ``check-data`` found: problems (fatal), warnings and per-case summaries."""

    datalist: Path
    modalities: tuple[str, ...] = ()
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    cases: list[CaseSummary] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_datalist(datalist: Path | str, *, plan: Plan) -> CheckReport:
    """Read every case of ``datalist`` through the training pipeline; collect every problem."""
    report = CheckReport(datalist=Path(datalist))
    try:
        site_data = load_datalist(datalist, check_files=False)
        check_task(site_data, plan)
    except DataError as exc:
        report.problems.append(str(exc))
        return report
    report.modalities = site_data.modalities
    settings = preprocess_settings(plan, site_data)
    read, resample = _compose(loading(settings)), _compose(resampling(settings))
    sections = [("training", c) for c in site_data.training] + [("validation", c) for c in site_data.validation]
    for section, case in sections:
        _check_case(report, section, case, read, resample)
    return report


def _modality_column(report: CheckReport, sources: list[str]) -> str:
    """Each channel's modality (the DICOM tag where there is one); warn where it contradicts the datalist."""
    names = []
    for channel, source in enumerate(sources):
        declared = report.modalities[min(channel, len(report.modalities) - 1)]
        found = dicom_modality(source)
        if found and (found.upper() == "CT") != (declared.upper() == "CT"):
            report.warnings.append(f"{source}: warning: DICOM Modality is {found} but the datalist says "
                                   f"{declared} (intensities are normalised as {declared})")
        names.append(found or declared)
    return ",".join(names)


def _check_case(report: CheckReport, section: str, case: dict[str, Any], read: Any, resample: Any) -> None:
    import torch

    sources = case["image"] if isinstance(case["image"], list) else [case["image"]]
    missing = [p for p in [*sources, case["label"]] if not Path(p).exists()]
    if missing:
        report.problems.extend(f"{p}: file does not exist" for p in missing)
        return
    try:
        loaded = preprocess_case(case, read)
        resample(dict(loaded))
    except DataError as exc:
        report.problems.append(str(exc))
        return
    image, label = loaded["image"], loaded["label"]
    values, counts = torch.unique(torch.as_tensor(label), return_counts=True)
    report.cases.append(CaseSummary(
        name=_relative(sources[0], report.datalist), section=section, modality=_modality_column(report, sources), shape=tuple(int(s) for s in image.shape[1:]),
        spacing=tuple(round(float(s), 3) for s in image.pixdim),
        label_counts={int(v): int(n) for v, n in zip(values.tolist(), counts.tolist())}))
    warning = check_not_empty_label(label)
    if warning:
        file_name, _, message = warning.partition(": ")
        report.warnings.append(f"{file_name}: warning: {message}")


def _relative(path: str, datalist: Path) -> str:
    try:
        return str(Path(path).relative_to(datalist.resolve().parent))
    except ValueError:
        return str(path)


def _compose(steps: list) -> Any:
    from monai.transforms import Compose

    return Compose(steps)


def print_report(report: CheckReport, *, out: TextIO | None = None) -> None:
    """Problem lines, warning lines, then the summary table (to stdout unless ``out``)."""
    out = out or sys.stdout
    for line in [*report.problems, *report.warnings]:
        print(line, file=out)
    if report.cases:
        print(file=out)
        print(f"{'case':<32} {'set':<10} {'modality':<9} {'shape':<16} {'spacing (mm)':<22} label voxels",
              file=out)
        for case in report.cases:
            counts = " ".join(f"{v}:{n}" for v, n in case.label_counts.items())
            print(f"{case.name:<32} {case.section:<10} {case.modality:<9} {'x'.join(map(str, case.shape)):<16} "
                  f"{'x'.join(map(str, case.spacing)):<22} {counts}", file=out)
    readable = len(report.cases)
    print(f"\n{report.datalist}: {readable} readable case(s), modality {', '.join(report.modalities) or '?'}; "
          f"{len(report.problems)} problem(s), {len(report.warnings)} warning(s)", file=out)


def plan_for_check(*, model: Path | None, overrides: dict[str, Any]) -> Plan:
    """The plan to check against: a model file's, else the manual plan of the defaults plus ``overrides``."""
    given = {k: v for k, v in overrides.items() if v is not None}
    if model is None:
        return manual_plan(RunConfig.from_mapping({"plan": "manual", "dp": False, **given}))
    from client.inference.model_files import plan_of_model
    from shared.model_file import read_model_file

    fixed = sorted(set(given) - {"num-classes", "in-channels"})
    if fixed:
        raise ConfigError(f"{', '.join(fixed)}: given with --model, whose plan fixes them")
    plan = plan_of_model(read_model_file(model), model)
    return dataclasses.replace(plan, num_classes=given.get("num-classes", plan.num_classes),
                               in_channels=given.get("in-channels", plan.in_channels), normalization=())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("datalist", type=Path, metavar="DATALIST", help="the site's datalist JSON")
    parser.add_argument("--model", type=Path, help="take classes, channels and spacing from this global_model.pt")
    parser.add_argument("--num-classes", type=int, help="classes incl. background (default: run default 2)")
    parser.add_argument("--in-channels", type=int, help="input channels / modalities (default: 1)")
    parser.add_argument("--spatial-dims", type=int, choices=(2, 3), help="2D or 3D model (default: 2)")
    parser.add_argument("--target-spacing", type=float, help="voxel spacing in mm the run resamples to")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of text")


def run(args: argparse.Namespace) -> int:
    if not args.datalist.is_file():
        print(f"error: {args.datalist}: datalist file does not exist", file=sys.stderr)
        return 2
    try:
        plan = plan_for_check(model=args.model, overrides={
            "num-classes": args.num_classes, "in-channels": args.in_channels,
            "spatial-dims": args.spatial_dims, "target-spacing": args.target_spacing})
    except (ConfigError, WeightsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = check_datalist(args.datalist, plan=plan)
    if args.json:
        print(json.dumps(report_as_dict(report), indent=2))
    else:
        print_report(report)
    return 0 if report.ok else 1


def report_as_dict(report: CheckReport) -> dict[str, Any]:
    """The report as JSON-friendly data (for scripts and monitoring)."""
    return {"datalist": str(report.datalist), "ok": report.ok, "modalities": list(report.modalities),
            "problems": report.problems, "warnings": report.warnings,
            "cases": [dataclasses.asdict(case) for case in report.cases]}
