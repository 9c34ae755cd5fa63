"""Image datasets: the labels table and its checked file column, PNG and DICOM read lazily to
float32 arrays in [0, 1] (compared with Pillow's and pydicom's own results computed here), and
simulated federations whose sites are image folders."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
from image_fixtures import PHI, write_dicom, write_digits_folder, write_png_declaring
from pydantic import ValidationError

from medveil.data import images as images_module
from medveil.data.images import MAX_IMAGE_PIXELS, ImageFolder
from medveil.data.sources import DataError, DatasetConfig, load_dataset

Image = pytest.importorskip("PIL.Image")
pydicom = pytest.importorskip("pydicom")


@pytest.fixture(scope="module")
def digits():
    datasets = pytest.importorskip("sklearn.datasets")
    return datasets.load_digits()


@pytest.fixture
def folder(tmp_path, digits):
    return write_digits_folder(tmp_path / "site", digits.images[:30], digits.target[:30],
                               extra_columns={"age": np.arange(30) + 40})


def _config(folder, **options) -> DatasetConfig:
    return DatasetConfig(kind="images", path=folder, **options)


def _write_labels(folder, files, name="labels.csv"):
    pd.DataFrame({"file": files, "label": np.arange(len(files)) % 2}).to_csv(folder / name, index=False)


# --- the dataset config and the labels table ---------------------------------------------------

def test_labels_table_is_the_dataset(folder):
    table = load_dataset("scans", _config(folder))
    pd.testing.assert_frame_equal(table, pd.read_csv(folder / "labels.csv", dtype={"file": str}))
    assert list(table.columns) == ["file", "label", "age"]


def test_config_rules(tmp_path):
    with pytest.raises(ValidationError, match="needs a path"):
        DatasetConfig(kind="images")
    with pytest.raises(ValidationError, match="only an images dataset has a labels file"):
        DatasetConfig(kind="csv", path=tmp_path / "a.csv", labels=tmp_path / "l.csv")
    assert _config(tmp_path).labels_path == tmp_path / "labels.csv"


def test_relative_folder_and_labels_resolve_against_the_config_directory(tmp_path, digits):
    folder = write_digits_folder(tmp_path / "data" / "scans", digits.images[:5], digits.target[:5])
    (tmp_path / "meta").mkdir()
    (folder / "labels.csv").rename(tmp_path / "meta" / "scan_labels.csv")
    config = DatasetConfig(kind="images", path="data/scans", labels="meta/scan_labels.csv").resolved(tmp_path)
    assert config.path == tmp_path / "data" / "scans"
    assert config.labels_path == tmp_path / "meta" / "scan_labels.csv"
    assert len(load_dataset("scans", config)) == 5


def test_custom_file_column(tmp_path, digits):
    folder = write_digits_folder(tmp_path / "s", digits.images[:4], digits.target[:4])
    pd.read_csv(folder / "labels.csv").rename(columns={"file": "path"}).to_csv(folder / "labels.csv", index=False)
    with pytest.raises(DataError, match="no file column 'file'"):
        load_dataset("scans", _config(folder))
    assert ImageFolder.from_config("scans", _config(folder, file_column="path")).file_column == "path"


def test_fingerprint_changes_when_the_labels_file_changes(folder):
    config = _config(folder)
    before = config.fingerprint()
    assert config.fingerprint() == before
    labels = folder / "labels.csv"
    stat = labels.stat()
    labels.write_text(labels.read_text().replace(",0,", ",1,", 1))
    os.utime(labels, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert config.fingerprint() != before


def test_missing_folder_and_labels_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="image folder .* does not exist"):
        load_dataset("scans", _config(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="does not exist") as error:
        load_dataset("scans", _config(tmp_path / "empty"))
    assert str(tmp_path / "empty" / "labels.csv") in str(error.value)


BAD_ENTRIES = {  # entry -> what the error says
    "../secret.png": "outside the image folder",
    "img/../../secret.png": "outside the image folder",
    "/etc/passwd.png": "absolute",
    "C:\\scans\\a.png": "absolute",
    "img/00000.jpg": "not a .png, .dcm or .dicom file",
    "notes.txt": "not a .png, .dcm or .dicom file",
    "img/absent.png": "does not exist",
    "img": "not a .png",
    "dir.png": "not a regular file",
}


@pytest.mark.parametrize("entry", sorted(BAD_ENTRIES))
@pytest.mark.parametrize("row", [0, 6])
def test_each_bad_file_entry_is_refused_with_dataset_file_and_line(folder, entry, row):
    (folder.parent / "secret.png").write_bytes(b"not for the study")
    (folder / "dir.png").mkdir()
    (folder / "img" / "00000.jpg").write_bytes(b"x")
    files = [f"img/{i:05d}.png" for i in range(10)]
    files[row] = entry
    _write_labels(folder, files)
    with pytest.raises(DataError) as error:
        load_dataset("scans", _config(folder))
    message = str(error.value)
    assert BAD_ENTRIES[entry] in message
    assert "'scans'" in message and str(folder / "labels.csv") in message and f"line {row + 2}" in message
    assert "not for the study" not in message


def test_symlink_out_of_the_folder_is_refused_and_one_inside_is_read(folder):
    outside = folder.parent / "outside.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(outside)
    (folder / "link_out.png").symlink_to(outside)
    (folder / "link_in.png").symlink_to(folder / "img" / "00003.png")
    _write_labels(folder, ["img/00003.png", "link_in.png"])
    images = ImageFolder.from_config("scans", _config(folder))
    np.testing.assert_array_equal(images.rows(["link_in.png"], 1, 8).batch(np.array([0])),
                                  images.rows(["img/00003.png"], 1, 8).batch(np.array([0])))
    _write_labels(folder, ["img/00001.png", "link_out.png"])
    with pytest.raises(DataError, match="line 3: the file lies outside the image folder") as error:
        ImageFolder.from_config("scans", _config(folder))
    assert "link_out.png" not in str(error.value)  # errors leave the site: the entry is logged there instead


def test_a_link_swapped_in_after_loading_is_refused_when_read(folder):
    images = ImageFolder.from_config("scans", _config(folder))
    rows = images.rows(["img/00002.png"], 1, 8)
    outside = folder.parent / "outside.png"
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(outside)
    (folder / "img" / "00002.png").unlink()
    (folder / "img" / "00002.png").symlink_to(outside)
    with pytest.raises(DataError, match="line 4.*lies outside the image folder"):
        rows.batch(np.array([0]))


def test_nul_and_empty_entries(folder):
    (folder / "labels.csv").write_text("file,label\nimg/00000.png,1\n,0\n")
    with pytest.raises(DataError, match="line 3: the file name is empty"):
        load_dataset("scans", _config(folder))
    (folder / "labels.csv").write_text("file,label\nimg/00000.png,1\n\"img/0\x00.png\",0\n")
    with pytest.raises(DataError, match="labels.csv, line 3: holds a NUL character"):
        load_dataset("scans", _config(folder))


def test_line_numbers_count_blank_lines_and_quoted_newlines(folder):
    (folder / "labels.csv").write_text('file,label,note\nimg/00000.png,1,"two\nlines"\n\nimg/00001.png,0,x\n'
                                       '../x.png,1,y\n')
    with pytest.raises(DataError, match="line 6: the file lies outside"):
        load_dataset("scans", _config(folder))


def test_extensions_are_case_insensitive(folder):
    for name in ("A.PNG", "b.Png"):
        Image.fromarray(np.eye(8, dtype=np.uint8) * 255).save(folder / name, format="PNG")
    for name in ("c.DCM", "d.Dicom"):
        write_dicom(folder / name, np.eye(8, dtype=np.uint16) * 1000)
    _write_labels(folder, ["A.PNG", "b.Png", "c.DCM", "d.Dicom"])
    images = ImageFolder.from_config("scans", _config(folder))
    batch = images.rows(images.table["file"], 1, 8).batch(np.arange(4))
    for image in batch:
        np.testing.assert_allclose(image[0], np.eye(8), atol=1e-7)


# --- PNG ---------------------------------------------------------------------------------------

def test_digits_read_back_exactly_at_their_own_size(folder, digits):
    images = ImageFolder.from_config("scans", _config(folder))
    rows = images.rows(images.table["file"].tolist(), channels=1, size=8)
    assert len(rows) == 30
    batch = rows.batch(np.array([4, 0, 29]))
    assert batch.dtype == np.float32 and batch.shape == (3, 1, 8, 8)
    expected = np.rint(digits.images[[4, 0, 29]] / 16 * 255) / 255
    np.testing.assert_allclose(batch[:, 0], expected, atol=1e-7)


def test_resize_and_channels_match_pillow(tmp_path):
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, (37, 23, 3), dtype=np.uint8)
    folder = tmp_path / "rgb"
    folder.mkdir()
    Image.fromarray(rgb).save(folder / "a.png")
    _write_labels(folder, ["a.png"])
    images = ImageFolder.from_config("scans", _config(folder))
    grey = images.rows(["a.png"], 1, 16).batch(np.array([0]))[0, 0]
    reference = Image.fromarray(np.asarray(Image.fromarray(rgb).convert("L"), np.float32) / 255)
    expected = np.clip(np.asarray(reference.resize((16, 16), Image.Resampling.LANCZOS)), 0, 1)
    np.testing.assert_allclose(grey, expected, atol=1e-6)
    colour = images.rows(["a.png"], 3, 23).batch(np.array([0]))[0]
    for k in range(3):
        plane = Image.fromarray(rgb[..., k].astype(np.float32) / 255)
        np.testing.assert_allclose(colour[k], np.clip(np.asarray(plane.resize((23, 23), Image.Resampling.LANCZOS)),
                                                      0, 1), atol=1e-6)
    assert 0.0 <= colour.min() and colour.max() <= 1.0


def test_grey_to_three_channels_and_sixteen_bit(tmp_path):
    folder = tmp_path / "g"
    folder.mkdir()
    deep = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    Image.fromarray(deep).save(folder / "deep.png")
    assert Image.open(folder / "deep.png").mode.startswith("I")
    _write_labels(folder, ["deep.png"])
    batch = ImageFolder.from_config("scans", _config(folder)).rows(["deep.png"], 3, 8).batch(np.array([0]))
    for k in range(3):
        np.testing.assert_allclose(batch[0, k], deep / 65535, atol=1e-7)


def test_a_non_png_file_named_png_is_a_data_error(folder):
    (folder / "fake.png").write_bytes(b"%PDF-1.4 confidential report of patient X")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "jpeg.png", format="JPEG")
    (folder / "cut.png").write_bytes((folder / "img" / "00001.png").read_bytes()[:60])
    _write_labels(folder, ["img/00000.png", "fake.png", "jpeg.png", "cut.png"])
    images = ImageFolder.from_config("scans", _config(folder))
    rows = images.rows(images.table["file"], 1, 8)
    for index, (entry, why) in enumerate([("fake.png", "not a PNG"), ("jpeg.png", "not a PNG"),
                                          ("cut.png", "cannot be decoded")], start=1):
        with pytest.raises(DataError) as error:
            rows.batch(np.array([index]))
        message = str(error.value)
        assert why in message and entry not in message and f"line {index + 2}" in message
        assert "'scans'" in message and "confidential" not in message


@pytest.mark.parametrize("width,height", [(100_000, 100_000), (8000, 8000)])
def test_decompression_bomb_is_refused_before_decoding(folder, width, height):
    write_png_declaring(folder / "bomb.png", width, height)
    assert (folder / "bomb.png").stat().st_size < 10_000 and width * height > MAX_IMAGE_PIXELS
    _write_labels(folder, ["img/00000.png", "bomb.png"])
    rows = ImageFolder.from_config("scans", _config(folder)).rows(["bomb.png"], 1, 8)
    with pytest.raises(DataError, match="line 3.*more pixels than|line 3.*declares 8000 x 8000 pixels"):
        rows.batch(np.array([0]))


# --- DICOM -------------------------------------------------------------------------------------

def _dicom_folder(tmp_path, pixels, **attributes):
    folder = tmp_path / "dicom"
    write_dicom(folder / "a.dcm", pixels, **attributes)
    _write_labels(folder, ["a.dcm"])
    return ImageFolder.from_config("scans", _config(folder))


def _scaled(values):
    values = values.astype(np.float64)
    return (values - values.min()) / (values.max() - values.min())


def test_dicom_pixels_min_max_scaled(tmp_path):
    pixels = np.random.default_rng(2).integers(100, 3000, (12, 10)).astype(np.uint16)
    image = _dicom_folder(tmp_path, pixels).rows(["a.dcm"], 1, 12).batch(np.array([0]))[0, 0]
    reference = Image.fromarray(_scaled(pixels).astype(np.float32)).resize((12, 12), Image.Resampling.LANCZOS)
    np.testing.assert_allclose(image, np.clip(np.asarray(reference), 0, 1), atol=1e-6)


def test_dicom_modality_rescale_and_monochrome1(tmp_path):
    pixels = np.arange(64, dtype=np.uint16).reshape(8, 8) * 10
    flipped = _dicom_folder(tmp_path, pixels, RescaleSlope=-2, RescaleIntercept=-1024).rows(["a.dcm"], 1, 8)
    np.testing.assert_allclose(flipped.batch(np.array([0]))[0, 0], _scaled(-2.0 * pixels - 1024), atol=1e-7)
    inverted = _dicom_folder(tmp_path, pixels, PhotometricInterpretation="MONOCHROME1").rows(["a.dcm"], 1, 8)
    np.testing.assert_allclose(inverted.batch(np.array([0]))[0, 0], 1 - _scaled(pixels), atol=1e-7)


def test_dicom_header_is_parsed_for_pixel_attributes_only(tmp_path, monkeypatch):
    """The site never reads PatientName, PatientID, dates or any other identifying attribute
    into memory: pydicom parses the image pixel module's tags only."""
    parsed = []
    original = pydicom.dcmread

    def spy(*args, **kwargs):
        dataset = original(*args, **kwargs)
        parsed.append(dataset)
        return dataset

    monkeypatch.setattr(pydicom, "dcmread", spy)
    folder = _dicom_folder(tmp_path, np.arange(64, dtype=np.uint16).reshape(8, 8), BurnedInAnnotation="NO")
    folder.rows(["a.dcm"], 1, 8).batch(np.array([0]))
    assert parsed and original(tmp_path / "dicom" / "a.dcm").PatientName == PHI["PatientName"]
    for dataset in parsed:
        keywords = {element.keyword for element in dataset}
        assert keywords <= set(images_module._DICOM_TAGS) | {"SpecificCharacterSet"}, keywords
        assert not set(PHI) & keywords
        assert "BurnedInAnnotation" in keywords


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # a sloppy writer's lower case, refused all the same
@pytest.mark.parametrize("value", ["YES", "yes"])
def test_dicom_with_burned_in_annotation_is_refused(tmp_path, value, caplog):
    rows = _dicom_folder(tmp_path, np.ones((8, 8), np.uint16), BurnedInAnnotation=value).rows(["a.dcm"], 1, 8)
    with caplog.at_level("WARNING", logger="medveil.data.images"), \
            pytest.raises(DataError, match="line 2.*BurnedInAnnotation YES") as error:
        rows.batch(np.array([0]))
    assert "a.dcm" not in str(error.value)  # the file name is logged at the site, never in the error
    assert [r.levelname for r in caplog.records if "'a.dcm'" in r.getMessage() and "BurnedInAnnotation" in
            r.getMessage()] == ["WARNING"]


