"""The training entrypoint: one script for every backend, launched by torchrun.

    python -m mlfactory.training.train --train-uri URI --output-uri URI [--checkpoint-uri URI] [--hyperparameters JSON]

``--train-uri`` is a training set folder written by ml_train (``dataset.json``, the dataset spec,
next to Parquet files). ``--hyperparameters`` is a JSON object validated against
``mlfactory.hyperparameters.Hyperparameters`` (the one declaration of their defaults and bounds; one
omitted takes its default). The script trains the tabular model with DistributedDataParallel and a
DistributedSampler on every process torchrun started: ``gloo`` on CPU, ``nccl`` on GPU, ``xla`` on
TPU (torch_xla is imported only on that path). Run without torchrun on a platform that asks for more
than one process (``--nproc-per-node``, or SageMaker/Vertex/Azure variables, see ``mlfactory.training.cluster``),
it re-launches itself under torchrun.

Every epoch rank 0 writes a checkpoint to ``--checkpoint-uri`` (atomically); a restarted job resumes
from it, so a preempted spot job continues where it stopped. Runs are deterministic for a seed:
shuffling and dropout are seeded from (seed, epoch, rank), which also makes a resumed run repeat
exactly what the interrupted one would have done.

Rank 0 alone writes ``model.pt`` and ``metrics.json`` to ``--output-uri`` and logs to MLflow (when a
tracking URI is given; ``mlfactory.training.tracking``): params, per-epoch metrics, the training set as a
dataset input with its digest, the training curves, and the model as a pyfunc that takes the raw
feature columns.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from mlfactory import storage
from mlfactory.training.cluster import Cluster, data_locations, launched_by_torchrun
from mlfactory.hyperparameters import Hyperparameters, refusal
from mlfactory.specs import CHECKPOINT_FILE, DATASET_FILE, METRICS_FILE, MODEL_FILE, VALIDATION_FILE

log = logging.getLogger("mlfactory.training.train")


def _hyperparameters(text: str) -> Hyperparameters:
    """``--hyperparameters``: a JSON object the model accepts; else argparse's error (exit code 2) naming each
    field refused and its bound."""
    try:
        return Hyperparameters.model_validate_json(text)
    except ValidationError as err:
        raise argparse.ArgumentTypeError(refusal(err)) from None


def parse_args(argv: list[str], env=os.environ) -> argparse.Namespace:
    defaults = data_locations(env)
    p = argparse.ArgumentParser(prog="python -m mlfactory.training.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--train-uri", default=defaults.train_uri, help="training set folder (dataset.json + Parquet)")
    p.add_argument("--output-uri", default=defaults.output_uri, help="where model.pt and metrics.json go")
    p.add_argument("--checkpoint-uri", default=defaults.checkpoint_uri, help="per-epoch checkpoints; resume from here")
    p.add_argument("--hyperparameters", type=_hyperparameters, default=Hyperparameters(), metavar="JSON",
                   help='e.g. \'{"model": "gbdt", "trees": 500}\': fields of mlfactory.hyperparameters.Hyperparameters, '
                   "each one omitted at its default")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "xla"], default="auto")
    p.add_argument("--nproc-per-node", type=int, default=None, help="processes to launch when not under torchrun")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads per process (default: cores / processes)")
    p.add_argument("--mlflow-tracking-uri", default=env.get("MLFLOW_TRACKING_URI"))
    p.add_argument("--experiment", default=env.get("MLFLOW_EXPERIMENT_NAME", "mlfactory"))
    p.add_argument("--run-name", default=None)
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="MLflow run tag (repeatable)")
    args = p.parse_args(argv)
    missing = [name for name in ("train_uri", "output_uri") if not getattr(args, name)]
    if missing:
        p.error(f"--{missing[0].replace('_', '-')} is required (no platform variable such as SM_MODEL_DIR provides it)")
    bad_tags = [t for t in args.tag if "=" not in t]
    if bad_tags:
        p.error(f"--tag takes KEY=VALUE, got {bad_tags}")
    return args


# ---------------------------------------------------------------------------------------------
# Devices and process groups


@dataclass
class Runtime:
    device: object
    backend: str
    rank: int
    world_size: int
    local_rank: int
    mark_step: object = field(default=lambda: None)  # XLA executes the traced graph here

    @property
    def is_primary(self) -> bool:
        return self.rank == 0

    @property
    def hardware(self) -> str:
        """cpu, cuda or xla: what the process group's communication backend runs on."""
        return {"gloo": "cpu", "nccl": "cuda", "xla": "xla"}[self.backend]


