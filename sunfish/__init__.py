"""SunFish: a reproducible DVC + MLflow pipeline for training and evaluating small language models.

The package is a library: import it and call functions with typed config objects
(:mod:`sunfish.config`). It knows nothing of DVC; the `pipeline` package is the thin glue that
DVC stages run.
"""

__version__ = "0.1.0"
