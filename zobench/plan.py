"""`zobench-plan OVERRIDES...`: the jobs a sweep (`zobench -m OVERRIDES...`) would run, listed, nothing run.

Hydra's `--cfg job` prints one composed config and cannot expand a sweep (with `-m` it stops on a
ValueError). This composes the same config `zobench -m` would, takes the preset's `hydra.sweeper.params`
and the comma lists typed on the command line, and expands them as Hydra's basic sweeper does (the same
order, so job N here is job N of the sweep, `N_…` folder included). `--cfg N` prints job N's composed
config (what `zobench --cfg job` prints for one run). Exit status: 0 listed; 2 bad input (one line).

`--memory` adds, for each distinct job shape, the memory and disk it needs (zobench/memory_plan.py, from the
model's config on the meta device: nothing downloaded): bytes per GPU by part, the GPUs of `--gpu-memory` it
needs (or on `--gpus N`), host memory, disk per checkpoint and per run. `--json`: the same, machine-readable.
"""

from __future__ import annotations

import argparse
import sys

from .errors import ZobenchError


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """Each job's overrides, in the order the basic sweeper launches them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from .configs import check_overrides, hydra_config, register_resolvers, register_tasks, single_valued

    check_overrides(overrides)
    register_resolvers()
    register_tasks()
    # As Hydra's basic sweeper: the preset's sweep (hydra.sweeper.params), then what was typed; a key keeps the
    # place of its first mention and takes its last value.
    params_node = hydra_config(single_valued(overrides)).hydra.sweeper.get("params")
    params = OmegaConf.to_container(params_node, resolve=False) if params_node is not None else {}
    preset = [f"{key}={value}" for key, value in params.items()]
    parser = OverridesParser.create()
    batches = BasicSweeper.split_arguments(parser.parse_overrides(preset + list(overrides)), max_batch_size=None)
    return [list(job) for batch in batches for job in batch]


def main(argv: list[str] | None = None) -> int:
    from .failures import command

    parser = argparse.ArgumentParser(prog="zobench-plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="what you would give `zobench -m` (experiment=…, key=a,b)")
    parser.add_argument("--cfg", type=int, metavar="N", help="print job N's composed config instead of the list")
    parser.add_argument("-m", "--multirun", action="store_true", help="taken as zobench takes it (a sweep is always "
                                                                         "expanded here)")
    parser.add_argument("--memory", action="store_true", help="the memory and disk plan of each distinct job shape")
    parser.add_argument("--gpu-memory", metavar="SIZE", help="memory of one GPU (80GB, 80GiB; default 80GB); "
                                                              "implies --memory")
    parser.add_argument("--gpus", type=int, metavar="N", help="plan for N GPUs instead of the fewest that hold a job; "
                                                             "implies --memory")
    parser.add_argument("--json", action="store_true", help="print the jobs and plans as one JSON object")
    args = parser.parse_args(argv)
    # the one failure policy (failures.py): a bad name or value, Hydra's or OmegaConf's refusals exit 2
    return command("zobench-plan", lambda: _plan(args), refused=(ZobenchError,))


def _plan(args) -> None:
    jobs = sweep_jobs(args.overrides)
    if args.cfg is not None:
        if not 0 <= args.cfg < len(jobs):
            raise ZobenchError(f"--cfg {args.cfg}: this sweep has jobs 0 to {len(jobs) - 1}")
        from .configs import compose, resolved_yaml

        print(resolved_yaml(compose(jobs[args.cfg])), end="")
        return
    memory = args.memory or args.json or args.gpu_memory or args.gpus is not None
    plans = _memory_plans(args, jobs) if memory else None
    if args.json:
        import json

        print(json.dumps({"jobs": [{"number": n, "overrides": job} for n, job in enumerate(jobs)],
                          "plans": [{"jobs": numbers, **result.record()} for result, numbers in plans]}, indent=1))
        return
    width = len(str(len(jobs) - 1))
    for number, job in enumerate(jobs):
        print(f"{number:>{width}}  {' '.join(job)}")
    if plans:
        _print_plans(plans, len(jobs))
    print(f"{len(jobs)} job{'s' if len(jobs) != 1 else ''}: run them with zobench -m {' '.join(args.overrides)}")


def _memory_plans(args, jobs: list[list[str]]) -> list:
    """(memory_plan.Plan, its job numbers) for each distinct job shape."""
    from .memory_plan import parse_size, plan

    gpu_memory = parse_size(args.gpu_memory or "80GB")
    if args.gpus is not None and not 1 <= args.gpus <= 4096:
        raise ZobenchError(f"--gpus {args.gpus}: give a number of GPUs from 1 to 4096")
    shapes: dict = {}  # a distinct job shape -> the jobs of that shape
    models: dict = {}  # the meta-device model of each (model, peft) preset, built once
    for number, job in enumerate(jobs):
        shapes.setdefault(job_shape(job, models), []).append(number)
    return [(plan(shape, gpu_memory, args.gpus), numbers) for shape, numbers in shapes.items()]


def _print_plans(plans: list, job_count: int) -> None:
    from .memory_plan import human, render

    for result, numbers in plans:
        which = "every job" if len(numbers) == job_count else f"job{'s' if len(numbers) > 1 else ''} " + \
            ", ".join(map(str, numbers))
        print(f"{which}: {render(result)}")
    if job_count > 1:
        end = sum(result.disk["run_end"] * len(numbers) for result, numbers in plans)
        print(f"disk once every job has completed: {human(end)}")


def job_shape(overrides: list[str], models: dict):
    """A job's memory-relevant settings as plain values (memory_plan.JobShape), from its run spec."""
    from omegaconf import OmegaConf

    from .configs import compose
    from .spec import RunSpec

    cfg = compose(overrides)
    # the refusals a run would give, on a machine without the GPU it plans for: checked as device=cpu, the
    # device and dtype planned for are the config's own (dtype=auto is float16 on CUDA)
    planned = (str(cfg.device), str(cfg.dtype))
    checked = cfg.copy()
    OmegaConf.update(checked, "device", "cpu")
    return shape_of(RunSpec.from_cfg(checked), planned, models)


