"""Data: NIfTI readers for the BraTS/UPENN/MSD layouts, preprocessing, sampling, phantoms."""

# Canonical modality order: a modality's id (its one-hot channel) is its index here.
MODALITIES = ("t1", "t1ce", "t2", "flair")
# BraTS evaluation regions, in the channel order of every region map in the code base.
REGIONS = ("WT", "TC", "ET")
