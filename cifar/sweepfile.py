"""A W&B sweep file (https://docs.wandb.ai/guides/sweeps/sweep-config-keys), read as W&B defines it, turned into an
Optuna search: the sampler (grid, random; `bayes` is Optuna's TPE, not W&B's Gaussian process), the pruner
(hyperband), the direction, and each parameter as the `fit` option a trial passes. Anything W&B defines that this
cannot honour is one error naming the key, before any trial."""

import json
import math
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import optuna
import yaml

from cifar.errors import UserError

TOP_KEYS = {"program", "method", "metric", "parameters", "early_terminate", "command", "run_cap", "name",
            "description", "project", "entity"}
MACROS = {"${env}", "${interpreter}", "${program}", "${args}"}  # what W&B's agent expands; a trial is `fit` itself
QUANTILE = 1e-6  # a normal's draw is its quantile in [QUANTILE, 1 - QUANTILE]: no infinite value


@dataclass
class Parameter:
    """One swept option: its `fit` key, W&B's distribution and that distribution's settings."""

    key: str
    distribution: str
    spec: dict

    def suggest(self, trial: optuna.Trial):
        """The value this trial passes, drawn through Optuna (the same name and range on every draw: a retried trial
        gets its values back)."""
        s, d, name = self.spec, self.distribution, self.key
        if d == "constant":
            return s["value"]
        if d == "categorical":
            return decoded(trial.suggest_categorical(name, [encoded(v) for v in s["values"]]))
        if d == "int_uniform":
            return trial.suggest_int(name, s["min"], s["max"])
        if d in ("uniform", "q_uniform"):
            return quantized(trial.suggest_float(name, s["min"], s["max"]), s.get("q"))
        if d in ("log_uniform", "log_uniform_values", "q_log_uniform", "q_log_uniform_values"):
            low, high = (s["min"], s["max"]) if d.endswith("_values") else (math.exp(s["min"]), math.exp(s["max"]))
            return quantized(trial.suggest_float(name, low, high, log=True), s.get("q"))
        # normal family: Optuna has no normal, so its quantile is drawn uniformly and mapped through the normal's
        # inverse CDF (random: exactly W&B's distribution; TPE models the quantile)
        x = NormalDist(s.get("mu", 0.0), s.get("sigma", 1.0)).inv_cdf(trial.suggest_float(name, QUANTILE, 1 - QUANTILE))
        return quantized(math.exp(x) if "log" in d else x, s.get("q"))

    def checked_values(self) -> list:
        """The values that must parse as `fit` options: each choice, or the ends of the range."""
        s, d = self.spec, self.distribution
        if d == "constant":
            return [s["value"]]
        if d == "categorical":
            return list(s["values"])
        if d == "int_uniform":
            return [s["min"], s["max"]]
        if "normal" in d:
            return [math.exp(s.get("mu", 0.0)) if "log" in d else s.get("mu", 0.0)]
        ends = [s["min"], s["max"]] if d.endswith("_values") or "log" not in d else [math.exp(s["min"]), math.exp(s["max"])]
        return [quantized(end, s.get("q")) for end in ends]


DISTRIBUTIONS = {"constant": ("value",), "categorical": ("values",), "int_uniform": ("min", "max"),
                 "uniform": ("min", "max"), "q_uniform": ("min", "max"), "log_uniform": ("min", "max"),
                 "log_uniform_values": ("min", "max"), "q_log_uniform": ("min", "max"),
                 "q_log_uniform_values": ("min", "max"), "normal": (), "log_normal": (), "q_normal": (),
                 "q_log_normal": ()}  # name: required keys


@dataclass
class Sweep:
    """What a sweep file asks for, checked: the trials' base options (the command's), the parameters, and the
    search's method, metric, cap and early termination."""

    file: Path
    name: str
    method: str
    metric: str
    goal: str
    target: float | None
    run_cap: int | None
    parameters: list[Parameter]
    base: list[str]
    early_terminate: dict | None
    project: str | None
    entity: str | None

    @property
    def direction(self) -> str:
        return "maximize" if self.goal == "maximize" else "minimize"

    def grid(self) -> dict[str, list]:
        return {p.key: [encoded(v) for v in p.spec["values"]] for p in self.parameters if p.distribution != "constant"}

    def sampler(self, seed: int | None) -> optuna.samplers.BaseSampler:
        if self.method == "grid":
            return Grid(self.grid(), seed=seed)
        if self.method == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.TPESampler(seed=seed)

    def grid_size(self) -> int | None:
        return math.prod(len(v) for v in self.grid().values()) if self.method == "grid" else None


