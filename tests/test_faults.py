"""Runs that die or go wrong: SIGKILL/SIGTERM and exact resume, interrupted checkpoint writes, NaN losses,
unwritable or full output folders, the last K checkpoints."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from lgd.config import save_config
from lgd.engine import checkpoint, output_dir, training
from lgd.engine.checkpoint import CHECKPOINT, FINAL, load_checkpoint
from lgd.engine.signals import StopSignals, TrainingInterrupted, ignore_stop_signals
from lgd.engine.step import Stepper
from lgd.engine.training import train
from lgd.errors import DatasetError, TrainingError
from lgd.methods.lgd import LGD

REPO = Path(__file__).parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def _launch(config: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lgd", "train", "-c", str(config), "--no-progress", *args],
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(proc: subprocess.Popen, ready, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            output = proc.stderr.read()[-3000:] if proc.stderr else "(its output went to a pipe the test reads not)"
            pytest.fail(f"lgd train ended (status {proc.returncode}) too early:\n{output}")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail("timed out waiting for lgd train")
        time.sleep(0.02)


def _iterations(run: Path) -> list[int]:
    return sorted(int(p.stem.split("_")[1]) for p in run.glob("model_0*.pth"))


def _train_losses(run: Path) -> list[dict]:
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [(r["iter"], r["losses"]) for r in records if r["kind"] == "train"]


def test_sigterm_then_sigkill_then_resume_gives_the_uninterrupted_run(tiny_config, tmp_path):
    common = ("solver.max_iter=8", "checkpoint_period=2", f"threads={torch.get_num_threads()}")
    reference = tiny_config(f"output_dir={tmp_path / 'a'}", *common)
    train(reference, progress=False)

    run = tmp_path / "b"
    config = tmp_path / "b.yaml"
    save_config(tiny_config(f"output_dir={run}", *common), config)
    # SIGTERM: the step in progress finishes, a checkpoint is written, exit status 128 + 15.
    proc = _launch(config)
    _wait_for(proc, lambda: (run / "model_0000002.pth").is_file())
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    stopped = load_checkpoint(run / CHECKPOINT)["iteration"]
    assert 2 <= stopped < 8
    assert f"SIGTERM received: stopped after iteration {stopped}" in err
    # SIGKILL, no warning: at whatever point the resumed run is after its next checkpoint.
    proc = _launch(config, "--resume")
    _wait_for(proc, lambda: any(it > stopped for it in _iterations(run)))
    proc.kill()
    proc.communicate(timeout=240)
    assert proc.returncode == -signal.SIGKILL
    assert load_checkpoint(run / CHECKPOINT)["iteration"] > stopped
    # A runtime key (how many checkpoints to keep) may change on resume; what is computed may not.
    resumed = tiny_config(f"output_dir={run}", *common, "keep_checkpoints=1")
    train(resumed, resume=True, progress=False)

    a, b = load_checkpoint(tmp_path / "a" / FINAL)["model"], load_checkpoint(run / FINAL)["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=0, atol=1e-6), k
    losses_a, losses_b = _train_losses(tmp_path / "a"), _train_losses(run)
    assert [it for it, _ in losses_b] == list(range(1, 9))
    for (it, la), (_, lb) in zip(losses_a, losses_b):
        for k in la:
            assert lb[k] == pytest.approx(la[k], rel=1e-6, abs=1e-7), (it, k)
    assert _iterations(run) == [8]
    assert not list(run.glob(".*.tmp"))


KILLED_WRITE = """
import os, signal, sys, torch
from pathlib import Path
from lgd.engine import checkpoint

out = Path(sys.argv[1])
checkpoint.save_checkpoint({"iteration": 1}, out, 1, keep=3)

def dying_save(obj, path):
    with open(path, "wb") as f:
        f.write(b"half a checkpoint")
        f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = dying_save
