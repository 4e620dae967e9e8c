"""The end-of-session leak scan finds what it is meant to find."""

from __future__ import annotations

from pathlib import Path

from tests.support.leaks import Registry


def test_a_token_or_password_in_a_log_is_reported_by_its_prefix_only(tmp_path: Path) -> None:
    registry = Registry()
    token = "oit_" + "A1b2C3" * 8 + "x"
    registry.remember_secret(token)
    registry.remember_secret("an orthanc password")
    clean, dirty = tmp_path / "clean.log", tmp_path / "dirty.log"
    clean.write_text("upload site=a receipt=1 oit_NotASecretOfOurs12345678901234567890\n")
    dirty.write_text(f"oops Authorization: Bearer {token}\nand an orthanc password here\n")
    registry.remember_log(clean)
    registry.remember_log(dirty)
    found = registry.scan()
    assert found == [f"{dirty}: an ortha…", f"{dirty}: {token[:8]}…"]
    assert all(token not in line for line in found)