class Grid(optuna.samplers.GridSampler):
    """Optuna's grid, without its `Study.stop()` once the grid is done, which works only inside `Study.optimize`: a
    sweep stops at its count, at most the grid's size."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


def pruner(early_terminate: dict | None) -> optuna.pruners.BasePruner:
    """W&B's hyperband as Optuna's HyperbandPruner, counted in validation epochs (W&B's iterations: the times the
    metric was logged). `min_iter`, or `max_iter` and `s` (the first rung at max_iter / eta**s); eta defaults to 3."""
    if not early_terminate:
        return optuna.pruners.NopPruner()
    eta = int(early_terminate.get("eta", 3))
    if "min_iter" in early_terminate:
        return optuna.pruners.HyperbandPruner(int(early_terminate["min_iter"]), "auto", eta)
    top = int(early_terminate["max_iter"])
    return optuna.pruners.HyperbandPruner(max(1, round(top / eta ** int(early_terminate["s"]))), top, eta)


def read(file: str) -> Sweep:
    """The sweep file, checked against what W&B defines and what the app honours; a mistake is one UserError."""
    path = Path(file)
    try:
        spec = yaml.safe_load(path.read_text())
    except OSError as error:
        raise UserError(f"cannot read the sweep file {file}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise UserError(f"{file} is not YAML ({' '.join(str(error).split())}); a sweep file is W&B's format") from None
    if not isinstance(spec, dict):
        raise UserError(f"{file} is not a sweep file: W&B's format is a mapping (method, metric, parameters, ...)")

    def bad(key: str, why: str) -> UserError:
        return UserError(f"sweep file {file}: {key}: {why}")

    for key in spec:
        if key not in TOP_KEYS:
            raise bad(key, f"not a key this app honours ({', '.join(sorted(TOP_KEYS))})")
    method = spec.get("method")
    if method not in ("grid", "random", "bayes"):
        raise bad("method", f"{method!r} cannot run here: grid, random or bayes (Optuna's TPE)")
    metric = spec.get("metric") or {}
    if not isinstance(metric, dict) or not metric.get("name") or metric.get("goal", "minimize") not in ("minimize", "maximize"):
        raise bad("metric", "needs a name (a metric the fit logs at validation, e.g. val_acc) and a goal, minimize or maximize")
    for key in metric:
        if key not in ("name", "goal", "target"):
            raise bad(f"metric.{key}", "not a key this app honours (name, goal, target)")
    parameters = [parameter(key, value, bad, method) for key, value in (spec.get("parameters") or {}).items()]
    if not parameters:
        raise bad("parameters", "none given")
    early = spec.get("early_terminate")
    if early is not None:
        if not isinstance(early, dict) or early.get("type") != "hyperband":
            raise bad("early_terminate", "only type: hyperband can run here")
        if "min_iter" not in early and not ("max_iter" in early and "s" in early):
            raise bad("early_terminate", "hyperband needs min_iter, or max_iter and s")
        for key in early:
            if key not in ("type", "min_iter", "max_iter", "s", "eta", "strict"):
                raise bad(f"early_terminate.{key}", "not a key this app honours (min_iter, max_iter, s, eta)")
    run_cap = spec.get("run_cap")
    if run_cap is not None and (not isinstance(run_cap, int) or run_cap < 1):
        raise bad("run_cap", "a positive number of runs")
    return Sweep(path, str(spec.get("name") or path.stem), method, metric["name"], metric.get("goal", "minimize"),
                 metric.get("target"), run_cap, parameters, base_options(spec.get("command"), bad), early,
                 spec.get("project"), spec.get("entity"))


def parameter(key: str, spec, bad, method: str) -> Parameter:
    """One entry of `parameters`, its distribution named or inferred as W&B infers it."""
    if not isinstance(spec, dict):
        raise bad(f"parameters.{key}", "a mapping with values, value, or a distribution and its range")
    if "parameters" in spec:
        raise bad(f"parameters.{key}.parameters", "nested parameters cannot run here: name each option in full "
                  "(model.optimizer.init_args.lr)")
    if "distribution" in spec:
        distribution = spec["distribution"]
    elif "values" in spec:
        distribution = "categorical"
    elif "value" in spec:
        distribution = "constant"
    elif "min" in spec and "max" in spec:
        distribution = "int_uniform" if all(isinstance(spec[k], int) for k in ("min", "max")) else "uniform"
    elif "mu" in spec or "sigma" in spec:
        distribution = "normal"
    else:
        raise bad(f"parameters.{key}", "needs values, value, min and max, or a distribution")
    if distribution not in DISTRIBUTIONS:
        raise bad(f"parameters.{key}.distribution", f"{distribution!r} cannot run here ({', '.join(DISTRIBUTIONS)})")
    for needed in DISTRIBUTIONS[distribution] + (("q",) if distribution.startswith("q_") else ()):
        if needed not in spec:
            raise bad(f"parameters.{key}", f"the {distribution} distribution needs {needed}")
    if distribution == "categorical" and (not isinstance(spec["values"], list) or not spec["values"]):
        raise bad(f"parameters.{key}.values", "a non-empty list")
    if method == "grid" and distribution not in ("categorical", "constant"):
        raise bad(f"parameters.{key}", "a grid takes values (or value), not a distribution")
    return Parameter(key, distribution, spec)


def base_options(command, bad) -> list[str]:
    """The `fit` options of W&B's `command` block (its --config files and any fixed option): each trial's base."""
    if command is None:
        return []
    words = [str(word) for word in command if str(word) not in MACROS]
    for word in words:
        if word.startswith("${"):
            raise bad("command", f"{word} cannot run here: a trial gets its values as --key=value options (${{args}})")
    if words[:1] != ["fit"]:
        raise bad("command", "W&B's agent must run `main.py fit` (command: [${env}, ${interpreter}, ${program}, fit, "
                  "--config, <file>, ${args}])")
    return words[1:]


def encoded(value):
    """A value as an Optuna choice (None, bool, int, float or str): lists and mappings as JSON text."""
    return value if value is None or isinstance(value, bool | int | float | str) else json.dumps(value)


def decoded(value):
    return json.loads(value) if isinstance(value, str) and value[:1] in "[{" else value


def quantized(value: float, q: float | None) -> float:
    return value if q is None else round(round(value / q) * q, 12)  # 12 places: no 0.30000000000000004


def option(key: str, value) -> str:
    """`--key=value` as W&B's agent passes it, in the syntax the app parses (YAML: true, null, [1, 2])."""
    text = value if isinstance(value, str) else json.dumps(value)
    return f"--{key}={text}"
