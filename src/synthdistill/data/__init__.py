"""Training images: the decoded uint8 store, the one augmentation, and streamed web-scale data."""
