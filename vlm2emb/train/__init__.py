"""Training: typed recipes and the accelerate loop (imported only when training)."""
