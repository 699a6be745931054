"""Prompt sets: every (prompt, method, seed) one run, scheduled as Ray tasks (``recdreamer-gs batch``, ``bench``).

The driver (the ``batch`` process) reads the prompt file, builds and validates the config of every run before
anything starts, and submits one Ray task per run that is not done yet. A task runs what ``recdreamer-gs run``
runs (``training.prepare`` and ``training.fit``) into a run folder with a deterministic name, so that a second
``batch`` finds it: a folder with ``metrics.json`` is done and skipped, a folder with ``checkpoints/last.ckpt``
continues from it (as ``run --resume``). Ray retries a task whose worker died; the retry continues from the
checkpoint the lost attempt wrote. Ray itself is imported only where a set is run (docs/batch.md).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import sys
import time
import traceback
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
import yaml
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from recdreamer_gs import errors, run_folder
from recdreamer_gs.board import Board
from recdreamer_gs.config import (ConfigError, config_from_data, load_config, option_overrides, parse_override,
                                  preset_path, read_yaml, to_dict)
from recdreamer_gs.errors import UserError
from recdreamer_gs.export import atomic_write_bytes
from recdreamer_gs.run_folder import BATCH_FILE, read_record, run_state, slugify
from recdreamer_gs.summary import method_label, write_summary

METHODS = ("sds", "vsd", "usd")
ENTRY_KEYS = ("prompt", "name", "method", "seed", "templates", "set")
LOG_FILE = "run.log"  # in a run folder: what the run printed, every attempt appended
PAPER_PROMPTS = "paper-prompts.txt"  # the paper's Table 7 prompts, shipped in configs/


class BatchError(UserError):
    """A prompt set that cannot run as given; one line: what was wrong and where."""


# --------------------------------------------------------------------------------------------
# The prompt file
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Override:
    """One ``--set`` value: a nested mapping over the config tree, for every run or one method's runs."""

    data: dict
    method: Optional[str] = None  # only runs of this method ("sds:distill.guidance_scale=100")


@dataclass(frozen=True)
class Entry:
    """One line (or list item) of a prompt file: a prompt and the settings of its own."""

    prompt: str
    where: str  # "FILE line 3" / "FILE item 3", for messages
    name: Optional[str] = None  # folder name instead of the prompt's slug
    methods: Optional[tuple[str, ...]] = None  # None: the set's --methods
    seeds: Optional[tuple[int, ...]] = None  # None: the set's --seeds
    templates: Optional[str] = None  # pose template folder (relative paths: to the prompt file's folder)
    sets: tuple[Override, ...] = ()  # this entry's --set values, over the set's


