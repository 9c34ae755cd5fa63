"""Study approvals: a steward's signature covers exactly one spec for one site."""

from __future__ import annotations

import copy
import hashlib

import pytest
from pydantic import ValidationError

from medveil.crypto.sealed import generate_encryption_key
from medveil.crypto.signing import SignatureError, SigningKey, b64encode
from medveil.runtime.study import (
    LATER_FIELDS,
    StudySpec,
    sign_approval,
    verify_approval,
)
from medveil.runtime.wire import canonical_json

RESEARCHER = SigningKey.generate()
STEWARD_A = SigningKey.generate()
STEWARD_B = SigningKey.generate()
NODE_A = SigningKey.generate()
NODE_B = SigningKey.generate()
SITE_KEYS = {"site_a": NODE_A.verify_key.to_text(), "site_b": NODE_B.verify_key.to_text()}


@pytest.fixture
def spec() -> StudySpec:
    return StudySpec(
        id="gbsg2-descriptives", title="Breast cancer cohort", purpose="baseline table",
        researcher="alice", researcher_key=RESEARCHER.verify_key.to_text(),
        sites=["site_a", "site_b"], site_keys=SITE_KEYS, datasets={"default": ["age", "tsize"], "labs": ["crp"]},
        analyses=["describe", "crosstab"],
    )


def test_approval_signs_and_verifies(spec):
    approval = sign_approval(spec, "site_a", STEWARD_A, approved_at=1700000000.0)
    assert approval["document"] == {"study": spec.id, "spec_sha256": spec.digest(), "site": "site_a",
                                    "approved_at": 1700000000.0}
    verify_approval(approval, spec, "site_a", STEWARD_A.verify_key)


def test_approval_survives_a_json_roundtrip_of_the_spec(spec):
    """The node stores spec and approval as JSON and re-validates the spec before verifying."""
    approval = sign_approval(spec, "site_a", STEWARD_A, approved_at=1.5)
    restored = StudySpec.model_validate_json(spec.model_dump_json())
    assert restored.digest() == spec.digest()
    verify_approval(copy.deepcopy(approval), restored, "site_a", STEWARD_A.verify_key)


@pytest.mark.parametrize(
    "change",
    [
        {"datasets": {"default": ["age", "tsize", "pnodes"], "labs": ["crp"]}},
        {"datasets": {"default": ["age", "tsize"], "labs": ["crp"], "genomes": ["brca1"]}},
        {"analyses": ["describe", "crosstab", "histogram"]},
        {"sites": ["site_a", "site_b", "site_c"]},
        {"site_keys": dict(SITE_KEYS, site_b=SigningKey.generate().verify_key.to_text())},
        {"researcher": "mallory"},
        {"researcher_key": SigningKey.generate().verify_key.to_text()},
        {"purpose": "something else"},
        {"title": ""},
    ],
    ids=["more-variables", "more-datasets", "more-analyses", "more-sites", "site-key", "researcher", "researcher-key",
         "purpose", "title"],
)
def test_spec_changed_after_approval_fails(spec, change):
    approval = sign_approval(spec, "site_a", STEWARD_A, approved_at=1.0)
    widened = spec.model_copy(update=change)
    assert widened.digest() != spec.digest()
    with pytest.raises(ValueError, match="does not cover"):
        verify_approval(approval, widened, "site_a", STEWARD_A.verify_key)


def test_another_study_id_fails(spec):
    approval = sign_approval(spec, "site_a", STEWARD_A, approved_at=1.0)
    with pytest.raises(ValueError, match="does not cover"):
        verify_approval(approval, spec.model_copy(update={"id": "other-study"}), "site_a", STEWARD_A.verify_key)


def test_another_sites_approval_fails(spec):
    approval_b = sign_approval(spec, "site_b", STEWARD_B, approved_at=1.0)
    verify_approval(approval_b, spec, "site_b", STEWARD_B.verify_key)
    # Presented to site_a, checked with site_a's steward key: the signature is not theirs.
    with pytest.raises(SignatureError):
        verify_approval(approval_b, spec, "site_a", STEWARD_A.verify_key)
    # Even with the right key, the document names another site.
    with pytest.raises(ValueError, match="does not cover"):
        verify_approval(approval_b, spec, "site_a", STEWARD_B.verify_key)


@pytest.mark.parametrize("field, value", [("site", "site_b"), ("study", "other"), ("spec_sha256", "0" * 64),
                                          ("approved_at", 2.0)])
def test_edited_approval_document_fails(spec, field, value):
    approval = sign_approval(spec, "site_a", STEWARD_A, approved_at=1.0)
    forged = {"document": dict(approval["document"], **{field: value}), "signature": approval["signature"]}
    with pytest.raises(SignatureError):
        verify_approval(forged, spec, "site_a" if field != "site" else "site_b", STEWARD_A.verify_key)