def start_runtime(kind: str, env=os.environ) -> Runtime:
    import torch
    import torch.distributed as dist

    rank, world, local_rank = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))
    if kind == "auto":
        kind = "xla" if env.get("PJRT_DEVICE") else "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "xla":
        try:  # TPU (Vertex AI): only here, torch_xla is not installed elsewhere
            import torch_xla
            import torch_xla.core.xla_model as xm
            import torch_xla.distributed.xla_backend  # noqa: F401 - registers the "xla" process-group backend
        except ImportError as err:
            raise SystemExit(f"--device xla needs torch_xla (a TPU image); it is not installed: {err}") from err
        if world > 1:
            dist.init_process_group("xla", init_method="xla://")
        return Runtime(torch_xla.device(), "xla", rank, world, local_rank, mark_step=xm.mark_step)
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda was asked for but torch sees no GPU")
        torch.cuda.set_device(local_rank)
        backend, device = "nccl", torch.device("cuda", local_rank)
    else:
        backend, device = "gloo", torch.device("cpu")
    if world > 1:
        dist.init_process_group(backend)
    return Runtime(device, backend, rank, world, local_rank)


def _all_reduce_sum(runtime: Runtime, value: float) -> float:
    import torch
    import torch.distributed as dist

    if runtime.world_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=runtime.device)
    dist.all_reduce(tensor)
    return float(tensor.item())


def _barrier(runtime: Runtime) -> None:
    import torch.distributed as dist

    if runtime.world_size > 1:
        dist.barrier()


# ---------------------------------------------------------------------------------------------
# Data


def read_training_set(train_uri: str):
    """The dataset spec, every row, and the SHA-256 of the Parquet files of a training set folder."""
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    from mlfactory.dataset import DatasetSpec

    spec_uri = storage.join(train_uri, DATASET_FILE)
    if not storage.exists(spec_uri):
        raise SystemExit(f"{train_uri} is not a training set folder: {DATASET_FILE} is missing")
    dataset = DatasetSpec.model_validate_json(storage.read_bytes(spec_uri))
    digest, tables = hashlib.sha256(), []
    for part in sorted(o.uri for o in storage.list_objects(train_uri) if o.key.endswith(".parquet")):
        data = storage.read_bytes(part)
        digest.update(data)
        tables.append(pq.read_table(pa.BufferReader(data)))
    if not tables or sum(t.num_rows for t in tables) == 0:
        raise SystemExit(f"training set {train_uri} has no rows")
    return dataset, pa.concat_tables(tables).to_pandas(), digest.hexdigest()


def split(n_rows: int, fraction: float, seed: int):
    import numpy as np

    order = np.random.default_rng(seed).permutation(n_rows)
    n_val = max(1, int(round(n_rows * fraction)))
    return order[n_val:], order[:n_val]


# ---------------------------------------------------------------------------------------------
# Checkpoints


def load_checkpoint(uri: str | None):
    import torch

    if not uri or not storage.exists(storage.join(uri, CHECKPOINT_FILE)):
        return None
    return torch.load(io.BytesIO(storage.read_bytes(storage.join(uri, CHECKPOINT_FILE))), weights_only=True)


def save_checkpoint(uri: str, state: dict) -> None:
    import torch

    buffer = io.BytesIO()
    torch.save(state, buffer)
    with storage.atomic_write(storage.join(uri, CHECKPOINT_FILE)) as f:
        f.write(buffer.getvalue())


# ---------------------------------------------------------------------------------------------
# Training


