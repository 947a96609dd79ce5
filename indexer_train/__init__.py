"""indexer_train: labels from the frozen backbone, Arrow shards, and training/export of the memory indexer."""
