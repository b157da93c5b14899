"""The store turned into tables, pictures, reports and registered models (docs/architecture.md)."""
