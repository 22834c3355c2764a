"""Who-am-I from the environment, stop requests, the LR schedule."""

import os
import signal
import subprocess
import sys
import threading

import pytest
import torch

from lmu_asr.distributed import DistEnv, env_from_environ, set_threads, slurm_port
from lmu_asr.optim import OptimConfig, build_optimizer, lr_at
from lmu_asr.preemption import Lifecycle, StopFlag, parse_signal
from lmu_asr.state import TrainState
from lmu_asr.train import TrainerConfig, micro_batch_seed


def test_single_process_by_default():
    assert env_from_environ({}) == DistEnv()
    # a one-task step is one process, and so is python started in a batch script with --ntasks=4
    assert env_from_environ({"SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"}) == DistEnv()
    assert env_from_environ({"SLURM_NTASKS": "4", "SLURM_PROCID": "0"}) == DistEnv()


def test_torchrun_environment():
    env = env_from_environ(
        {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "7"}
    )
    assert env == DistEnv(rank=3, local_rank=1, world_size=4, master_addr="n1", master_port=7)
    assert not env.is_main and env.distributed


def test_srun_step_on_one_node_meets_on_loopback_at_a_per_job_port():
    e = {"SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NUM_NODES": "1", "SLURM_PROCID": "1"}
    e |= {"SLURM_LOCALID": "1", "SLURM_STEP_NODELIST": "gpu-a17"}
    a = env_from_environ(e | {"SLURM_JOB_ID": "101"})
    b = env_from_environ(e | {"SLURM_JOB_ID": "102"})
    assert a == DistEnv(rank=1, local_rank=1, world_size=2, master_addr="127.0.0.1",
                        master_port=slurm_port(101))  # fmt: skip
    assert a.master_port != b.master_port
    # below the ephemeral range (32768+), where outgoing connections would take the port
    assert all(10000 <= slurm_port(j) < 32768 for j in (0, 19999, 20000, 123456789))
    # set by hand, MASTER_ADDR and MASTER_PORT win
    c = env_from_environ(e | {"MASTER_ADDR": "n7", "MASTER_PORT": "4242"})
    assert (c.master_addr, c.master_port) == ("n7", 4242)


