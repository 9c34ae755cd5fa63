"""Red-team tests of image datasets, through a real simulated federation (hub and nodes over
loopback HTTP): a labels file that points out of the image folder (a relative path climbing out,
an absolute path, a symlink), a DICOM file marked as having text burnt into its pixels, a
decompression bomb, a file of another kind named .png, and DICOM files whose identifying
attributes (PatientName, PatientID, dates ...) must reach neither the researcher nor the hub nor
the node's audit log. Each attack is refused with an error naming the file and the labels line,
and the node answers the next task as before.

The sites read pixels through `image_mean`, a test-only analysis registered here: the mean image
of a dataset (sums of pixels and of rows, under secure aggregation), compared with the mean
computed in the test from the files themselves.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pytest
from image_fixtures import PHI, write_dicom, write_digits_folder, write_png_declaring

import medveil as mv
from medveil.analyses import base
from medveil.analyses.base import Aggregated, Analysis, AnalysisError, Finished, Params, Release, SiteContext
from medveil.runtime.audit import read_audit_log
from medveil.runtime.grid import RefusedError

Image = pytest.importorskip("PIL.Image")
pytest.importorskip("pydicom")

pytestmark = pytest.mark.e2e
DATASETS = ("scans", "dicom", "burned", "bomb", "fake")
# A bad labels file is refused as data_error when the node loads the dataset; a bad image file when
# the analysis reads its pixels, which the node reports as analysis_error (a DataError is a ValueError).
PIXEL_RULES = {"data_error", "analysis_error"}


class ImageMeanParams(Params):
    column: str = "file"
    channels: Literal[1, 3] = 1
    size: int = 8


class ImageMean(Analysis[ImageMeanParams]):
    """Test-only: the pooled mean image of the files a dataset's labels list."""

    name = "image_mean"
    reads_images = True
    Params = ImageMeanParams

    def variables(self, params: ImageMeanParams) -> list[str]:
        return [params.column]

    def local(self, params: ImageMeanParams, round_no: int, broadcast: dict[str, Any],
              context: SiteContext) -> Release:
        if context.images is None:
            raise AnalysisError("image_mean reads an image dataset")
        rows = context.images.rows(context.data[params.column].tolist(), params.channels, params.size)
        pixels = rows.batch(np.arange(len(rows))).astype(np.float64)
        return Release(sums={"pixels": pixels.sum(axis=0), "rows": np.array([len(rows)], dtype=np.int64)})

    def global_step(self, params: ImageMeanParams, round_no: int, aggregated: Aggregated,
                    state: dict[str, Any]) -> Finished:
        return Finished(aggregated.sums["pixels"] / aggregated.sums["rows"][0])


def _dicom_pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4000, (8, 8)).astype(np.uint16)


def _dicom_folder(folder: Path, seeds: list[int], **attributes: Any) -> Path:
    folder.mkdir(parents=True)
    files = []
    for seed in seeds:
        write_dicom(folder / f"scan_{seed}.dcm", _dicom_pixels(seed), **attributes)
        files.append(f"scan_{seed}.dcm")
    pd.DataFrame({"file": files, "label": [seed % 2 for seed in seeds]}).to_csv(folder / "labels.csv", index=False)
    return folder


