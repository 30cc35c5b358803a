"""Data pipeline: FineVision-schema samples -> packed training batches."""
