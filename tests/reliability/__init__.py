"""Hostile input and corruption: fuzzed manifests, path escapes, malicious weights, leaks, damage."""
