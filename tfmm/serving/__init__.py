"""The production path (paper §5, Figure 4): TF Serving checks, the new-item
encoder service and the predictor."""
