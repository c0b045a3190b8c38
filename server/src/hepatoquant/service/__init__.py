"""The inference server: durable job store, bounded job executor, status-code mapping (gRPC and HTTP on top)."""
