"""Delivery to the private Orthanc: the forwarder, its child process, the Orthanc client."""
