"""Scores of a trained model, without MLflow or Optuna: the evaluation pass of a split
(evaluation.py), the IWAE log-likelihood estimate (likelihood.py), clustering scores
(clustering.py: NMI, accuracy, ARI) and the label classifier that scores a cvae's samples
(classifier.py).
"""
