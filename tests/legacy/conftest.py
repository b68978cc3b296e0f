from tfmm.keras_compat import LEGACY

# These tests need tf-keras; tests/test_tf_keras.py runs them in a subprocess
# with TF_USE_LEGACY_KERAS=1.
collect_ignore_glob = [] if LEGACY else ["test_*.py"]
