"""The runner, top to bottom: build model, data, optimizer; train; evaluate; record.

Every run, whatever happens, leaves config.yaml, metrics.json and log.jsonl in its directory.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from .best_weights import BestWeights
from .checkpoint import Checkpointer, RecordingLoss
from .data import sample_task
from .early_stopping import EarlyStopping
from .encoding import Encoder, collate
from .epochs import resolve_epochs
from .errors import Diverged, Interrupted, ZobenchError
from .evaluate import MAX_NEW_TOKENS, evaluate
from .icl import demonstration_blocks
from .linear_probe import LinearProbe, ProbeEvaluator, check_task
from .loggers import open_trackers
from .models import (bos_override, input_device, load_model, parameter_count, resolve_device, resolve_dtype,
                     trained_parameters)
from .objective import Objective, PassCounter
from .optim import build_optimizer
from .peft_adapters import apply_peft
from .precision import from_config as precision_from_config
from .records import (JsonlLog, Stopwatch, device_name, final_figures, initial_metrics, peak_memory,
                      reset_peak_memory)
from .run_dir import RunDir, now, text_sha256
from .safe_files import YAML_LIMIT, read_text
from .tasks import PromptTemplate
from .validate import validate

log = logging.getLogger(__name__)


def run(cfg: DictConfig, run_dir: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run one job into `run_dir`, or resume the interrupted/failed one there; returns metrics.json's
    content. Raises after recording a failure. `overrides`: the command line, kept for `zobench resume=`."""
    directory = RunDir(run_dir).claim()  # the lock, for the job's lifetime; refuses foreign and live folders
    try:
        resume_state = _resumable_state(directory, cfg)
        if resume_state is None:
            directory.start(OmegaConf.to_yaml(cfg, resolve=True), overrides)
        job = Job(cfg, directory, resume_state)
        try:
            with _signals_stop(job):
                job.execute()
            job.metrics["status"] = "completed"
        except Diverged as error:
            job.fail("diverged", f"diverged at step {job.diverged_step()}: {error}")
        except (torch.cuda.OutOfMemoryError, MemoryError) as error:
            message = job.out_of_memory(error)
            raise ZobenchError(message) from error
        except (KeyboardInterrupt, Interrupted):
            job.fail("interrupted", f"interrupted at step {job.metrics['steps']}")
            raise
        except ZobenchError as error:
            job.fail("failed", str(error))
            raise
        except OSError as error:  # a full disk, a folder made read-only: recorded if it still can be
            log.debug("traceback:\n%s", traceback.format_exc())
            job.fail("failed", f"could not write to {directory.path}: {error}")
            raise ZobenchError(job.metrics["error"]) from error
        except Exception as error:
            log.debug("traceback:\n%s", traceback.format_exc())
            job.fail("failed", f"{type(error).__name__}: {error}")
            raise
        finally:
            job.close()
    finally:
        directory.release()
    return job.metrics


def _resumable_state(directory: RunDir, cfg: DictConfig) -> dict[str, Any] | None:
    """None for a fresh directory, or for an unfinished run that left no checkpoint (it starts again from
    step 0, what it recorded moved to attempts/N); else the checkpoint of an unfinished run made with the
    same config, its records rewound to it."""
    metrics = directory.read_json("metrics.json")
    if metrics is None:
        directory.refuse_leftovers()
        return None
    run_dir, status = directory.path, metrics.get("status")
    if status == "completed":
        raise ZobenchError(f"{run_dir} already holds a completed run; zobench never overwrites results")
    state = Checkpointer.load_state(directory)
    if state is None and status == "diverged":  # a result, as a completed run is
        raise ZobenchError(f"{run_dir} holds a diverged run that left no checkpoint; zobench never overwrites "
                           f"results: start a new run")
    saved = read_text(run_dir / "config.yaml", YAML_LIMIT) if (run_dir / "config.yaml").exists() else None
    if saved != OmegaConf.to_yaml(cfg, resolve=True):
        raise ZobenchError(f"{run_dir} was started with another config; resume it as it was with "
                           f"`zobench resume={run_dir}`")
    if state is None:  # killed or failed before its first checkpoint: nothing to resume, nothing lost
        attempt = directory.set_aside_attempt()
        log.warning("the %s run in %s left no checkpoint: it starts again from step 0 (its records are kept "
                    "in %s)", status, run_dir, attempt)
        return None
    directory.fingerprint("config", saved)  # config.yaml edited to match another command line: refused
    directory.config_sha256 = text_sha256(saved)
    directory.rewind(state["records"], state["step"])
    log.info("resuming the %s run in %s from step %d", status, run_dir, state["step"])
    return state