def train(args: argparse.Namespace, env=os.environ) -> dict | None:
    import torch

    from mlfactory.tabular import Preprocessor, primary_metric
    from mlfactory.training.tracking import MlflowTracker

    hp = args.hyperparameters
    runtime = start_runtime(args.device, env)
    if hp.model == "gbdt" and runtime.hardware == "xla":
        raise SystemExit("model gbdt trains on CPUs or GPUs, not on a TPU: train the mlp there, or use a GPU")
    local_world = int(env.get("LOCAL_WORLD_SIZE", runtime.world_size))
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // local_world)
    torch.set_num_threads(args.threads)
    torch.manual_seed(hp.seed)
    say = log.info if runtime.is_primary else log.debug

    dataset, frame, digest = read_training_set(args.train_uri)
    train_idx, val_idx = split(len(frame), hp.validation_fraction, hp.seed)
    train_rows, val_rows = frame.iloc[train_idx], frame.iloc[val_idx]
    pre = Preprocessor.fit(train_rows, dataset)
    data = Encoded(*pre.encode(train_rows), pre.encode_target(train_rows[dataset.target]),
                   *pre.encode(val_rows), pre.encode_target(val_rows[dataset.target]))
    metric = f"val_{primary_metric(dataset.task)}"
    if hp.class_weight != "none" and pre.classes is None:
        raise SystemExit(f"class_weight {hp.class_weight} applies to classification; {dataset.name}'s task is regression")

    checkpoint = load_checkpoint(args.checkpoint_uri)
    if checkpoint is not None and checkpoint["hyperparameters"] != hp.model_dump():
        raise SystemExit(
            f"checkpoint at {args.checkpoint_uri} was written with other hyperparameters "
            f"{checkpoint['hyperparameters']}; use a new --checkpoint-uri for a new job"
        )
    tracker = None
    if runtime.is_primary:
        cluster = Cluster.from_environ(env)
        tracker = MlflowTracker.start(
            args.mlflow_tracking_uri, args.experiment, args.run_name,
            checkpoint["mlflow_run_id"] or None if checkpoint else None,
            params={**hp.model_dump(), "world_size": runtime.world_size, "backend": runtime.backend,
                    "rows": len(frame), "train_uri": args.train_uri},
            tags={"mlfactory.platform": cluster.platform, "mlfactory.job_id": cluster.job_id,
                  "mlfactory.dataset_sha256": digest, **dict(t.split("=", 1) for t in args.tag)},
            dataset=dataset, frame=frame, digest=digest, source_uri=args.train_uri)
    say("training %s on %d rows (%d validation): %s, %d process(es), backend %s", dataset.name, len(data.y),
        len(data.v_y), hp.model, runtime.world_size, runtime.backend)
    fit = _boost if hp.model == "gbdt" else _epochs
    model, history, val_scores = fit(args, runtime, pre, data, checkpoint, tracker, metric)

    result = None
    if runtime.is_primary:  # metrics.json, the job's result, is written last
        write_validation(args.output_uri, val_idx, val_scores, data.v_y.numpy())
        result = _finish(args, dataset, pre, model, history, metric, runtime, tracker)
    _barrier(runtime)
    if runtime.world_size > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return result


@dataclass
class Encoded:
    """The training and validation rows as the model takes them (``Preprocessor.encode``)."""

    x_dense: object
    x_cats: object
    y: object
    v_dense: object
    v_cats: object
    v_y: object


def _epoch_row(pre, data: Encoded, predicted, row: dict, metric: str, unit: str, total: str) -> dict:
    """One history row (rank 0): ``row`` and the validation metrics of ``predicted``, logged as
    ``<unit> <n>/<total>`` (an epoch of the network, a boosting round of the trees)."""
    from mlfactory.tabular import metrics

    row = {**row, **{f"val_{k}": v for k, v in metrics(pre, data.v_y, predicted).items()}}
    log.info("%s %d/%s  %s %.4f  %.0f samples/s", unit, row["epoch"], total, metric, row[metric], row["samples_per_s"])
    return row


