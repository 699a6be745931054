"""Where models come from: a Hub repo id or a local folder, checked, downloaded and reported in one place.

Every model the package loads is a :class:`ModelSpec`: what kind of folder it is (:class:`ModelKind`: its
parts and the files each part needs), where it comes from (``owner/name`` on the Hugging Face Hub, or a
local folder) and whether half-precision weights are wanted. :func:`ensure` returns the local folder that
``from_pretrained`` then reads, with the weight variant found there; a Hub id missing from the cache is
downloaded first (only the files the loader reads: the needed parts, safetensors over ``.bin``, the fp16
variant for half precision when the repo has one), with its size said up front and a progress bar.
Everything that stops a model from being had ends as one :class:`ModelUnavailable` line that names the
model, the cause (offline, not found, gated, incomplete, network error) and the ways on.

Hugging Face's variables are read when called, not at import: ``HF_HOME`` / ``HF_HUB_CACHE`` for the
cache, ``HF_HUB_OFFLINE`` for no network. Which models a run loads is not decided here: each prior lists its own
(``Prior.models``), and ``prior_choice.run_models`` adds the starting shape's and CLIP.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from recdreamer_gs.errors import UserError


class ModelUnavailable(UserError, RuntimeError):
    """A model cannot be had here. ``str()`` is one line: the model, the cause, the ways on."""

    def __init__(self, message: str, cause: str):
        super().__init__(message)
        self.cause = cause  # the cause alone, for notices that add their own ways on


# --------------------------------------------------------------------------------------------
# What a model folder holds
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """One folder of a model (``""``: the repo root) and what the loader reads there."""

    folder: str
    needs: tuple[str, ...] = ()  # files that must be there; "a|b": either will do
    weights: bool = True  # one complete set of weights: safetensors or .bin, plain or the fp16 variant


@dataclass(frozen=True)
class ModelKind:
    title: str  # what the model is, as messages name it
    parts: tuple[Part, ...]
    option: str  # how a user points at another source ("PATH" is replaced by a suggested id)
    folder: str  # what such a local folder holds
    instead: str  # how to run without this model


_TOKENIZER = ("vocab.json|tokenizer.json", "merges.txt|tokenizer.json")  # CLIP BPE: slow files or the fast one
SD_PIPELINE = ModelKind(
    "Stable Diffusion model",
    (Part("", ("model_index.json",), weights=False), Part("tokenizer", _TOKENIZER, weights=False),
     Part("text_encoder", ("config.json",)), Part("unet", ("config.json",)), Part("vae", ("config.json",)),
     Part("scheduler", ("scheduler_config.json",), weights=False)),
    option="--model PATH",
    folder="a diffusers folder with model_index.json, tokenizer/, text_encoder/, unet/, vae/, scheduler/",
    instead="--prior synthetic (offline, no weights needed)",
)
UNET = ModelKind(  # a separate base UNet for ε_φ (distill.particle_score.base = separate)
    "ε_φ base UNet",
    (Part("unet", ("config.json",)), Part("scheduler", ("scheduler_config.json",), weights=False)),
    option="--set distill.particle_score.separate_model=PATH",
    folder="a diffusers folder with unet/ and scheduler/",
    instead="--set distill.particle_score.base=shared (LoRA on the prior's own UNet)",
)
DINOV2 = ModelKind(
    "Pose feature model (DINOv2)",
    (Part("", ("config.json",)),),
    option="--pose-model PATH",
    folder="a transformers DINOv2 folder with config.json and model.safetensors",
    instead="--method vsd (no rectifier, so no DINOv2)",
)
TINY_DECODER = ModelKind(  # prior.sd.tiny_decoder: AutoencoderTiny (TAESD) decoding USD's x̂0
    "Tiny decoder (AutoencoderTiny)",
    (Part("", ("config.json",)),),
    option="--set prior.sd.tiny_decoder=PATH",
    folder="a diffusers AutoencoderTiny folder with config.json and diffusion_pytorch_model.safetensors",
    instead="--set prior.sd.tiny_decoder=null (the full VAE decodes x̂0)",
)
CLIP = ModelKind(
    "CLIP model",
    (Part("", ("config.json", *_TOKENIZER)),),
    option="--clip-model PATH (run: --set output.clip_model=PATH)",
    folder="a transformers CLIP folder with config.json, weights and tokenizer files",
    instead="leave output.clip_model unset (no cEnt or CLIP score)",
)
SHAP_E = ModelKind(  # gaussians.init = shap-e: diffusers' ShapEPipeline (text -> mesh)
    "Shap-E model",
    (Part("", ("model_index.json",), weights=False), Part("tokenizer", _TOKENIZER, weights=False),
     Part("text_encoder", ("config.json",)), Part("prior", ("config.json",)),
     Part("shap_e_renderer", ("config.json",)), Part("scheduler", ("scheduler_config.json",), weights=False)),
    option="--set gaussians.shap_e.model=PATH",
    folder="a diffusers ShapEPipeline folder with model_index.json, tokenizer/, text_encoder/, prior/, "
           "shap_e_renderer/, scheduler/",
    instead="--init sphere (start from a random ball)",
)


@dataclass(frozen=True)
class ModelSpec:
    kind: ModelKind
    source: str  # Hub repo id "owner/name" or local folder
    half: bool = False  # fp16/bf16 run: prefer the repo's fp16 weight variant (half the download)


# Weight files from_pretrained reads (diffusers and transformers names), optionally sharded or the fp16 variant;
# other files (flax, onnx, single-file checkpoints at a repo's root) are never fetched.
_NAMES = "diffusion_pytorch_model|model|pytorch_model"
_WEIGHT = re.compile(rf"^(?:{_NAMES})(?:\.(fp16))?(?:-\d{{5}}-of-\d{{5}})?\.(safetensors|bin)$")
_INDEX = re.compile(rf"^(?:{_NAMES})\.(safetensors|bin)\.index(?:\.(fp16))?\.json$")
_CONFIG_SUFFIXES = (".json", ".txt", ".model")  # configs and tokenizer files of a part


def _preference(half: bool) -> tuple[tuple[Optional[str], str], ...]:
    """(variant, format) of weight sets, best first: safetensors over .bin; fp16 first for half precision."""
    if half:
        return (("fp16", "safetensors"), (None, "safetensors"), ("fp16", "bin"), (None, "bin"))
    return ((None, "safetensors"), (None, "bin"), ("fp16", "safetensors"), ("fp16", "bin"))


def _weight_set(names: set[str], half: bool, folder: Optional[Path]) -> Optional[tuple[Optional[str], list[str]]]:
    """The best complete weight set among file ``names`` of one part: (variant, its files), or None.

    With ``folder`` (files on disk) a sharded set counts only when every shard its index lists is there.
    """
    sets: dict[tuple[Optional[str], str], list[str]] = {}
    for name in sorted(names):
        if m := _WEIGHT.match(name):
            sets.setdefault((m.group(1), m.group(2)), []).append(name)
        elif m := _INDEX.match(name):
            sets.setdefault((m.group(2), m.group(1)), []).append(name)
    for key in _preference(half):
        files = sets.get(key)
        if not files:
            continue
        index = [f for f in files if f.endswith(".json")]
        if folder is not None and index:
            try:
                shards = set(json.loads((folder / index[0]).read_text())["weight_map"].values())
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue
            if not shards <= names:
                continue
        elif not [f for f in files if not f.endswith(".json")]:
            continue
        return key[0], files
    return None


def _select(kind: ModelKind, names: set[str], half: bool, folder: Optional[Path] = None):
    """The files the loader reads among repo-relative ``names``: (files, variant per part, what is missing)."""
    files: list[str] = []
    variants: dict[str, Optional[str]] = {}
    missing: list[str] = []
    for part in kind.parts:
        prefix = f"{part.folder}/" if part.folder else ""
        here = {n[len(prefix):] for n in names if n.startswith(prefix) and "/" not in n[len(prefix):]}
        if part.folder and not here:
            missing.append(prefix)
            continue
        missing += [prefix + need.replace("|", " or ") for need in part.needs if not set(need.split("|")) & here]
        files += [prefix + n for n in sorted(here) if n.endswith(_CONFIG_SUFFIXES) and not _INDEX.match(n)]
        if part.weights:
            found = _weight_set(here, half, folder / part.folder if folder is not None else None)
            if found is None:
                missing.append(f"weights in {prefix or 'the top folder'} (*.safetensors or *.bin)")
            else:
                variants[part.folder] = found[0]
                files += [prefix + n for n in found[1]]
    return files, variants, missing


# --------------------------------------------------------------------------------------------
# Where things are
# --------------------------------------------------------------------------------------------


def _truthy(value: Optional[str]) -> bool:
    return value is not None and value.strip().lower() in {"1", "true", "yes", "on"}


def hub_offline() -> bool:
    """HF_HUB_OFFLINE, read now (huggingface_hub reads it once at import)."""
    from huggingface_hub import constants  # heavy: huggingface_hub loads only when needed

    return bool(constants.HF_HUB_OFFLINE) or _truthy(os.environ.get("HF_HUB_OFFLINE"))


def cache_dir() -> Path:
    """The Hugging Face hub cache, from HF_HUB_CACHE / HF_HOME as they are set now."""
    from huggingface_hub import constants  # heavy: huggingface_hub loads only when needed

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def is_local(source: str) -> bool:
    """A local folder rather than a Hub id ``owner/name`` (exactly one '/', no leading '.', '~' or '/')."""
    if Path(source).expanduser().exists():
        return True
    return source.startswith((".", "~", "/", "\\")) or source.count("/") != 1 or "\\" in source


def repo_cache(repo_id: str) -> Path:
    """``models--owner--name`` in the cache (huggingface_hub's own layout)."""
    from huggingface_hub.file_download import repo_folder_name  # heavy: huggingface_hub loads only when needed

    return cache_dir() / repo_folder_name(repo_id=repo_id, repo_type="model")


def cached_snapshot(repo_id: str) -> Optional[Path]:
    """The snapshot folder that ``refs/main`` points at in the cache, or None; never touches the network.

    Read from the cache layout directly: a partial download (only the files we need) is a valid snapshot.
    """
    ref = repo_cache(repo_id) / "refs" / "main"
    try:
        commit = ref.read_text().strip()
    except OSError:
        return None
    snapshot = repo_cache(repo_id) / "snapshots" / commit
    return snapshot if commit and snapshot.is_dir() else None


def human_size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}" if unit == "GB" else f"{n / scale:.0f} {unit}"
    return f"{n} B"


