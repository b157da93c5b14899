"""The one seam to MLflow (see docs/architecture.md)."""
