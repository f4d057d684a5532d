"""Low-rank factorization: truncated SVD for Linear, Tucker-2 for Conv2d."""
