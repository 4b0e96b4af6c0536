"""The use cases around the encoder: extract (what is missing, locks, parts), plan (what it would cost),
verify (stored rows recomputed), and the Ray executor (cluster, and the actor it ships to workers)."""
