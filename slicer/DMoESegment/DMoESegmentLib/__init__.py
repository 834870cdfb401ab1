"""The dMoE Segment module's Slicer-free part (``logic``); a subfolder, so Slicer does not scan it for modules."""
