"""Test helpers: the real CLI in a scratch folder, synthetic MLflow studies, a toy Hydra app."""
