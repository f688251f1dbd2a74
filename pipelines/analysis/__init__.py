"""Analyses of embeddings, shared by the evaluate and index stages, the CLI and the benches:
retrieval math and metrics, the evaluation sample, probes against TF-IDF, pictures, drift
between table versions, and the annotation helpers."""
