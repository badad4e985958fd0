"""torchrun as users launch it, on CPU with gloo.

Two processes on one node (--standalone) and two one-process "nodes" meeting by c10d rendezvous at 127.0.0.1 reach the
losses and weights of the in-process DDP path. A worker killed with SIGKILL at a random step is restarted by torchrun
(--max-restarts=1) and the group continues from the last checkpoint to the very model, optimiser and EMA of an
uninterrupted run (STRUCTALIGN_ELASTIC_TRIALS trials, 1 by default). SIGTERM to torchrun, a scheduler's preemption,
makes every rank save at its next sync point and exit; the requeued command continues exactly. A rank that cannot
reach the others exits with one line.

Every command runs in its own session; when a test ends, its processes and their descendants are killed.
"""
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
import yaml

from engine_helpers import tiny_raw_config
from process_group import as_rank, free_port

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
# The `torchrun` command beside this Python (the same program as `python -m torch.distributed.run`).
TORCHRUN = [os.path.join(os.path.dirname(sys.executable), "torchrun")]
if not os.path.isfile(TORCHRUN[0]):
    TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
STEPS = 9  # 3 epochs of 3 steps: 24 training images, 2 ranks, batches of 4
RUN_TIMEOUT_S = 240  # the longest wait for a command; a test that needs it has failed
COMPARED = ("model", "ema", "optimizer", "scheduler", "scaler", "epoch", "batch", "step", "best_nme")


def _config(tmp_path, root: str, **train) -> str:
    """A tiny run's YAML: STEPS steps, a log record per step, a checkpoint every 2 steps and at each epoch end."""
    raw = tiny_raw_config(root, str(tmp_path / "unused"))
    raw["train"].update(epochs=3, batch_size=4, log_every=1, save_every=2, tensorboard=False, progress=False,
                        dist_timeout_s=60.0, **train)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _env() -> dict:
    """Loopback only (gloo's interface), one thread per process (as torchrun sets it)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}


def _descendants(pid: int) -> list:
    """The processes below pid (torchrun starts its workers in sessions of their own: killpg does not reach them)."""
    children = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _workers(agent_pid: int) -> list:
    """The training processes torchrun started."""
    found = []
    for pid in _descendants(agent_pid):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"structalign.cli" in f.read():
                found.append(pid)
    return found


@contextlib.contextmanager
def _launched(*commands):
    """Start each (argv, log_path) in a session of its own; yield the Popen objects; kill all that is left at exit."""
    procs = []
    try:
        for argv, log_path in commands:
            with open(log_path, "w") as log:
                procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=_env(),
                                              start_new_session=True))
        yield procs
    finally:
        for proc in procs:
            for pid in [*_descendants(proc.pid), proc.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()


def _finished(proc, log_path) -> int:
    """proc's exit status once it ends (a failure naming its output when it outlives RUN_TIMEOUT_S)."""
    try:
        return proc.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(proc.args)} still runs after {RUN_TIMEOUT_S} s:\n{open(log_path).read()[-3000:]}")


def _logged_losses(out_dir) -> list:
    """(step, loss) of every training record in out_dir/log.jsonl (a torn last line is skipped)."""
    records = []
    with contextlib.suppress(FileNotFoundError), open(os.path.join(out_dir, "log.jsonl")) as f:
        for line in f:
            with contextlib.suppress(json.JSONDecodeError):
                record = json.loads(line)
                if "loss" in record:
                    records.append((record["step"], record["loss"]))
    return records


def _wait_for_step(out_dir, step: int, proc) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not any(s >= step for s, _ in _logged_losses(out_dir)):
        assert proc.poll() is None, f"the run ended (status {proc.returncode}) before step {step}"
        assert time.monotonic() < deadline, f"no step {step} after {RUN_TIMEOUT_S} s"
        time.sleep(0.02)


