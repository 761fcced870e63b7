"""models/formats."""
