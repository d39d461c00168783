"""The training stage (ml_train): why a run trains and its trials (``plan``), the training sets and the frozen
holdout (``data``), the training entrypoint every backend runs (``train``, with ``cluster``: torchrun's terms
from the platform's conventions), what a run records in MLflow (``tracking``) and the blend of the best of each
model family (``blend``)."""
