"""A site's data fingerprint: the aggregates the federated plan is derived from (nnU-Net style).

A fingerprint holds aggregates over a site's training cases only (counts,
percentiles, means); never a value of one case. It travels as one flat
``MetricRecord`` of scalar numbers, so the egress guard can allow exactly its
keys (:data:`FINGERPRINT_KEY_PATTERNS`) and the audit log records it like any
other reply.

Geometry is described in two frames:

- the RAS frame (``spacing-*``, ``extent-*``): each case reoriented to RAS, as
  a 3D model sees it;
- the sliced frame (``sliced-*``): each case turned so that its
  lowest-resolution axis comes last (:func:`slicing_axcodes`), as a 2D model
  slices it; axes 0 and 1 are then in-plane.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from shared.errors import ConfigError

#: Percentiles of spacing and extent a site reports over its cases.
GEOMETRY_PERCENTILES = (10, 50, 90)
#: Foreground intensity percentiles a site reports per channel (nnU-Net's CT clip uses 0.5 and 99.5).
INTENSITY_PERCENTILES = (0.5, 50.0, 99.5)
#: A case is sliced across its coarsest axis when that axis is this much coarser than the finest;
#: nearer isotropic cases keep the axial (S) axis as the slice axis.
ANISOTROPY_FOR_SLICING = 1.5
#: RAS axis codes by axis and the orientation that puts each axis last (in-plane axes keep RAS order).
RAS = "RAS"
_SLICED = {0: "ASR", 1: "RSA", 2: "RAS"}

FINGERPRINT_KEY_PATTERNS = tuple(re.compile(p) for p in (
    r"cases", r"channels", r"classes",
    r"(spacing|extent|sliced-spacing|sliced-extent)-p\d{1,2}-axis-[012]",
    r"thickest-axis-[012]-cases", r"isotropic-cases",
    r"intensity-(mean|std|p[0-9_]{1,5})-channel-\d{1,2}", r"foreground-voxels-channel-\d{1,2}",
    r"class-fraction-\d{1,3}", r"modality-ct-channel-\d{1,2}",
    r"dp-epsilon-left", r"dp-delta", r"dp-required",
))


def slicing_axis(spacing: Sequence[float]) -> int:
    """The axis a 2D model slices a case across: its coarsest, if clearly coarser; else axial (2)."""
    coarsest = max(range(3), key=lambda axis: (spacing[axis], axis == 2))
    return coarsest if spacing[coarsest] >= ANISOTROPY_FOR_SLICING * min(spacing) else 2


def slicing_axcodes(spacing: Sequence[float]) -> str:
    """Orientation codes (for MONAI ``Orientation``) that put the slicing axis of a RAS case last."""
    return _SLICED[slicing_axis(spacing)]


def percentile_key(value: float) -> str:
    """``0.5`` -> ``"p0_5"``, ``50`` -> ``"p50"``: a percentile as a metric-key fragment."""
    text = f"{value:g}".replace(".", "_")
    return f"p{text}"


@dataclass(frozen=True)
class ChannelIntensity:
    """Foreground intensity statistics of one input channel over a site's (sampled) foreground voxels."""

    voxels: int
    mean: float
    std: float
    percentiles: dict[float, float]