def read_prompts(path: Path) -> list[Entry]:
    """The entries of a prompt file: ``.jsonl`` (one JSON object a line), ``.yaml``/``.yml`` (a list), else text
    (one prompt a line, ``#`` starts a comment line). Raises :class:`BatchError` for a missing, unreadable or empty
    file and for any malformed entry."""
    path = Path(path)
    if not path.is_file():
        raise BatchError(f"prompt file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise BatchError(f"prompt file {path} cannot be read as UTF-8 text: {err}") from None
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        entries = _read_jsonl(text, path)
    elif suffix in (".yaml", ".yml"):
        entries = _read_yaml(text, path)
    else:
        entries = [Entry(line.strip(), f"{path} line {i}") for i, line in enumerate(text.splitlines(), 1)
                   if line.strip() and not line.strip().startswith("#")]
    if not entries:
        raise BatchError(f"prompt file {path} holds no prompt: expected one prompt a line (text), one JSON object "
                         "a line (.jsonl) or a list (.yaml)")
    return entries


def _read_jsonl(text: str, path: Path) -> list[Entry]:
    entries = []
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()  # a final newline (or a few) is not an entry
    for i, line in enumerate(lines, 1):
        where = f"{path} line {i}"
        if not line.strip():
            raise BatchError(f"{where}: empty line; a .jsonl file holds one JSON object a line, e.g. "
                             '{"prompt": "a red teapot", "method": "usd"}')
        try:
            data = json.loads(line)
        except json.JSONDecodeError as err:
            raise BatchError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
        entries.append(_entry(data, where, path.parent))
    return entries


def _read_yaml(text: str, path: Path) -> list[Entry]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise BatchError(f"prompt file {path} is not valid YAML: {err}") from None
    if data is None:
        return []
    if not isinstance(data, list):
        raise BatchError(f"prompt file {path}: expected a list of prompts or mappings, got {type(data).__name__}")
    return [_entry(item, f"{path} item {i}", path.parent) for i, item in enumerate(data, 1)]


def _entry(data: Any, where: str, base: Path) -> Entry:
    """An entry from a JSON/YAML item: a prompt string, or a mapping with ``prompt`` and the keys of ENTRY_KEYS."""
    if isinstance(data, str):
        data = {"prompt": data}
    if not isinstance(data, dict):
        raise BatchError(f"{where}: expected a prompt or a mapping with 'prompt', got {data!r}")
    unknown = sorted(set(data) - set(ENTRY_KEYS))
    if unknown:
        raise BatchError(f"{where}: unknown key {unknown[0]!r}; expected some of {', '.join(ENTRY_KEYS)}")
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise BatchError(f"{where}: expected a non-empty 'prompt' string, got {prompt!r}")
    name = data.get("name")
    if name is not None and (not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", name)):
        raise BatchError(f"{where}: 'name' must be a folder name of letters, digits, '.', '_' and '-', got {name!r}")
    methods = None if data.get("method") is None else parse_methods(data["method"], f"{where}: 'method'")
    seeds = None if data.get("seed") is None else parse_seeds(data["seed"], f"{where}: 'seed'")
    templates = data.get("templates")
    if templates is not None:
        if not isinstance(templates, str) or not templates:
            raise BatchError(f"{where}: 'templates' must be a folder path, got {templates!r}")
        templates = str(base / templates) if not Path(templates).is_absolute() else templates
    raw = data.get("set") or []
    if isinstance(raw, dict):
        sets = tuple(Override(_nest(str(k), v)) for k, v in raw.items())
    elif isinstance(raw, list) and all(isinstance(s, str) for s in raw):
        sets = tuple(parse_set(s, f"{where}: 'set'") for s in raw)
    else:
        raise BatchError(f"{where}: 'set' must be a list of KEY=VALUE strings or a mapping, got {raw!r}")
    return Entry(prompt.strip(), where, name, methods, seeds, templates, sets)


def parse_methods(value: Any, what: str = "--methods") -> tuple[str, ...]:
    """``"usd,vsd"`` or a list of method names, checked (each of METHODS, no repeats)."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise BatchError(f"{what}: expected a method or a list of methods ({', '.join(METHODS)}), got {value!r}")
    methods = tuple(str(m).strip().lower() for m in items)
    for m in methods:
        if m not in METHODS:
            raise BatchError(f"{what}: unknown method {m!r}; expected one of {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise BatchError(f"{what}: a method is given twice: {', '.join(methods)}")
    return methods


def parse_seeds(value: Any, what: str = "--seeds") -> tuple[int, ...]:
    """``"0,1"``, an integer or a list of integers >= 0, without repeats."""
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
    seeds = []
    for item in items:
        try:
            seed = int(item.strip()) if isinstance(item, str) else item
        except ValueError:
            seed = None
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
            raise BatchError(f"{what}: expected seeds as integers >= 0 (e.g. 0,1), got {item!r}")
        seeds.append(seed)
    if not seeds or len(set(seeds)) != len(seeds):
        raise BatchError(f"{what}: expected distinct seeds, got {value!r}")
    return tuple(seeds)


def parse_set(text: str, what: str = "--set") -> Override:
    """``KEY=VALUE`` (the value read as YAML), or ``METHOD:KEY=VALUE`` for that method's runs only."""
    key = text.split("=", 1)[0]
    method = None
    if ":" in key:
        method, text = text.split(":", 1)
        if method not in METHODS:
            raise BatchError(f"{what} {method}:...: expected METHOD:KEY=VALUE with a method of {', '.join(METHODS)}")
    try:
        return Override(parse_override(text), method)
    except ConfigError as err:
        raise BatchError(f"{what}: {err}") from None


def _nest(key: str, value: Any) -> dict:
    """``("a.b", v)`` -> ``{"a": {"b": v}}``."""
    out: dict = {}
    node = out
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return out


# --------------------------------------------------------------------------------------------
# The runs of a set
# --------------------------------------------------------------------------------------------


@dataclass
class RunSpec:
    """One run of a set: what the task needs (picklable), where it writes."""

    name: str  # folder under the set's output folder: <slug or entry name>-<method>-s<seed>
    order: int  # position in the set: the summary's row order
    prompt: str
    method: str  # the distillation method (a multi-stage run: its stages' methods joined by '+')
    seed: int
    run_dir: str
    config: dict = field(repr=False)  # the validated RunConfig as plain data (config.to_dict)

    def state(self) -> str:
        """``done`` (metrics.json of the last stage), ``resume`` (a checkpoint to continue from) or ``new``."""
        return run_state(Path(self.run_dir), len(self.config.get("stages") or []))


def plan_runs(entries: Sequence[Entry], out: Path, preset: str = "preview", config_file: Optional[Path] = None,
              sets: Sequence[Override] = (), methods: Optional[Sequence[str]] = None,
              seeds: Optional[Sequence[int]] = None) -> list[RunSpec]:
    """Every (prompt, method, seed) run of the set with its validated config, before anything starts.

    The config of a run: the preset, ``config_file``, the set's ``--set`` values (those for its method too),
    the entry's own, then its prompt, method, seed and templates. A checkpoint every tenth of the run when the
    config asks for none (so a lost worker costs little) and no progress bar (the log is a file).

    Raises:
        BatchError: an invalid config for any entry (naming the entry), a data-parallel run, a method on a
            multi-stage preset, two runs with one folder name, or a folder that holds another run.
    """
    runs: list[RunSpec] = []
    for entry in entries:
        for method in entry.methods or methods or (None,):
            for seed in entry.seeds or seeds or (None,):
                what = f"{entry.where} ({entry.prompt[:40]!r}{', ' + method if method else ''})"
                try:
                    options = option_overrides(prompt=entry.prompt, method=method, seed=seed,
                                               templates=entry.templates)
                    plain = [s.data for s in sets if s.method is None]
                    cfg = load_config(preset, config_file, plain + [s.data for s in entry.sets] + [options])
                    label = method_label(cfg)
                    scoped = [s.data for s in sets if s.method == label]
                    if scoped:
                        cfg = load_config(preset, config_file, plain + scoped + [s.data for s in entry.sets]
                                          + [options])
                except ConfigError as err:
                    raise BatchError(f"{what}: {err}") from None
                if cfg.train.devices != 1:
                    raise BatchError(f"{what}: train.devices={cfg.train.devices}; a batch runs each run in one "
                                     "process (set train.devices=1; the set itself spreads over the GPUs)")
                if cfg.stages and method is not None:
                    raise BatchError(f"{what}: preset {preset!r} runs {len(cfg.stages)} stages with their own "
                                     "methods; leave out --methods (and 'method') to run it as it is")
                steps = sum(s for _, s, _ in cfg.stage_plan())
                train = dataclasses.replace(cfg.train, progress_bar=False,
                                            checkpoint_every=cfg.train.checkpoint_every or max(1, steps // 10))
                cfg = dataclasses.replace(cfg, train=train)
                name = f"{entry.name or slugify(entry.prompt)}-{label}-s{cfg.train.seed}"
                runs.append(RunSpec(name, len(runs), cfg.prompt, label, cfg.train.seed, str(Path(out) / name),
                                    to_dict(cfg)))
    _check_names(runs)
    for run in runs:
        _check_folder(run)
    return runs


def _check_names(runs: Sequence[RunSpec]) -> None:
    """Every run of the set needs a folder of its own."""
    seen: dict[str, RunSpec] = {}
    for run in runs:
        if run.name in seen:
            other = seen[run.name]
            raise BatchError(f"two runs of the set get the folder {run.name!r} ({other.prompt!r} and {run.prompt!r}, "
                             f"{run.method}, seed {run.seed}): give the entries a 'name' (a .jsonl or .yaml prompt "
                             "file) or drop the repeat")
        seen[run.name] = run


def _check_folder(run: RunSpec) -> None:
    """A run folder that exists must hold this run (same prompt, method and seed): else a second ``batch`` with
    an edited prompt file would continue someone else's run."""
    saved = Path(run.run_dir) / "config.yaml"
    if not saved.is_file():
        return
    try:
        data = read_yaml(saved)
    except ConfigError as err:
        raise BatchError(f"run folder {run.run_dir}: {err}; remove the folder to run it again") from None
    stages = data.get("stages") or []
    methods = [s.get("distill", {}).get("method") for s in stages] if stages else [
        (data.get("distill") or {}).get("method")]
    got = (data.get("prompt"), "+".join(dict.fromkeys(methods)), (data.get("train") or {}).get("seed"))
    if got != (run.prompt, run.method, run.seed):
        raise BatchError(f"run folder {run.run_dir} holds another run (prompt {got[0]!r}, {got[1]}, seed {got[2]}) "
                         f"than this set's ({run.prompt!r}, {run.method}, seed {run.seed}); use another --out or "
                         "remove that folder")


# --------------------------------------------------------------------------------------------
# One run (a Ray task; also callable directly)
# --------------------------------------------------------------------------------------------


def run_one(spec: RunSpec, threads: int, device: str, board: Any = None, batch_id: str = "") -> dict[str, Any]:
    """Run (or continue) one run of a set in its folder; never raises for a run that fails.

    ``threads``: torch's CPU thread budget; ``device``: ``cpu`` or ``cuda`` (what the task was given);
    ``board``: the set's progress actor (or None). Returns ``{"name", "status", "cause", "wall_s"}`` with status
    ``done``, ``failed`` (the cause: one line) or ``interrupted`` (Ctrl-C or a cancelled task: the checkpoint
    is written and the next batch continues).
    """
    run_dir = Path(spec.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, threads))
    start = time.perf_counter()
    record = _Record(run_dir)
    attempt = record.start(spec, batch_id, device)
    if board is not None:
        board.started.remote(spec.name, attempt["attempt"])
    status, cause = "failed", ""
    with output_to(run_dir / LOG_FILE):
        print(f"== {spec.name}: attempt {attempt['attempt']} on {attempt['host']} (pid {attempt['pid']}, {device}, "
              f"{threads} CPU threads)", flush=True)
        try:
            status, cause = _run(spec, run_dir, device, board, record)
        finally:
            wall = time.perf_counter() - start
            record.finish(status, cause, wall)
            print(f"== {spec.name}: {status}{': ' + cause if cause else ''} ({wall:.1f} s)", flush=True)
    return {"name": spec.name, "status": status, "cause": cause, "wall_s": round(wall, 3)}


def _run(spec: RunSpec, run_dir: Path, device: str, board: Any, record: "_Record") -> tuple[str, str]:
    """(status, cause) of one attempt: the run from its config, or continued from its checkpoint."""
    from recdreamer_gs import training  # heavy: lightning loads in the run's own process

    try:
        state = spec.state()
        if state == "done":
            return "done", ""
        if state == "resume":
            cfg, checkpoint = run_folder.read_resume(run_dir)
            where = f"iteration {checkpoint['iteration']}"
            if cfg.stages:
                where += f" of stage {int(checkpoint.get('stage', 0)) + 1}/{len(cfg.stages)}"
            record.note(resumed_from=where)
            print(f"resuming from checkpoints/last.ckpt at {where}", flush=True)
        else:
            cfg, checkpoint = config_from_data(spec.config), None
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device=device, progress_bar=False))
        ready = training.prepare(cfg, fresh=checkpoint is None)
        if ready.choice.notice:
            print(ready.choice.notice, flush=True)
        callbacks = [_progress_callback(board, spec.name, cfg)] if board is not None else []
        training.fit(cfg, run_dir, ready.choice, ready.device, resume=checkpoint, clip=ready.clip,
                     extra_callbacks=callbacks, start=ready.start)
        return "done", ""
    except (errors.Interrupted, KeyboardInterrupt):
        return "interrupted", "stopped; the next batch continues from its checkpoint"
    except errors.TrainingFailed as err:
        return "failed", str(err)
    except (UserError, OSError) as err:
        return "failed", f"{err.filename}: {err.strerror}" if isinstance(err, OSError) and err.filename else str(err)
    except Exception as err:  # noqa: BLE001 - a bug: the set goes on, the traceback stays in the run folder
        (run_dir / "error.log").write_text("".join(traceback.format_exception(err)))
        first = (str(err).strip().splitlines() or [""])[0]
        return "failed", f"{type(err).__name__}: {first} (traceback in {run_dir / 'error.log'})"


def _progress_callback(board: Any, name: str, cfg):
    """A Lightning callback that tells the board how far the run is (every 1% of its iterations, all stages
    together) and writes a line to the log every tenth."""
    import lightning as L  # heavy: lightning loads in the run's own process

    plan = cfg.stage_plan()
    total = sum(steps for _, steps, _ in plan)
    before = [sum(steps for _, steps, _ in plan[:k]) for k in range(len(plan))]

    class Progress(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            done = before[pl_module.stage] + pl_module.iteration
            if done % max(1, total // 100) == 0 or done == total:
                board.progress.remote(name, done, total)
            if done % max(1, total // 10) == 0:
                print(f"iteration {done}/{total}", flush=True)

    return Progress()


@contextmanager
def output_to(path: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors 1 and 2, so C libraries too) to ``path``,
    appended, and restore them after."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with open(path, "ab", buffering=0) as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


class _Record:
    """``batch.json`` of a run folder: one entry per attempt (host, pid, device, status, cause, wall time),
    written atomically; an attempt whose worker died stays ``running``."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / BATCH_FILE
        self.data = read_record(run_dir)

    def start(self, spec: RunSpec, batch_id: str, device: str) -> dict[str, Any]:
        # What the summary lists even when the run failed before its config.yaml was written, and its row order.
        self.data.update(prompt=spec.prompt, method=spec.method, seed=spec.seed, order=spec.order)
        attempt = {"attempt": len(self.data["attempts"]) + 1, "batch": batch_id, "host": socket.gethostname(),
                   "pid": os.getpid(), "device": device, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                   "status": "running"}
        self.data["attempts"].append(attempt)
        self.data.update(status="running", cause="")
        self._write()
        return attempt

    def note(self, **values: Any) -> None:
        self.data["attempts"][-1].update(values)
        self._write()

    def finish(self, status: str, cause: str, wall: float) -> None:
        self.data["attempts"][-1].update(status=status, cause=cause, wall_s=round(wall, 3))
        self.data.update(status=status, cause=cause)
        self._write()

    def _write(self) -> None:
        atomic_write_bytes(self.path, (json.dumps(self.data, indent=2) + "\n").encode())


# --------------------------------------------------------------------------------------------
# The driver: Ray
# --------------------------------------------------------------------------------------------


@dataclass
class Cluster:
    """What a set runs on, as the driver found it."""

    address: str  # the GCS address
    local: bool  # this process started the instance (and stops it at the end)
    gpus: float  # GPUs in the cluster
    cpus: float  # CPUs in the cluster
    max_node_gpus: float  # the most GPUs of one node
    max_node_cpus: float  # the most CPUs of one node


def check_address(address: str) -> None:
    """Refuse an unreachable ``HOST:PORT`` in seconds, before Ray tries for a minute. ``auto`` is left to Ray."""
    if address == "auto":
        return
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BatchError(f"--address: expected auto or HOST:PORT (the head's `ray start --head --port`), got "
                         f"{address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as err:
        why = "no answer within 5 s" if isinstance(err, socket.timeout) else (err.strerror or str(err))
        raise BatchError(f"--address {address}: cannot reach a Ray head there ({why}); start one with "
                         "`ray start --head --port PORT` on the head node, or leave out --address for a "
                         "local instance") from None


def connect(address: Optional[str], num_cpus: Optional[int] = None) -> Cluster:
    """Join the cluster at ``address`` (``auto`` or HOST:PORT), or start a local instance on every GPU and CPU of
    this machine (``num_cpus`` to offer fewer CPUs). Usage statistics off, no dashboard, token authentication
    on unless ``RAY_AUTH_MODE`` says otherwise (docs/batch.md, "Network")."""
    ray = ray_module()
    kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, configure_logging=True,
                                  logging_level="ERROR")
    try:
        if address is None:  # "local": a new instance, never one that Ray would find running on this machine
            ray.init(address="local", num_cpus=num_cpus, _node_ip_address="127.0.0.1", **kwargs)
        else:
            ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RaySystemError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise BatchError(f"cannot connect to {where}: {first}") from None
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    total = ray.cluster_resources()
    return Cluster(ray.get_runtime_context().gcs_address, address is None, total.get("GPU", 0.0),
                   total.get("CPU", 0.0), max((n.get("GPU", 0.0) for n in nodes), default=0.0),
                   max((n.get("CPU", 0.0) for n in nodes), default=0.0))


def ray_module():
    """``ray``, imported with usage statistics off and token authentication on unless the environment says
    otherwise (Ray reads both when it is first imported)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray  # heavy: Ray loads when runs start (planning and --dry-run need none)

    return ray


@dataclass
class Slots:
    """What each run asks Ray for."""

    gpus: float  # 0: a CPU task
    cpus: int  # Ray CPUs and torch threads of the run
    device: str  # the run's device: cuda with a GPU, else cpu


def slots(cluster: Cluster, gpus_per_run: Optional[float], cpus_per_run: Optional[int]) -> Slots:
    """A whole GPU per run where the cluster has GPUs (``gpus_per_run`` for fractions or 0 for CPU runs), else a
    CPU task with ``cpus_per_run`` threads (default 2); refuses requests no node can meet."""
    gpus = (1.0 if cluster.gpus > 0 else 0.0) if gpus_per_run is None else gpus_per_run
    if gpus < 0 or (gpus > 1 and gpus != int(gpus)):
        raise BatchError(f"--gpus-per-run: expected 0, a fraction of one GPU or a whole number, got {gpus:g}")
    cpus = cpus_per_run if cpus_per_run is not None else (1 if gpus > 0 else 2)
    if cpus < 1:
        raise BatchError(f"--cpus-per-run: expected 1 or more, got {cpus}")
    if gpus > cluster.max_node_gpus:
        have = f"at most {cluster.max_node_gpus:g} GPUs on a node" if cluster.gpus else "no GPU"
        raise BatchError(f"--gpus-per-run {gpus:g}: the Ray cluster has {have}; use --gpus-per-run 0 for CPU runs")
    cpus = min(cpus, int(cluster.max_node_cpus)) if gpus == 0 and cpus_per_run is None else cpus
    if cpus > cluster.max_node_cpus:
        raise BatchError(f"--cpus-per-run {cpus}: the largest node of the Ray cluster has "
                         f"{cluster.max_node_cpus:g} CPUs")
    return Slots(gpus, cpus, "cuda" if gpus > 0 else "cpu")


def run_set(runs: Sequence[RunSpec], cluster: Cluster, slot: Slots, retries: int, display) -> dict[str, dict]:
    """Submit one task per run and wait for them, updating ``display``; Ctrl-C cancels the tasks (they write
    their checkpoints) and raises KeyboardInterrupt once they stopped. Returns each run's result."""
    import ray  # heavy: Ray loads when runs start (planning and --dry-run need none)

    batch_id = uuid.uuid4().hex[:12]
    board = ray.remote(num_cpus=0)(Board).remote()
    # A GPU run in a fresh worker process each time (max_calls=1): nothing of one run's GPU memory (CUDA caches,
    # compiled graphs) stays for the next; CPU workers are reused (0: no limit), saving the imports.
    task = ray.remote(num_cpus=slot.cpus, num_gpus=slot.gpus, max_retries=retries, retry_exceptions=False,
                      max_calls=1 if slot.gpus else 0)(run_one)
    pending = {task.remote(run, slot.cpus, slot.device, board, batch_id): run for run in runs}
    results: dict[str, dict] = {}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            if ready:
                ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
            for ref in ready:
                run = pending.pop(ref)
                results[run.name] = _result(ref, run, retries)
                display.finished(run, results[run.name])
            display.update(_snapshot(board), pending.values())
    except KeyboardInterrupt:
        display.stopping()
        for ref in pending:
            ray.cancel(ref)  # a KeyboardInterrupt in each running task: it writes its checkpoint and returns
        deadline = time.time() + 600
        while pending and time.time() < deadline:
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0.5)
            for ref in ready:
                run = pending.pop(ref)
                results[run.name] = _result(ref, run, retries)
        for run in pending.values():
            results[run.name] = {"name": run.name, "status": "interrupted", "cause": "stopped before it answered"}
        display.interrupted_results = results
        raise
    return results


def _snapshot(board) -> dict[str, dict]:
    import ray  # heavy: Ray loads when runs start (planning and --dry-run need none)

    try:
        return ray.get(board.snapshot.remote(), timeout=5)
    except ray.exceptions.GetTimeoutError:
        return {}


def _result(ref, run: RunSpec, retries: int) -> dict[str, Any]:
    """A task's result; Ray's errors (a worker that died more often than retried, a task cancelled before it
    started) as a failed or interrupted run with one line."""
    import ray  # heavy: Ray loads when runs start (planning and --dry-run need none)

    try:
        return ray.get(ref)
    except ray.exceptions.TaskCancelledError:
        return {"name": run.name, "status": "interrupted", "cause": "cancelled before it started"}
    except ray.exceptions.RayError as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        cause = f"{type(err).__name__}: {first}"
        if isinstance(err, (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError)):
            cause = f"its worker died {retries + 1} times (retries exhausted): {first}"
        return {"name": run.name, "status": "failed", "cause": cause}


# --------------------------------------------------------------------------------------------
# Progress display
# --------------------------------------------------------------------------------------------


class Display:
    """One rich display for the set: done, running, failed, queued, ETA, and each running run's progress.
    On a terminal it redraws in place; otherwise each finished run is one line."""

    def __init__(self, console, total: int, skipped: int, slots_text: str):
        self.console, self.total, self.skipped = console, total, skipped
        self.start = time.time()
        self.walls: list[float] = []
        self.failed = 0
        self.done = skipped
        self.running: dict[str, dict] = {}
        self.queued = total - skipped
        self.slots_text = slots_text
        self.live = None
        self.interrupted_results: dict[str, dict] = {}

    def __enter__(self) -> "Display":
        if self.console.is_terminal:
            self.live = Live(self._render(), console=self.console, refresh_per_second=2, transient=False)
            self.live.__enter__()
        else:
            self.console.print(self._line(), highlight=False)
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.update(self._render())
            self.live.__exit__(*exc)

    def finished(self, run: RunSpec, result: dict) -> None:
        self.running.pop(run.name, None)
        if result["status"] == "done":
            self.done += 1
            if result.get("wall_s"):
                self.walls.append(result["wall_s"])
        elif result["status"] == "failed":
            self.failed += 1
        if self.live is None:
            cause = f": {result['cause']}" if result.get("cause") and result["status"] != "done" else ""
            self.console.print(f"{result['status']}: {run.name}{cause}  [{self._line()}]", highlight=False,
                               markup=False, soft_wrap=True)

    def update(self, snapshot: dict[str, dict], pending) -> None:
        names = {run.name for run in pending}
        self.running = {k: v for k, v in snapshot.items() if k in names}
        self.queued = len(names) - len(self.running)
        if self.live is not None:
            self.live.update(self._render())

    def stopping(self) -> None:
        self.console.print("stopping: the running runs write their checkpoints; the next batch continues them",
                           highlight=False)

    def eta(self) -> Optional[float]:
        """Seconds left: the queued and the rest of the running runs, at the mean time of a run finished here,
        spread over the runs that run at once."""
        left = self.queued + sum(1 - r["iteration"] / r["total"] for r in self.running.values() if r.get("total"))
        left += sum(1 for r in self.running.values() if not r.get("total"))
        if not self.walls:
            rates = [(time.time() - r["since"]) / (r["iteration"] / r["total"])
                     for r in self.running.values() if r.get("total") and r.get("iteration")]
            if not rates:
                return None
            per_run = sum(rates) / len(rates)
        else:
            per_run = sum(self.walls) / len(self.walls)
        return left * per_run / max(1, len(self.running))

    def _line(self) -> str:
        eta = self.eta()
        eta_text = "?" if eta is None else time.strftime("%H:%M:%S", time.gmtime(eta))
        earlier = f" ({self.skipped} earlier)" if self.skipped else ""
        return (f"done {self.done}/{self.total}{earlier}, running {len(self.running)}, failed {self.failed}, "
                f"queued {self.queued}, ETA {eta_text}")

    def _render(self):
        table = Table("running", "attempt", "iteration", box=None, padding=(0, 2))
        for name, r in sorted(self.running.items()):
            it = f"{r['iteration']}/{r['total']}" if r.get("total") else "starting"
            table.add_row(name, str(r.get("attempt", 1)), it)
        head = Text(f"{self._line()}  ({self.slots_text}, {time.time() - self.start:.0f} s)")
        return Group(head, table) if self.running else head


# --------------------------------------------------------------------------------------------
# batch / bench
# --------------------------------------------------------------------------------------------


def batch(runs: Sequence[RunSpec], out: Path, address: Optional[str], gpus_per_run: Optional[float],
          cpus_per_run: Optional[int], num_cpus: Optional[int], retries: int, console) -> int:
    """Run the runs of a set that are not done, then write the summary. Returns the exit code: 0 when every run
    is done, 1 when any failed, 130 after Ctrl-C (the summary is written in every case)."""
    address = address or os.environ.get("RAY_ADDRESS") or None  # as Ray itself: RAY_ADDRESS names the cluster
    if retries < 0:
        raise BatchError(f"--retries: expected 0 or more, got {retries}")
    if num_cpus is not None and (num_cpus < 1 or address is not None):
        raise BatchError(f"--num-cpus {num_cpus}: expected 1 or more, for the local instance (no --address)")
    if address is not None:
        check_address(address)
    _writable(out)
    todo = [run for run in runs if run.state() != "done"]
    skipped = len(runs) - len(todo)
    console.print(f"{len(runs)} runs in {out}: {skipped} done earlier, "
                  f"{sum(r.state() == 'resume' for r in todo)} to continue from a checkpoint, "
                  f"{sum(r.state() == 'new' for r in todo)} to start", highlight=False)
    results: dict[str, dict] = {}
    code = 0
    if gpus_per_run is None and all(run.config["train"]["device"] == "cpu" for run in todo):
        gpus_per_run = 0  # every run asks for the CPU (--set train.device=cpu): CPU tasks, GPUs or not
    if todo:
        ray = ray_module()
        cluster = connect(address, num_cpus)
        try:
            slot = slots(cluster, gpus_per_run, cpus_per_run)
            text = (f"{slot.gpus:g} GPU + {slot.cpus} CPU a run" if slot.gpus else f"{slot.cpus} CPU threads a run")
            where = "local Ray instance" if cluster.local else f"Ray cluster {cluster.address}"
            console.print(f"{where}: {cluster.gpus:g} GPUs, {cluster.cpus:g} CPUs; {text}", highlight=False)
            display = Display(console, len(runs), skipped, text)
            # SIGTERM (a job scheduler stopping the driver) stops the set as Ctrl-C does.
            previous = signal.signal(signal.SIGTERM, _interrupt)
            try:
                with display:
                    results = run_set(todo, cluster, slot, retries, display)
            except KeyboardInterrupt:
                results, code = display.interrupted_results, 130
            finally:
                signal.signal(signal.SIGTERM, previous)
        finally:
            ray.shutdown()
    written = write_summary(out)
    failed = [r for r in results.values() if r["status"] == "failed"]
    for r in failed:
        console.print(f"failed: {r['name']}: {r['cause']}", highlight=False, markup=False, soft_wrap=True)
    console.print(f"wrote {', '.join(str(p) for p in written)}", highlight=False)
    if code == 0 and failed:
        code = 1
    if code == 0 and any(r["status"] == "interrupted" for r in results.values()):
        code = 130
    return code


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise BatchError(f"--out {out}: cannot write there ({err.strerror or err}); choose a writable folder") from None


def paper_prompts() -> Path:
    """The paper's 22 prompts (its Table 7), shipped with the presets."""
    return preset_path("preview").with_name(PAPER_PROMPTS)
