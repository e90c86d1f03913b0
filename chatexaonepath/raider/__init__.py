"""RAIDER: retrieval-augmented instruction-data generation from pathology reports (RAIDER issue)."""