def test_digest_ignores_dataset_key_order_only(spec):
    reordered = spec.model_copy(update={"datasets": {"labs": ["crp"], "default": ["age", "tsize"]}})
    assert reordered.digest() == spec.digest()
    assert spec.model_copy(update={"analyses": ["crosstab", "describe"]}).digest() != spec.digest()


@pytest.mark.parametrize("update", [{"id": "bad id"}, {"id": ""}, {"researcher": "../x"}, {"sites": []},
                                    {"analyses": []}, {"extra": 1}, {"sites": ["site_a", "site_a"]},
                                    {"sites": ["../site_a"], "site_keys": {"../site_a": SITE_KEYS["site_a"]}},
                                    {"researcher_key": "not a key"}])
def test_invalid_specs_are_refused(spec, update):
    with pytest.raises(ValidationError):
        StudySpec.model_validate({**spec.model_dump(), **update})


@pytest.mark.parametrize(
    "site_keys",
    [{}, {"site_a": SITE_KEYS["site_a"]}, dict(SITE_KEYS, site_c=SITE_KEYS["site_a"]),
     dict(SITE_KEYS, site_b="AAAA"), dict(SITE_KEYS, site_b=NODE_B.verify_key.fingerprint())],
    ids=["none", "missing-site", "extra-site", "short-key", "fingerprint-not-key"],
)
def test_site_keys_must_pin_a_key_for_exactly_the_sites(spec, site_keys):
    with pytest.raises(ValidationError, match="site_keys|public key"):
        StudySpec.model_validate({**spec.model_dump(), "site_keys": site_keys})


def test_pinned_site_key_is_a_verify_key(spec):
    assert spec.site_key("site_b") == NODE_B.verify_key
    with pytest.raises(KeyError):
        spec.site_key("site_c")


ENC_A = generate_encryption_key()[1]
ENC_B = generate_encryption_key()[1]


def test_later_fields_default_empty_and_keep_the_digest_of_a_spec_without_them(spec):
    assert (spec.site_encryption_keys, spec.roles, spec.site_datasets, spec.services) == ({}, {}, {}, [])
    assert spec.datasets_for("site_a") == spec.datasets and spec.role_of("site_a") is None
    before = {k: v for k, v in spec.model_dump().items() if k not in LATER_FIELDS}
    assert spec.digest() == hashlib.sha256(canonical_json(before)).hexdigest()


@pytest.mark.parametrize("change", [
    {"site_encryption_keys": {"site_a": ENC_A}},
    {"roles": {"site_a": "label_holder"}},
    {"site_datasets": {"site_b": {"claims": ["cost"]}}},
    {"services": ["count_lookup"]},
], ids=["encryption-key", "role", "site-datasets", "services"])
def test_later_fields_are_covered_by_the_approval(spec, change):
    approval = sign_approval(spec, "site_a", STEWARD_A, approved_at=1.0)
    widened = StudySpec.model_validate({**spec.model_dump(), **change})
    assert widened.digest() != spec.digest()
    with pytest.raises(ValueError, match="does not cover"):
        verify_approval(approval, widened, "site_a", STEWARD_A.verify_key)


def test_site_datasets_roles_and_keys_per_site(spec):
    vertical = StudySpec.model_validate({
        **spec.model_dump(), "site_datasets": {"site_b": {"claims": ["cost", "visits"]}},
        "roles": {"site_a": "label_holder", "site_b": "feature_holder"},
        "site_encryption_keys": {"site_a": ENC_A, "site_b": ENC_B}, "services": ["count_lookup"]})
    assert vertical.datasets_for("site_a") == spec.datasets
    assert vertical.datasets_for("site_b") == {"claims": ["cost", "visits"]}
    assert (vertical.role_of("site_a"), vertical.role_of("site_b")) == ("label_holder", "feature_holder")
    assert vertical.encryption_key("site_b") == ENC_B
    restored = StudySpec.model_validate_json(vertical.model_dump_json())
    assert restored.digest() == vertical.digest()


@pytest.mark.parametrize("update", [
    {"site_encryption_keys": {"site_c": ENC_A}},
    {"site_encryption_keys": {"site_a": SITE_KEYS["site_a"][:-4]}},
    {"site_encryption_keys": {"site_a": b64encode(bytes(32))}},
    {"site_encryption_keys": {"site_a": "not a key"}},
    {"roles": {"site_a": "referee"}},
    {"roles": {"site_c": "server"}},
    {"site_datasets": {"site_c": {"default": ["age"]}}},
    {"site_datasets": {"site_a": ["age"]}},
    {"services": ["count_lookup", "count_lookup"]},
    {"services": ["../x"]},
], ids=["key-outside-sites", "short-key", "low-order-key", "text", "unknown-role", "role-outside-sites",
        "datasets-outside-sites", "datasets-not-a-map", "repeated-service", "bad-service-name"])
def test_invalid_later_fields_are_refused(spec, update):
    with pytest.raises(ValidationError):
        StudySpec.model_validate({**spec.model_dump(), **update})
