"""Offline data preparation: the shard builder and the synthetic fundus set."""
