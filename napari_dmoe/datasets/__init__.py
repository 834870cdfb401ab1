"""Training and evaluation datasets in public formats (``formats.py``: Harvard-FairSeg, HAM10000, NIfTI folder +
CSV, generic folder + CSV) and their shared parts (``base.py``: attribute vocabulary, records, mask mapping,
checks). Image files themselves are read by ``napari_dmoe.io``."""
