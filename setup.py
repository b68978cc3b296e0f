"""tfmm: multimodal item representations for TensorFlow CTR models."""

from setuptools import find_packages, setup

setup(
    name="tfmm",
    version="0.1.0",
    description=(
        "Semantic-aware contrastive pre-training, SimTier and MAKE for "
        "ID-based CTR models (CIKM'24, Taobao display advertising)."
    ),
    # pipelines/ and benchmarks/ are the repo's jobs, run from a checkout
    # (python -m pipelines.paper): no top-level `pipelines` in site-packages.
    packages=find_packages(include=["tfmm", "tfmm.*"]),
    package_data={"tfmm.serving": ["*.cc"]},
    python_requires=">=3.11",
    install_requires=[
        "tensorflow==2.21.*",
        "keras==3.15.*",
        "tensorboard==2.21.*",  # TensorBoard logs of training runs
        "keras-hub==0.32.*",
        "tensorflow-datasets==4.9.*",
        "importlib_resources==7.*",  # tensorflow-datasets needs it to build, but does not pull it
        "pyarrow==25.*",  # Parquet input of tfmm.data.prepare; apache-beam 2.77 needs < 26
        "absl-py==2.*",
        "matplotlib==3.10.*",  # PNG plots of the paper report (pipelines.paper)
        "numpy>=1.26,<3",
        "tensorflow-serving-api==2.21.*",  # warmup records; the gRPC predictor client
        # The Redis index table and new-item streams; hiredis parses replies in C:
        # a 300-id look-up took 0.85 ms p99 with it, 2.3 ms without.
        "redis[hiredis]==8.*",
    ],
    extras_require={
        # ruff: `make test` lints first; xdist: it runs the suite in two workers
        "test": ["pytest==9.*", "pytest-xdist==3.8.*", "hypothesis==6.*", "ruff==0.17.6"],
        "tfrs": ["tensorflow-recommenders==0.7.7", "tf-keras==2.21.*"],
        "beam": ["apache-beam[tfrecord]==2.77.*"],  # prepare and embed as Beam pipelines (--runner)
        # the DIN peer of benchmarks.ctr_step (runs under tf-keras)
        "bench": ["deepctr==0.9.4", "tf-keras==2.21.*"],
    },
)
