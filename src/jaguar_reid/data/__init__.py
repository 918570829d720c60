"""Data: the competition's tables, images, the preprocessing cache, near-duplicates, folds,
augmentation, the batch sampler, the data check and the demo data."""
