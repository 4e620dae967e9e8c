"""Fail early, and clearly, on a Python older than the project needs."""

import sys

if sys.version_info < (3, 11):  # noqa: UP036 - runs under whatever python3 the machine has
    sys.exit(f"Orthanc Intake needs Python 3.11 or newer; this is {sys.version.split()[0]}")