def _epochs(args, runtime: Runtime, pre, data: Encoded, checkpoint, tracker, metric):
    """The network, trained with DistributedDataParallel over the processes torchrun started: AdamW on a
    one-cycle learning-rate schedule over ``epochs`` (warm-up to the peak ``learning_rate``, then cosine
    annealing), stopped once the validation metric has not improved for ``patience`` epochs; the weights
    of the best epoch are the model (its history row comes last)."""
    import copy

    import torch
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DistributedSampler

    from mlfactory.tabular import build_net, class_weights, loss_function, scores

    hp = args.hyperparameters
    net = build_net(pre, hp.hidden_sizes, hp.dropout, hp.numeric_embedding).to(runtime.device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=hp.learning_rate, weight_decay=hp.weight_decay)
    x_dense, x_cats, y = data.x_dense, data.x_cats, data.y
    sampler = DistributedSampler(range(len(y)), num_replicas=runtime.world_size, rank=runtime.rank,
                                 shuffle=True, seed=hp.seed, drop_last=True)
    per_process = len(sampler)
    steps = per_process // hp.batch_size + (1 if per_process % hp.batch_size >= 2 else 0)  # batches of 1 are skipped
    schedule = one_cycle(optimizer, hp.epochs * steps)
    history: list[dict] = []
    best = {"epoch": 0, "value": -math.inf, "state": None}  # rank 0's
    start_epoch = 1
    if checkpoint is not None:
        net.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        schedule.load_state_dict(checkpoint["schedule"])
        history = json.loads(checkpoint["history"])
        best = {"epoch": int(checkpoint["best_epoch"]), "value": float(checkpoint["best_value"]),
                "state": checkpoint["best_state"] or None}
        start_epoch = int(checkpoint["epoch"]) + 1
        log.info("resuming from checkpoint %s: epoch %d of %d done, starting epoch %d",
                 args.checkpoint_uri, start_epoch - 1, hp.epochs, start_epoch)
    model = DistributedDataParallel(net) if runtime.world_size > 1 else net
    loss_fn = loss_function(pre, class_weights(pre, y, hp.class_weight))
    stop = start_epoch > 1 and start_epoch - 1 - best["epoch"] >= hp.patience  # stopped just before a restart
    for epoch in range(start_epoch, hp.epochs + 1):
        if stop:
            break
        torch.manual_seed(hp.seed * 100_003 + epoch * 1009 + runtime.rank)  # dropout: reproducible on resume
        sampler.set_epoch(epoch)
        order = torch.tensor(list(iter(sampler)), dtype=torch.int64)
        model.train()
        started, total_loss, seen = time.perf_counter(), 0.0, 0
        for first in range(0, len(order), hp.batch_size):
            batch = order[first:first + hp.batch_size]
            if len(batch) < 2:
                continue
            out = model(x_dense[batch].to(runtime.device), x_cats[batch].to(runtime.device))
            loss = loss_fn(out, y[batch].to(runtime.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            runtime.mark_step()
            total_loss += float(loss.detach()) * len(batch)
            seen += len(batch)
        elapsed = time.perf_counter() - started
        samples = _all_reduce_sum(runtime, seen)
        loss_sum = _all_reduce_sum(runtime, total_loss)
        rate = _all_reduce_sum(runtime, seen / max(elapsed, 1e-9))  # summed per-process rates
        stopping = 0.0
        if runtime.is_primary:
            net.eval()
            with torch.no_grad():
                predicted = scores(pre, net(data.v_dense.to(runtime.device), data.v_cats.to(runtime.device)).cpu())
            row = _epoch_row(pre, data, predicted, {"epoch": epoch, "train_loss": loss_sum / max(samples, 1),
                                                    "learning_rate": schedule.get_last_lr()[0], "samples_per_s": rate},
                             metric, "epoch", str(hp.epochs))
            history.append(row)
            if row[metric] > best["value"]:  # a NaN metric (one class among the validation rows) is never best
                best = {"epoch": epoch, "value": row[metric], "state": copy.deepcopy(net.state_dict())}
            elif best["state"] is not None and epoch - best["epoch"] >= hp.patience:
                log.info("early stop: %s has not improved for %d epochs (best %.4f at epoch %d)", metric,
                         hp.patience, best["value"], best["epoch"])
                stopping = 1.0
            if tracker:
                tracker.log_epoch(row)
            if args.checkpoint_uri:
                save_checkpoint(args.checkpoint_uri, {
                    "epoch": epoch, "model": net.state_dict(), "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(), "history": json.dumps(history),
                    "best_epoch": best["epoch"], "best_value": best["value"], "best_state": best["state"] or {},
                    "mlflow_run_id": tracker.run_id if tracker else "", "hyperparameters": hp.model_dump(),
                })
                log.info("checkpoint: epoch %d saved to %s", epoch, args.checkpoint_uri)
        stop = _all_reduce_sum(runtime, stopping) > 0  # rank 0 decides; every process leaves the loop together
        _barrier(runtime)
    if runtime.is_primary and best["state"] is not None and best["epoch"] != history[-1]["epoch"]:
        net.load_state_dict(best["state"])
        history.append(next(row for row in history if row["epoch"] == best["epoch"]))
        log.info("kept the weights of epoch %d (%s %.4f)", best["epoch"], metric, best["value"])
    val_scores = None
    if runtime.is_primary:  # the kept weights' (a resumed run may not have them from before the restart)
        net.eval()
        with torch.no_grad():
            val_scores = scores(pre, net(data.v_dense.to(runtime.device), data.v_cats.to(runtime.device)).cpu())
    return net.cpu(), history, val_scores


def one_cycle(optimizer, total_steps: int, warmup_share: float = 0.1, start: float = 1 / 25, end: float = 1e-4):
    """The learning rate of each step: a linear warm-up from ``start`` x the optimizer's rate over the first
    ``warmup_share`` of the steps, then cosine annealing down to ``end`` x. Like OneCycleLR, whose phase
    arithmetic divides by zero for some step counts (10 steps in all, for one)."""
    import torch

    warmup = max(1, round(warmup_share * total_steps))
    annealing = max(1, total_steps - 1 - warmup)  # the last step is at `end`

    def factor(step: int) -> float:
        if step < warmup:
            return start + (1 - start) * step / warmup
        done = min(1.0, (step - warmup) / annealing)
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * done))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


