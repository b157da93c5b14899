"""Clustering scores (NMI, ARI, accuracy). Clusters are argmax q(c|x) for models with a
categorical latent, else k-means (K = 10, fixed seed) on the posterior means."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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
    """scikit-learn's k-means on one OpenMP thread: its partial sums are then added in one
    order on every machine (with several threads the order, and so the last bits, follow the
    core count), and on a few thousand points of 10 to 100 dimensions one thread is as fast
    (threads' synchronisation costs what they share). The caller may run it beside other work."""
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    k = min(k, len(points))  # a split of fewer images than clusters
    with threadpool_limits(limits=1, user_api="openmp"):  # this thread's OpenMP setting
        return KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(points)


@dataclass(frozen=True)
class ClusterInput:
    """What a split's clustering scores are computed from, on the host (k-means is slow: done
    after training, in a background process where asked)."""

    prefix: str
    labels: np.ndarray
    means: np.ndarray | None
    categories: np.ndarray | None

    def clusters(self) -> np.ndarray:
        return self.categories if self.means is None else kmeans_clusters(self.means)


def scored_clusters(clusters: ClusterInput) -> dict[str, float]:
    scores = clustering_scores(clusters.labels, clusters.clusters())
    return {f"{clusters.prefix}_{name}": value for name, value in scores.items()}
