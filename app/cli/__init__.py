"""The ``orthanc-intake`` command."""
