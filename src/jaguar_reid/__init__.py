"""Jaguar Re-ID: a fold-aware re-identification pipeline (see the README's layout section)."""
