"""End-to-end jobs built from tfmm's pieces."""
