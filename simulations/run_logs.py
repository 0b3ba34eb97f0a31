"""Extra views of a finished run: TensorBoard scalars and overlays of example cases.

- ``tb/``: every number of ``metrics.jsonl`` as a TensorBoard scalar, tagged
  ``<metric>/<site>`` with the round as step (``tensorboard --logdir runs/<id>/tb``);
- ``plots/examples.png``: for one validation case per site, the axial slice with
  the most ground truth, the ground truth and the final global model's prediction
  outlined; below it (``uncertainty``) the model's uncertainty on that slice, as
  ``client predict --uncertainty`` computes it (normalised entropy over
  test-time flips, 0 sure to 1 all classes equal).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shared.atomic import atomic_write

EXAMPLE_SITES = 6


def write_tensorboard(run_dir: Path, rows: list[dict[str, Any]]) -> Path:
    """Write the run's metrics as TensorBoard scalars under ``run_dir/tb``."""
    from torch.utils.tensorboard import SummaryWriter

    log_dir = Path(run_dir) / "tb"
    with SummaryWriter(log_dir=str(log_dir)) as writer:
        for row in rows:
            for key, value in row.items():
                if key not in ("round", "site") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    writer.add_scalar(f"{key}/{row['site']}", value, global_step=int(row["round"]))
    return log_dir


def _first_case(datalist: Path, plan: Any) -> dict[str, Any] | None:
    """A site's first validation case, or None when it has none or its data cannot be read (a site whose
    data is broken refused the run; its problem is in metrics.jsonl, not a reason to fail the report)."""
    from client.data.site_data import load_validation_cases
    from shared.errors import FedSegError

    try:
        cases = load_validation_cases(datalist, plan)
    except FedSegError:
        return None
    return cases[0] if cases else None


def write_example_overlays(run_dir: Path, sites: list[tuple[str, Path]], *, uncertainty: bool = True) -> Path | None:
    """Plot one validation case per site (up to six) with ground truth and prediction outlined, and with
    ``uncertainty`` a second row: the uncertainty map of the same slice with the prediction outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from client.inference.whole_volume import class_indices, flip_probabilities, normalised_entropy
    from shared.model_file import load_model
    from shared.plan import read_plan_file

    run_dir = Path(run_dir)
    plan = read_plan_file(run_dir / "plan.json")
    model, _ = load_model(run_dir / "global_model.pt")
    shown = [(site, case) for site, datalist in sites if (case := _first_case(datalist, plan)) is not None]
    shown = shown[:EXAMPLE_SITES]
    if not shown:
        return None
    rows = 2 if uncertainty else 1
    figure, axes = plt.subplots(rows, len(shown), figsize=(3.2 * len(shown), 3.4 * rows), dpi=100, squeeze=False)
    with torch.no_grad():
        for column, (site, case) in enumerate(shown):
            probabilities = flip_probabilities(model.eval(), case["image"], spatial_dims=plan.spatial_dims,
                                               patch_size=plan.patch_size, flips=uncertainty)
            prediction = class_indices(probabilities).float()
            z = int(case["label"][0].flatten(0, 1).sum(0).argmax()) if case["label"].sum() else case["label"].shape[-1] // 2
            ax = axes[0][column]
            ax.imshow(case["image"][0, :, :, z].T.cpu(), cmap="gray", origin="lower")
            ax.contour(case["label"][0, :, :, z].T.cpu(), levels=[0.5], colors="lime", linewidths=1.0)
            ax.contour(prediction[:, :, z].T.cpu(), levels=[0.5], colors="red", linewidths=1.0)
            ax.set_title(site, fontsize=9)
            if uncertainty:
                _uncertainty_panel(axes[1][column], normalised_entropy(probabilities)[:, :, z], prediction[:, :, z])
    for ax in axes.flat:
        ax.axis("off")
    figure.suptitle("ground truth (green) vs final global model (red)", fontsize=10)
    figure.tight_layout()
    path = run_dir / "plots" / "examples.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda handle: figure.savefig(handle, format="png"))
    plt.close(figure)
    return path


def _uncertainty_panel(ax: Any, entropy: Any, prediction: Any) -> None:
    """The slice's normalised entropy (0 black to 1 bright) with the prediction outlined."""
    image = ax.imshow(entropy.T.cpu(), cmap="magma", vmin=0.0, vmax=1.0, origin="lower")
    ax.contour(prediction.T.cpu(), levels=[0.5], colors="cyan", linewidths=0.8)
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title("uncertainty: entropy over flips", fontsize=9)