def test_multi_frame_and_palette_dicom_are_refused(tmp_path):
    frames = np.zeros((3, 8, 8), np.uint16)
    folder = tmp_path / "dicom"
    path = write_dicom(folder / "a.dcm", frames[0], NumberOfFrames=3)
    dataset = pydicom.dcmread(path)
    dataset.PixelData = frames.tobytes()
    dataset.save_as(path)
    _write_labels(folder, ["a.dcm"])
    with pytest.raises(DataError, match="holds 3 frames"):
        ImageFolder.from_config("scans", _config(folder)).rows(["a.dcm"], 1, 8).batch(np.array([0]))
    rows = _dicom_folder(tmp_path, np.ones((8, 8), np.uint8), PhotometricInterpretation="PALETTE COLOR").rows(
        ["a.dcm"], 1, 8)
    with pytest.raises(DataError, match="'PALETTE COLOR' is not supported"):
        rows.batch(np.array([0]))


def test_non_dicom_and_oversized_dicom(tmp_path):
    folder = tmp_path / "dicom"
    folder.mkdir()
    (folder / "a.dcm").write_bytes(b"\x00" * 300 + b"Doe^Jane")
    _write_labels(folder, ["a.dcm"])
    with pytest.raises(DataError, match="not a DICOM file") as error:
        ImageFolder.from_config("scans", _config(folder)).rows(["a.dcm"], 1, 8).batch(np.array([0]))
    assert "Doe" not in str(error.value)
    rows = _dicom_folder(tmp_path, np.ones((8, 8), np.uint16), Rows=20000, Columns=20000).rows(["a.dcm"], 1, 8)
    with pytest.raises(DataError, match="declares 400000000 samples"):
        rows.batch(np.array([0]))


