"""The runner, top to bottom: build model, data and method; train; evaluate; record.

Every run, whatever happens, leaves config.yaml, metrics.json and log.jsonl in its directory (its RunRecord).
"""

from __future__ import annotations

import logging
import traceback
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from .best_weights import BestOnDev
from .build import Evaluator, build_method, build_model, encode_splits, sample_splits
from .checkpoint import Checkpointer, RecordingLoss
from .early_stopping import EarlyStopping
from .encoding import collate_indices
from .errors import Diverged, Interrupted, ZobenchError
from .failures import run_failure
from .loggers import open_trackers
from .models import parameter_count, trained_parameters
from .objective import Objective
from .optim.base import EVALUATION_ONLY
from .parallel.launch import follow_run_folder, joined, send_run_folder
from .parallel.ranks import Ranks
from .parallel.sharded_checkpoint import save_model_folder
from .parallel.world import World, from_env
from .resume import resumable_state
from .run_dir import RunDir
from .run_record import RunRecord, device_names, devices_used, record_refusal
from .spec import RunSpec
from .stop_signals import signals_stop

log = logging.getLogger(__name__)


def run(cfg: DictConfig | RunSpec, run_dir: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run one job into `run_dir`, or resume the interrupted/failed one there; returns metrics.json's
    content. Raises after recording a failure. `overrides`: the command line, kept for `zobench resume=`.
    Under torchrun every rank runs it, each into its own folder (zobench/parallel/launch.py)."""
    world = from_env()
    spec = _spec(cfg, run_dir, overrides)  # every check, before any data or model is read
    with joined(world, spec.device.type):
        return _run(spec, run_dir, overrides, world)


def _run(spec: RunSpec, run_dir: str | Path, overrides: list[str] | None, world: World) -> dict[str, Any]:
    if not world.main:  # rank 0's folder, copied into this rank's own when it resumes
        follow_run_folder(world, Path(run_dir))
    directory = RunDir(run_dir).claim()  # the lock, for the job's lifetime; refuses foreign and live folders
    job = None
    try:
        resume_state = resumable_state(directory, spec.config_yaml, world)
        if world.main:
            send_run_folder(world, directory.path, resuming=resume_state is not None)
        if resume_state is None:
            directory.start(spec.config_yaml, overrides)
        job = Job(spec, directory, resume_state, world)
        try:
            with signals_stop(job):
                job.execute()
            job.record.note(status="completed")
        except Diverged as error:
            job.record.fail("diverged", f"diverged at step {job.diverged_step()}: {error}")
        except (torch.cuda.OutOfMemoryError, MemoryError) as error:
            message = job.record.out_of_memory(error)
            raise ZobenchError(message) from error
        except (KeyboardInterrupt, Exception) as error:  # failures.py: the one mapping of an error to a status
            failure = run_failure(error, job.record.metrics["steps"], directory.path)
            if failure.traceback:
                log.debug("traceback:\n%s", traceback.format_exc())
            job.record.fail(failure.status, failure.message)
            raise failure.raised
        finally:
            job.close()
    finally:
        directory.release()
        if job is not None and job.hand_on is not None:
            job.hand_on()  # submitit's SIGUSR2 handler: requeues the job, now that the run is recorded
    return job.record.metrics


def _spec(cfg: DictConfig | RunSpec, run_dir: str | Path, overrides: list[str] | None) -> RunSpec:
    """Every check before any data or model is read (the CLI's exit 2); run()'s caller finds it recorded too."""
    try:
        return cfg if isinstance(cfg, RunSpec) else RunSpec.from_cfg(cfg)
    except ZobenchError as error:
        record_refusal(RunDir(run_dir), OmegaConf.to_yaml(cfg), overrides, str(error))
        raise


class Job:
    """One run: `execute()` builds its parts and runs the recipe; the record, the best on dev and the
    checkpointer are what run() reads when it ends, however it ends."""

    def __init__(self, spec: RunSpec, directory: RunDir, resume_state: dict[str, Any] | None = None,
                 world: World = World()):
        self.spec, self.directory, self.resume_state = spec, directory, resume_state
        self.ranks = Ranks(spec, world)  # what runs over torchrun's ranks (a world of one without), checked here
        resumed = resume_state or {}
        self.record = RunRecord(spec, directory, resumed.get("job"), resumed.get("step", 0))
        self.best: BestOnDev | None = None  # built with the model
        self.checkpointer: Checkpointer | None = None  # a method that trains has one
        self.stopper = EarlyStopping()  # train.early_stop, set up in _train
        self.stop_requested = False  # set by SIGTERM/SIGINT/SIGUSR2 during training: stop after the step
        self.hand_on = None  # the stop signal's previous handler (submitit's requeue), called once recorded
        self.in_training_loop = False

    def execute(self) -> None:
        record = self.record
        record.log.attach(open_trackers(self.spec, self.directory.path, resumed=self.resume_state is not None))
        record.start_clocks(self.spec.device)
        torch.manual_seed(self.spec.seed)
        ranks, splits = self.ranks, sample_splits(self.spec)
        self.directory.fingerprint("data", [splits.train, splits.dev, splits.test])  # a resume refuses other data
        record.note(data_source=splits.source, n_train=len(splits.train), n_dev=len(splits.dev),
                    n_test=len(splits.test))
        spec = self.spec = self.spec.for_training_size(len(splits.train))  # train.epochs: steps from this size
        if spec.train.epochs is not None:
            record.note(steps_planned=spec.train.steps)
        model, tokenizer, saveable = build_model(spec, max_length=spec.max_length, empty=ranks.streams)
        record.device = device = ranks.input_device(model)  # batches go where the (first shard of the) model is
        forward = ranks.place(model, device)  # sharded or wrapped under torchrun, before objective and method
        used = devices_used(model)  # several GPUs under model.device_map
        record.note(device=device_names(used), devices=[str(d) for d in used],
                    dtype=str(spec.dtype).removeprefix("torch."), n_params=parameter_count(model))
        encoded = encode_splits(spec, splits, tokenizer)
        record.note(**encoded.record())
        precision = spec.precision
        record.note(precision=precision.record())
        objective = Objective(model, record.counter, loss_dtype=precision.dtype_of(precision.loss_dtype),
                              forward=forward)
        # the loss values of each step, the global ones under torchrun: the ZO trajectory
        recording = RecordingLoss(ranks.training_loss(objective))
        method = build_method(spec, model, recording)
        ranks.attach(method, recording)
        trains = method.kind != EVALUATION_ONLY
        # counted once the method is built: head-tuning chooses its trained parameters there
        record.note(n_trainable_params=sum(p.numel() for p in trained_parameters(model).values()) if trains else 0)
        evaluator = Evaluator(objective, spec, tokenizer, device)
        self.best = BestOnDev(model, spec.train.keep_best if trains else "none", self.directory, record,
                              select_by=spec.train.select_by, world=ranks.world)
        if trains:
            self.checkpointer = Checkpointer(self.directory, model, method, spec.checkpoint.weights, ranks.world)
            start = 0 if self.resume_state is None else self.best.resume(self.checkpointer, self.resume_state)
            self._train(method, recording, encoded, tokenizer.pad_token_id, evaluator, start)
            self.best.restore()
        else:
            evaluator = self._evaluate_only(method, objective, encoded, tokenizer.pad_token_id, evaluator)
        record.log_test(evaluator, encoded.test)
        record.note(**ranks.summary(model, record))
        if spec.save_model:  # the tested weights (with PEFT: the adapter alone), moved into place once complete
            record.note(saved_model=save_model_folder(self.directory, ranks.world, saveable, model, tokenizer))

    def _evaluate_only(self, method, objective, encoded, pad_id: int, evaluator):
        """Zero-shot and ICL: the model as loaded. A method that fits an evaluator first (linear probing, on
        the training sample's features) has those forward passes and seconds as the run's training cost."""
        self.record.note(steps_planned=0)
        with self.record.training():
            fitted = method.fit_evaluator(objective, encoded.train, pad_id, self.spec.eval.batch_size,
                                          self.record.device)
        if fitted is None:  # nothing was trained: no training seconds either
            self.record.note(train_wall_clock_s=0.0)
        else:
            self.record.count_training()
            evaluator = fitted
        self._dev_eval(evaluator, encoded.dev, 0)
        return evaluator

    def _train(self, method, recording, encoded, pad_id: int, evaluator, start: int) -> None:
        spec, record, train = self.spec, self.record, encoded.train
        steps, log_every, eval_every = spec.train.steps, spec.train.log_interval, spec.train.eval_interval
        batches = method.batches([max(map(len, e.sequences)) for e in train], spec.train.batch_size, spec.seed)
        for _ in range(start):  # the data order of the steps already done
            next(batches)
        stopper = self.stopper = EarlyStopping.from_spec(spec.train.early_stop, bool(encoded.dev))
        if self.resume_state is not None:
            stopper.load_state_dict(self.resume_state["job"].get("early_stop"))
        if stopper.stopped:  # resumed after an early stop: training is over
            return
        if start == 0 and stopper.due(0, regular=False):  # AdaMeZO evaluates the initial weights too
            stopper.observe(0, self._dev_eval(evaluator, encoded.dev, 0, select=False))
        classification = spec.task["train_as_classification"]
        self.in_training_loop = True
        record.start_progress(steps, start, desc=f"{spec.method.name} {spec.task['name']}")
        try:
            with record.training():
                for step in range(start + 1, steps + 1):
                    indices = self.ranks.local(next(batches))  # parallel.zo=data: this rank's slice
                    batch = (collate_indices(indices, train, pad_id, classification, record.device)
                             if indices else None)  # an empty slice (a short last batch) adds nothing
                    lr = method.lr
                    loss = method.step(batch)
                    self.checkpointer.record_step(step, recording.take(), lr)
                    record.log_train(step, loss, lr, line=step % log_every == 0 or step == steps)
                    regular = (eval_every > 0 and step % eval_every == 0) or step == steps
                    early = stopper.due(step, regular)
                    if regular or early:
                        result = self._dev_eval(evaluator, encoded.dev, step, select=regular)
                        if early and stopper.observe(step, result):
                            self._stop_early(result, step, selected=regular)
                    stop = self.ranks.stop_agreed(self.stop_requested)  # all ranks stop after the same step
                    if regular or early or step % spec.checkpoint.every == 0 or stop:
                        self.checkpointer.save(step, self._job_state())
                    if stop:
                        raise Interrupted("stop requested")
                    if stopper.stopped:
                        break
        finally:
            self.in_training_loop = False
            record.stop_progress()

    def _dev_eval(self, evaluator, dev, step: int, select: bool = True) -> dict[str, Any] | None:
        """Evaluates on dev; `select`: the weights may become the kept best-on-dev ones."""
        if not dev:
            return None
        result = self.record.log_eval("dev", step, evaluator, dev)
        self.record.echo_dev(step, result, best=select and self.best.offer(result, step))
        return result

    def _stop_early(self, result: dict[str, Any], step: int, selected: bool) -> None:
        """The step where train.early_stop ends the run is its last: its weights are a candidate for the
        kept best, as those of train.steps are."""
        if not selected:
            self.best.offer(result, step)
        self.record.log_early_stop(step, self.stopper.record())
        log.info("stopped early at step %d: %s", step, self.record.metrics["stop_reason"])

    def _job_state(self) -> dict[str, Any]:
        """Everything of the job a resume needs besides model and method."""
        return {**self.record.state_dict(), **self.best.state_dict(), "early_stop": self.stopper.state_dict()}

    def diverged_step(self) -> int:
        """The step whose loss was not finite: one past the last recorded when the method raised it."""
        pending = self.checkpointer is not None and self.checkpointer.pending_step()
        return self.record.metrics["steps"] + (1 if pending else 0)

    def close(self) -> None:
        """An ended run's kept best-on-dev copy goes (an interrupted or failed run keeps it for its resume);
        the record writes the run's end. A completed run's checkpoint tensors go once metrics.json says so, and
        its disk_bytes is written again without them."""
        try:
            if self.best is not None and self.record.metrics["status"] in ("completed", "diverged"):
                self.best.discard()
        finally:
            self.record.finish()
        if self.checkpointer is not None and self.record.metrics["status"] == "completed":
            self.checkpointer.finish()
            self.record.note_disk_bytes()
