"""Jaguar Re-ID: a fold-aware re-identification pipeline (docs/layout.md: its folders)."""