def test_truncated_dicom_pixels_name_the_kind_of_failure_only(tmp_path):
    path = write_dicom(tmp_path / "dicom" / "a.dcm", np.ones((8, 8), np.uint16))
    dataset = pydicom.dcmread(path)
    dataset.PixelData = dataset.PixelData[:10]
    dataset.save_as(path)
    _write_labels(tmp_path / "dicom", ["a.dcm"])
    rows = ImageFolder.from_config("scans", _config(tmp_path / "dicom")).rows(["a.dcm"], 1, 8)
    with pytest.raises(DataError, match="pixel data cannot be decoded .*Explicit VR Little Endian") as error:
        rows.batch(np.array([0]))
    assert not any(value in str(error.value) for value in PHI.values())


# --- lazy rows ---------------------------------------------------------------------------------

def test_rows_refuse_unlisted_files_and_bad_shapes(folder):
    images = ImageFolder.from_config("scans", _config(folder))
    with pytest.raises(DataError, match="1 of the 2 files asked for are not listed in file column 'file'") as error:
        images.rows(["img/00000.png", "../labels.csv"], 1, 8)
    assert "../labels.csv" not in str(error.value)
    with pytest.raises(DataError, match="not listed"):
        images.read("img/absent.png", 1, 8)
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        images.rows(["img/00000.png"], 2, 8)
    with pytest.raises(ValueError, match="size must be"):
        images.rows(["img/00000.png"], 1, 0)
    rows = images.rows(["img/00000.png"], 1, 8)
    with pytest.raises(IndexError):
        rows.batch(np.array([1]))
    with pytest.raises(ValueError, match="integers"):
        rows.batch(np.array([0.5]))
    assert rows.batch(np.array([], dtype=np.int64)).shape == (0, 1, 8, 8)