class Job:
    def __init__(self, cfg: DictConfig, directory: RunDir, resume_state: dict[str, Any] | None = None):
        self.cfg, self.directory, self.resume_state = cfg, directory, resume_state
        self.run_dir = run_dir = directory.path
        self.device = torch.device("cpu")
        self.counter = PassCounter()  # every forward/backward/token, training and evaluation
        self.eval_tokens = 0
        self.best_score = math.inf
        self.earlier_seconds = {"total": 0.0, "train": 0.0}  # spent before a resume
        self.best: BestWeights | None = None
        self.early_stop = EarlyStopping()  # train.early_stop, set up in _train
        self.checkpointer: Checkpointer | None = None
        self.saveable = None  # what save_model writes: the model, or a PEFT adapter alone
        self.stop_requested = False  # set by SIGTERM/SIGINT during training: stop after the step
        self.in_training_loop = False
        self.log = JsonlLog(directory.records("log.jsonl"))
        self.clock = Stopwatch(self.device)
        self.metrics: dict[str, Any] = initial_metrics(cfg, run_dir)
        if resume_state is not None:
            saved = resume_state["job"]
            self.metrics.update(saved["metrics"], status="running", error=None,
                                resumed_at_step=resume_state["step"])
            self.counter = PassCounter(**saved["counter"])
            self.eval_tokens, self.best_score = saved["eval_tokens"], saved["best_score"]
            self.earlier_seconds = saved["seconds"]
        self.recent_losses: list[float] = list(resume_state["job"]["recent_losses"]) if resume_state else []
        self.metrics.update(directory.provenance())  # run id, config.yaml's SHA-256, earlier attempts
        self._write_metrics()

    # -- the job -------------------------------------------------------------------------------
    def execute(self) -> None:
        cfg = self.cfg
        validate(cfg)
        self.log.attach(open_trackers(cfg, self.run_dir, resumed=self.resume_state is not None))
        self.device = resolve_device(str(cfg.device))
        dtype = resolve_dtype(str(cfg.dtype), self.device)
        self.clock = Stopwatch(self.device)
        reset_peak_memory(self.device)
        torch.manual_seed(int(cfg.seed))
        task = OmegaConf.to_container(cfg.task, resolve=True)
        classification = bool(task["train_as_classification"])
        if classification and task["kind"] == "generation":
            raise ZobenchError(f"task '{task['name']}' is a generation task: train_as_classification must be false")
        trains = _check_method(cfg, task)
        splits = self._data(task)
        if resolve_epochs(cfg.train, len(splits.train)):  # train.epochs: steps from this task's training size
            self.metrics["steps_planned"] = int(cfg.train.steps)
        model_spec = OmegaConf.to_container(cfg.model, resolve=True)
        model, tokenizer = load_model(model_spec, self.device, dtype, max_length=int(cfg.max_length))
        peft_spec = OmegaConf.to_container(cfg.peft, resolve=True) if "peft" in cfg else None
        model, self.saveable = apply_peft(model, peft_spec, seed=int(cfg.seed))
        self.device = input_device(model)  # batches go where the (first shard of the) model is
        self.metrics.update(device=device_name(self.device), dtype=str(dtype).removeprefix("torch."),
                            n_params=parameter_count(model))
        encoded = self._encode(splits, task, Encoder(tokenizer, int(cfg.max_length), bos_override(model_spec)))
        precision = precision_from_config(cfg.get("precision"), dtype)
        self.metrics["precision"] = precision.record()
        objective = Objective(model, self.counter, loss_dtype=precision.dtype_of(precision.loss_dtype))
        recording = RecordingLoss(objective)  # the loss values of each step: the ZO trajectory
        optimizer = build_optimizer(cfg.optimizer, model, recording, seed=int(cfg.seed),
                                    total_steps=int(cfg.train.steps), precision=precision)
        # counted once the optimizer is built: head-tuning chooses its trained parameters there
        self.metrics["n_trainable_params"] = sum(p.numel() for p in trained_parameters(model).values()) if trains else 0
        evaluator = _Evaluator(objective, task, tokenizer, classification, cfg, self.device)
        self.best = BestWeights(model, str(cfg.train.keep_best) if trains else "none", self.directory,
                                step=lambda: self.metrics["steps"])
        if trains:
            self.checkpointer = Checkpointer(self.directory, model, optimizer, bool(cfg.checkpoint.weights))
            start = self._resume(optimizer) if self.resume_state is not None else 0
            self._train(optimizer, recording, encoded, tokenizer.pad_token_id, classification, evaluator, start)
            self.best.restore()
        else:
            evaluator = self._evaluate_only(optimizer, objective, encoded, tokenizer.pad_token_id, evaluator)
        test = self._timed_eval(evaluator, encoded["test"], "test", self.metrics["steps"])
        self.metrics.update(test_metric=test["metric"], test_scores=_scores(test))
        log.info("test %s = %s (dev %s = %s, best step %s)", task["metric"], _fmt(test["metric"]),
                 task["metric"], _fmt(self.metrics["dev_metric"]), self.metrics["best_step"])
        if cfg.save_model:
            self._save_model(tokenizer)
        if self.checkpointer is not None:
            self.checkpointer.finish()

    def _evaluate_only(self, method, objective, encoded, pad_id: int, evaluator):
        """Zero-shot and ICL: the model as loaded. Linear probing fits its probe first, on the training
        sample's features: those forward passes and seconds are the run's training cost."""
        self.metrics.update(steps_planned=0, train_wall_clock_s=0.0)
        if isinstance(method, LinearProbe):
            clock = Stopwatch(self.device)
            evaluator = ProbeEvaluator(method, objective, pad_id, int(self.cfg.eval.batch_size), self.device)
            evaluator.fit(encoded["train"])
            self.metrics["train_wall_clock_s"] = clock.elapsed()
            self._count_train()
        self._dev_eval(evaluator, encoded["dev"], 0)
        return evaluator

    def _resume(self, optimizer) -> int:
        """Bring model and optimizer to the checkpoint's step; returns that step."""
        step, best_step = self.resume_state["step"], self.metrics["best_step"]
        if not self.checkpointer.restore(self.resume_state, self.best, best_step):
            log.warning("the best-on-dev weights (step %s) did not survive the stop (train.keep_best=%s); "
                        "the test uses the best of the evaluations from now on", best_step, self.best.mode)
            self.best_score = math.inf
        log.info("resumed at step %d (%s checkpoint)", step, self.resume_state["mode"])
        return step

    def _save_model(self, tokenizer) -> None:
        """The tested weights (with PEFT: the adapter alone) as a save_pretrained folder, moved into place
        only once complete."""
        self.metrics["saved_model"] = str(self.directory.save_folder(
            "model", lambda partial: (self.saveable.save_pretrained(partial), tokenizer.save_pretrained(partial))))

    def _data(self, task: dict[str, Any]):
        splits = sample_task(task, self.cfg.data)
        source = splits.source
        self.directory.fingerprint("data", [splits.train, splits.dev, splits.test])  # a resume refuses other data
        self.metrics.update(data_source=source, n_train=len(splits.train), n_dev=len(splits.dev),
                            n_test=len(splits.test))
        log.info("data: %d train / %d dev / %d test from %s", len(splits.train), len(splits.dev),
                 len(splits.test), source)
        return splits

    def _encode(self, splits, task, encoder: Encoder) -> dict[str, list]:
        template = PromptTemplate(task)
        room = MAX_NEW_TOKENS if task["kind"] == "generation" else 0
        rendered = {name: [template.render(row) for row in getattr(splits, name)] for name in ("train", "dev", "test")}
        contexts = self._demonstrations(rendered, splits.train_pool, template)
        encoded = {name: [encoder.encode(example, room, context) for example, context in zip(examples, contexts[name])]
                   for name, examples in rendered.items()}
        self.metrics["truncated"] = {name: sum(e.truncated for e in rows) for name, rows in encoded.items()}
        if any(self.metrics["truncated"].values()):
            log.warning("truncated from the left to max_length=%s: %s", self.cfg.max_length,
                        self.metrics["truncated"])
        return encoded

    def _demonstrations(self, rendered, pool, template) -> dict[str, list[str]]:
        """ICL (icl.k > 0): each dev and test prompt's own k demonstrations drawn from the whole train split,
        MeZO's pool (zobench/icl.py); test takes the first draws, so its demonstrations do not depend on the
        dev size. Training examples never get any (MeZO)."""
        k, n_test, n_dev = int(self.metrics["icl_k"]), len(rendered["test"]), len(rendered["dev"])
        if not k:
            blocks = [""] * (n_test + n_dev)
        else:
            blocks = demonstration_blocks(pool, n_test + n_dev, k, int(self.cfg.data.seed), template.render)
            self.metrics["icl_pool"] = len(pool)
            if k > len(pool):
                log.warning("icl.k=%d but the train split holds %d examples: each prompt gets all of them",
                            k, len(pool))
        return {"train": [""] * len(rendered["train"]), "test": blocks[:n_test], "dev": blocks[n_test:]}

    def _train(self, optimizer, recording, encoded, pad_id, classification, evaluator, start: int) -> None:
        train_cfg = self.cfg.train
        steps, batch_size = int(train_cfg.steps), int(train_cfg.batch_size)
        log_interval, eval_interval = int(train_cfg.log_interval), int(train_cfg.eval_interval)
        checkpoint_every = int(self.cfg.checkpoint.every)
        train = encoded["train"]
        batches = optimizer.batches([max(map(len, e.sequences)) for e in train], batch_size, int(self.cfg.seed))
        for _ in range(start):  # the data order of the steps already done
            next(batches)
        recent = self.recent_losses  # the losses since the last train line: checkpointed, a resume goes on
        stopper = self.early_stop = EarlyStopping.from_config(train_cfg.get("early_stop"), bool(encoded["dev"]))
        if self.resume_state is not None:
            stopper.load_state_dict(self.resume_state["job"].get("early_stop"))
        if stopper.stopped:  # resumed after an early stop: training is over
            return
        if start == 0 and stopper.due(0, regular=False):  # AdaMeZO evaluates the initial weights too
            stopper.observe(0, self._dev_eval(evaluator, encoded["dev"], 0, select=False))
        train_clock = Stopwatch(self.device)
        self.metrics["train_wall_clock_s"] = self.earlier_seconds["train"]
        bar = tqdm(total=steps, initial=start, desc=f"{self.cfg.optimizer.name} {self.cfg.task.name}",
                   unit="step", dynamic_ncols=True, disable=None)
        self.in_training_loop = True
        try:
            for step in range(start + 1, steps + 1):
                batch = _collate_indices(next(batches), train, pad_id, classification, self.device)
                lr = optimizer.lr
                loss = optimizer.step(batch)
                self.checkpointer.record_step(step, recording.take(), lr)
                self._count_train()
                self.metrics["steps"] = step
                if not math.isfinite(loss):
                    raise Diverged(f"loss is {loss}")
                recent.append(float(loss))
                if step % log_interval == 0 or step == steps:
                    self.log.write({"event": "train", "step": step, "loss": sum(recent) / len(recent),
                                    "lr": lr, "elapsed_s": self._elapsed(),
                                    "forward_passes": self.metrics["forward_passes"]})
                    bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")
                    recent.clear()
                bar.update(1)
                regular = (eval_interval > 0 and step % eval_interval == 0) or step == steps
                early = stopper.due(step, regular)
                evaluate_now = regular or early
                if evaluate_now:
                    self.metrics["train_wall_clock_s"] += train_clock.elapsed()
                    result = self._dev_eval(evaluator, encoded["dev"], step, select=regular)
                    if early and stopper.observe(step, result):
                        self._stop_early(result, step, selected=regular)
                    train_clock = Stopwatch(self.device)
                if evaluate_now or step % checkpoint_every == 0 or self.stop_requested:
                    self.metrics["train_wall_clock_s"] += train_clock.elapsed()
                    train_clock = Stopwatch(self.device)
                    self.checkpointer.save(step, self._job_state())
                if self.stop_requested:
                    raise Interrupted("stop requested")
                if stopper.stopped:
                    break
        finally:
            self.in_training_loop = False
            bar.close()
            self.metrics["train_wall_clock_s"] += train_clock.elapsed()

    def _dev_eval(self, evaluator, dev, step: int, select: bool = True) -> dict[str, Any] | None:
        """Evaluates on dev; `select`: the weights may become the kept best-on-dev ones."""
        if not dev:
            return None
        result = self._timed_eval(evaluator, dev, "dev", step)
        if select:
            self._keep_if_best(result, step)
        return result

    def _keep_if_best(self, result: dict[str, Any], step: int) -> None:
        score = result["loss"] if self.cfg.train.select_by == "loss" else -result["metric"]
        # keep_best=none tests the final weights: the dev figures are the latest evaluation's (the last step,
        # or the early stop's, is always evaluated), so they describe the weights the test scores
        if score < self.best_score or self.best.mode == "none":  # the first evaluation always becomes the best
            self.best_score = score
            self.best.save()
            self.metrics.update(dev_metric=result["metric"], dev_loss=result["loss"], best_step=step)
            self._write_metrics()

    def _stop_early(self, result: dict[str, Any], step: int, selected: bool) -> None:
        """The step where train.early_stop ends the run is its last: its weights are a candidate for the
        kept best, as those of train.steps are."""
        if not selected:
            self._keep_if_best(result, step)
        self.metrics.update(self.early_stop.record())
        self.log.write({"event": "early_stop", "step": step, "reason": self.metrics["stop_reason"],
                        "elapsed_s": self._elapsed(), "forward_passes": self.metrics["forward_passes"]})
        log.info("stopped early at step %d: %s", step, self.metrics["stop_reason"])

    def _elapsed(self) -> float:
        return self.earlier_seconds["total"] + self.clock.elapsed()

    def _job_state(self) -> dict[str, Any]:
        """Everything of the job a resume needs besides model and optimizer."""
        return {"metrics": dict(self.metrics), "counter": vars(self.counter).copy(),
                "eval_tokens": self.eval_tokens, "best_score": self.best_score,
                "early_stop": self.early_stop.state_dict(), "recent_losses": list(self.recent_losses),
                "best_weights": self.best.record() if self.best is not None else None,
                "seconds": {"total": self._elapsed(), "train": self.metrics["train_wall_clock_s"]}}

    def _timed_eval(self, evaluator, examples, split: str, step: int) -> dict[str, Any]:
        passes, tokens = self.counter.forward_passes, self.counter.tokens
        result = evaluator(examples)
        self.metrics["eval_forward_passes"] += self.counter.forward_passes - passes
        self.eval_tokens += self.counter.tokens - tokens
        self.log.write({"event": "eval", "split": split, "step": step, "metric": result["metric"],
                        "loss": result["loss"], **_scores(result), "elapsed_s": self._elapsed(),
                        # training seconds so far (loading and evaluations excluded): zobench-report's time to target
                        "train_s": self.metrics["train_wall_clock_s"] or 0.0,
                        "forward_passes": self.metrics["forward_passes"]})
        return result

    def _count_train(self) -> None:
        """Training counts are the counter's totals minus what evaluation used."""
        self.metrics["forward_passes"] = self.counter.forward_passes - self.metrics["eval_forward_passes"]
        self.metrics["backward_passes"] = self.counter.backward_passes
        self.metrics["tokens"] = self.counter.tokens - self.eval_tokens

    # -- records -------------------------------------------------------------------------------
    def fail(self, status: str, message: str) -> None:
        self.metrics.update(status=status, error=message)
        log.debug("%s: %s", status, message)  # the CLI prints it as one line

    def out_of_memory(self, error: BaseException) -> str:
        memory, method = peak_memory(self.device)
        message = (f"out of memory at step {self.metrics['steps']} (peak {memory / 2**30:.2f} GiB, {method}): "
                   f"lower train.batch_size or eval.batch_size, shorten max_length, use dtype=float16/bfloat16 "
                   f"on GPU, shard with model.device_map=auto, or pick a zeroth-order optimizer")
        log.debug("out of memory: %r", error)
        self.fail("failed", message)
        return message

    def diverged_step(self) -> int:
        """The step whose loss was not finite: one past the last recorded when the optimizer raised it."""
        pending = self.checkpointer is not None and self.checkpointer.pending_step()
        return self.metrics["steps"] + (1 if pending else 0)

    def close(self) -> None:
        """metrics.json gets the run's end whatever else fails here (RunDir.write_metrics says in one line
        if even that cannot be written)."""
        try:
            if self.best is not None and self.metrics["status"] in ("completed", "diverged"):
                self.best.discard()  # an interrupted or failed run keeps it for its resume
            self.metrics.update(final_figures(self.metrics, self._elapsed(), self.device), finished_at=now())
            self.log.finish(self.metrics)
        finally:
            try:
                self.directory.write_metrics(self.metrics, final=True)
            finally:
                self.log.close()

    def _write_metrics(self) -> None:
        self.directory.write_metrics(self.metrics)