checkpoint.save_checkpoint({"iteration": 2}, out, 2, keep=3)
"""


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path):
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(tmp_path)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert load_checkpoint(tmp_path / CHECKPOINT) == {"iteration": 1}
    assert not (tmp_path / "model_0000002.pth").exists()
    leftovers = list(tmp_path.glob(".model_0000002.pth.*.tmp"))
    assert len(leftovers) == 1 and leftovers[0].read_bytes() == b"half a checkpoint"
    output_dir.prepare_output_dir(tmp_path, resume=True)  # what the resuming run does first
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT, "model_0000001.pth"]


def test_the_first_signal_asks_to_stop_and_a_second_interrupts():
    with StopSignals(announce=False) as signals:
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert TrainingInterrupted(signal.SIGINT, 3, Path("x")).exit_code == 130



def test_an_interruption_crosses_a_process_pool_intact():
    """A run stopped in benchmarks/accuracy.py's process pool comes back to the parent pickled; were it not to
    unpickle, the pool would break and kill its other runs before their checkpoints."""
    import pickle

    back = pickle.loads(pickle.dumps(TrainingInterrupted(signal.SIGTERM, 70, Path("out/model_0000070.pth"))))
    assert isinstance(back, TrainingInterrupted) and back.exit_code == 143 and back.is_main
    assert "iteration 70" in str(back) and "model_0000070.pth" in str(back)

def _poison(monkeypatch, iteration: int) -> None:
    real = LGD.forward

    def poisoned(self, images, targets=None):
        losses = real(self, images, targets)
        if self.training and self.iteration == iteration:
            losses["loss_distill"] = losses["loss_distill"] * float("nan")
        return losses

    monkeypatch.setattr(LGD, "forward", poisoned)


def test_a_nan_loss_stops_with_the_iteration_terms_and_a_debug_checkpoint(tiny_config, monkeypatch):
    _poison(monkeypatch, iteration=2)
    cfg = tiny_config()
    with pytest.raises(TrainingError, match=r"iteration 2: non-finite loss terms \['loss_distill'\] on images "
                                            r"\[\d+, \d+\].*nan_debug_0000002.pth") as info:
        train(cfg, progress=False)
    assert "--resume" in str(info.value)
    run = Path(cfg.output_dir)
    debug = load_checkpoint(run / "nan_debug_0000002.pth")
    assert debug["iteration"] == 2 and len(debug["image_ids"]) == 2
    assert debug["losses_per_rank"][0]["loss_distill"] != debug["losses_per_rank"][0]["loss_distill"]  # NaN
    last = load_checkpoint(run / CHECKPOINT)
    assert last["iteration"] == 2
    for k, v in last["model"].items():  # the debug state is the one before the failed step
        assert torch.equal(v, debug["model"][k]), k


def test_nan_policy_skip_leaves_the_model_alone_and_logs_the_step(tiny_config, monkeypatch):
    _poison(monkeypatch, iteration=1)
    cfg = tiny_config("solver.nan_policy=skip", "solver.max_iter=2", "checkpoint_period=1")
    train(cfg, progress=False)
    run = Path(cfg.output_dir)
    before, after = load_checkpoint(run / "model_0000001.pth"), load_checkpoint(run / "model_0000002.pth")
    for k, v in before["model"].items():  # parameters and BatchNorm running statistics alike
        assert torch.equal(v, after["model"][k]), k
    assert after["optimization"]["schedulers"][0]["last_epoch"] == 2  # the schedule still moved on
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["iter"], r.get("split")) for r in records] == [
        ("train", 1, None), ("skip", 2, None), ("eval", 2, "val"), ("eval", 2, "val_teacher")]
    assert records[1]["terms"] == ["loss_distill"] and records[1]["gradients"] == []
    assert len(records[1]["image_ids"]) == 2


def test_a_nan_gradient_behind_finite_losses_is_caught_before_any_optimiser_steps(tiny_config, monkeypatch):
    real = LGD.forward

    def nan_gradient(self, images, targets=None):
        losses = real(self, images, targets)
        if self.training and self.iteration == 1:  # 0 * sqrt(0): value 0, gradient 0 * inf = NaN
            losses["loss_distill"] = losses["loss_distill"] + (self.adapter.layers[0].bias * 0).sum().sqrt() * 0
        return losses

    monkeypatch.setattr(LGD, "forward", nan_gradient)
    cfg = tiny_config("checkpoint_period=1")
    with pytest.raises(TrainingError, match=r"iteration 1: non-finite gradients of adapter.layers.0.bias on "
                                            r"images \[\d+, \d+\] \(finite losses\)"):
        train(cfg, progress=False)
    last = load_checkpoint(Path(cfg.output_dir) / CHECKPOINT)
    debug = load_checkpoint(Path(cfg.output_dir) / "nan_debug_0000001.pth")
    assert last["iteration"] == 1
    for k, v in last["model"].items():  # not even the student optimiser stepped
        assert torch.equal(v, debug["model"][k]), k


def test_an_unwritable_or_full_output_dir_is_reported_before_training(tiny_config, tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the output folder must be checked first")

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setattr(training, "build_dataset", never)
    with pytest.raises(TrainingError, match=r"output_dir .*a_file/run is not writable \(Not a directory\)"):
        train(tiny_config(f"output_dir={blocker / 'run'}"), progress=False)
    monkeypatch.undo()

    def one_mib_free(path):
        return types.SimpleNamespace(total=2**40, used=2**40 - 2**20, free=2**20)

    monkeypatch.setattr(checkpoint.shutil, "disk_usage", one_mib_free)
    monkeypatch.setattr(Stepper, "__call__", never)
    cfg = tiny_config()
    with pytest.raises(TrainingError, match=r"has 1 MiB free, but this run needs about \d+ MiB for its checkpoints"):
        train(cfg, progress=False)


def test_a_failed_checkpoint_write_stops_with_the_previous_checkpoint_intact(tiny_config, monkeypatch):
    real, calls = checkpoint.atomic_save, []

    def disk_full_on_second(obj, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(obj, path)

    monkeypatch.setattr(checkpoint, "atomic_save", disk_full_on_second)
    cfg = tiny_config()
    with pytest.raises(TrainingError, match=r"cannot write checkpoint .*model_0000004.pth \(No space left on "
                                            r"device\); the previous checkpoint .*last.pth is intact"):
        train(cfg, progress=False)
    assert load_checkpoint(Path(cfg.output_dir) / CHECKPOINT)["iteration"] == 2


def test_the_newest_k_checkpoints_are_kept_and_last_is_the_newest(tiny_config):
    cfg = tiny_config("checkpoint_period=1", "keep_checkpoints=2")
    run = Path(cfg.output_dir)
    run.mkdir(parents=True)
    (run / "model_0000009.pth").write_bytes(b"left by an abandoned run")
    train(cfg, progress=False)
    assert _iterations(run) == [3, 4]
    assert load_checkpoint(run / CHECKPOINT)["iteration"] == 4
    assert os.stat(run / CHECKPOINT).st_ino == os.stat(run / "model_0000004.pth").st_ino  # a link, not a copy


def test_loader_workers_leave_stop_signals_to_the_main_process():
    """A SIGTERM sent to every process (pkill, a scheduler) must not kill a worker under the step being finished."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        ignore_stop_signals(0)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def test_a_process_that_trained_with_loader_workers_exits(tiny_config, tmp_path):
    """Training in-process with worker processes, as the benchmarks do, then leaving the interpreter: this hung
    forever while train() left its workers, which ignore SIGTERM, for multiprocessing to stop at exit."""
    config = tmp_path / "workers.yaml"
    save_config(tiny_config("data.workers=1", "solver.max_iter=2", "checkpoint_period=2"), config)
    script = ("from lgd.config import load_config; from lgd.engine.training import train; "
              f"train(load_config({str(config)!r}), progress=False)")
    try:
        done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=ENV, capture_output=True, text=True,
                              timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("the process did not exit after training")
    assert done.returncode == 0, done.stderr[-3000:]


