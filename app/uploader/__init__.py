"""The site-side uploader (``orthanc-intake upload``): sending files, and saying what became of
them.
"""
