"""Image datasets at a site: a folder of PNG or DICOM files with a labels CSV, read lazily.

The labels CSV is the dataset's table (what `load_dataset` returns and what the study approves:
its columns are the variables); its `file_column` names one image file per row, relative to the
folder. Every entry is checked when the labels load (a labels file holding a NUL byte is refused
whole): a string, relative, with an extension .png, .dcm or .dicom (any case), naming an existing
file inside the folder also after following symlinks (checked again when the file is opened). Pixels are read on demand, one batch
at a time (`ImageFolder.rows(...).batch(indices)`), as float32 arrays in [0, 1] of shape
(n, channels, size, size):

- PNG through Pillow (PNG decoder only: a file of another format named .png is refused), at most
  MAX_IMAGE_PIXELS declared pixels (checked before decoding, and Pillow's own decompression-bomb
  guard turned into an error); 8-bit values / 255, 16-bit / 65535; grey or RGB as `channels` asks
  (RGB to grey by ITU-R 601 luma, grey to RGB by repetition), then stretched to size x size with
  a Lanczos filter (antialiased when shrinking) and clipped to [0, 1].
- DICOM through pydicom: the header is parsed for the image pixel module only (`_DICOM_TAGS`,
  pydicom's `specific_tags`; PatientName, PatientID, dates, institution and every other attribute
  are skipped unparsed), a file whose BurnedInAnnotation is "YES" (text burnt into the pixels,
  often the patient's name) is refused, as is a multi-frame file (one image per labels row: a
  volume's frames are not silently cut to one) and a palette-colour one; then the first and only
  frame's pixel data is decoded, its modality LUT or rescale applied, MONOCHROME1 inverted (so
  that bright is dense in every image) and min-max scaled to [0, 1] per image.

What leaves this module is the labels table and pixel arrays, nothing of a DICOM header and no
file's contents: an error names the dataset, the labels file and the labels line, and says what
is wrong in its own words, never a decoder's message (which could quote the file), and never the
labels entry itself: a file name can identify a patient and errors reach the researcher (the
node refuses with them). The entry is logged at the site instead (this module's logger, at
warning level), for the steward. The site's analyses decide what of the pixels is released (a model's
weights under secure aggregation, for federated learning); BurnedInAnnotation can only be checked
where a file sets it: a site steward who has images with burnt-in text not so marked must clean
them before registering the folder.
"""

from __future__ import annotations

import csv
import logging
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePath

import numpy as np
import pandas as pd

from medveil.data.sources import DataError, DatasetConfig, read_csv

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".png": "png", ".dcm": "dicom", ".dicom": "dicom"}
MAX_IMAGE_PIXELS = 40_000_000  # declared width x height (x samples for DICOM) of one image; a 6000 x 6000 radiograph fits
MAX_IMAGE_SIZE = 1024  # largest output side length a batch may ask for
CACHE_BYTES = 256 * 1024 * 1024  # decoded images kept per ImageFolder (every epoch and round reads them again)
_DICOM_TAGS = [  # the only DICOM attributes parsed: the image pixel module, the modality LUT, burnt-in text
    "BurnedInAnnotation", "NumberOfFrames", "Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation",
    "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "PlanarConfiguration",
    "RescaleSlope", "RescaleIntercept", "RescaleType", "ModalityLUTSequence",
]


def load_labels(name: str, config: DatasetConfig) -> pd.DataFrame:
    """An image dataset's labels table, every entry of its file column checked (`ImageFolder`)."""
    return ImageFolder.from_config(name, config).table


