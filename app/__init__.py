"""Orthanc Intake: a public DICOM intake in front of a private Orthanc."""

__version__ = "0.1.0"