@dataclass
class Status:
    """What of a model is on disk now (no network)."""

    spec: ModelSpec
    folder: Optional[Path]  # the local folder or cached snapshot; None when there is none
    missing: list[str] = field(default_factory=list)  # empty with a folder: complete
    variants: dict[str, Optional[str]] = field(default_factory=dict)  # part folder -> "fp16" or None
    size: int = 0  # bytes of the needed files that are there

    @property
    def complete(self) -> bool:
        return self.folder is not None and not self.missing

    def where(self) -> str:
        """Where the model is, or why it is not complete here (a cause for messages)."""
        local = is_local(self.spec.source)
        if self.folder is None:
            if local:
                return f"not found: there is no folder {Path(self.spec.source).expanduser()}"
            return f"not in the Hugging Face cache {cache_dir()}"
        what = f"folder {self.folder}" if local else f"download in the Hugging Face cache {self.folder}"
        if self.missing:
            return f"incomplete {what}: missing {', '.join(self.missing)}"
        return f"local {what}" if local else f"Hugging Face cache {self.folder}"


def status(spec: ModelSpec) -> Status:
    """The model's local folder (or cached snapshot), what it lacks and its size; never downloads."""
    if is_local(spec.source):
        folder: Optional[Path] = Path(spec.source).expanduser()
        if not folder.is_dir():
            folder = None
    else:
        folder = cached_snapshot(spec.source)
    if folder is None:
        return Status(spec, None)
    names = set()
    for part in spec.kind.parts:
        sub = folder / part.folder
        if sub.is_dir():
            prefix = f"{part.folder}/" if part.folder else ""
            names |= {prefix + p.name for p in sub.iterdir() if p.is_file()}  # a broken cache link is no file
    files, variants, missing = _select(spec.kind, names, spec.half, folder)
    size = sum((folder / f).stat().st_size for f in files)
    return Status(spec, folder, missing, variants, size)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def mirror(repo_id: str) -> Optional[str]:
    """Where a Stable Diffusion 2.x repo of stabilityai is kept since its owner took it offline (Nov 2025)."""
    owner, _, name = repo_id.partition("/")
    if owner.lower() == "stabilityai" and name.lower().startswith("stable-diffusion-2"):
        return f"sd2-community/{name}"
    return None