@dataclass(frozen=True)
class Fingerprint:
    """Aggregates over one site's training cases, plus the site's privacy budget (for DP advice).

    ``spacing`` / ``extent`` / ``sliced_spacing`` / ``sliced_extent`` map a
    percentile (10, 50, 90) to a per-axis triple (mm). ``thickest_axis_cases``
    counts cases by the axis they are sliced across (RAS axis 0, 1, 2);
    ``isotropic_cases`` those sliced axially for lack of a coarse axis.
    ``class_fractions[k]`` is the mean fraction of a case's voxels in class
    ``k`` (k >= 1). ``ct_channels`` says which input channels the datalist names CT.
    ``dp_epsilon_left`` is ``None`` when the site does not say (e.g. no DP).
    """

    cases: int
    channels: int
    classes: int
    spacing: dict[int, tuple[float, float, float]]
    extent: dict[int, tuple[float, float, float]]
    sliced_spacing: dict[int, tuple[float, float, float]]
    sliced_extent: dict[int, tuple[float, float, float]]
    thickest_axis_cases: tuple[int, int, int]
    isotropic_cases: int
    intensity: tuple[ChannelIntensity, ...]
    class_fractions: dict[int, float]
    ct_channels: tuple[bool, ...] = ()
    dp_epsilon_left: float | None = None
    dp_delta: float | None = None
    dp_required: bool = False

    def to_metrics(self) -> dict[str, float | int]:
        """The flat scalar record that leaves the site (keys match :data:`FINGERPRINT_KEY_PATTERNS`)."""
        out: dict[str, float | int] = {"cases": self.cases, "channels": self.channels, "classes": self.classes}
        for name, table in (("spacing", self.spacing), ("extent", self.extent),
                            ("sliced-spacing", self.sliced_spacing), ("sliced-extent", self.sliced_extent)):
            for pct, triple in table.items():
                out.update({f"{name}-p{pct}-axis-{axis}": float(v) for axis, v in enumerate(triple)})
        out.update({f"thickest-axis-{axis}-cases": n for axis, n in enumerate(self.thickest_axis_cases)})
        out["isotropic-cases"] = self.isotropic_cases
        for channel, stats in enumerate(self.intensity):
            out[f"foreground-voxels-channel-{channel}"] = stats.voxels
            out[f"intensity-mean-channel-{channel}"] = stats.mean
            out[f"intensity-std-channel-{channel}"] = stats.std
            out.update({f"intensity-{percentile_key(p)}-channel-{channel}": v for p, v in stats.percentiles.items()})
        out.update({f"class-fraction-{k}": v for k, v in self.class_fractions.items()})
        out.update({f"modality-ct-channel-{c}": int(ct) for c, ct in enumerate(self.ct_channels)})
        if self.dp_epsilon_left is not None:
            out["dp-epsilon-left"] = self.dp_epsilon_left
            out["dp-delta"] = float(self.dp_delta or 0.0)
        out["dp-required"] = int(self.dp_required)
        return out

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, float | int], *, source: str = "fingerprint") -> Fingerprint:
        """Parse a record made by :meth:`to_metrics`; raise :class:`ConfigError` naming ``source`` if malformed."""
        try:
            channels, classes = int(metrics["channels"]), int(metrics["classes"])

            def table(name: str) -> dict[int, tuple[float, float, float]]:
                return {p: tuple(float(metrics[f"{name}-p{p}-axis-{a}"]) for a in range(3))  # type: ignore[misc]
                        for p in GEOMETRY_PERCENTILES}

            intensity = tuple(ChannelIntensity(
                voxels=int(metrics[f"foreground-voxels-channel-{c}"]),
                mean=float(metrics[f"intensity-mean-channel-{c}"]), std=float(metrics[f"intensity-std-channel-{c}"]),
                percentiles={p: float(metrics[f"intensity-{percentile_key(p)}-channel-{c}"])
                             for p in INTENSITY_PERCENTILES}) for c in range(channels))
            return cls(
                cases=int(metrics["cases"]), channels=channels, classes=classes,
                spacing=table("spacing"), extent=table("extent"), sliced_spacing=table("sliced-spacing"),
                sliced_extent=table("sliced-extent"),
                thickest_axis_cases=tuple(int(metrics[f"thickest-axis-{a}-cases"]) for a in range(3)),  # type: ignore[arg-type]
                isotropic_cases=int(metrics["isotropic-cases"]), intensity=intensity,
                class_fractions={k: float(metrics[f"class-fraction-{k}"]) for k in range(1, classes)},
                ct_channels=tuple(bool(metrics.get(f"modality-ct-channel-{c}", 0)) for c in range(channels)),
                dp_epsilon_left=float(metrics["dp-epsilon-left"]) if "dp-epsilon-left" in metrics else None,
                dp_delta=float(metrics["dp-delta"]) if "dp-delta" in metrics else None,
                dp_required=bool(metrics.get("dp-required", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: not a complete fedseg fingerprint (missing or bad {exc})") from None


def fingerprint_key_allowed(key: str) -> bool:
    """True if ``key`` may appear in a fingerprint reply."""
    return any(pattern.fullmatch(key) for pattern in FINGERPRINT_KEY_PATTERNS)