def shape_of(spec, planned: tuple[str, str], models: dict):
    """JobShape of a run spec for the (device, dtype) names planned; `models` caches each preset's
    meta-device model."""
    import torch

    from .memory_plan import JobShape, MethodShape
    from .models import resolve_dtype
    from .optim.addax import Addax, zo_half
    from .optim.base import EVALUATION_ONLY
    from .optim.first_order import TorchOptimizer
    from .optim.head_tuning import HeadTuning
    from .optim.ip_sgd import InPlaceSGD
    from .optim.mezo import MeZO
    from .precision import from_config as precision_from_config

    device = "cpu" if planned[0] == "cpu" else "cuda"  # the plan is for where the run will go
    dtype = resolve_dtype(planned[1], torch.device(device))
    policy = precision_from_config(spec.config["precision"], dtype)
    peft = dict(spec.peft)
    model_spec = dict(spec.model)
    key = (json_key(model_spec), json_key(peft))  # the adapter's seed changes its values, not its shapes
    if key not in models:
        models[key] = _model_shape(model_spec, peft)
    model = models[key]
    cls, name, settings = spec.method.cls, spec.method.name, spec.method.settings
    if cls.kind == EVALUATION_ONLY:
        method = MethodShape(name, "evaluation")
    elif issubclass(cls, TorchOptimizer):
        momentum = float(settings.kwargs.get("momentum", 0) or 0)
        states = 2 if settings.torch_class in ("Adam", "AdamW", "HFAdamW") else (1 if momentum else 0)  # moments
        method = MethodShape(name, "torch", states=states)
        if issubclass(cls, HeadTuning):  # the LM head alone is trained
            from dataclasses import replace

            head = model.vocab * model.hidden
            model = replace(model, trained=head, largest_trained=head)
    elif issubclass(cls, InPlaceSGD):
        method = MethodShape(name, "inplace")
    elif issubclass(cls, Addax):
        method = MethodShape(name, "addax", directions=zo_half(settings).settings.q)
    elif issubclass(cls, MeZO):
        method = MethodShape(name, "zo", states=len(getattr(cls, "state_names", ())), directions=settings.q)
    else:
        raise ZobenchError(f"optimizer={name}: zobench-plan does not know how {cls.__name__} uses memory")
    task = spec.task
    candidates = len(task["candidates"]) if isinstance(task.get("candidates"), list) else 1
    train_rows = spec.train.batch_size * (candidates if task["train_as_classification"] else 1)
    n_train = min(spec.data.n_train, int(task["sizes"].get("n_train", 10**12)))
    train = spec.train.for_training_size(n_train)  # train.epochs as the run resolves it
    if model_spec.get("device_map"):
        parallel = "device_map"
    elif method.kind == "evaluation":
        parallel = "single"
    else:
        parallel = spec.parallel.zo if method.kind in ("zo", "addax") else spec.parallel.fo  # Addax: in_place.py
    return JobShape(
        model=model, method=method, device=device, weights_bytes=dtype.itemsize,
        master_weights=policy.master_weights, state_bytes=policy.dtype_of(policy.state_dtype).itemsize,
        update_bytes=policy.dtype_of(policy.update_dtype).itemsize, loss_fp32=policy.loss_dtype == "float32",
        train_rows=train_rows, eval_rows=spec.eval.batch_size * candidates, max_length=spec.max_length,
        generation=task["kind"] == "generation",
        parallel=parallel, steps=train.steps, log_interval=train.log_interval,
        checkpoint_weights=spec.checkpoint.weights, keep_best=train.keep_best,
        save_model=spec.save_model, peft=spec.peft_name,
        threads=torch.get_num_threads() if device == "cpu" else 1, pretrained=spec.model["init"] != "random",
        micro_batches=spec.train.grad_accumulation)