def _network_errors() -> tuple[type[BaseException], ...]:
    """Transport errors of the HTTP clients huggingface_hub uses (httpx2, httpx or requests by version)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                         ("requests", "ConnectionError"), ("requests", "Timeout")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:200]}" if text else type(err).__name__


def describe_error(err: BaseException, source: str = "") -> str:
    """A one-line cause for a Hub or loading exception, looking through chained exceptions."""
    # heavy: huggingface_hub loads only when needed
    from huggingface_hub.errors import (
        EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled,
        RepositoryNotFoundError, RevisionNotFoundError,
    )

    chain: list[BaseException] = []
    node: Optional[BaseException] = err
    while node is not None and node not in chain:
        chain.append(node)
        node = node.__cause__ or node.__context__
    network = _network_errors()
    for e in chain:
        if isinstance(e, GatedRepoError):
            return "the repo is gated: accept its licence on huggingface.co and log in with `hf auth login`"
        if isinstance(e, RepositoryNotFoundError):
            moved = mirror(source)
            if moved:
                return ("not found on the Hugging Face Hub: stabilityai took its Stable Diffusion 2.x repos offline "
                        f"in November 2025, and the same files are kept at {moved}")
            return "not found on the Hugging Face Hub (check the id; a private repo needs `hf auth login`)"
        if isinstance(e, RevisionNotFoundError):
            return "the repo has no such revision on the Hugging Face Hub"
        if isinstance(e, (OfflineModeIsEnabled, LocalEntryNotFoundError)):
            return f"offline or no network, and the files are not in the Hugging Face cache {cache_dir()}"
        if isinstance(e, network):
            return f"no connection to the Hugging Face Hub ({_first_line(e)})"
        if isinstance(e, HfHubHTTPError):
            code = getattr(getattr(e, "response", None), "status_code", "?")
            return f"the Hugging Face Hub answered HTTP {code} ({_first_line(e)})"
        if isinstance(e, EntryNotFoundError):
            return f"a file is missing in the repo ({_first_line(e)})"
    return _first_line(err)


def unavailable(spec: ModelSpec, cause: str) -> ModelUnavailable:
    """The one error for a model that cannot be had: model, cause, ways on (one line)."""
    kind = spec.kind
    ways = []
    moved = None if is_local(spec.source) else mirror(spec.source)
    if moved:
        ways.append(kind.option.replace("PATH", moved))
    ways.append(f"{kind.option} to {kind.folder}")
    if not is_local(spec.source):
        ways.append("`recdreamer-gs models --download` on a machine with network (then HF_HUB_OFFLINE=1 here)")
    ways.append(kind.instead)
    message = f"{kind.title} {spec.source!r} cannot be loaded: {cause}. Ways on: {'; or '.join(ways)}."
    return ModelUnavailable(" ".join(message.split()), cause)


def load_error(spec: ModelSpec, err: BaseException) -> ModelUnavailable:
    """A ``from_pretrained`` failure on a complete folder (corrupt file, wrong model type) as the one error."""
    return unavailable(spec, describe_error(err, spec.source))


# --------------------------------------------------------------------------------------------
# Downloads
# --------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """The files of a Hub repo that the loader reads, with their sizes (from the repo's file metadata)."""

    spec: ModelSpec
    files: dict[str, int]  # repo path -> bytes
    variants: dict[str, Optional[str]]

    @property
    def total(self) -> int:
        return sum(self.files.values())

    def describe(self) -> str:
        half = " (fp16 weights)" if any(v == "fp16" for v in self.variants.values()) else ""
        return f"{len(self.files)} files, {human_size(self.total)}{half}"


def plan(spec: ModelSpec) -> Optional[Plan]:
    """None when the model is complete locally; else what to download, asking the Hub for the file list.

    Raises:
        ModelUnavailable: a local folder is missing or incomplete, the Hub is off (HF_HUB_OFFLINE) or
            unreachable, or the repo is not found, gated or lacks the files the loader reads.
    """
    here = status(spec)
    if here.complete:
        return None
    if is_local(spec.source):
        raise unavailable(spec, here.where())
    if hub_offline():
        raise unavailable(spec, f"offline (HF_HUB_OFFLINE is set) and {here.where()}")
    from huggingface_hub import HfApi  # heavy: huggingface_hub loads only when needed

    try:
        info = HfApi().model_info(spec.source, files_metadata=True)
    except Exception as err:  # noqa: BLE001 - every Hub failure becomes the one message
        raise unavailable(spec, describe_error(err, spec.source)) from None
    sizes = {s.rfilename: int(s.size or 0) for s in info.siblings or []}
    files, variants, missing = _select(spec.kind, set(sizes), spec.half)
    if missing:
        raise unavailable(spec, f"the repo lacks {', '.join(missing)} (expected {spec.kind.folder})")
    return Plan(spec, {f: sizes[f] for f in files}, variants)


class _BlobWatcher:
    """Moves a rich progress task with the bytes landing in a repo's ``blobs/`` folder while it downloads
    (huggingface_hub writes each file there as ``*.incomplete`` first), so big files show progress too."""

    def __init__(self, blobs: Path, progress, task):
        self.blobs, self.progress, self.task = blobs, progress, task
        self.start = self._bytes()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _bytes(self) -> int:
        try:
            return sum(e.stat().st_size for e in os.scandir(self.blobs) if e.is_file(follow_symlinks=False))
        except OSError:
            return 0

    def _run(self) -> None:
        while not self.stop.wait(0.5):
            self.progress.update(self.task, completed=self._bytes() - self.start)

    def __enter__(self) -> "_BlobWatcher":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def download(p: Plan, console: Optional["Console"] = None) -> Path:
    """Fetch the planned files into the Hugging Face cache with a progress bar; returns the snapshot folder."""
    from huggingface_hub import snapshot_download  # heavy: huggingface_hub loads only when needed
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    spec = p.spec
    console = console or Console(stderr=True)
    console.print(f"downloading {spec.kind.title} {spec.source}: {p.describe()} into {cache_dir()}", highlight=False)
    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()  # our bar instead of one tqdm bar per file
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    try:
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task(spec.source, total=p.total)
            with _BlobWatcher(repo_cache(spec.source) / "blobs", progress, task):
                snapshot_download(spec.source, allow_patterns=list(p.files), cache_dir=str(cache_dir()))
    except Exception as err:  # noqa: BLE001 - every Hub failure becomes the one message
        raise unavailable(spec, f"the download failed: {describe_error(err, spec.source)}") from None
    finally:
        if not was_disabled:
            enable_progress_bars()
    after = status(spec)
    if not after.complete:
        raise unavailable(spec, f"after the download, {after.where()}")
    console.print(f"downloaded {spec.source} ({human_size(after.size)})", highlight=False)
    return after.folder  # type: ignore[return-value]


@dataclass(frozen=True)
class Resolved:
    """A complete local model folder and the weight variant of each part (what ``from_pretrained`` reads)."""

    folder: Path
    variants: dict[str, Optional[str]]

    def variant(self, part: str = "") -> Optional[str]:
        return self.variants.get(part)


def ensure(spec: ModelSpec, console: Optional["Console"] = None) -> Resolved:
    """The model's complete local folder, downloading it first when it is a Hub id and the network allows.

    Raises:
        ModelUnavailable: the model cannot be had here (see :func:`plan`).
    """
    todo = plan(spec)
    if todo is not None:
        download(todo, console)
    here = status(spec)
    return Resolved(here.folder, here.variants)  # type: ignore[arg-type]


def prepare(specs: Iterable[ModelSpec], console: Optional["Console"] = None) -> None:
    """Make every model local: check all of them first (so nothing is fetched when one cannot be had),
    then download the missing ones."""
    plans = [p for p in (plan(s) for s in specs) if p is not None]
    for p in plans:
        download(p, console)


def half_weights(dtype: str, cuda: bool) -> bool:
    """Whether a prior dtype setting (auto, fp16, bf16, fp32) runs in half precision."""
    return dtype in ("fp16", "bf16") or (dtype == "auto" and cuda)
