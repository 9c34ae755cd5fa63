"""Studies and the steward's approval of them.

A study spec names the researcher (and their key), the sites and each site's identity key, the
datasets and variables it may read and the analyses it may run. A site's steward approves one
exact spec by signing its digest, and only if the key pinned for the site is the node's own;
the node keeps that signed approval and trusts nothing else, so neither the hub nor a
researcher can widen a study after approval, and researchers and peers verify each site
against its pinned key, never against the keys the hub serves.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from medveil.crypto.signing import SigningKey, VerifyKey, b64decode, b64encode
from medveil.runtime.wire import canonical_json

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN)]


class StudySpec(BaseModel):
    """What a researcher asks the sites to allow."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=NAME_PATTERN)
    title: str = ""
    purpose: str = ""
    researcher: str = Field(pattern=NAME_PATTERN)
    researcher_key: str
    sites: list[Name] = Field(min_length=1)
    site_keys: dict[str, str] = Field(description="site -> its Ed25519 identity key (VerifyKey.to_text()), "
                                                  "pinned: replies and secure-aggregation keys are checked "
                                                  "against these, never against the hub")
    datasets: dict[str, list[str]] = Field(description="dataset name -> variables the study may read")
    analyses: list[str] = Field(min_length=1)
    secure_aggregation: bool = Field(True, description="sums across sites are masked; turning it off is recorded")
    secagg_threshold: int | None = Field(None, ge=2, description="sites needed to recover a sum; default a majority")
    dp_rho_per_release: float | None = Field(None, gt=0, description="zCDP rho each site spends per noisy "
                                                                      "release; None: no differential privacy")

    @field_validator("researcher_key")
    @classmethod
    def _researcher_key_is_a_key(cls, value: str) -> str:
        _parse_key(value)
        return value

    @field_validator("site_keys")
    @classmethod
    def _site_keys_are_keys(cls, value: dict[str, str]) -> dict[str, str]:
        for key_text in value.values():
            _parse_key(key_text)
        return value

    @model_validator(mode="after")
    def _keys_cover_exactly_the_sites(self) -> "StudySpec":
        if len(set(self.sites)) != len(self.sites):
            raise ValueError("sites must not repeat")
        if set(self.site_keys) != set(self.sites):
            raise ValueError("site_keys must name exactly the study's sites")
        return self

    def site_key(self, site: str) -> VerifyKey:
        """The identity key pinned for `site` (KeyError for a site outside the study)."""
        return VerifyKey.from_text(self.site_keys[site])

    def threshold(self) -> int:
        """Sites that must remain for a secure sum to be recovered (default a majority)."""
        return self.secagg_threshold or len(self.sites) // 2 + 1

    def digest(self) -> str:
        return hashlib.sha256(canonical_json(self.model_dump())).hexdigest()


def _parse_key(text: str) -> VerifyKey:
    try:
        return VerifyKey.from_text(text)
    except (ValueError, TypeError) as exc:
        raise ValueError("not an Ed25519 public key (32 bytes, URL-safe base64)") from exc


def sign_approval(spec: StudySpec, site: str, steward: SigningKey, approved_at: float) -> dict[str, Any]:
    """The steward's signed statement that `site` allows exactly this spec."""
    document = {"study": spec.id, "spec_sha256": spec.digest(), "site": site, "approved_at": approved_at}
    return {"document": document, "signature": b64encode(steward.sign(canonical_json(document)))}


def verify_approval(approval: dict[str, Any], spec: StudySpec, site: str, steward: VerifyKey) -> None:
    """Raise unless `approval` is the steward's signature over this spec for this site."""
    document = approval["document"]
    steward.verify(b64decode(approval["signature"]), canonical_json(document))
    if document["study"] != spec.id or document["site"] != site or document["spec_sha256"] != spec.digest():
        raise ValueError(f"approval does not cover study {spec.id!r} as specified for {site!r}")
