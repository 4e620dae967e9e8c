"""Orthanc Intake test suite."""
