"""The U-Nets and DynUNets ``python -m benchmarks.dp_step`` measures (the networks of issue 20: :mod:`benchmarks.dp_networks`).
"""

from __future__ import annotations

from typing import Any

MODEL_NAMES = ("2D-harness", "2D-runconfig", "3D-harness")
# DynUNet as an nnU-Net plan sizes it for a CPU: 2D 5 levels up to 320 features on 128x128 patches
# in batches of 12 (nnU-Net's 2D reference batch), 3D 4 levels on 64^3 patches in batches of 2 (its 3D
# batch); plain blocks, LeakyReLU, deep supervision by nnU-Net's rule (levels - 3 heads: 2 in 2D, 1 in 3D).
DYNUNET_PLANS: dict[str, dict[str, Any]] = {
    "2D-dynunet": {"model": "dynunet", "num-res-units": -1, "channels": "32,64,128,256,320", "strides": "2,2,2,2", "patch-size": 128,
                   "batch-size": 12, "optimizer": "sgd", "learning-rate": 0.01},
    "3D-dynunet": {"model": "dynunet", "num-res-units": -1, "spatial-dims": 3, "channels": "32,64,128,256", "strides": "2,2,2",
                   "patch-size": 64, "batch-size": 2, "optimizer": "sgd", "learning-rate": 0.01},
}


# The U-Nets measured since issue 3, by their old names: the synthetic harness' recipe (now preset
# "small-unet") in 2D and 3D, and RunConfig's defaults before presets (U-Net 16-32-64-128, batch 4, Adam).
UNET_RUNS: dict[str, dict[str, Any]] = {
    "2D-harness": {"preset": "small-unet", "patch-size": 64},
    "2D-runconfig": {"model": "unet", "channels": "16,32,64,128", "strides": "2,2,2", "num-res-units": 1,
                     "patch-size": 64, "batch-size": 4, "optimizer": "adam", "learning-rate": 0.005},
    "3D-harness": {"preset": "small-unet", "spatial-dims": 3, "patch-size": 32, "batch-size": 2,
                   "optimizer": "adam", "learning-rate": 0.005},
}


SETUP_TEXT = """Models (run config): **2D-harness** = what `make run` trains with DP, the simulation harness'
2D recipe (now preset `small-unet`: U-Net 8-16-32, 64x64 patches, batches of 128
cases, SGD); **2D-runconfig** = `RunConfig` / pyproject defaults (U-Net 16-32-64-128, 64x64,
batch 4, Adam); **3D-harness** = the harness' 3D defaults (8-16-32, 32^3, batch 2, Adam). One torch
thread for every variant (as one simulated site). Variants: `non-DP`; `auto` = DP-SGD as shipped
(Opacus hooks + fedseg's convolution grad samplers + backward to the first trained layers only); `samplers-only`
= fedseg's samplers with a full backward; `functorch` = Opacus functorch mode (backward to the
first trained layers only); `stock` = Opacus as shipped (unfold Conv sampler, functorch for transposed
convolutions, full backward), the baseline. Medians over the repeats, all variants of a model
interleaved in one process; CPU = thread time (less sensitive to other jobs on the shared cores)."""
DYNUNET_SETUP_TEXT = """Models (run config, `benchmarks.dp_models.DYNUNET_PLANS`): MONAI DynUNet (`model = "dynunet"`:
nnU-Net's plain convolution blocks, affine instance norm, LeakyReLU, deep supervision by nnU-Net's
rule, `levels - 3` heads, trained through MONAI's `DeepSupervisionLoss`) at sizes an nnU-Net plan
gives on a CPU: **2D-dynunet** = 5 levels, filters 32-64-128-256-320, 128x128 patches, batches of 12
(nnU-Net's 2D reference batch), 2 deep-supervision heads, 5.7 M weights; **3D-dynunet** = 4 levels,
filters 32-64-128-256, 64^3 patches, batches of 2 (nnU-Net's 3D batch), 1 head, 5.6 M weights; SGD.
One torch thread for every variant. Variants as in the U-Net section: `non-DP`; `auto` = DP-SGD as
shipped (Opacus hooks + fedseg's convolution and instance-norm grad samplers + backward
to the first trained layers only); `samplers-only` = the same with a full backward; `stock` = Opacus as shipped
(unfold Conv sampler, functorch for the transposed convolutions, full backward). Medians over the
repeats, all variants of a model interleaved in one process; CPU = thread time."""
