"""Offline evaluation: full-catalogue ranking metrics and collaborative-filtering / content baselines."""