def test_threads_from_slurm(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
        assert set_threads(0) == 1
        assert set_threads(2) == 2  # the config wins
    finally:
        torch.set_num_threads(before)


def test_stop_flag_records_the_signal_and_restores_handlers():
    previous = signal.getsignal(signal.SIGTERM)
    with StopFlag() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is previous


EARLY_USR2 = """
import os, signal
os.kill(os.getpid(), signal.SIGUSR2)  # SLURM's warning, long before training starts
import torch  # the slow part of a start
from lmu_asr.preemption import StopFlag
with StopFlag((signal.SIGTERM, signal.SIGUSR2)) as stop:
    print("stop requested by", signal.Signals(stop.signum).name)
"""


def test_a_time_limit_warning_during_the_start_of_a_slurm_task_is_kept_for_the_loop():
    """A sweep's SLURM task starts through lmu_asr.task_start (as the launcher has submitit run
    it): USR2 is held from then until StopFlag handles it, so the job stops at its first step and
    is requeued, instead of dying (FAILED)."""
    start = [sys.executable, "-m", "lmu_asr.task_start", "-u", "-c", EARLY_USR2]
    done = subprocess.run(start, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "stop requested by SIGUSR2", done
    plain = subprocess.run([sys.executable, "-c", EARLY_USR2], capture_output=True, timeout=120)
    assert plain.returncode == -signal.SIGUSR2  # started directly, the warning kills it


def test_a_time_limit_warning_after_training_finished_changes_nothing():
    """Once training is over, SLURM's warning (USR2) is ignored: it must not reach submitit's
    handler, restored by then, which would requeue a finished job. (That it cannot kill the
    exiting process: test_train.py, ..._as_the_finished_job_exits_leaves_it_successful.)"""
    caught = []
    before = signal.getsignal(signal.SIGUSR2)
    try:
        for ignore_after in [(signal.SIGUSR2,), ()]:  # without it, the handler is restored
            signal.signal(signal.SIGUSR2, lambda signum, frame: caught.append(signum))
            with StopFlag((signal.SIGTERM, signal.SIGUSR2), ignore_after=ignore_after):
                pass  # training
            os.kill(os.getpid(), signal.SIGUSR2)
            ignored = signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN
            assert (ignored, caught) == ((True, []) if ignore_after else (False, [signal.SIGUSR2]))
    finally:
        signal.signal(signal.SIGUSR2, before)


def test_a_stop_flag_off_the_main_thread_installs_and_ignores_nothing():
    """Python sets signal handlers only on the main thread: a StopFlag entered on another (launch's
    main called from a thread) leaves every handler as it was, and its end raises nothing."""
    before = signal.getsignal(signal.SIGUSR2)
    errors = []

    def run() -> None:
        try:
            with StopFlag((signal.SIGTERM, signal.SIGUSR2), ignore_after=(signal.SIGUSR2,)):
                pass
        except Exception as err:
            errors.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert errors == [] and signal.getsignal(signal.SIGUSR2) == before


def test_second_ctrl_c_interrupts_at_once():
    with StopFlag() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_warmup_by_steps_then_cosine_by_progress():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(cfg, 0, 0.0) == pytest.approx(0.1)
    assert lr_at(cfg, 9, 0.05) == pytest.approx(1.0)
    assert lr_at(cfg, 55, 0.5) == pytest.approx(0.55)
    assert lr_at(cfg, 100, 1.0) == pytest.approx(0.1)
    assert lr_at(cfg, 100, 7.0) == pytest.approx(0.1)  # past the deadline: stays at the floor
    constant = OptimConfig(lr=1.0, schedule="constant", warmup_steps=0)
    assert lr_at(constant, 50, 0.9) == 1.0


def test_no_weight_decay_on_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and [p.dim() for p in decayed["params"]] == [2]
    assert plain["weight_decay"] == 0 and len(plain["params"]) == 3


def test_stop_signal_names_and_a_bad_one():
    assert parse_signal("USR2") == parse_signal("SIGUSR2") == parse_signal("12") == signal.SIGUSR2
    with pytest.raises(ValueError, match="trainer.stop_signal: not a signal name.*'USR9'"):
        TrainerConfig(stop_signal="USR9")
    with pytest.raises(ValueError, match="trainer.max_restarts must be >= 0"):
        TrainerConfig(max_restarts=-1)


def test_lifecycle_names_a_start_that_never_stopped(tmp_path, caplog):
    life = Lifecycle(tmp_path, is_main=True)
    life.started(0)
    life.stopped("time_limit", 40)
    life.started(40)  # ... then the node died: no stop
    with caplog.at_level("WARNING"):
        Lifecycle(tmp_path, is_main=True).started(30)
    assert "ended without stopping" in caplog.text and "resuming from step 30" in caplog.text
    events = [(e["event"], e.get("reason"), e["step"]) for e in life.events()]
    assert events == [("start", None, 0), ("stop", "time_limit", 40), ("start", None, 40),
                      ("stop", "lost", None), ("start", None, 30)]  # fmt: skip
    assert life.summary()["starts"] == 3
    Lifecycle(tmp_path, is_main=False).started(30)  # other ranks write nothing
    assert len(life.events()) == 5


def test_each_rank_resumes_at_its_own_data_position():
    state = TrainState(epoch=3, batch_in_epoch=7, rank_positions=[[3, 7], [4, 0]])
    state.take_position(rank=1, world_size=2)
    assert (state.epoch, state.batch_in_epoch) == (4, 0)
    other = TrainState(epoch=3, batch_in_epoch=7, rank_positions=[[3, 7], [4, 0]])
    other.take_position(rank=0, world_size=4)  # another world size: rank 0's position stands
    assert (other.epoch, other.batch_in_epoch) == (3, 7)


def test_micro_batch_seeds_depend_on_step_and_global_index_only():
    seeds = {(s, i): micro_batch_seed(0, s, i) for s in range(3) for i in range(4)}
    assert len(set(seeds.values())) == 12
    assert micro_batch_seed(0, 2, 3) == seeds[(2, 3)] and micro_batch_seed(1, 2, 3) != seeds[(2, 3)]