def json_key(value) -> str:
    import json

    return json.dumps(value, sort_keys=True, default=str)


def _model_shape(spec: dict, peft: dict | None):
    """The model's config without its weights: the preset's `arch` (random init, or a hub preset's recorded
    architecture), a local model.path's config.json, else the hub's config (small; refused in one line offline)."""
    from transformers import AutoConfig

    from .memory_plan import model_shape

    name = str(spec.get("name"))
    arch = dict(spec.get("arch") or {})
    if spec.get("path"):  # its config.json, read as a file zobench did not write (safe_files' limits)
        from .models import local_model_config

        values, source = local_model_config(str(spec["path"]))
        if not values or not isinstance(values.get("model_type"), str):
            raise ZobenchError(f"{source} is missing or names no model_type: zobench-plan needs the model's config")
        try:
            config = AutoConfig.for_model(**values)
        except Exception as error:
            raise ZobenchError(f"{source}: not a config transformers knows ({type(error).__name__}: "
                               f"{str(error).splitlines()[0][:160] if str(error) else ''})") from None
        source = str(source)
    elif arch.get("model_type"):
        model_type = arch.pop("model_type")
        if spec.get("tokenizer") == "byte":  # as models._random_model: the byte tokenizer's ids fit the vocabulary
            from .byte_tokenizer import byte_tokenizer

            arch["vocab_size"] = max(int(arch.get("vocab_size", 0)), len(byte_tokenizer()))
        config, source = AutoConfig.for_model(model_type, **arch), f"model.arch of model={name}"
    elif spec.get("hub_id"):
        source = str(spec["hub_id"])
        try:
            config = AutoConfig.from_pretrained(source)
        except Exception as error:
            raise ZobenchError(f"the config of {source} cannot be read ({str(error).splitlines()[0][:160]}); "
                               f"offline, set model.path=/local/dir or give the preset an `arch`") from None
    else:
        raise ZobenchError(f"model preset '{name}' has neither arch, path nor hub_id: nothing to plan from")
    return model_shape(name, config, peft, source)


if __name__ == "__main__":
    sys.exit(main())
