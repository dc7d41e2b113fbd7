from zeroseg.toolkit.kmeans import batched_kmeans, sample_initial_centroids
from zeroseg.toolkit.pseudo_masks import generate_pseudo_masks, merge_by_similarity, merge_clusters, window_seeds
from zeroseg.toolkit.region_tokens import RegionTokens, encode_regions, find_regions, padded_regions
from zeroseg.toolkit.token_bank import TokenBank, gather_across_ranks

__all__ = [
    "RegionTokens",
    "TokenBank",
    "batched_kmeans",
    "encode_regions",
    "find_regions",
    "gather_across_ranks",
    "generate_pseudo_masks",
    "merge_by_similarity",
    "merge_clusters",
    "padded_regions",
    "sample_initial_centroids",
    "window_seeds",
]
