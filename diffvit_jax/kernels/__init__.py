"""Hand-written kernels for what XLA does not fuse on a backend."""
