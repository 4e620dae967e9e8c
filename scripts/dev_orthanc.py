"""Run a private Orthanc for `make run` (Debian's package): `make dev-orthanc`.

Everything it keeps is under var/dev-orthanc of the checkout: storage, configuration and
the password of its user, generated on the first run and reused by every later one, so the
settings it prints stay right from one run to the next. The port is the one given
(`--port`, or `make dev-orthanc DEV_ORTHANC_PORT=8043`), else the last run's, else 8042
when free (Debian's package may run a system Orthanc there), else one the system picks.

Orthanc 1.10 has no bind-address option: it listens on every interface, and
"RemoteAccessAllowed": false makes it refuse every request that does not come from this
host, with authentication on as well.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOME = ROOT / "var" / "dev-orthanc"
DEFAULT_PORT = 8042


def _port_is_free(port: int) -> bool:
    """Whether Orthanc, which binds every interface, could listen on ``port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("0.0.0.0", port))  # noqa: S104 - never listens: checks Orthanc's bind
        except OSError:
            return False
    return True


def _any_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("0.0.0.0", 0))  # noqa: S104 - never listens: checks Orthanc's bind
        port: int = probe.getsockname()[1]
    return port


def _last_port(config_path: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        return int(json.loads(config_path.read_text())["HttpPort"])
    return None


def _port(asked: int | None, config_path: Path) -> int:
    """The port given, else the last run's (the printed URL stays valid), else 8042."""
    port = asked or _last_port(config_path)
    if port is None:
        return DEFAULT_PORT if _port_is_free(DEFAULT_PORT) else _any_free_port()
    if not _port_is_free(port):
        how = "given" if asked else "of the last run"
        sys.exit(
            f"port {port} ({how}) is in use: is `make dev-orthanc` already running? "
            "Otherwise choose another: make dev-orthanc DEV_ORTHANC_PORT=<port>"
        )
    return port


def _password(password_file: Path) -> str:
    """The password kept from the first run; that run takes an exported one, if any."""
    if password_file.is_file():
        kept = password_file.read_text(encoding="utf-8").strip()
        exported = os.environ.get("INTAKE_ORTHANC_PASSWORD")
        if exported and exported != kept:
            print(
                f"warning: INTAKE_ORTHANC_PASSWORD is exported in this shell and is not the "
                f"password in {password_file}: `make run` from this shell would get 401. "
                "Run `unset INTAKE_ORTHANC_PASSWORD` there.",
                file=sys.stderr,
            )
        if kept:
            return kept
    password = os.environ.get("INTAKE_ORTHANC_PASSWORD") or secrets.token_urlsafe(24)
    password_file.touch(mode=0o600)
    password_file.chmod(0o600)
    password_file.write_text(password + "\n", encoding="utf-8")
    return password


def _env_file() -> Path:
    """The env file `make run` reads (app/settings.py, env_file_of)."""
    named = os.environ.get("INTAKE_ENV_FILE")
    if named:
        return Path(named).resolve()
    home = os.environ.get("INTAKE_HOME")
    return (Path(home).resolve() if home else ROOT / "var") / "intake.env"


def _tell(lines: list[str], port: int, password_file: Path) -> None:
    env_file = _env_file()
    print(f"Private Orthanc for development: http://127.0.0.1:{port}/ (user and password below)")
    print(f"  It listens on port {port} of every interface and answers this host only.")
    print(f"  Storage, configuration and password (kept for the next runs): {HOME}")
    try:
        present = set(env_file.read_text(encoding="utf-8").splitlines())
    except OSError:
        present = set()
    if set(lines) <= present:
        print(f"{env_file} has the settings `make run` needs to reach it:")
    else:
        print(f"For `make run` and the orthanc-intake commands, put these lines in {env_file}")
        print("(or export them in the shell that runs `make run`):")
    for line in lines:
        print(f"  {line}")
    print(f"  (the password itself is in {password_file})", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, help="HTTP port (default: the last run's, or 8042)")
    args = parser.parse_args(argv)
    HOME.mkdir(parents=True, exist_ok=True)
    HOME.chmod(0o700)
    config_path = HOME / "orthanc.json"
    password_file = HOME / "password"
    port = _port(args.port, config_path)
    user = os.environ.get("INTAKE_ORTHANC_USERNAME") or "intake"
    password = _password(password_file)
    orthanc = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    if not Path(orthanc).exists():
        sys.exit("Orthanc is not installed: run `bash scripts/orthanc-deps.sh` (Debian: orthanc)")
    config = {
        "Name": "intake-dev-private",
        "HttpPort": port,
        "DicomServerEnabled": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {user: password},
        "StorageDirectory": str(HOME / "storage"),
        "IndexDirectory": str(HOME / "index"),
        "Plugins": [],
        "OverwriteInstances": False,
        "MaximumStorageSize": 0,
        "MaximumPatientCount": 0,
    }
    config_path.touch(mode=0o600)  # it holds the password too
    config_path.chmod(0o600)
    config_path.write_text(json.dumps(config, indent=2))
    _tell(
        [
            f"INTAKE_ORTHANC_URL=http://127.0.0.1:{port}",
            f"INTAKE_ORTHANC_USERNAME={user}",
            f"INTAKE_ORTHANC_PASSWORD_FILE={password_file}",
        ],
        port,
        password_file,
    )
    os.execv(orthanc, [orthanc, str(config_path)])  # noqa: S606 - replaces this helper by Orthanc


if __name__ == "__main__":
    main()