@dataclass(frozen=True, eq=False)
class ImageFolder:
    """A site's image dataset: its folder (resolved), labels table and file column; the labels
    line each listed file is on (for error messages), and the images decoded so far."""

    name: str
    folder: Path
    table: pd.DataFrame
    file_column: str
    labels_file: Path
    _lines: dict[str, str] = field(repr=False)
    _cache: _PixelCache = field(default_factory=lambda: _PixelCache(CACHE_BYTES), repr=False)

    @classmethod
    def from_config(cls, name: str, config: DatasetConfig) -> ImageFolder:
        """Read the labels of an "images" dataset and check every file it lists (DataError)."""
        if config.kind != "images" or config.path is None:
            raise DataError(f"dataset {name!r} is not an image folder")
        if not config.path.is_dir():
            raise DataError(f"dataset {name!r}: image folder {config.path} does not exist")
        folder = config.path.resolve()
        labels_file = config.labels_path
        column = config.file_column
        _refuse_nul(name, labels_file)
        table = read_csv(name, labels_file, dtype={column: str})
        if column not in table.columns:
            raise DataError(f"dataset {name!r}: labels file {labels_file} has no file column {column!r}")
        lines = _record_lines(labels_file, len(table))
        first_line: dict[str, str] = {}
        for entry, line in zip(table[column].tolist(), lines, strict=True):
            where = f"dataset {name!r}: labels file {labels_file}, {line}"
            with _logged(entry):
                _checked_path(folder, entry, where)
            first_line.setdefault(entry, line)
        return cls(name, folder, table, column, labels_file, first_line)

    def rows(self, files: Sequence[str], channels: int, size: int) -> ImageRows:
        """The images of `files` (entries of the file column, in the order wanted) as lazy rows of
        `channels` (1 or 3) x `size` x `size`; a file the labels do not list is a DataError, which
        does not quote it (`files` may come from a column the researcher named)."""
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, not {channels!r}")
        if not isinstance(size, int | np.integer) or not 1 <= size <= MAX_IMAGE_SIZE:
            raise ValueError(f"size must be an integer from 1 to {MAX_IMAGE_SIZE}, not {size!r}")
        files = list(files)
        unknown = sum(1 for f in files if not isinstance(f, str) or f not in self._lines)
        if unknown:
            raise DataError(f"dataset {self.name!r}: {unknown} of the {len(files)} files asked for are not listed "
                            f"in file column {self.file_column!r} of labels file {self.labels_file}")
        return ImageRows(self, tuple(files), channels, int(size))

    def read(self, entry: str, channels: int, size: int) -> np.ndarray:
        """One listed image as float32 (channels, size, size) in [0, 1] (DataError naming file and
        line); decoded again only when the file changed since (its inode, size or mtime)."""
        line = self._lines.get(entry) if isinstance(entry, str) else None
        if line is None:
            raise DataError(f"dataset {self.name!r}: a file asked for is not listed in file column "
                            f"{self.file_column!r} of labels file {self.labels_file}")
        where = f"dataset {self.name!r}: labels file {self.labels_file}, {line}"
        with _logged(entry):
            path = _checked_path(self.folder, entry, where)  # again: the folder may have changed since
            stat = path.stat()
            key = (entry, channels, size, stat.st_ino, stat.st_size, stat.st_mtime_ns)
            image = self._cache.get(key)
            if image is None:
                if IMAGE_EXTENSIONS[path.suffix.lower()] == "png":
                    planes = _read_png(path, channels, where)
                else:
                    planes = _read_dicom(path, channels, where)
                image = np.stack([_resized(plane, size) for plane in planes]).astype(np.float32, copy=False)
                image.flags.writeable = False
                self._cache.put(key, image)
        return image


