"""The one seam to MLflow: the Tracker (tracker.py) and the one place where store
failures become TrackingError, the store's location and schema (store.py, schema.py),
logged and registered models (registry.py, served.py).
"""
