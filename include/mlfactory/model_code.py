"""mlfactory's tabular model for MLflow's models-from-code: MLflow saves this file with the model (no pickle
of any object), and ``mlflow.pyfunc.load_model`` runs it to build the pyfunc, whose weights come from the
``bundle`` artifact through ``torch.load(weights_only=True)``.

mlfactory's own components (the model server, batch scoring, the promotion gate) never run this file or
any other code stored with a model: they read the MLmodel file and the bundle themselves
(``mlfactory.tabular.load_logged_model``). Never import this module: MLflow executes it.
"""

from mlflow.models import set_model

from mlfactory.tabular import TabularPyfunc

set_model(TabularPyfunc())
