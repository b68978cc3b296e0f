"""The production path (paper §5, Figure 4): TF Serving checks, the new-item
encoder service and the predictor."""

_PREDICTOR = ("Predictor", "Request", "ServingError", "open_model")


def __getattr__(name):
    # Lazy: the other serving modules should not pay for TensorFlow and gRPC.
    if name in _PREDICTOR:
        from tfmm.serving import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module 'tfmm.serving' has no attribute {name!r}")


__all__ = list(_PREDICTOR)
