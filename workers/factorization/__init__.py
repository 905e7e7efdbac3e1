"""Low-rank factorisation of trained layers (the low_rank method)."""
