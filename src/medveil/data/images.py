"""Image datasets at a site: a folder of PNG or DICOM files with a labels CSV, read lazily.

Interface only until the image-dataset work lands (see /tmp/i12/contract.md)."""

from __future__ import annotations

from typing import Any


class ImageFolder:
    """A folder of images and its labels table (contract: from_config, table, batch)."""

    @classmethod
    def from_config(cls, name: str, config: Any) -> ImageFolder:
        raise NotImplementedError("image datasets are being built")
