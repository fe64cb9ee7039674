"""Evaluation: metrics, judges and runners for unlearning."""
