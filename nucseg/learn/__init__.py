"""Learning: datasets, augmentation, training, calibration, cross-validation and scoring."""