class _Evaluator:
    def __init__(self, objective, task, tokenizer, classification, cfg, device):
        self.objective, self.task, self.tokenizer = objective, task, tokenizer
        self.classification, self.device = classification, device
        self.batch_size, self.score = int(cfg.eval.batch_size), str(cfg.eval.score)

    def __call__(self, examples):
        return evaluate(self.objective, examples, kind=self.task["kind"], metric=self.task["metric"],
                        tokenizer=self.tokenizer, classification=self.classification,
                        batch_size=self.batch_size, score=self.score, device=self.device)


def _check_method(cfg: DictConfig, task: dict[str, Any]) -> bool:
    """Whether the optimizer trains; refuses, before anything is loaded, what a method cannot do."""
    from .optim import optimizer_class

    method = optimizer_class(cfg.optimizer.get("_target_"))  # zobench's own classes only, else one line
    trains = getattr(method, "trains", True)
    name, k = cfg.optimizer.get("name"), OmegaConf.select(cfg, "icl.k", default=0)
    peft = OmegaConf.select(cfg, "peft.name", default="none")
    if not isinstance(k, int) or k < 0:
        raise ZobenchError(f"icl.k must be an integer >= 0, got {k!r}")
    if k and (trains or issubclass(method, LinearProbe)):
        raise ZobenchError(f"icl.k={k} is for optimizer=zero_shot (MeZO's ICL row); optimizer={name} evaluates "
                           f"without demonstrations, as MeZO does after training")
    if not trains and peft != "none":
        raise ZobenchError(f"optimizer={name} trains no adapter: use peft=none")
    if issubclass(method, LinearProbe):
        check_task(task)
    return trains