GBDT_PATIENCE = 50  # rounds without a better validation metric before boosting stops
GBDT_SUBSAMPLE = 0.8  # rows and columns each tree sees: on the P7 datasets, +0.002 to +0.005 ROC AUC over 1.0
GBDT_CHECKPOINT_ROUNDS = 50


def _boost(args, runtime: Runtime, pre, data: Encoded, checkpoint, tracker, metric):
    """Gradient-boosted trees (XGBoost, hist, best-first leaves, row and column subsampling), early-stopped
    on the validation rows, then refit on every row for as many rounds (scaled to the rows added): the
    trial's metric is the early-stopped model's on the validation rows, the model the refit. Under torchrun each
    process boosts on its shard of the rows and XGBoost's collective joins them (its tracker started by
    rank 0, its address passed over the torch process group): one model, as if trained on all the rows;
    on the GPU (``device=cuda``) when the job has one. A checkpoint every 50 rounds; a resumed job adds
    the rounds still to do to the checkpointed trees."""
    import numpy as np
    import torch
    import xgboost as xgb

    from mlfactory.tabular import class_weights, scores, tree_feature_types, tree_inputs, tree_objective

    hp = args.hyperparameters
    shard = slice(runtime.rank, None, runtime.world_size)
    types = tree_feature_types(pre)
    weights = class_weights(pre, data.y, hp.class_weight)

    def matrix(dense, cats, y):
        y = y[shard]
        return xgb.DMatrix(tree_inputs(dense[shard], cats[shard]), label=y.numpy(), feature_types=types,
                           weight=None if weights is None else weights[y.long()].numpy(),
                           enable_categorical=True, nthread=args.threads)

    train, valid = matrix(data.x_dense, data.x_cats, data.y), matrix(data.v_dense, data.v_cats, data.v_y)
    params = {"tree_method": "hist", "grow_policy": "lossguide", "max_leaves": hp.tree_leaves, "max_depth": 0,
              "eta": hp.tree_learning_rate, "subsample": GBDT_SUBSAMPLE, "colsample_bytree": GBDT_SUBSAMPLE,
              "seed": hp.seed, "nthread": args.threads, "device": runtime.hardware, **tree_objective(pre)}
    history: list[dict] = []
    previous = None
    if checkpoint is not None:
        previous = xgb.Booster(model_file=bytearray(checkpoint["booster"].numpy().tobytes()))
        history = json.loads(checkpoint["history"])
        log.info("resuming from checkpoint %s: %d rounds done", args.checkpoint_uri, previous.num_boosted_rounds())
    done = previous.num_boosted_rounds() if previous is not None else 0
    started = time.perf_counter()

    class Progress(xgb.callback.TrainingCallback):
        def after_iteration(self, booster, epoch, evals_log) -> bool:
            rounds = done + epoch + 1
            if runtime.is_primary and (rounds % 10 == 0 or rounds == hp.trees):
                rate = len(data.y) * (epoch + 1) / max(time.perf_counter() - started, 1e-9)
                margins = booster.inplace_predict(tree_inputs(data.v_dense, data.v_cats), predict_type="margin")
                row = _epoch_row(pre, data, scores(pre, torch.from_numpy(np.asarray(margins))),
                                 {"epoch": rounds, "samples_per_s": rate}, metric, "round", str(hp.trees))
                history.append(row)
                if tracker:
                    tracker.log_epoch(row)
            if runtime.is_primary and args.checkpoint_uri and rounds % GBDT_CHECKPOINT_ROUNDS == 0:
                save_checkpoint(args.checkpoint_uri, {
                    "booster": torch.frombuffer(bytearray(booster.save_raw("ubj")), dtype=torch.uint8),
                    "history": json.dumps(history), "mlflow_run_id": tracker.run_id if tracker else "",
                    "hyperparameters": hp.model_dump(), "epoch": rounds})
                log.info("checkpoint: round %d saved to %s", rounds, args.checkpoint_uri)
            return False

    def boost():
        stopped = xgb.train(params, train, num_boost_round=max(hp.trees - done, 0), evals=[(valid, "val")],
                            early_stopping_rounds=GBDT_PATIENCE, xgb_model=previous, verbose_eval=False,
                            callbacks=[Progress()])
        best = getattr(stopped, "best_iteration", stopped.num_boosted_rounds() - 1) + 1
        # the model: as many rounds again (scaled to the rows added) on every row, validation rows included
        rounds = math.ceil(best / (1 - hp.validation_fraction))
        every_row = matrix(torch.cat([data.x_dense, data.v_dense]), torch.cat([data.x_cats, data.v_cats]),
                           torch.cat([data.y, data.v_y]))
        return stopped[:best], xgb.train(params, every_row, num_boost_round=rounds, verbose_eval=False)

    stopped, booster = boost() if runtime.world_size == 1 else _with_collective(runtime, boost)
    val_scores = None
    if runtime.is_primary:  # the early-stopped trees' (the refit has seen the validation rows)
        margins = stopped.inplace_predict(tree_inputs(data.v_dense, data.v_cats), predict_type="margin")
        val_scores = scores(pre, torch.from_numpy(np.asarray(margins)))
        final = _epoch_row(pre, data, val_scores,
                           {"epoch": stopped.num_boosted_rounds(),
                            "samples_per_s": history[-1]["samples_per_s"] if history else 0.0},
                           metric, "round", f"{hp.trees} (best)")
        history.append(final)
        log.info("refit on all %d rows: %d rounds (the best round's count, scaled to the rows added)",
                 len(data.y) + len(data.v_y), booster.num_boosted_rounds())
    return booster, history, val_scores