def _assert_equal(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _assert_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _assert_same_run(out_dir, reference_dir) -> None:
    """last.pt (model, optimiser, EMA, schedule, RNG states, position) and the logged losses are the reference's."""
    run, reference = (torch.load(os.path.join(d, "last.pt"), weights_only=True) for d in (out_dir, reference_dir))
    assert run["step"] == STEPS
    for key in COMPARED:
        _assert_equal(run[key], reference[key], key)
    assert _logged_losses(out_dir) == _logged_losses(reference_dir)


def _standalone(config: str, out_dir, *extra) -> list:
    return [*TORCHRUN, "--standalone", "--nproc_per_node=2", *extra, "-m", "structalign.cli", "train", config,
            f"train.out_dir={out_dir}", "--resume", "auto"]


@pytest.fixture(scope="module")
def config(synth_root, tmp_path_factory):
    return _config(tmp_path_factory.mktemp("config"), synth_root)


@pytest.fixture(scope="module")
def reference(config, tmp_path_factory):
    """An uninterrupted `torchrun --standalone --nproc_per_node=2` run: its folder."""
    out = tmp_path_factory.mktemp("reference")
    log = out / "torchrun.log"
    with _launched((_standalone(config, out), log)) as (proc,):
        assert _finished(proc, log) == 0, log.read_text()[-3000:]
    return str(out)


def _in_process_worker(rank: int, port: int, config: str, out: str):
    as_rank(rank, 2, port)
    from structalign.engine.config import load_config
    from structalign.engine.train import train

    with open(os.path.join(out, f"rank{rank}.log"), "w") as log, contextlib.redirect_stdout(log):
        result = train(load_config(config, [f"train.out_dir={out}"]))
    torch.save({"losses": result.losses, "model": result.model.state_dict(), "ema": result.ema.state_dict()},
               os.path.join(out, f"result{rank}.pt"))


@pytest.mark.slow
def test_standalone_torchrun_matches_the_in_process_ddp_path(config, reference, tmp_path):
    mp.spawn(_in_process_worker, args=(free_port(), config, str(tmp_path)), nprocs=2, join=True)
    in_process, rank1 = (torch.load(tmp_path / f"result{rank}.pt") for rank in (0, 1))
    _assert_equal(rank1["ema"], in_process["ema"], "rank 1's EMA")  # the ranks validate the same model
    assert [loss for _, loss in _logged_losses(reference)] == in_process["losses"]
    assert [step for step, _ in _logged_losses(reference)] == list(range(1, STEPS + 1))
    _assert_equal(torch.load(os.path.join(reference, "last.pt"))["model"], in_process["model"], "model")
    _assert_same_run(tmp_path, reference)


@pytest.mark.slow
def test_two_nodes_on_loopback_with_c10d_rendezvous(config, reference, tmp_path):
    """One torchrun per "node", one process each, meeting at 127.0.0.1 as `--rdzv-backend=c10d` describes."""
    endpoint = f"127.0.0.1:{free_port()}"
    node = [*TORCHRUN, "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
            "--rdzv-id=two-nodes", "--local-addr=127.0.0.1", "-m", "structalign.cli", "train", config,
            f"train.out_dir={tmp_path}", "--resume", "auto"]
    logs = [tmp_path / f"node{i}.log" for i in (0, 1)]
    with _launched((node, logs[0]), (node, logs[1])) as procs:
        for proc, log in zip(procs, logs):
            assert _finished(proc, log) == 0, log.read_text()[-3000:]
    _assert_same_run(tmp_path, reference)


@pytest.mark.slow
def test_elastic_restart_after_sigkill_at_a_random_step_is_exact(config, reference, tmp_path):
    """torchrun --max-restarts=1: a worker (either rank) killed with SIGKILL after a random step; the restarted group
    resumes from the last checkpoint and ends bit-identical to the uninterrupted run."""
    rng = random.Random()
    for trial in range(int(os.environ.get("STRUCTALIGN_ELASTIC_TRIALS", "1"))):
        out, log = tmp_path / f"trial{trial}", tmp_path / f"trial{trial}.log"
        kill_after = rng.randint(3, STEPS - 1)  # the checkpoint of step 2 is written before step 3
        with _launched((_standalone(config, out, "--max-restarts=1"), log)) as (agent,):
            _wait_for_step(out, kill_after, agent)
            victim = rng.choice(_workers(agent.pid))
            os.kill(victim, signal.SIGKILL)
            status = _finished(agent, log)
        text = log.read_text()
        where = f"trial {trial}, SIGKILL after step {kill_after}"
        assert status == 0, f"{where}:\n{text[-3000:]}"
        assert f"--resume auto: continuing from {out / 'last.pt'}" in text, where
        _assert_same_run(out, reference)


@pytest.mark.slow
def test_sigterm_to_torchrun_saves_at_the_next_sync_point_and_the_requeued_job_continues_exactly(
        config, reference, tmp_path):
    """SIGTERM to torchrun and its workers at once, as SLURM sends it (Kubernetes signals torchrun only): each worker
    gets it twice (torchrun forwards its own), and the second must not abort the save."""
    out, log = tmp_path / "run", tmp_path / "first.log"
    stop_after = random.randint(1, STEPS - 3)
    with _launched((_standalone(config, out), log)) as (agent,):
        _wait_for_step(out, stop_after, agent)
        for pid in [agent.pid, *_workers(agent.pid)]:
            os.kill(pid, signal.SIGTERM)
        _finished(agent, log)
    text = log.read_text()
    for rank in (0, 1):
        assert f"interrupt (SIGTERM, rank {rank})" in text, text[-3000:]
    saved = torch.load(out / "last.pt", weights_only=True)["step"]
    # Both ranks, or the first one signalled where a sync point fell between the two signals.
    assert re.search(rf"interrupt received on rank\(s\) \[[01, ]+\] of 2: saving a checkpoint at step {saved} and "
                     rf"stopping", text)
    assert f"interrupted (SIGTERM) at step {saved}" in text and "exit status 75" in text
    assert "forcefully exiting" not in text  # every worker ended by itself, torchrun killed none
    assert stop_after <= saved
    requeued = tmp_path / "requeued.log"
    with _launched((_standalone(config, out), requeued)) as (agent,):
        assert _finished(agent, requeued) == 0, requeued.read_text()[-3000:]
    assert f"--resume auto: continuing from {out / 'last.pt'}" in requeued.read_text()
    _assert_same_run(out, reference)


def _cli(config: str, out, rank: int, port: int, *overrides) -> list:
    """`structalign train` as rank `rank` of 2 processes started by hand (no torchrun), group at 127.0.0.1:port."""
    env = f"RANK={rank} LOCAL_RANK={rank} WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT={port}"
    return ["env", *env.split(), sys.executable, "-m", "structalign.cli", "train", config, f"train.out_dir={out}",
            *overrides]


def _error_lines(text: str) -> list:
    return [line for line in text.splitlines() if line.startswith("structalign train: error:")]


def test_a_rank_whose_peers_never_come_exits_with_one_line(config, tmp_path):
    log = tmp_path / "rank0.log"
    with _launched((_cli(config, tmp_path, 0, free_port(), "train.dist_timeout_s=2.0"), log)) as (proc,):
        status = _finished(proc, log)
    text = log.read_text()
    assert status == 1 and "Traceback" not in text, text[-3000:]
    (line,) = _error_lines(text)
    assert "rank 0 of 2: cannot form the process group with the other ranks at 127.0.0.1:" in line
    assert "within train.dist_timeout_s=2 s" in line


@pytest.mark.slow
def test_a_rank_that_loses_its_peer_mid_run_exits_with_one_line(config, tmp_path):
    """Rank 1 killed with SIGKILL after step 3, without torchrun to stop rank 0: rank 0's next collective fails and it
    exits with one line (no traceback, no hang)."""
    port, logs = free_port(), [tmp_path / f"rank{r}.log" for r in (0, 1)]
    with _launched((_cli(config, tmp_path, 0, port), logs[0]), (_cli(config, tmp_path, 1, port), logs[1])) as procs:
        _wait_for_step(tmp_path, 3, procs[0])
        procs[1].kill()
        status = _finished(procs[0], logs[0])
    text = logs[0].read_text()
    assert status == 1 and "Traceback" not in text, text[-3000:]
    (line,) = _error_lines(text)
    assert "rank 0 of 2 lost contact with the other ranks (" in line and "--resume auto" in line


def test_sigterm_stops_a_single_process_with_exit_status_75(config, tmp_path):
    log = tmp_path / "run.log"
    argv = [sys.executable, "-m", "structalign.cli", "train", config, f"train.out_dir={tmp_path}",
            "train.batch_size=8"]  # one process: STEPS steps with batches of 8
    with _launched((argv, log)) as (proc,):
        _wait_for_step(tmp_path, 1, proc)
        proc.send_signal(signal.SIGTERM)
        status = _finished(proc, log)
    saved = torch.load(tmp_path / "last.pt", weights_only=True)["step"]
    assert status == 75 and 1 <= saved < STEPS, log.read_text()[-3000:]


@pytest.mark.slow
def test_sync_points_come_within_half_the_grace_period(synth_root, tmp_path, monkeypatch):
    """One process, 3 steps per epoch, steps of at least 0.6 s (the loss sleeps inside the step) and
    train.preempt_grace_s=1: after the first sync point (the end of epoch 0, step 3) every step is one, although
    train.log_every is 100, so that an interrupt is acted on in time."""
    import structalign.engine.train as train_module
    from structalign.engine.config import load_config

    def slow_criterion(*args, **kwargs):
        criterion = build_criterion(*args, **kwargs)
        criterion.register_forward_hook(lambda module, inputs, output: time.sleep(0.6))
        return criterion

    build_criterion = train_module.build_criterion
    monkeypatch.setattr(train_module, "build_criterion", slow_criterion)
    cfg = load_config(_config(tmp_path, synth_root, preempt_grace_s=1.0),
                      ["train.log_every=100", "train.save_every=0", "train.epochs=2", "train.batch_size=8",
                       f"train.out_dir={tmp_path}"])
    train_module.train(cfg)
    assert [step for step, _ in _logged_losses(tmp_path)] == [3, 4, 5, 6]
