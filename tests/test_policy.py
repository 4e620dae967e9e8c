"""A site's policy value (app/access/policy.py): address allow-list, content, size; no I/O."""

from __future__ import annotations

import ipaddress

import pytest

from app.access.policy import SitePolicy, parse_address, parse_networks
from app.dicom.summary import Summary
from app.errors import AddressNotAllowed, ContentNotAllowed

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"


def _summary(modality: str | None = "CT", sop_class_uid: str = CT_IMAGE) -> Summary:
    return Summary(
        sop_class_uid=sop_class_uid,
        sop_instance_uid="1.2.3.4.5.1",
        series_instance_uid="1.2.3.4.5.2",
        study_instance_uid="1.2.3.4.5.3",
        patient_id="P1",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        modality=modality,
        element_count=10,
        max_depth=0,
    )


def test_parse_networks_v4_v6_and_bare_addresses() -> None:
    """A bare address is a single-host network; host bits are tolerated."""
    assert parse_networks(["10.1.2.3/8", " 2001:db8::/32 ", "192.0.2.7", "::1"]) == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("2001:db8::/32"),
        ipaddress.ip_network("192.0.2.7/32"),
        ipaddress.ip_network("::1/128"),
    )


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "example.org", "", "1.2.3"])
def test_parse_networks_names_the_invalid_value(bad: str) -> None:
    with pytest.raises(ValueError, match=repr(bad)):
        parse_networks(["10.0.0.0/8", bad])


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("192.0.2.1", ipaddress.ip_address("192.0.2.1")),
        ("2001:db8::1", ipaddress.ip_address("2001:db8::1")),
        ("[2001:db8::1]", ipaddress.ip_address("2001:db8::1")),
        (" 192.0.2.1 ", ipaddress.ip_address("192.0.2.1")),
        ("::ffff:192.0.2.1", ipaddress.ip_address("192.0.2.1")),
        ("[::ffff:192.0.2.1]", ipaddress.ip_address("192.0.2.1")),
        ("", None),
        ("unknown", None),
        ("192.0.2.1:8080", None),
    ],
)
def test_parse_address(value: str, expected: object) -> None:
    assert parse_address(value) == expected


def test_no_allow_list_allows_every_address() -> None:
    policy = SitePolicy()
    for address in ("192.0.2.1", "2001:db8::1", "garbage", None):
        policy.check_address("site-a", address)


@pytest.mark.parametrize(
    "address", ["10.9.8.7", "192.0.2.7", "::ffff:10.0.0.1", "2001:db8:1::5", "[2001:db8::1]"]
)
def test_an_address_inside_the_allow_list_is_allowed(address: str) -> None:
    policy = SitePolicy(networks=parse_networks(["10.0.0.0/8", "192.0.2.7", "2001:db8::/32"]))
    policy.check_address("site-a", address)


@pytest.mark.parametrize("address", ["11.0.0.1", "192.0.2.8", "2001:db9::1", "::ffff:11.0.0.1"])
def test_an_address_outside_the_allow_list_is_refused(address: str) -> None:
    policy = SitePolicy(networks=parse_networks(["10.0.0.0/8", "192.0.2.7", "2001:db8::/32"]))
    with pytest.raises(AddressNotAllowed, match="site-a"):
        policy.check_address("site-a", address)


@pytest.mark.parametrize("address", [None, "", "unknown", "10.0.0.1:443"])
def test_an_unparsable_address_is_refused_when_there_is_a_list(address: str | None) -> None:
    policy = SitePolicy(networks=parse_networks(["0.0.0.0/0", "::/0"]))
    with pytest.raises(AddressNotAllowed):
        policy.check_address("site-a", address)


def test_no_content_lists_allow_any_content() -> None:
    SitePolicy().check_content("site-a", _summary(modality=None, sop_class_uid=MR_IMAGE))


@pytest.mark.parametrize("modality", ["CT", "ct", "Ct"])
def test_modality_is_compared_case_insensitively(modality: str) -> None:
    SitePolicy(modalities=frozenset({"CT"})).check_content("site-a", _summary(modality))


@pytest.mark.parametrize("modality", ["MR", None, ""])
def test_a_modality_outside_the_list_is_refused(modality: str | None) -> None:
    policy = SitePolicy(modalities=frozenset({"CT", "PT"}))
    with pytest.raises(ContentNotAllowed, match="allowed: CT, PT"):
        policy.check_content("site-a", _summary(modality))


def test_a_sop_class_in_the_list_is_allowed() -> None:
    SitePolicy(sop_classes=frozenset({CT_IMAGE})).check_content("site-a", _summary())


def test_a_sop_class_outside_the_list_is_refused() -> None:
    policy = SitePolicy(sop_classes=frozenset({CT_IMAGE}))
    with pytest.raises(ContentNotAllowed, match=MR_IMAGE.replace(".", r"\.")):
        policy.check_content("site-a", _summary(sop_class_uid=MR_IMAGE))


@pytest.mark.parametrize(
    ("site_limit", "global_limit", "expected"),
    [(None, 1000, 1000), (500, 1000, 500), (2000, 1000, 1000), (1000, 1000, 1000)],
)
def test_max_bytes_is_the_smaller_limit(
    site_limit: int | None, global_limit: int, expected: int
) -> None:
    assert SitePolicy(max_instance_bytes=site_limit).max_bytes(global_limit) == expected
