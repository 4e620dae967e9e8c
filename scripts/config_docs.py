"""Generate docs/CONFIGURATION.md from the settings class (app/settings.py).

    .venv/bin/python scripts/config_docs.py            # print it
    .venv/bin/python scripts/config_docs.py --write    # update docs/CONFIGURATION.md
    .venv/bin/python scripts/config_docs.py --check    # exit 1 when the file is stale

Everything comes from ``Settings.model_fields``: a field's ``description``, its group
(``json_schema_extra=_group(...)``), its default and its bounds. A new setting needs
nothing here. The output depends on nothing but the class, so it can be compared as is.
"""

from __future__ import annotations

import argparse
import sys
from enum import Enum
from pathlib import Path

import annotated_types
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from app.secret_files import FILE_SUFFIX, is_secret
from app.settings import Group, Settings, group_of

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "docs" / "CONFIGURATION.md"
REGENERATE = ".venv/bin/python scripts/config_docs.py --write"
PREFIX = Settings.model_config.get("env_prefix") or ""
_SIZES = (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024))


def variable(name: str) -> str:
    """The environment variable of settings field ``name``."""
    return (PREFIX + name).upper()


def _code(text: str) -> str:
    return f"`{text}`"


def _number(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _is_list(field: FieldInfo) -> bool:
    return isinstance(field.get_default(call_default_factory=True, validated_data={}), list)


def _default(name: str, field: FieldInfo) -> str:
    """The default as a reader wants it: sizes in MiB/GiB, "unset", "empty"."""
    value = field.get_default(call_default_factory=True, validated_data={})
    if value is PydanticUndefined:
        return "required"
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return _code("true" if value else "false")
    if isinstance(value, list):
        return _code(",".join(map(str, value))) if value else "empty"
    if isinstance(value, int) and name.endswith("_bytes"):
        for unit, size in _SIZES:
            if value and value % size == 0:
                return f"{value // size} {unit}"
    if isinstance(value, Path) and not value.is_absolute() and not str(value).startswith("."):
        return _code(f"./{value}")  # Path("./var/spool") prints as "var/spool"
    if isinstance(value, Enum):
        return _code(str(value.value))
    return _code(_number(value))


def _bounds(field: FieldInfo) -> str:
    """The field's numeric constraints as a sentence ("" when it has none)."""
    words: list[str] = []
    for constraint in field.metadata:
        if isinstance(constraint, annotated_types.Gt):
            words.append(f"more than {_number(constraint.gt)}")
        elif isinstance(constraint, annotated_types.Ge):
            words.append(f"at least {_number(constraint.ge)}")
        elif isinstance(constraint, annotated_types.Lt):
            words.append(f"less than {_number(constraint.lt)}")
        elif isinstance(constraint, annotated_types.Le):
            words.append(f"at most {_number(constraint.le)}")
    return f" Must be {' and '.join(words)}." if words else ""


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _row(name: str, field: FieldInfo) -> str:
    names = _code(variable(name))
    if is_secret(field):
        names += " or " + _code(variable(name) + FILE_SUFFIX)
    description = (field.description or "").strip() + _bounds(field)
    return f"| {names} | {_default(name, field)} | {_cell(description)} |"


def _intro() -> list[str]:
    fields = Settings.model_fields
    lists = ", ".join(_code(variable(n)) for n, f in fields.items() if _is_list(f))
    secrets = [n for n, f in fields.items() if is_secret(f)]
    secret_names = " and ".join(_code(variable(n)) for n in secrets)
    example = variable(secrets[0]) if secrets else PREFIX + "PASSWORD"
    if any(f.is_required() for f in fields.values()):
        required = "Those whose default is *required* must be set; the others are optional."
    else:
        required = "All are optional."
    return [
        f"<!-- Generated from app/settings.py by scripts/config_docs.py. Do not edit by hand:"
        f" run `{REGENERATE}`. -->",
        "",
        "# Configuration",
        "",
        f"Orthanc Intake reads its configuration from environment variables, each the name of"
        f" a setting with the prefix `{PREFIX}` (case does not matter). {required} A bad"
        " value stops the service at start-up with a message that names the setting and"
        " never repeats the value.",
        "",
        f"The same variables can be written, one `{PREFIX}…=value` a line, in an env file that"
        f" the service and every `orthanc-intake` command read: `{variable('env_file')}`, by"
        f" default `intake.env` in `{variable('home')}` when it exists. A variable in the"
        f" environment wins over the file's. Relative storage paths are taken from"
        f" `{variable('home')}`, never from the current folder, so a command run from any"
        " folder uses the service's database; every admin command names the database it"
        " uses (on standard error, without its password), and only `migrate` creates one.",
        "",
        "- **Units are in the names**: `_BYTES` in bytes, `_SECONDS` in seconds (fractions"
        " allowed), `_DAYS` in days. The tables show sizes in MiB or GiB; give the variable"
        " in bytes (2 GiB is `2147483648`).",
        f"- **Lists** ({lists}) are comma-separated, e.g. `10.0.0.5,fd00::/64`; spaces around"
        " the commas are ignored, and an empty value means none.",
        "- **Booleans** take `true` or `false` (also `1`/`0`, `yes`/`no`, `on`/`off`).",
        "- **unset** means the variable is absent.",
        "",
        "## Secrets",
        "",
        f"{secret_names} hold secrets. Each can instead be read from a file: set"
        f" `{example}{FILE_SUFFIX}` to its path, as with Docker or Kubernetes secrets mounted"
        " as files. The value is the file's content without one trailing newline. Setting"
        f" both `{example}` and `{example}{FILE_SUFFIX}` is an error, and so is a file that"
        " cannot be read; the messages name the variables and the path, never the value.",
        "",
        "Where secrets must never go:",
        "",
        f"- Into `{variable('orthanc_url')}`: a URL with credentials in it is refused, so that"
        f" they never reach a log; use `{variable('orthanc_username')}` and"
        f" `{variable('orthanc_password')}`.",
        "- Onto a command line, or into a file under version control (a compose file, a"
        " committed `.env`): prefer the `_FILE` variables, pointing at files only the"
        " service's user can read.",
        "- Into logs, tickets or error reports: the service never logs them, and neither"
        " should anything around it.",
        f"- `{variable('database_url')}` carries the PostgreSQL password when there is one:"
        " treat the whole variable as a secret.",
    ]


def render() -> str:
    """The whole of docs/CONFIGURATION.md."""
    lines = _intro()
    fields = Settings.model_fields
    for group in Group:
        names = [name for name, field in fields.items() if group_of(field) is group]
        if not names:
            continue
        lines += ["", f"## {group.value}", ""]
        lines += ["| variable | default | description |", "| --- | --- | --- |"]
        lines += [_row(name, fields[name]) for name in names]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help=f"write {TARGET.relative_to(ROOT)}")
    action.add_argument("--check", action="store_true", help="exit 1 when the file is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        TARGET.write_text(text, encoding="utf-8")
        print(f"wrote {TARGET.relative_to(ROOT)}")
    elif args.check:
        current = TARGET.read_text(encoding="utf-8") if TARGET.exists() else ""
        if current != text:
            print(f"{TARGET.relative_to(ROOT)} is stale: run {REGENERATE}", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
