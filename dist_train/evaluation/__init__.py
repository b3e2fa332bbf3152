"""Scoring, the official AIROGS metrics, export and prediction."""
