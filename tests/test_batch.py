"""batch.py: prompt files, the runs of a set, bad input refused up front, and sets run on Ray.

The Ray tests run in a fresh network namespace that has only ``lo`` (``unshare -n``; CI runs as root): one Ray
head with two CPUs is shared by the module (tests/ray_head.py), every ``recdreamer-gs batch`` joins it from the
same namespace (``nsenter``), and the test checks that no socket of these processes uses an address other than
loopback. Without the namespace the tests fail; they are never skipped.
"""

import ipaddress
import json
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from recdreamer_gs import batch, run_folder
from recdreamer_gs.cli import app
from recdreamer_gs.export import read_ply

runner = CliRunner()
TESTS = Path(__file__).parent
SMALL = ["prior.kind=synthetic", "prior.synthetic.resolution=24", "gaussians.num_init=200", "camera.batch_size=2",
         "output.turntable_frames=0", "train.preview_every=0", "train.steps=24", "train.checkpoint_every=3"]



def invoke(*args: str):
    result = runner.invoke(app, list(args))
    return result.exit_code, " ".join(result.output.split())


# ---- prompt files -------------------------------------------------------------------------------


def test_prompt_files_text_jsonl_yaml(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("# a comment\na red cube\n\n  a blue ball  \n")
    assert [(e.prompt, e.where) for e in batch.read_prompts(text)] == [
        ("a red cube", f"{text} line 2"), ("a blue ball", f"{text} line 4")]
    (tmp_path / "tpl").mkdir()
    lines = tmp_path / "p.jsonl"
    lines.write_text('{"prompt": "a cat", "method": ["usd", "vsd"], "seed": [1, 2], "templates": "tpl", '
                     '"set": ["train.steps=7", "sds:distill.guidance_scale=50"]}\n{"prompt": "a dog", "name": "dog1", '
                     '"set": {"camera.batch_size": 2}}\n\n')
    cat, dog = batch.read_prompts(lines)
    assert cat.methods == ("usd", "vsd") and cat.seeds == (1, 2) and cat.templates == str(tmp_path / "tpl")
    assert cat.sets[0].data == {"train": {"steps": 7}} and cat.sets[1].method == "sds"
    assert dog.name == "dog1" and dog.sets[0].data == {"camera": {"batch_size": 2}}
    listing = tmp_path / "p.yaml"
    listing.write_text("- a fish\n- {prompt: a bird, method: sds, seed: 4}\n")
    fish, bird = batch.read_prompts(listing)
    assert (fish.prompt, fish.methods, bird.methods, bird.seeds) == ("a fish", None, ("sds",), (4,))


def test_plan_names_settings_and_folders(tmp_path):
    entries = [batch.Entry("A red cube!", "f line 1"), batch.Entry("a cat", "f line 2", name="cat", seeds=(5,),
                                                                   sets=(batch.parse_set("train.steps=40"),))]
    runs = batch.plan_runs(entries, tmp_path, "synthetic", sets=[batch.parse_set("sds:distill.guidance_scale=50")],
                           methods=("usd", "sds"), seeds=(0, 1))
    assert [r.name for r in runs] == ["a-red-cube-usd-s0", "a-red-cube-usd-s1", "a-red-cube-sds-s0",
                                      "a-red-cube-sds-s1", "cat-usd-s5", "cat-sds-s5"]
    cfg = {r.name: r.config for r in runs}
    assert cfg["a-red-cube-sds-s0"]["distill"]["guidance_scale"] == 50.0  # the set for SDS runs only
    assert cfg["a-red-cube-usd-s0"]["distill"]["guidance_scale"] == 7.5
    assert cfg["cat-usd-s5"]["train"]["steps"] == 40 and cfg["cat-usd-s5"]["train"]["seed"] == 5
    # No checkpoint interval in the preset: a tenth of the run, so a lost worker costs little; no progress bar.
    assert cfg["cat-usd-s5"]["train"]["checkpoint_every"] == 4 and not cfg["cat-usd-s5"]["train"]["progress_bar"]
    assert all(r.state() == "new" for r in runs)
    with pytest.raises(batch.BatchError, match="get the folder 'a-cat-usd-s0'"):
        batch.plan_runs([batch.Entry("a cat", "1"), batch.Entry("A CAT", "2")], tmp_path, methods=("usd",))
    with pytest.raises(batch.BatchError, match="runs 3 stages with their own methods"):
        batch.plan_runs(entries[:1], tmp_path, "paper", methods=("usd",))
    assert [r.method for r in batch.plan_runs(entries[:1], tmp_path, "paper")] == ["usd+sds"]
    # A folder of that name that holds another run is not continued.
    (tmp_path / "cat-usd-s5").mkdir()
    (tmp_path / "cat-usd-s5" / "config.yaml").write_text("prompt: a dog\ntrain: {seed: 5}\ndistill: {method: usd}\n")
    with pytest.raises(batch.BatchError, match="holds another run .prompt 'a dog'"):
        batch.plan_runs(entries[1:], tmp_path, "synthetic", methods=("usd",))


def test_bench_plans_the_paper_prompts_with_every_method(tmp_path):
    code, text = invoke("bench", "--out", str(tmp_path / "b"), "--dry-run", "--set", "prior.kind=synthetic")
    assert code == 0 and "66 runs" in text and "a-kangaroo-wearing-boxing-gloves-sds-s0" in text
    assert not (tmp_path / "b").exists()
    assert len(batch.read_prompts(batch.paper_prompts())) == 22


# ---- bad input: one line, exit 2, nothing started --------------------------------------------


@pytest.mark.parametrize("content, args, expected", [
    (None, [], "prompt file {p} does not exist"),
    ("# only a comment\n\n", [], "prompt file {p} holds no prompt"),  # (a text file: see below)
    ('{"prompt": "a"}\n\n{"prompt": "b"}\n', [], "{p} line 2: empty line"),
    ('{"prompt": "a"}\n{"prompt": "b", "method": "dreamfusion"}\n', [],
     "line 2: 'method': unknown method 'dreamfusion'"),
    ('{"prompt": "a", "colour": "red"}\n', [], "line 1: unknown key 'colour'"),
    ('{"prompt": "a"}\n', ["--methods", "usd,nerf"], "--methods: unknown method 'nerf'"),
    ('{"prompt": "a"}\n{"prompt": "b", "set": ["distill.nope=1"]}\n', [],
     "line 2 ('b'): unknown config key distill.nope"),
    ('{"prompt": "a"}\n', ["--set", "train.steps=0"], "train.steps: expected a positive number, got 0"),
    ('{"prompt": "a"}\n', ["--set", "nerf:train.steps=3"], "expected METHOD:KEY=VALUE"),
    ('{"prompt": "a"}\n', ["--seeds", "0,x"], "--seeds: expected seeds as integers"),
])
def test_bad_input_is_refused_before_anything_starts(tmp_path, content, args, expected):
    prompts = tmp_path / ("p.txt" if content and content.startswith("#") else "p.jsonl")
    if content is not None:
        prompts.write_text(content)
    code, text = invoke("batch", str(prompts), "--out", str(tmp_path / "out"), *args)
    assert code == 2 and text.startswith("error: ") and expected.format(p=prompts) in text, text
    assert "Traceback" not in text and not (tmp_path / "out").exists()


def test_unreachable_address_is_refused(tmp_path):
    with socket.socket() as s:  # a loopback port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "p.txt").write_text("a cat\n")
    code, text = invoke("batch", str(tmp_path / "p.txt"), "--out", str(tmp_path / "out"), "--address",
                        f"127.0.0.1:{port}")
    assert code == 2 and f"--address 127.0.0.1:{port}: cannot reach a Ray head there" in text
    code, text = invoke("batch", str(tmp_path / "p.txt"), "--out", str(tmp_path / "out"), "--address", "nohost")
    assert code == 2 and "expected auto or HOST:PORT" in text
    assert not (tmp_path / "out").exists()


# ---- sets on Ray, inside a network namespace with only lo --------------------------------------


class Namespace:
    """A Ray head in a fresh network namespace; ``run`` starts a command in that namespace."""

    def __init__(self, root: Path):
        self.root = root
        # Ray starts its workers at niceness 15 (docs/batch.md): beside the other pytest worker of `make test` they
        # would wait for the CPU while this test waits for them; at 0 they take their share.
        self.env = dict(os.environ, RAY_AUTH_TOKEN=secrets.token_hex(16), RAY_AUTH_MODE="token",
                        RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1", RAY_worker_niceness="0")
        self.temp = tempfile.mkdtemp(prefix="rgs-ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
        head = f"ip link set lo up && exec {sys.executable} {TESTS / 'ray_head.py'} 2 {self.temp}"
        try:
            self.head = subprocess.Popen(["unshare", "-n", "sh", "-c", head], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True, env=self.env, start_new_session=True)
        except OSError as err:
            raise RuntimeError(f"the Ray tests need `unshare -n` (util-linux) as root: {err}") from None
        ready, _, _ = select.select([self.head.stdout], [], [], 180)
        line = self.head.stdout.readline() if ready else ""
        if not line:
            os.killpg(self.head.pid, signal.SIGKILL)  # the head's own process group: what it had started
            shutil.rmtree(self.temp, ignore_errors=True)
            raise RuntimeError("could not start a Ray head under `unshare -n` (needs root, as CI runs) within "
                               f"180 s: exit code {self.head.wait()}")
        info = json.loads(line)
        self.address, self.pid = info["address"], info["pid"]

    def command(self, *argv: str) -> list[str]:
        return ["nsenter", f"--net=/proc/{self.pid}/ns/net", "--", *argv]

    def batch(self, *args: str, local: bool = False) -> subprocess.Popen:
        """``recdreamer-gs batch ARGS`` on the shared head, or with ``local`` on a local instance of its own (one
        CPU) that it starts and stops, in the same namespace."""
        where = ["--num-cpus", "1"] if local else ["--address", self.address]
        argv = self.command(sys.executable, "-m", "recdreamer_gs.cli", "batch", *args, *where)
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=self.root,
                                env=dict(self.env, RAY_TMPDIR=self.temp))

    def sockets(self) -> list[str]:
        """Every TCP/UDP socket in the namespace (all of them belong to the test's processes)."""
        out = subprocess.run(self.command("ss", "-tuanH"), capture_output=True, text=True, check=True).stdout
        return [line for line in out.splitlines() if line.strip()]

    def close(self) -> None:
        self.head.stdin.close()
        try:
            self.head.wait(60)
        finally:
            shutil.rmtree(self.temp, ignore_errors=True)


def foreign(lines: list[str]) -> list[str]:
    """The socket lines of ``ss -tuanH`` whose local or peer address is neither loopback nor a wildcard."""

    def ok(endpoint: str) -> bool:
        host = endpoint.rsplit(":", 1)[0].strip("[]").split("%")[0]
        if host in ("*", "0.0.0.0", "::"):
            return True
        addr = ipaddress.ip_address(host)
        return addr.is_loopback or bool(getattr(addr, "ipv4_mapped", None) and addr.ipv4_mapped.is_loopback)

    return [line for line in lines if not all(ok(part) for part in line.split()[4:6])]


@pytest.fixture(scope="module")
def namespace(tmp_path_factory):
    try:
        ns = Namespace(tmp_path_factory.mktemp("ray"))
    except RuntimeError:  # Ray gives its raylet 30 s to register: once more on a machine that busy
        ns = Namespace(tmp_path_factory.mktemp("ray"))
    try:
        yield ns
    finally:
        ns.close()


@pytest.fixture(scope="module")
def first_set(namespace, tmp_path_factory):
    """One set on two Ray workers: 2 prompts x usd, sds, an identical twin of one run, a failing entry; the
    worker of the first run is killed (SIGKILL) after its first checkpoints. Sockets sampled throughout."""
    root = tmp_path_factory.mktemp("set")
    empty = root / "no-model"
    empty.mkdir()
    entries = [{"prompt": "a red cube"}, {"prompt": "a blue ball"},
               {"prompt": "a red cube", "name": "twin", "method": "usd"},
               {"prompt": "a broken one", "method": "sds", "set": ["prior.kind=sd", f"prior.sd.model={empty}"]}]
    prompts = root / "set.jsonl"
    prompts.write_text("".join(json.dumps(e) + "\n" for e in entries))
    out = root / "out"
    args = [str(prompts), "--out", str(out), "--methods", "usd,sds", "--cpus-per-run", "1",
            *[a for s in SMALL for a in ("--set", s)]]
    start = time.time()
    proc = namespace.batch(*args)
    target, killed, sampled, last_sample = out / "a-red-cube-usd-s0", None, [], 0.0
    while proc.poll() is None:
        if time.time() - last_sample > 0.5:  # `ss` is a process of its own: sampled twice a second, not each poll
            sampled += namespace.sockets()
            last_sample = time.time()
        record = run_folder.read_record(target)
        if killed is None and (target / "checkpoints" / "last.ckpt").is_file() and record["attempts"]:
            killed = record["attempts"][-1]["pid"]
            os.kill(killed, signal.SIGKILL)  # a lost worker: Ray retries the task
        time.sleep(0.05)
    output = " ".join(proc.stdout.read().split())
    sampled += namespace.sockets()
    return {"root": root, "out": out, "code": proc.returncode, "output": output, "killed": killed,
            "sockets": sampled, "args": args, "wall": time.time() - start}


def test_set_runs_every_run_into_its_folder(first_set):
    out, output = first_set["out"], first_set["output"]
    assert first_set["code"] == 1, output  # one run failed
    names = ["a-red-cube-usd-s0", "a-red-cube-sds-s0", "a-blue-ball-usd-s0", "a-blue-ball-sds-s0", "twin-usd-s0"]
    for name in names:
        metrics = json.loads((out / name / "metrics.json").read_text())
        assert metrics["iterations"] == 24 and (out / name / "model.ply").is_file(), name
        assert (out / name / "config.yaml").is_file() and (out / name / "checkpoints" / "last.ckpt").is_file()
        assert f"== {name}: done" in (out / name / "run.log").read_text()
    assert "done 5/6" in output and f"wrote {out / 'summary.csv'}" in output
    assert (out / "sheet.png").is_file()


def test_lost_worker_is_retried_and_continues_from_its_checkpoint(first_set):
    out = first_set["out"]
    assert first_set["killed"] is not None
    record = run_folder.read_record(out / "a-red-cube-usd-s0")
    first, second = record["attempts"]
    assert first["pid"] == first_set["killed"] and first["status"] == "running"  # it never came back
    assert second["status"] == "done" and second["pid"] != first["pid"]
    resumed_at = int(second["resumed_from"].split()[1])
    assert 3 <= resumed_at < 24 and resumed_at % 3 == 0  # from a checkpoint, not from zero
    # It ends where its uninterrupted twin (same prompt, method, seed) ends: same iterations, same Gaussians.
    resumed, twin = read_ply(out / "a-red-cube-usd-s0" / "model.ply"), read_ply(out / "twin-usd-s0" / "model.ply")
    for name, value in twin.items():
        assert torch.allclose(resumed[name], value, atol=1e-4), name


def test_failing_entry_is_reported_while_the_others_finish(first_set):
    out = first_set["out"]
    record = run_folder.read_record(out / "a-broken-one-sds-s0")
    assert record["status"] == "failed" and "Stable Diffusion model" in record["cause"]
    assert "\n" not in record["cause"]
    assert "failed: a-broken-one-sds-s0: Stable Diffusion model" in first_set["output"]
    summary = (out / "summary.md").read_text()
    assert "- `a-broken-one-sds-s0`: failed: Stable Diffusion model" in summary
    assert summary.count("| done |") == 5


def test_no_socket_leaves_loopback(namespace, first_set):
    links = subprocess.run(namespace.command("ip", "-o", "link"), capture_output=True, text=True).stdout
    assert [line.split(":")[1].strip() for line in links.splitlines()] == ["lo"]
    assert len(first_set["sockets"]) > 10  # Ray's GCS, raylet and workers were seen talking
    assert foreign(first_set["sockets"]) == []


def test_second_batch_runs_nothing(first_set):
    good = first_set["root"] / "good.txt"
    good.write_text("a red cube\na blue ball\n")
    out = first_set["out"]
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/metrics.json")}
    args = first_set["args"]
    # In this process and without --address: with every run done no local Ray instance may start either.
    code, output = invoke("batch", str(good), *args[1:])
    assert code == 0, output
    assert "4 runs in" in output and "4 done earlier" in output and "Ray" not in output  # no cluster needed
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/metrics.json")} == before


def test_ctrl_c_stops_runs_with_checkpoints_and_the_next_batch_continues(namespace, tmp_path):
    # 150 iterations: Ctrl-C comes at the first checkpoint (iteration 4), and the rest of the run takes about 4 s on a
    # quiet machine; a 40-iteration run of this size could finish before the signal reached its task.
    (tmp_path / "p.txt").write_text("a slow cube\n")
    args = [str(tmp_path / "p.txt"), "--out", str(tmp_path / "out"), "--methods", "usd", "--cpus-per-run", "1",
            *[a for s in SMALL for a in ("--set", s)], "--set", "train.steps=150", "--set", "train.checkpoint_every=4"]
    run = tmp_path / "out" / "a-slow-cube-usd-s0"
    proc = namespace.batch(*args)
    while not (run / "checkpoints" / "last.ckpt").is_file() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # Ctrl-C on the driver
    output = " ".join(proc.communicate(timeout=300)[0].split())
    assert proc.returncode == 130, output
    assert "stopping" in output and run_folder.read_record(run)["status"] == "interrupted"
    stopped_at = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["iteration"]
    assert 4 <= stopped_at < 150 and (run / "model.ply").is_file()  # written when it stopped
    proc = namespace.batch(*args, local=True)  # continued by a local Ray instance (the path without --address)
    output = " ".join(proc.communicate(timeout=300)[0].split())
    assert proc.returncode == 0, output
    assert "1 to continue from a checkpoint" in output and "local Ray instance: 0 GPUs, 1 CPUs" in output
    second = run_folder.read_record(run)["attempts"][-1]
    assert second["resumed_from"] == f"iteration {stopped_at}"
    assert json.loads((run / "metrics.json").read_text())["iterations"] == 150
