"""Studies and the steward's approval of them.

A study spec names the researcher (and their key), the sites and each site's identity key, the
datasets and variables it may read (one map for all sites, or a site's own map), the analyses
it may run, the model recipes it may train and the site services it may query, each site's party role in two-party protocols
and the X25519 key each site receives per-recipient payloads under. A site's steward approves one
exact spec by signing its digest, and only if the key pinned for the site is the node's own;
the node keeps that signed approval and trusts nothing else, so neither the hub nor a
researcher can widen a study after approval, and researchers and peers verify each site
against its pinned key, never against the keys the hub serves.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from medveil.analyses.base import NAME_PATTERN, SiteName
from medveil.crypto.sealed import parse_encryption_key
from medveil.crypto.signing import SigningKey, VerifyKey, b64decode, b64encode
from medveil.models.registry import MODEL_KEY
from medveil.runtime.wire import canonical_json

Name = SiteName
Role = Literal["label_holder", "feature_holder", "dealer", "server", "client"]
# Fields added after studies were first approved: left out of the digest while empty, so an
# approval signed before they existed still covers the same spec.
LATER_FIELDS = ("site_encryption_keys", "roles", "site_datasets", "services", "models")


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
    site_encryption_keys: dict[str, str] = Field(default_factory=dict, description="site -> its X25519 public key "
                                                 "(URL-safe base64), pinned: payloads sent to a site are sealed "
                                                 "to this key; needed for a site that receives payloads")
    roles: dict[str, Role] = Field(default_factory=dict, description="site -> its party role in two-party "
                                                                     "protocols")
    site_datasets: dict[str, dict[str, list[str]]] = Field(
        default_factory=dict, description="site -> its own map of dataset name -> variables, used for that "
                                          "site instead of `datasets` (sites holding different tables)")
    services: list[Name] = Field(default_factory=list, description="site services (e.g. count_lookup) the "
                                                                   "researcher may query")
    models: list[Annotated[str, Field(pattern=MODEL_KEY)]] = Field(
        default_factory=list, description="model recipes (\"name@version\") federated training may train")

    @field_validator("site_encryption_keys")
    @classmethod
    def _encryption_keys_are_keys(cls, value: dict[str, str]) -> dict[str, str]:
        for key_text in value.values():
            try:
                parse_encryption_key(key_text)
            except ValueError as exc:
                raise ValueError(f"not an X25519 public key (32 bytes, URL-safe base64): {exc}") from exc
        return value

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
    def _keys_cover_exactly_the_sites(self) -> StudySpec:
        if len(set(self.sites)) != len(self.sites):
            raise ValueError("sites must not repeat")
        if set(self.site_keys) != set(self.sites):
            raise ValueError("site_keys must name exactly the study's sites")
        for field in ("site_encryption_keys", "roles", "site_datasets"):
            outside = sorted(set(getattr(self, field)) - set(self.sites))
            if outside:
                raise ValueError(f"{field} names sites outside the study: {outside}")
        if len(set(self.services)) != len(self.services):
            raise ValueError("services must not repeat")
        if len(set(self.models)) != len(self.models):
            raise ValueError("models must not repeat")
        return self

    def datasets_for(self, site: str) -> dict[str, list[str]]:
        """The datasets and variables the study may read at `site`: its own map if it has one."""
        return self.site_datasets.get(site, self.datasets)

    def role_of(self, site: str) -> str | None:
        """The party role of `site` in the study, or None when the study gives it none."""
        return self.roles.get(site)

    def data_sites(self) -> list[str]:
        """The study's sites that hold data: every site but dealers of correlated randomness."""
        return [site for site in self.sites if self.role_of(site) != "dealer"]

    def encryption_key(self, site: str) -> str:
        """The X25519 key pinned for payloads to `site` (KeyError when the study pins none)."""
        return self.site_encryption_keys[site]

    def site_key(self, site: str) -> VerifyKey:
        """The identity key pinned for `site` (KeyError for a site outside the study)."""
        return VerifyKey.from_text(self.site_keys[site])

    def threshold(self) -> int:
        """Sites that must remain for a secure sum to be recovered (default a majority)."""
        return self.secagg_threshold or len(self.sites) // 2 + 1

    def study_salt(self) -> bytes:
        """32 bytes bound to this study and its approved spec (the salt of PSI hashing: the same at
        every site of the study, unrelated in any other study)."""
        return hashlib.sha256(b"medveil study salt\0" + self.id.encode() + b"\0" + self.digest().encode()).digest()

    def digest(self) -> str:
        """SHA-256 of the canonical JSON of every field (what a steward's approval signs)."""
        dumped = self.model_dump()
        for field in LATER_FIELDS:
            if not dumped[field]:
                del dumped[field]
        return hashlib.sha256(canonical_json(dumped)).hexdigest()


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
