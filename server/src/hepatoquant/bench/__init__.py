"""HepatoBench: the patch benchmark protocol (dataset, curation, splits, embeddings, linear probes, metrics,
encoder comparison), research use only."""
