"""Image folders for tests: digits as PNG files with a labels.csv, and small synthetic DICOM files
carrying PHI-like attributes (which the site must never read into anything it releases)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

PHI = {"PatientName": "Doe^Jane", "PatientID": "MRN-123456", "PatientBirthDate": "19610704",
       "StudyDate": "20240229", "InstitutionName": "St Elsewhere General", "ReferringPhysicianName": "House^Gregory",
       "AccessionNumber": "ACC-998877"}


def as_uint8(images: np.ndarray) -> np.ndarray:
    """Images as uint8: uint8 kept, floats taken as [0, 16] (scikit-learn's digits) when their
    maximum is above 1, else as [0, 1]."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    scale = 16.0 if float(images.max(initial=0.0)) > 1.0 else 1.0
    return np.clip(np.rint(images.astype(np.float64) / scale * 255.0), 0, 255).astype(np.uint8)


def write_digits_folder(path: str | Path, images: np.ndarray, labels: Sequence[Any],
                        extra_columns: Mapping[str, Sequence[Any]] | None = None) -> Path:
    """A folder of grey PNGs (images (n, H, W), floats or uint8, see `as_uint8`) and a labels.csv
    with columns file, label and `extra_columns`; returns the folder."""
    from PIL import Image

    folder = Path(path)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    pixels = as_uint8(images)
    if len(pixels) != len(labels):
        raise ValueError("one label per image")
    files = []
    for i, image in enumerate(pixels):
        name = f"img/{i:05d}.png"
        Image.fromarray(image).save(folder / name)
        files.append(name)
    table = pd.DataFrame({"file": files, "label": list(labels), **{k: list(v) for k, v in (extra_columns or {}).items()}})
    table.to_csv(folder / "labels.csv", index=False)
    return folder


def write_dicom(path: str | Path, pixels: np.ndarray, **attributes: Any) -> Path:
    """A valid single-frame DICOM file (explicit VR little endian, MONOCHROME2 unless
    `attributes` say otherwise, unsigned 16-bit unless given uint8) of `pixels` (H, W) integers,
    with the PHI-like attributes of PHI set and then `attributes` (any DICOM keyword)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    pixels = np.asarray(pixels)
    pixels = pixels.astype(np.uint8 if pixels.dtype == np.uint8 else np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "OT"
    for keyword, value in PHI.items():
        setattr(ds, keyword, value)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    bits = 8 if pixels.dtype == np.uint8 else 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_png_declaring(path: str | Path, width: int, height: int) -> Path:
    """A small valid-looking PNG whose header declares `width` x `height` grey pixels while its
    image data holds a few rows only (a decompression bomb's header: a reader that trusts the
    declared size allocates width x height bytes before it finds out)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (width + 1) * 4, 9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return path
