"""The feature store: HDF5 feature sets, immutable parts, one lock per set (sets); sets made under other
library versions (upgrades); what `cache prune` may delete (prune)."""
