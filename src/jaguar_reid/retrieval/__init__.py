"""Retrieval: embeddings, metrics, re-ranking, post-processing, out-of-fold scoring and tuning."""
