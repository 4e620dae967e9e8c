"""Secrets from files: ``INTAKE_X_FILE`` for every ``SecretStr`` setting ``x``.

Docker and Kubernetes hand secrets over as files, which keeps them out of the
environment (``docker inspect`` and /proc/PID/environ show it).
"""

from __future__ import annotations

import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsError,
)

FILE_SUFFIX = "_FILE"


def is_secret(field: FieldInfo) -> bool:
    """A ``SecretStr`` field (optional or not): it also has an ``…_FILE`` variable."""
    return field.annotation is SecretStr or SecretStr in typing.get_args(field.annotation)


class SecretFiles(PydanticBaseSettingsSource):
    """``INTAKE_X_FILE`` for every secret field ``x``: the value is that file's content.

    Docker and Kubernetes hand secrets over as files, which keeps them out of the
    environment (``docker inspect`` and /proc/PID/environ show it). Ranked after init
    arguments and the environment: an explicit ``Settings(orthanc_password=...)`` wins,
    and ``INTAKE_X`` set beside ``INTAKE_X_FILE`` is refused rather than one of them being
    silently ignored. Errors name variables and paths, never a value.
    """

    def __init__(
        self, settings_cls: type[BaseSettings], environments: Sequence[EnvSettingsSource]
    ) -> None:
        super().__init__(settings_cls)
        self._environments = environments

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        if not is_secret(field):
            return None, field_name, False
        path = self._lookup(field_name + FILE_SUFFIX)
        if path is None:
            return None, field_name, False
        variable = self._variable(field_name)
        if self._lookup(field_name) is not None:
            raise SettingsError(
                f"{variable} and {variable}{FILE_SUFFIX} are both set: set only one of them"
            )
        if field_name in self.current_state:  # an init argument, which wins over both
            return None, field_name, False
        return _read_secret(variable + FILE_SUFFIX, path), field_name, False

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for field_name, field in self.settings_cls.model_fields.items():
            value, key, _ = self.get_field_value(field, field_name)
            if value is not None:
                values[key] = value
        return values

    def _lookup(self, name: str) -> str | None:
        """The environment's (else the dotenv file's) value for field-like ``name``."""
        for source in self._environments:
            key = source.env_prefix + name
            value = source.env_vars.get(key if source.case_sensitive else key.lower())
            if value is not None:
                return value
        return None

    def _variable(self, field_name: str) -> str:
        prefix = self._environments[0].env_prefix if self._environments else ""
        return (prefix + field_name).upper()


def _read_secret(variable: str, path: str) -> str:
    """The file's text without one trailing newline (``echo`` and editors add one)."""
    if not path:
        raise SettingsError(f"{variable} is empty: it should name the file holding the value")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise SettingsError(f"{variable}: cannot read {path!r} ({reason})") from None
    except UnicodeDecodeError:
        raise SettingsError(f"{variable}: {path!r} is not UTF-8 text") from None
    if text.endswith("\r\n"):
        return text[:-2]
    return text.removesuffix("\n")