def test_sigint_to_the_process_group_with_the_reader_gone_checkpoints_and_exits_130(tiny_config, tmp_path):
    """`lgd train ... 2>&1 | tee log` and Ctrl-C: the terminal's SIGINT reaches the whole process group, tee dies
    of it, and lgd's next line meets a closed pipe. That line (the signal's announcement) aborted the step before
    its checkpoint, and the exit status said success (issue 26)."""
    run = tmp_path / "piped"
    config = tmp_path / "piped.yaml"
    save_config(tiny_config(f"output_dir={run}", "solver.max_iter=100000", "checkpoint_period=100000",
                            "log_period=1", "eval_period=0"), config)
    read, write = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "lgd", "train", "-c", str(config), "--no-progress"], cwd=REPO,
                            env=ENV, stdout=write, stderr=write, start_new_session=True)
    os.close(write)
    try:
        _wait_for(proc, lambda: (run / "metrics.jsonl").is_file() and '"train"' in (run / "metrics.jsonl").read_text())
        assert not (run / CHECKPOINT).exists()
        os.close(read)  # the reader goes first, as tee does when the group's SIGINT reaches it
        read = None
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=240) == 130
    finally:
        if read is not None:
            os.close(read)
        if proc.poll() is None:
            proc.kill()
    stopped = load_checkpoint(run / CHECKPOINT)["iteration"]
    assert 1 <= stopped < 100000


def test_an_image_that_cannot_be_decoded_mid_run_stops_after_a_checkpoint(tiny_config, synth_root, tmp_path):
    """A training image truncated on disk is first read at iteration 4: the run stops there with the file named
    and a checkpoint of the 3 steps done (none was due), and resumes once the file is whole again (issue 26)."""
    import shutil

    from lgd.data.build import build_dataset
    from lgd.data.loader import TrainBatchSampler, _aspect_ratios

    images = tmp_path / "train"
    shutil.copytree(synth_root / "train", images)
    cfg = tiny_config(f"data.train.root={images}", "solver.max_iter=6", "checkpoint_period=1000")
    dataset = build_dataset(cfg, "train", train=True)
    batches = iter(TrainBatchSampler(_aspect_ratios(dataset), cfg.data.batch_size, cfg.seed))
    seen = {idx for _ in range(3) for idx, _ in next(batches)}
    bad = images / dataset.image_info(next(idx for idx, _ in next(batches) if idx not in seen))["file_name"]
    whole = bad.read_bytes()
    bad.write_bytes(whole[:len(whole) // 2])

    with pytest.raises(DatasetError, match=rf"{bad.name} cannot be read: .*truncated.*Stopped before iteration 4 and "
                                           r"wrote .*model_0000003\.pth; fix or replace the file and continue with "
                                           r"the same command and --resume"):
        train(cfg, progress=False)
    assert load_checkpoint(Path(cfg.output_dir) / CHECKPOINT)["iteration"] == 3

    bad.write_bytes(whole)
    train(cfg, resume=True, progress=False)
    assert load_checkpoint(Path(cfg.output_dir) / FINAL)["iteration"] == 6