def _with_collective(runtime: Runtime, boost):
    """``boost()`` on every process inside XGBoost's collective: rank 0 starts the tracker on this node's
    address torchrun's rendezvous uses, and hands its arguments to the others over the torch process group."""
    import torch.distributed as dist
    from xgboost import collective
    from xgboost.tracker import RabitTracker

    tracker, args = None, [None]
    if runtime.is_primary:
        tracker = RabitTracker(n_workers=runtime.world_size, host_ip=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                               sortby="task")
        tracker.start()
        args = [tracker.worker_args()]
    dist.broadcast_object_list(args, src=0)
    try:
        with collective.CommunicatorContext(**args[0], dmlc_task_id=str(runtime.rank)):
            return boost()
    finally:
        if tracker is not None:
            tracker.wait_for()


def _finish(args, dataset, pre, model, history, metric, runtime, tracker) -> dict:
    from mlfactory.tabular import save_bundle

    hp = args.hyperparameters
    with tempfile.TemporaryDirectory() as tmp:
        bundle = str(Path(tmp) / MODEL_FILE)
        save_bundle(bundle, dataset, pre, model)
        storage.write_bytes(storage.join(args.output_uri, MODEL_FILE), Path(bundle).read_bytes())
        final = history[-1] if history else {}
        result = {
            "metric": metric,
            "value": final.get(metric),
            "metrics": final,
            "history": history,
            "epochs": history[-1]["epoch"] if history else 0,  # rounds of the kept trees, for gbdt
            "world_size": runtime.world_size,
            "backend": runtime.backend,
            "hyperparameters": hp.model_dump(),
            "samples_per_s": sum(h["samples_per_s"] for h in history) / max(len(history), 1),
            "output_uri": args.output_uri,
            "model_bundle_uri": storage.join(args.output_uri, MODEL_FILE),
        }
        if tracker:
            result.update(tracker.finish(bundle, history, dataset))
    storage.write_bytes(storage.join(args.output_uri, METRICS_FILE), json.dumps(result, indent=2).encode())
    log.info("done: %s %.4f after %d %s; model and metrics in %s", metric, result["value"] or float("nan"),
             result["epochs"], "rounds" if hp.model == "gbdt" else "epochs", args.output_uri)
    return result


