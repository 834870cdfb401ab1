"""Files in and out: images, DICOM, DICOM SEG, model files (checkpoints), case tables, the atomic writer."""