def _site(root: Path, site: str, digits, lo: int, hi: int, hostile: bool) -> dict[str, Path]:
    """A site's datasets; at the hostile site, burned/bomb/fake hold one attack file each."""
    scans = write_digits_folder(root / site / "scans", digits.images[lo:hi], digits.target[lo:hi],
                                extra_columns={"patient": [f"Patient^{i}.png" for i in range(lo, hi)]})
    seeds = list(range(lo, lo + 4))
    datasets = {"scans": scans, "dicom": _dicom_folder(root / site / "dicom", seeds)}
    for name in ("burned", "bomb", "fake"):
        datasets[name] = write_digits_folder(root / site / name, digits.images[lo:lo + 3], digits.target[lo:lo + 3])
    if hostile:
        write_dicom(datasets["burned"] / "img" / "00001.dcm", _dicom_pixels(99), BurnedInAnnotation="YES")
        write_png_declaring(datasets["bomb"] / "img" / "00001.png", 100_000, 100_000)
        (datasets["fake"] / "img" / "00001.png").write_bytes(b"%PDF-1.4\n" + PHI["PatientName"].encode() * 20)
        for name, suffix in (("burned", ".dcm"), ("bomb", ".png"), ("fake", ".png")):
            labels = pd.read_csv(datasets[name] / "labels.csv")
            labels.loc[1, "file"] = f"img/00001{suffix}"
            labels.to_csv(datasets[name] / "labels.csv", index=False)
    return datasets


@pytest.fixture(scope="module")
def digits():
    return pytest.importorskip("sklearn.datasets").load_digits()


@pytest.fixture(scope="module")
def world(tmp_path_factory, digits):
    root = tmp_path_factory.mktemp("images")
    sites = {"site_a": _site(root, "site_a", digits, 0, 40, hostile=False),
             "site_b": _site(root, "site_b", digits, 40, 70, hostile=True)}
    (root / "secret.png").write_bytes(b"the steward's own file, outside every image folder")
    base.register(ImageMean)
    try:
        with mv.Federation.simulate(sites, record_hub_traffic=True, timeout=120) as fed:
            yield fed, sites, root
    finally:
        base._REGISTRY.pop(ImageMean.name, None)


def _mean_image(folder: Path) -> tuple[np.ndarray, int]:
    """Sum of a digits folder's images as the sites must read them (uint8 / 255) and their count."""
    files = pd.read_csv(folder / "labels.csv")["file"]
    images = [np.asarray(Image.open(folder / f).convert("L"), dtype=np.float64) / 255 for f in files]
    return np.sum(images, axis=0), len(images)


def _serves(fed, sites) -> None:
    """The nodes answer an ordinary task with the pooled mean image of `scans`."""
    sums = [_mean_image(datasets["scans"]) for datasets in sites.values()]
    expected = sum(s for s, _ in sums) / sum(n for _, n in sums)
    result = fed.run("image_mean", data="scans").result
    np.testing.assert_allclose(result[0], expected, atol=1e-9)


def _rewrite_labels(path: Path, files: list[str]) -> None:
    """New labels with a later modification time (so the node's cache sees the change)."""
    stat = path.stat() if path.exists() else None
    pd.DataFrame({"file": files, "label": [i % 2 for i in range(len(files))]}).to_csv(path, index=False)
    if stat is not None:
        os.utime(path, ns=(stat.st_atime_ns, max(stat.st_mtime_ns, path.stat().st_mtime_ns) + 1_000_000_000))


def _refused(fed, dataset: str, rules: set[str], **params: Any) -> RefusedError:
    with pytest.raises(RefusedError) as error:
        fed.run("image_mean", data=dataset, **params)
    assert error.value.site == "site_b" and error.value.rule in rules, error.value
    return error.value


def _traversal(root: Path, folder: Path) -> str:
    return "../../secret.png"


def _absolute(root: Path, folder: Path) -> str:
    return str(root / "secret.png")


def _symlink(root: Path, folder: Path) -> str:
    link = folder / "img" / "link.png"
    if not link.is_symlink():
        link.symlink_to(root / "secret.png")
    return "img/link.png"


@pytest.mark.parametrize("attack,why", [(_traversal, "lies outside the image folder"),
                                        (_absolute, "is absolute"),
                                        (_symlink, "lies outside the image folder")])
