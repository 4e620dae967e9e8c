"""The upload pipeline and what it reads and writes: multipart bodies, ZIP archives, the spool,
STOW-RS answers.
"""