def write_validation(output_uri: str, rows, val_scores, target) -> None:
    """``VALIDATION_FILE`` beside the model: the validation rows (their positions in the training set), the
    model's scores on them (``tabular.scores``: what its metric was computed from) and their encoded targets.
    ml_train's blend (``mlfactory.training.blend``) weighs the best trial of each model family on them."""
    import numpy as np

    buffer = io.BytesIO()
    np.savez_compressed(buffer, rows=np.asarray(rows, np.int64), scores=np.asarray(val_scores, np.float32),
                        target=np.asarray(target))
    storage.write_bytes(storage.join(output_uri, VALIDATION_FILE), buffer.getvalue())


# ---------------------------------------------------------------------------------------------


def _without_option(argv: list[str], option: str) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [rank " + os.environ.get("RANK", "0") + "] %(message)s",
                        stream=sys.stdout, force=True)
    logging.getLogger("azure").setLevel(logging.WARNING)  # the Azure SDKs (adlfs) log every HTTP request at INFO
    worker = launched_by_torchrun(os.environ)
    if worker:
        _interpreter_signal_handlers()
    args = parse_args(argv)
    if not worker:
        cluster = Cluster.from_environ(os.environ, args.nproc_per_node)
        if cluster.world_size > 1:
            command = cluster.torchrun_command("mlfactory.training.train", _without_option(argv, "--nproc-per-node"))
            log.info("launching %d process(es) on node %d of %d (%s): %s", cluster.nproc_per_node, cluster.node_rank,
                     cluster.nodes, cluster.platform, " ".join(command))
            os.execv(command[0], command)
    try:
        train(args)
    except BaseException:
        _end_mlflow_run("FAILED")
        raise
    return 0


def _interpreter_signal_handlers() -> None:
    """A worker forked by torchrun's launcher (``--start-method=fork``) inherits the launcher's handlers, which
    raise an exception only once the worker is back in Python: SIGTERM, SIGHUP and SIGQUIT end it at once again,
    and SIGINT raises KeyboardInterrupt, as in a worker started as a command."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _end_mlflow_run(status: str) -> None:
    """End this process's active MLflow run, if any, with ``status``: a forked worker exits without running
    ``atexit`` handlers, where MLflow would have ended it, and a job that failed did not finish."""
    mlflow = sys.modules.get("mlflow")
    run = mlflow.active_run() if mlflow is not None else None
    if run is not None:
        try:
            mlflow.end_run(status)
        except Exception:  # noqa: BLE001 - the job's own error is the one to report
            log.warning("could not mark MLflow run %s %s", run.info.run_id, status, exc_info=True)


if __name__ == "__main__":
    sys.exit(main())
