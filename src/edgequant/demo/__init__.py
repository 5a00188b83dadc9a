"""Small bundled demo models and data, so examples and tests need no downloads."""
