"""The hyperparameters of a training job, declared once: each one's default, bounds, and ``Knob``.

``Hyperparameters`` is the one declaration that the rest derive from: the config's ``training``
section extends it (``config.TrainingSpec``), a ``TrainingJobSpec`` carries one, the training
entrypoint validates its ``--hyperparameters`` JSON against it, ml_train's trigger form is generated
from it (``form_params``), and a ``search_space`` names its ``SEARCHABLE`` fields with values each
field accepts (``check_search_space``). A bound changed here is changed in all of them.

This module is imported by DAG files at parse time: it must stay light (pydantic only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError


@dataclass(frozen=True)
class Knob:
    """What a hyperparameter tunes: the model ``family`` (mlp, gbdt, or both), whether ``search_space`` may
    vary it, and whether ml_train's trigger form offers it (each field there is one more Param for the DAG
    processor to validate on every parse: the knobs a person turns per run)."""

    family: Literal["mlp", "gbdt", "both"]
    searchable: bool = True
    form: bool = False


class Hyperparameters(BaseModel):
    """The values a training job takes; one omitted takes its default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: Annotated[Literal["mlp", "gbdt"], Knob("both", form=True)] = Field(
        "mlp", description="the model family: mlp (the PyTorch network: epochs, patience, learning_rate, batch_size, "
        "hidden_sizes, dropout, weight_decay, numeric_embedding) or gbdt (gradient-boosted trees, XGBoost: trees, "
        "tree_leaves, tree_learning_rate); search_space may list both")
    class_weight: Annotated[Literal["none", "balanced"], Knob("both")] = Field(
        "none", description="classification, both families: balanced weighs each class as much as the others in the "
        "loss whatever its share (a rare positive class); none: every row alike")
    epochs: Annotated[int, Knob("mlp", form=True)] = Field(
        40, ge=1, le=1000, description="mlp: at most this many epochs; the learning rate rises to learning_rate in the "
        "first tenth of them and anneals (one cycle) over the rest")
    patience: Annotated[int, Knob("mlp", searchable=False)] = Field(
        6, ge=1, le=1000, description="mlp: training stops after this many epochs without a better validation metric, "
        "and the best epoch's weights are the model")
    learning_rate: Annotated[float, Knob("mlp", form=True)] = Field(
        0.003, gt=0, le=1, description="mlp: the peak of the one-cycle schedule (AdamW)")
    batch_size: Annotated[int, Knob("mlp", form=True)] = Field(
        512, ge=8, le=65536, description="mlp: rows per step and process")
    hidden_sizes: Annotated[list[Annotated[int, Field(ge=1, le=4096)]], Knob("mlp", form=True)] = Field(
        [128, 64], min_length=1, max_length=8, description="mlp: the width of each hidden layer, e.g. [128, 64]")
    dropout: Annotated[float, Knob("mlp")] = Field(0.1, ge=0, lt=1, description="mlp: dropout after each hidden layer")
    weight_decay: Annotated[float, Knob("mlp")] = Field(1e-5, ge=0, le=1, description="mlp: AdamW's weight decay")
    numeric_embedding: Annotated[Literal["periodic", "none"], Knob("mlp")] = Field(
        "periodic", description="mlp: periodic embeddings of each numeric feature (learned frequencies), or none")
    trees: Annotated[int, Knob("gbdt", form=True)] = Field(
        1000, ge=1, le=100_000, description="gbdt: at most this many boosting rounds; training stops earlier once the "
        "validation metric has not improved for 50 rounds")
    tree_leaves: Annotated[int, Knob("gbdt", form=True)] = Field(
        31, ge=2, le=4096, description="gbdt: the leaves of each tree (grown best-first, as LightGBM's num_leaves and "
        "scikit-learn's max_leaf_nodes)")
    tree_learning_rate: Annotated[float, Knob("gbdt", form=True)] = Field(
        0.1, gt=0, le=1, description="gbdt: the shrinkage of each tree (XGBoost's eta)")
    seed: Annotated[int, Knob("both", searchable=False)] = Field(
        42, ge=0, description="seeds the validation split, the shuffling, dropout and the trees' sampling")
    validation_fraction: Annotated[float, Knob("both", searchable=False)] = Field(
        0.15, gt=0, lt=0.5, description="share of training rows held out per run")


def knob(name: str) -> Knob:
    return next(m for m in Hyperparameters.model_fields[name].metadata if isinstance(m, Knob))


SEARCHABLE = tuple(name for name in Hyperparameters.model_fields if knob(name).searchable)
FORM = tuple(name for name in Hyperparameters.model_fields if knob(name).form)
CHOICES = {name: get_args(field.annotation) for name, field in Hyperparameters.model_fields.items()
           if get_origin(field.annotation) is Literal}
FORM_SECTIONS = {"both": "Model", "mlp": "Network (model: mlp)", "gbdt": "Boosted trees (model: gbdt)"}


def refusal(err: ValidationError) -> str:
    """What ``Hyperparameters`` refused, one ``field: reason`` (its bound or choices) per problem."""
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" if e["loc"] else e["msg"] for e in err.errors())


def check_search_space(space: dict[str, list]) -> dict[str, list]:
    """A search space names searchable hyperparameters, each with candidate values within its bounds."""
    unknown = sorted(set(space) - set(SEARCHABLE))
    if unknown:
        raise ValueError(f"search_space has unknown hyperparameter(s) {unknown}; searchable: {list(SEARCHABLE)}")
    empty = sorted(k for k, v in space.items() if not v)
    if empty:
        raise ValueError(f"search_space lists no candidate values for {empty}")
    for key, values in space.items():
        refused = {}
        for value in values:
            try:
                Hyperparameters.model_validate({key: value})
            except ValidationError as err:
                refused[repr(value)] = refusal(err)
        if refused:
            raise ValueError(f"search_space.{key} lists [{', '.join(refused)}]; {next(iter(refused.values()))}")
    return space


def form_params() -> dict[str, dict]:
    """The trigger form's hyperparameters, each as the keyword arguments of its Airflow ``Param`` (less the
    default, which is the config's): its JSON schema (type, bounds, choices, title, description) and the form
    section of its model family."""
    schemas = Hyperparameters.model_json_schema()["properties"]
    return {name: {**{k: v for k, v in schemas[name].items() if k != "default"},
                   "section": FORM_SECTIONS[knob(name).family]} for name in FORM}