class _PixelCache:
    """Decoded images by file version and shape, least recently used dropped past `limit` bytes."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self.images: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: tuple) -> np.ndarray | None:
        with self.lock:
            image = self.images.get(key)
            if image is not None:
                self.images.move_to_end(key)
            return image

    def put(self, key: tuple, image: np.ndarray) -> None:
        with self.lock:
            if image.nbytes > self.limit or key in self.images:
                return
            self.images[key] = image
            self.used += image.nbytes
            while self.used > self.limit:
                _, dropped = self.images.popitem(last=False)
                self.used -= dropped.nbytes


@dataclass
class ImageRows:
    """Lazy rows of an image folder (models.training's LazyRows): `batch(indices)` reads those
    images (float32, (n, channels, size, size), values in [0, 1]), through the folder's cache."""

    folder: ImageFolder
    files: tuple[str, ...]
    channels: int
    size: int

    def __len__(self) -> int:
        return len(self.files)

    def batch(self, indices: np.ndarray) -> np.ndarray:
        """The images at `indices` (positions in `files`), decoded now unless the folder kept them."""
        indices = np.asarray(indices)
        if indices.ndim != 1 or (indices.size and indices.dtype.kind not in "iu"):
            raise ValueError("indices must be a one-dimensional array of integers")
        if indices.size and (indices.min() < 0 or indices.max() >= len(self.files)):
            raise IndexError(f"indices must lie in [0, {len(self.files)})")
        out = np.empty((indices.size, self.channels, self.size, self.size), dtype=np.float32)
        for slot, index in enumerate(indices.tolist()):
            out[slot] = self.folder.read(self.files[index], self.channels, self.size)
        return out


def _record_lines(labels_file: Path, rows: int) -> list[str]:
    """The CSV line each data row starts on ("line N", the header being line 1), as pandas reads
    it (blank lines skipped, quoted fields may span lines); "data row N" where the two disagree."""
    starts: list[int] = []
    try:
        with labels_file.open(newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            end = 0
            for record in reader:
                if record and any(value.strip() for value in record):
                    starts.append(end + 1)
                end = reader.line_num
    except (OSError, UnicodeDecodeError, csv.Error):
        starts = []
    if len(starts) == rows + 1:
        return [f"line {start}" for start in starts[1:]]
    return [f"data row {i + 1}" for i in range(rows)]


def _refuse_nul(name: str, labels_file: Path) -> None:
    """A labels file with a NUL byte is refused: pandas' parser silently cuts a field at one, so the
    name checked would not be the name the file holds."""
    try:
        raw = labels_file.read_bytes()
    except OSError:
        return  # read_csv names the missing file
    at = raw.find(b"\x00")
    if at >= 0:
        line = raw.count(b"\n", 0, at) + 1
        raise DataError(f"dataset {name!r}: labels file {labels_file}, line {line}: holds a NUL character")


def _shown(entry: object) -> str:
    """A labels entry as the site's log shows it: quoted, at most 80 characters."""
    text = repr(entry)
    return text if len(text) <= 80 else text[:77] + "..."


@contextmanager
def _logged(entry: object) -> Iterator[None]:
    """Log a DataError's labels entry at the site (warning), since the error itself, which may
    leave the site, does not name it."""
    try:
        yield
    except DataError as exc:
        logger.warning("%s [labels entry %s]", exc, _shown(entry))
        raise


def _checked_path(folder: Path, entry: object, where: str) -> Path:
    """The file a labels entry names, after the rules of the module docstring (DataError)."""
    if not isinstance(entry, str) or not entry.strip():
        raise DataError(f"{where}: the file name is empty")
    if PurePath(entry).is_absolute() or entry.startswith(("/", "\\")) or (len(entry) > 1 and entry[1] == ":"):
        raise DataError(f"{where}: the file name is absolute; it must be relative to the folder")
    suffix = PurePath(entry).suffix.lower()
    if suffix not in IMAGE_EXTENSIONS:
        raise DataError(f"{where}: the file is not a .png, .dcm or .dicom file")
    try:
        path = (folder / entry).resolve()
    except (OSError, RuntimeError):  # a symlink loop
        raise DataError(f"{where}: the file cannot be resolved (a symlink loop?)") from None
    if not path.is_relative_to(folder):
        raise DataError(f"{where}: the file lies outside the image folder")
    if not path.exists():
        raise DataError(f"{where}: the file does not exist in the folder")
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise DataError(f"{where}: the file links to a file that is not .png, .dcm or .dicom")
    if not path.is_file():
        raise DataError(f"{where}: the file is not a regular file")
    return path


def _read_png(path: Path, channels: int, where: str) -> list[np.ndarray]:
    """A PNG's planes (1 or 3 float arrays in [0, 1]), its declared size checked before decoding."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise DataError(f"{where}: reading PNG images needs Pillow (pip install 'medveil[ml]')") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=("PNG",)) as image:
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise DataError(f"{where}: the image declares {width} x {height} pixels, more than the "
                                    f"{MAX_IMAGE_PIXELS} allowed (a decompression bomb?)")
                image.load()
                if image.mode.startswith("I"):  # 16-bit grey (I;16, I;16B) or 32-bit integer grey
                    grey = np.asarray(image, dtype=np.float64) / 65535.0
                    return [np.clip(grey, 0.0, 1.0)] * channels
                converted = image.convert("L" if channels == 1 else "RGB")
                array = np.asarray(converted, dtype=np.float64) / 255.0
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(f"{where}: the image declares more pixels than allowed (a decompression bomb?)") from None
    except UnidentifiedImageError:
        raise DataError(f"{where}: the file is not a PNG image") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise DataError(f"{where}: the PNG cannot be decoded ({type(exc).__name__}: truncated or corrupt)") from None
    return [array] if channels == 1 else [array[..., k] for k in range(3)]


def _read_dicom(path: Path, channels: int, where: str) -> list[np.ndarray]:
    """A DICOM file's planes (float arrays in [0, 1]) from its pixel data; only `_DICOM_TAGS` are parsed."""
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, pixel_array
    except ImportError:
        raise DataError(f"{where}: reading DICOM images needs pydicom (pip install 'medveil[ml]')") from None
    header = None
    try:
        # pydicom's warnings may quote an element's value: none reaches the site's logs either.
        with warnings.catch_warnings(), path.open("rb") as handle:
            warnings.simplefilter("ignore")
            header = pydicom.dcmread(handle, stop_before_pixels=True, specific_tags=list(_DICOM_TAGS))
            _check_dicom_header(header, where)
            handle.seek(0)
            pixels = pixel_array(handle, index=0)
            values = np.asarray(apply_modality_lut(pixels, header), dtype=np.float64)
    except DataError:
        raise
    except pydicom.errors.InvalidDicomError:
        raise DataError(f"{where}: the file is not a DICOM file (no DICM preamble)") from None
    except Exception as exc:  # a decoder's message may quote the file: only its kind is named
        raise DataError(f"{where}: the DICOM pixel data cannot be decoded ({type(exc).__name__}; "
                        f"transfer syntax {_transfer_syntax(header)})") from None
    photometric = str(header.get("PhotometricInterpretation", "")).strip().upper()
    if values.ndim == 3:  # colour, decoded to RGB by pydicom
        values = _min_max(values)
        if channels == 1:
            return [values @ np.array([0.299, 0.587, 0.114])]
        return [values[..., k] for k in range(3)]
    grey = _min_max(values)
    if photometric == "MONOCHROME1":
        grey = 1.0 - grey
    return [grey] * channels


def _check_dicom_header(header: object, where: str) -> None:
    """Refuse burnt-in annotations, multi-frame, palette colour and oversized images before decoding."""
    burned = str(header.get("BurnedInAnnotation", "")).strip().upper()  # type: ignore[attr-defined]
    if burned == "YES":
        raise DataError(f"{where}: the DICOM file has BurnedInAnnotation YES (text burnt into the pixels); "
                        "not read")
    frames = header.get("NumberOfFrames", 1)  # type: ignore[attr-defined]
    try:
        frames = int(frames or 1)
    except (TypeError, ValueError):
        raise DataError(f"{where}: the DICOM file's NumberOfFrames is not a number") from None
    if frames != 1:
        raise DataError(f"{where}: the DICOM file holds {frames} frames; one image per labels row is supported")
    photometric = str(header.get("PhotometricInterpretation", "")).strip().upper()  # type: ignore[attr-defined]
    if photometric not in ("MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422"):
        raise DataError(f"{where}: DICOM photometric interpretation {photometric[:32]!r} is not supported "
                        "(MONOCHROME1, MONOCHROME2, RGB, YBR_FULL, YBR_FULL_422)")
    try:
        pixels = int(header.Rows) * int(header.Columns) * int(header.get("SamplesPerPixel", 1))  # type: ignore[attr-defined]
    except (AttributeError, TypeError, ValueError):
        raise DataError(f"{where}: the DICOM file has no image size (Rows, Columns)") from None
    if pixels > MAX_IMAGE_PIXELS:
        raise DataError(f"{where}: the DICOM image declares {pixels} samples, more than the {MAX_IMAGE_PIXELS} "
                        "allowed")


def _transfer_syntax(header: object) -> str:
    meta = getattr(header, "file_meta", None)
    uid = getattr(meta, "TransferSyntaxUID", None)
    return "unknown" if uid is None else f"{getattr(uid, 'name', '')} ({str(uid)[:64]})".strip()


def _min_max(values: np.ndarray) -> np.ndarray:
    """Scaled to [0, 1] by the image's own minimum and maximum (a constant image becomes zeros)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros_like(values)
    low, high = float(finite.min()), float(finite.max())
    if high <= low:
        return np.zeros_like(values)
    return np.clip(np.nan_to_num((values - low) / (high - low), nan=0.0), 0.0, 1.0)


def _resized(plane: np.ndarray, size: int) -> np.ndarray:
    """One plane stretched to size x size (Pillow's Lanczos filter, float precision), in [0, 1]."""
    if plane.shape == (size, size):
        return plane
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32))  # mode "F"
    resized = np.asarray(image.resize((size, size), Image.Resampling.LANCZOS), dtype=np.float32)
    return np.clip(resized, 0.0, 1.0)
