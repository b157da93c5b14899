"""Clustering scores (NMI, ARI, accuracy) and active units. Clusters are argmax q(c|x) for
models with a categorical latent, else k-means (K = 10, fixed seed) on the posterior means."""

from __future__ import annotations

import numpy as np

ACTIVE_UNIT_THRESHOLD = 0.01
KMEANS_SEED = 0
KMEANS_CLUSTERS = 10  # the protocol's K: MNIST's digits


def cluster_accuracy(labels: np.ndarray, clusters: np.ndarray) -> float:
    """After the best one-to-one matching of clusters to labels (Hungarian)."""
    from scipy.optimize import linear_sum_assignment

    labels, clusters = np.asarray(labels), np.asarray(clusters)
    n = int(max(labels.max(), clusters.max())) + 1
    counts = np.zeros((n, n), dtype=np.int64)
    np.add.at(counts, (clusters, labels), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum() / len(labels))


def nmi(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Normalized mutual information (arithmetic mean), cheap enough for every epoch."""
    from sklearn.metrics import normalized_mutual_info_score

    return float(normalized_mutual_info_score(labels, clusters))


def clustering_scores(labels: np.ndarray, clusters: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import adjusted_rand_score

    return {
        "nmi": nmi(labels, clusters), "ari": float(adjusted_rand_score(labels, clusters)),
        "accuracy": cluster_accuracy(labels, clusters),
    }


def kmeans_clusters(
    points: np.ndarray, k: int = KMEANS_CLUSTERS, seed: int = KMEANS_SEED
) -> np.ndarray:
    from sklearn.cluster import KMeans

    k = min(k, len(points))  # a split of fewer images than clusters
    return KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(points)


def active_units(mu: np.ndarray, threshold: float = ACTIVE_UNIT_THRESHOLD) -> int:
    """Latent dimensions whose variance of E[z|x] over the data exceeds ``threshold``."""
    return int((np.var(mu, axis=0) > threshold).sum())
