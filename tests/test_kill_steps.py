"""kill -9 after every step of writing a run's outputs: each time they are absent or complete and consistent.

The write protocol of :mod:`onnxstain.outputs` has steps (each temp write, fsync, rename, folder
sync). ``ONNXSTAIN_TEST_PAUSE_EACH_STEP`` stops one run after each step until the files have been
checked here: no code of the run executes in between, so what is checked is exactly what a kill -9
after that step leaves, for every step of one run (the job's computation is not redone k times).
Real kills (``ONNXSTAIN_TEST_KILL_AFTER_STEP=k``, SIGKILL) after every step of one lock check the same
invariants on what a killed process really leaves, and that the next run removes its temp files.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import onnx
import pytest
from tinymodels import smooth_images, tiny_lockable, tiny_mlp, write_images

from onnxstain.outputs import KILL_ENV, PAUSE_ENV, TEMP_PREFIX
from onnxstain.preprocess import Preprocessing

REPO = Path(__file__).resolve().parent.parent


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **extra)
    env.pop(KILL_ENV, None)
    env.pop(PAUSE_ENV, None)
    env.update(extra)
    return env


def _cli(args: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "from onnxstain.cli import main; main()", *args], cwd=cwd,
                            env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _kill_each_step(args: list[str], cwd: Path, out: Path, check) -> tuple[int, list[str]]:
    """Run ``args`` stopped after every write step; ``check(out, final)`` there. Returns (steps, failures)."""
    hand = cwd / f"handshake-{out.name}"
    hand.mkdir()
    proc = _cli(args, cwd, **{PAUSE_ENV: str(hand)})
    log: list[bytes] = []
    ended = threading.Event()

    def drain() -> None:  # EOF once the run has exited
        log.append(proc.stdout.read())
        ended.set()

    threading.Thread(target=drain, daemon=True).start()
    failures: list[str] = []
    step = 0
    deadline = time.monotonic() + 240
    while True:
        nxt = hand / f"step-{step + 1}"
        while not nxt.exists() and not ended.is_set():
            assert time.monotonic() < deadline, f"step {step + 1} not reached: {sorted(os.listdir(hand))}"
            time.sleep(0.01)
        if not nxt.exists():
            break
        step += 1
        # the run is stopped right after step k: the files are what a kill there leaves
        problem = check(out, final=False)
        if problem:
            failures.append(f"after step {step}: {problem}")
        (hand / f"go-{step}").write_text("")
    proc.wait()
    text = b"".join(log).decode(errors="replace")
    problem = check(out, final=True) if proc.returncode == 0 else f"exit {proc.returncode}"
    if problem:
        failures.append(f"after the run: {problem} ({text[-2000:]})")
    return step, failures


def _leftovers(out: Path, allowed: set[str]) -> str | None:
    extra = [p.name for p in out.iterdir() if p.name not in allowed and not p.name.startswith(TEMP_PREFIX)]
    return f"unexpected files {extra}" if extra else None


def _model_unit(out: Path, model: str, key: str, sides: list[str], final: bool) -> str | None:
    """Model ⇒ its key and record, consistent; side outputs only after the model; every file complete."""
    m, k = out / model, out / key
    r = out / f"{key}.public.json"
    if problem := _leftovers(out, {model, f"{model}.data", key, r.name, *sides}):
        return problem
    if final and not all(p.exists() for p in (m, k, r, *(out / s for s in sides))):
        return "a completed run lacks outputs"
    if k.exists():
        body = json.loads(k.read_bytes())
        if r.exists():
            record = json.loads(r.read_bytes())
            canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
            if record["commitment"] != hashlib.sha256(canonical).hexdigest():
                return "the public record is not the key's"
    if m.exists():
        if not (k.exists() and r.exists()):
            return "a model without its key and record"
        onnx.checker.check_model(str(m))
        if body["model"]["output_sha256"] != _sha(m):
            return "the key is not the model's"
    for s in sides:
        if (out / s).exists():
            if not m.exists():
                return f"{s} without the model"
            if s.endswith(".json"):
                json.loads((out / s).read_bytes())
            else:
                from PIL import Image

                Image.open(out / s).load()
    return None


def _files_complete(out: Path, names: list[str], final: bool) -> str | None:
    if not out.exists():
        return None if not final else "no output folder"
    if problem := _leftovers(out, set(names)):
        return problem
    if final and not all((out / n).exists() for n in names):
        return "a completed run lacks outputs"
    from PIL import Image

    for n in names:
        p = out / n
        if p.exists():
            if n.endswith(".json"):
                json.loads(p.read_bytes())
            elif n.endswith(".png"):
                Image.open(p).load()
            else:
                assert p.read_text().rstrip().endswith("</html>")
    return None


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("kill")
    (d / "imgs").mkdir()
    write_images(d / "imgs", smooth_images(48, size=8, seed=3))
    # an 8x8 MLP with its weights in external data: the output's .data is staged with the model
    onnx.save(tiny_mlp(), d / "mlp.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="mlp.onnx.data", size_threshold=0)
    Preprocessing(height=8, width=8, resize=None).save(d / "mlp.preprocessing.json")
    onnx.save(tiny_lockable(), d / "lockable.onnx")
    Preprocessing(height=48, width=48, resize=None).save(d / "lockable.preprocessing.json")
    (d / "imgs48").mkdir()
    write_images(d / "imgs48", smooth_images(64, size=48, seed=3))
    return d


def _fresh(work: Path, name: str) -> Path:
    out = work / name
    out.mkdir()
    return out


def test_kill_each_step_stain(work):
    out = _fresh(work, "stain")
    args = ["stain", "mlp.onnx", "-o", "stain/s.onnx", "--key", "stain/k.key", "--images", "imgs", "--fpr",
            "0.05", "--seed", "1", "--quiet", "--mode", "insert", "--json", "stain/s.json", "--trigger-png",
            "stain/t.png"]
    steps, failures = _kill_each_step(args, work, out, lambda o, final: _model_unit(
        o, "s.onnx", "k.key", ["s.json", "t.png"], final))
    # model + data (write, 2 fsyncs), key, record, json, png (write + fsync each), 6 renames, 1 folder sync
    assert steps == 3 + 8 + 6 + 1, steps
    assert not failures, failures
    assert (out / "s.onnx.data").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(TEMP_PREFIX)]


@pytest.fixture(scope="module")
def locked(work):
    out = _fresh(work, "lock")
    args = ["lock", "--kind", "gate", "lockable.onnx", "-o", "lock/l.onnx", "--key", "lock/l.key", "--images",
            "imgs48", "--fpr", "1e-3", "--seed", "2", "--quiet", "--occlusion-steps", "0", "--patch-png", "lock/p.png"]
    steps, failures = _kill_each_step(args, work, out, lambda o, final: _model_unit(
        o, "l.onnx", "l.key", ["p.png"], final))
    return out, steps, failures


def test_kill_each_step_lock(locked):
    _, steps, failures = locked
    assert steps == 2 + 6 + 4 + 1, steps
    assert not failures, failures


def test_kill_each_step_apply_patch(work, locked):
    out = work / "patched"  # created by the run: absent, or holding complete PNGs
    photos = [str(work / "imgs48" / f"{i:03d}.png") for i in range(3)]
    steps, failures = _kill_each_step(["apply-patch", *photos, "--key", "lock/l.key", "-o", "patched"], work,
                                      out, lambda o, final: _files_complete(o, ["000.png", "001.png", "002.png"],
                                                                            final))
    assert steps == 3 * 2 + 3 + 1, steps
    assert not failures, failures


def test_kill_each_step_evaluate(work, locked):
    out = _fresh(work, "eval")
    args = ["evaluate", "lockable.onnx", "lock/l.onnx", "--key", "lock/l.key", "--images", "imgs48", "--quiet",
            "--json", "eval/a.json", "--html", "eval/a.html"]
    steps, failures = _kill_each_step(args, work, out, lambda o, final: _files_complete(o, ["a.json", "a.html"],
                                                                                       final))
    assert steps == 2 * 2 + 2 + 1, steps
    assert not failures, failures


@pytest.mark.slow  # one lock run per step (13 runs)
def test_real_kill_after_each_step_of_a_lock(work, locked):
    """SIGKILL after step k of a real lock run, for every k, each run writing over what the killed one
    before it left (temp files, a key without its model, a complete older unit): the invariants hold
    after every kill, and a last run removes every temp file and completes."""
    _, steps, _ = locked
    out = _fresh(work, "relock")
    args = ["lock", "--kind", "gate", "lockable.onnx", "-o", "relock/l.onnx", "--key", "relock/l.key", "--images",
            "imgs48",
            "--fpr", "1e-3", "--seed", "2", "--quiet", "--occlusion-steps", "0", "--patch-png", "relock/p.png"]
    check = lambda o, final: _model_unit(o, "l.onnx", "l.key", ["p.png"], final)  # noqa: E731
    failures = []
    kills = 0
    for k in range(1, steps + 4):  # into a folder holding what the previous killed run left
        proc = _cli(args, work, **{KILL_ENV: str(k)})
        proc.communicate()
        if proc.returncode == 0:  # k is past the last step (one more once an older model is replaced)
            break
        assert proc.returncode == -9, (k, proc.returncode)
        kills += 1
        if problem := check(out, final=False):
            failures.append(f"killed after step {k}: {problem}")
    assert kills >= steps, kills
    assert not failures, failures
    proc = _cli(args, work)
    text = proc.communicate()[0].decode()
    assert proc.returncode == 0, text
    assert sorted(p.name for p in out.iterdir()) == ["l.key", "l.key.public.json", "l.onnx", "p.png"]
    assert not check(out, final=True)
    assert steps == 13


def test_killed_run_leaves_only_temp_files_the_next_run_removes(work, locked):
    out = _fresh(work, "relock2")
    args = ["lock", "--kind", "gate", "lockable.onnx", "-o", "relock2/l.onnx", "--key", "relock2/l.key", "--images",
            "imgs48", "--fpr", "1e-3", "--seed", "2", "--quiet", "--occlusion-steps", "0"]
    proc = _cli(args, work, **{KILL_ENV: "6"})  # after staging all three files: the key's rename is next
    proc.communicate()
    assert proc.returncode == -9
    temps = [p.name for p in out.iterdir()]
    assert temps and all(n.startswith(TEMP_PREFIX) for n in temps), temps
    proc = _cli(args, work)
    text = proc.communicate()[0].decode()
    assert proc.returncode == 0, text
    assert sorted(p.name for p in out.iterdir()) == ["l.key", "l.key.public.json", "l.onnx"]
