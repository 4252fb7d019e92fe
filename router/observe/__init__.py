"""Observability: metrics, logging, health. Never carries personal data."""
