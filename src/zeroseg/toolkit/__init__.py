from zeroseg.toolkit.kmeans import batched_kmeans, sample_initial_centroids

__all__ = ["batched_kmeans", "sample_initial_centroids"]
