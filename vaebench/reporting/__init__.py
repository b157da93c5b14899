"""The store turned into tables and pictures: MLflow runs read (runs.py), the leaderboard
(table.py), figures (figures.py), markdown and HTML rendered from one list of blocks (render.py,
report.py), and the best runs registered as models (best_models.py)."""
