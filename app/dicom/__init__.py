"""DICOM without a framework: the summary of an instance, the bounded scan, the Part 10 parser,
the validation workers.
"""
