"""The code of a SunFish model logged to MLflow ("models from code").

Why a file and not a pickled object: MLflow copies this file into the logged model and runs it when
the model is loaded, so loading executes readable source instead of unpickling an opaque object (the
same reason checkpoints hold safetensors, never pickles). Nothing imports this module.
"""

import mlflow.models

from sunfish.mlflow_model import SunFishModel

mlflow.models.set_model(SunFishModel())
