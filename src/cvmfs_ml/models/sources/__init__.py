"""models/sources."""
