"""Pruning: magnitude / Wanda / SparseGPT zeroing (unstructured and N:M), structured channel removal with
least-squares recovery, and the bitmask storage that makes a sparse weight really smaller on disk."""