def test_images_are_decoded_on_demand_kept_and_decoded_again_when_changed(folder, monkeypatch):
    images = ImageFolder.from_config("scans", _config(folder))
    decoded = []
    original = images_module._read_png

    def counting(path, channels, where):
        decoded.append(path.name)
        return original(path, channels, where)

    monkeypatch.setattr(images_module, "_read_png", counting)
    rows = images.rows(images.table["file"], 1, 8)
    assert decoded == []
    first = rows.batch(np.array([3, 5]))
    again = images.rows(images.table["file"], 1, 8).batch(np.array([5, 3, 7]))  # a later round's rows
    assert decoded == ["00003.png", "00005.png", "00007.png"]
    np.testing.assert_array_equal(again[:2], first[::-1])
    images.rows(images.table["file"], 3, 8).batch(np.array([3]))  # another shape is decoded anew
    assert decoded[-1] == "00003.png" and len(decoded) == 4
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(folder / "img" / "00003.png")
    stat = (folder / "img" / "00003.png").stat()
    os.utime(folder / "img" / "00003.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    np.testing.assert_array_equal(rows.batch(np.array([3])), np.ones((1, 1, 8, 8), np.float32))
    assert len(decoded) == 5


def test_the_cache_stays_within_its_bound(folder, monkeypatch):
    monkeypatch.setattr(images_module, "CACHE_BYTES", 3 * 8 * 8 * 4)
    images = ImageFolder.from_config("scans", _config(folder))
    images.rows(images.table["file"], 1, 8).batch(np.arange(30))
    assert len(images._cache.images) == 3 and images._cache.used == 3 * 8 * 8 * 4


# --- simulated federations over image folders ----------------------------------------------------

@pytest.fixture
def image_sites(tmp_path, digits):
    cuts = [0, 60, 100, 150]
    return {f"site_{chr(97 + i)}": write_digits_folder(tmp_path / f"s{i}", digits.images[cuts[i]:cuts[i + 1]],
                                                      digits.target[cuts[i]:cuts[i + 1]])
            for i in range(3)}


@pytest.mark.parametrize("kind", ["in_process", "simulate"])
def test_federation_over_image_folders_describes_the_labels(image_sites, digits, monkeypatch, kind):
    import medveil as mv
    from medveil.analyses.base import get_analysis

    describe = type(get_analysis("describe"))
    contexts = []
    original = describe.local

    def spy(self, params, round_no, broadcast, context):
        contexts.append(context)
        return original(self, params, round_no, broadcast, context)

    monkeypatch.setattr(describe, "local", spy)
    with getattr(mv.Federation, kind)(image_sites, timeout=120) as fed:
        assert fed.study.datasets == {"default": ["file", "label"]}
        result = fed.describe("label")
        config = fed.network.nodes["site_a"].config if kind == "in_process" else None
    assert result.loc["label", "n"] == 150
    np.testing.assert_allclose(result.loc["label", "mean"], digits.target[:150].mean(), rtol=1e-12)
    assert {c.site for c in contexts} == set(image_sites)
    for context in contexts:
        assert isinstance(context.images, ImageFolder)
        assert context.images.folder == image_sites[context.site].resolve()
        pd.testing.assert_frame_equal(context.data, context.images.table)
    if config is not None:
        assert config.datasets["default"].kind == "images"


def test_node_processes_read_image_folders_from_their_site_config(image_sites, digits):
    """In node processes the folder travels through site.yaml (kind images) and back."""
    import medveil as mv
    from medveil.runtime.config import load_site_config

    with mv.Federation.simulate(image_sites, processes=True, timeout=120) as fed:
        config = load_site_config(fed.network.workdir / "site_b" / "site.yaml").datasets["default"]
        result = fed.describe("label")
    assert config.kind == "images" and config.path == image_sites["site_b"].resolve()
    assert config.labels_path == image_sites["site_b"].resolve() / "labels.csv"
    assert result.loc["label", "n"] == 150
    np.testing.assert_allclose(result.loc["label", "mean"], digits.target[:150].mean(), rtol=1e-12)
