"""Pruning: unstructured masks with schedules, structured channel removal, sparse storage."""
