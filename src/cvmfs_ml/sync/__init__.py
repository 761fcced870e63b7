"""Registries flow into the repository by themselves: DUCC's pattern, for images and models."""
