"""Test support: real Debian Orthanc processes and generated DICOM studies."""
