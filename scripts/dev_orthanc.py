"""Run a local private Orthanc for development on 127.0.0.1:8042 (Debian's package).

Credentials come from INTAKE_ORTHANC_USERNAME / INTAKE_ORTHANC_PASSWORD; when the
password is unset, one is generated and printed once so `make run` can use it.
Storage lives under ./var/dev-orthanc.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
from pathlib import Path

home = Path("var/dev-orthanc").resolve()
home.mkdir(parents=True, exist_ok=True)
user = os.environ.get("INTAKE_ORTHANC_USERNAME", "intake")
password = os.environ.get("INTAKE_ORTHANC_PASSWORD") or secrets.token_urlsafe(24)
if "INTAKE_ORTHANC_PASSWORD" not in os.environ:
    print("In the shell that runs `make run`:")
    print(f"  export INTAKE_ORTHANC_USERNAME={user} INTAKE_ORTHANC_PASSWORD={password}")
config = {
    "Name": "intake-dev-private",
    "HttpPort": 8042,
    "DicomServerEnabled": False,
    "RemoteAccessAllowed": False,
    "AuthenticationEnabled": True,
    "RegisteredUsers": {user: password},
    "StorageDirectory": str(home / "storage"),
    "IndexDirectory": str(home / "index"),
    "Plugins": [],
    "OverwriteInstances": False,
    "MaximumStorageSize": 0,
    "MaximumPatientCount": 0,
}
config_path = home / "orthanc.json"
config_path.write_text(json.dumps(config, indent=2))
config_path.chmod(0o600)
orthanc = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
if not Path(orthanc).exists():
    sys.exit("Orthanc is not installed: run `make system-deps` (Debian package `orthanc`)")
os.execv(orthanc, [orthanc, str(config_path)])  # noqa: S606 - replaces this helper by Orthanc
