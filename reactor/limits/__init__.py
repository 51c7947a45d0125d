"""Limits: how fast the reactor may send. Token buckets for one instance, and cluster-wide
budgets shared through MongoDB in leased slices, behind one `RateLimit` interface."""
