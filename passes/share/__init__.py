"""Weight sharing: codebooks of shared values with packed indices (lossy)."""