def test_labels_pointing_out_of_the_folder_are_refused(world, attack, why):
    fed, sites, root = world
    folder = sites["site_b"]["scans"]
    labels = folder / "labels.csv"
    original = labels.read_bytes()
    files = pd.read_csv(labels)["file"].tolist()
    entry = attack(root, folder)
    try:
        _rewrite_labels(labels, files[:5] + [entry] + files[5:])
        error = _refused(fed, "scans", {"data_error"})
        assert why in error.detail and "line 7" in error.detail and str(labels) in error.detail
        assert "steward's own file" not in str(error)
    finally:
        labels.write_bytes(original)
        stat = labels.stat()
        os.utime(labels, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))
    _serves(fed, sites)


@pytest.mark.parametrize("dataset,why", [
    ("burned", "BurnedInAnnotation YES"),
    ("bomb", "more pixels than allowed"),
    ("fake", "not a PNG image"),
])
def test_hostile_image_files_are_refused_naming_dataset_and_line_not_file(world, dataset, why):
    """The refusal reaches the researcher: it names the labels line, never the file (a file name
    can identify a patient; the site logs it for the steward)."""
    fed, sites, _ = world
    error = _refused(fed, dataset, PIXEL_RULES)
    assert why in error.detail and "line 3" in error.detail and "00001" not in error.detail
    assert f"dataset {dataset!r}" in error.detail
    assert not any(value in str(error) for value in PHI.values())
    _serves(fed, sites)


@pytest.mark.parametrize("column", ["label", "patient"])
def test_a_column_other_than_the_file_column_reads_no_file(world, column):
    """The researcher names the column of files to read; only entries of the steward's checked file
    column are opened, so another approved column cannot steer the site's reads, and the refusal
    quotes none of that column's values (here names of patients)."""
    fed, sites, _ = world
    with pytest.raises(RefusedError) as error:
        fed.run("image_mean", data="scans", column=column)
    assert error.value.rule in PIXEL_RULES and "are not listed in file column 'file'" in error.value.detail
    assert "Patient^" not in str(error.value)
    _serves(fed, sites)


def test_dicom_identifiers_reach_nobody(world):
    """The DICOM files carry PHI (image_fixtures.PHI); the researcher's result, the hub's traffic,
    every refusal and every file the federation wrote (hub database, audit logs, node state,
    the researcher's run journal) are searched for it."""
    fed, sites, _ = world
    result = fed.run("image_mean", data="dicom").result
    images = []
    for datasets in sites.values():
        for file in pd.read_csv(datasets["dicom"] / "labels.csv")["file"]:
            seed = int(file.removeprefix("scan_").removesuffix(".dcm"))
            pixels = _dicom_pixels(seed).astype(np.float64)
            images.append((pixels - pixels.min()) / (pixels.max() - pixels.min()))
    np.testing.assert_allclose(result[0], np.mean(images, axis=0), atol=1e-9)
    refusal = _refused(fed, "burned", PIXEL_RULES)  # a PHI-carrying file refused: its message holds none
    traffic = fed.hub_traffic()
    assert len(traffic) > 0
    seen = [repr(result), str(refusal), repr(traffic.to_dict("records"))]
    for site in sites:
        seen.append(repr(read_audit_log(fed.network.workdir / site / "state" / "audit.jsonl")))
    stored = [path.read_bytes() for path in fed.network.workdir.rglob("*") if path.is_file()]
    assert stored and PHI["PatientName"].encode() in (sites["site_a"]["dicom"] / "scan_0.dcm").read_bytes()
    for value in PHI.values():
        assert not any(value in text for text in seen), value
        assert not any(value.encode() in data for data in stored), value


@pytest.mark.parametrize("ask", [lambda fed: fed.crosstab("file", data="scans"),
                                 lambda fed: fed.run("describe", data="scans", variables=["file"])])
def test_the_file_column_is_no_statistic(world, ask):
    """File names can identify a patient ("doe_jane_chest.png"): an analysis that does not read the
    images may not name the steward's file column, so its values never become levels or counts."""
    fed, sites, _ = world
    with pytest.raises(RefusedError) as error:
        ask(fed)
    assert error.value.rule == "image_file_column", error.value
    assert ".png" not in str(error.value)
    _serves(fed, sites)