def _collate_indices(indices, examples, pad_id, classification, device):
    """An index list becomes one batch; a tuple of index lists a tuple of batches (see Optimizer.batches)."""
    if isinstance(indices, tuple):
        return tuple(_collate_indices(part, examples, pad_id, classification, device) for part in indices)
    return collate([examples[i] for i in indices], pad_id, classification).to(device)


def _scores(result: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in result.items() if k in ("accuracy", "f1", "em")}


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


@contextmanager
def _signals_stop(job: Job):
    """SIGTERM (SLURM pre-emption, `kill`) and Ctrl-C end the run as `interrupted`, files written.

    During training the run stops after the current step, with a checkpoint to resume from; a
    second Ctrl-C, or a signal outside the training loop, stops it at once. Once a signal has stopped
    the run, later ones are logged and ignored for the rest of the process: it is on its way out, and
    the default action would kill it (exit 143) before its records are written and it exits 130.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping = False

    def handler(signum, frame):
        nonlocal stopping
        if stopping:
            _already_stopping(signum, frame)
            return
        if job.in_training_loop and not job.stop_requested:
            job.stop_requested = True
            log.warning("signal %d: stopping after this step (again to stop at once)", signum)
            return
        stopping = True
        raise Interrupted(f"signal {signum}")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    except (KeyboardInterrupt, Interrupted):  # also a stop requested in training, raised after its step
        stopping = True
        raise
    finally:
        for sig, old in previous.items():
            signal.signal(sig, _already_stopping if stopping else old)


def _already_stopping(signum, frame) -> None:
    log.warning("signal %d: already stopping", signum)
