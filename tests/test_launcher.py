"""``hydra/launcher=slurm`` and ``hydra/launcher=local`` (hydra-submitit-launcher) without a cluster.

The launcher is driven as Hydra drives it, up to the point of submission: the sbatch script submitit
would hand to ``sbatch`` is rendered from the composed config and read line by line. Then one job is
run as a SLURM node would run it: the launcher is pickled and unpickled (submitit's way of shipping
it), called with that job's overrides under simulated ``SLURM_*`` variables, and the trainer the job's
config builds must take Lightning's SLURMEnvironment with the ranks SLURM gave it, requeue on the
signal the script asks SLURM to send, and write into the sweep directory the submitting process chose.
"""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path
from typing import Any

import cloudpickle
import hydra
import pytest
import submitit
from hydra import compose, initialize_config_module
from hydra._internal.callbacks import Callbacks
from hydra.core.global_hydra import GlobalHydra
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import HydraContext
from lightning.fabric.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf

from zeroseg.utils import run_dirs

TASK_OVERRIDES = ["trainer=ddp", "trainer.num_nodes=2", "trainer.accelerator=cpu", "trainer.devices=4", "trainer.precision=32"]
SLURM_OVERRIDES = [
    "hydra/launcher=slurm",
    "hydra.launcher.partition=gpu-long",
    "hydra.launcher.account=proj42",
    "hydra.launcher.timeout_min=720",
    "hydra.launcher.gpus_per_node=4",
]


@pytest.fixture
def fake_srun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """submitit's SlurmExecutor refuses to exist without ``srun`` on the PATH; nothing calls it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text("#!/bin/sh\necho 'srun must not run in the tests' >&2\nexit 1\n")
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def record_job(cfg: DictConfig) -> dict[str, Any]:
    """The task a simulated node runs: build the trainer the job's config asks for and report what it got."""
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    environment = trainer.strategy.cluster_environment
    # what Lightning's launcher checks when fit starts: SLURM's tasks per node and nodes against the trainer's
    environment.validate_settings(num_devices=trainer.num_devices, num_nodes=trainer.num_nodes)
    return {
        "output_dir": cfg.paths.output_dir,
        "seed": cfg.seed,
        "environment": type(environment).__name__,
        "world_size": environment.world_size(),
        "global_rank": environment.global_rank(),
        "node_rank": environment.node_rank(),
        "local_rank": environment.local_rank(),
        "trainer_global_rank": trainer.global_rank,
        "auto_requeue": getattr(environment, "auto_requeue", None),
        "requeue_signal": getattr(environment, "requeue_signal", None),
    }


def launch_without_submitting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, launcher_overrides: list[str], sweep: list[list[str]]
) -> tuple[DictConfig, Any, Any]:
    """Compose, instantiate the launcher as Hydra does, and run its ``launch`` with submitit's
    ``map_array`` intercepted: returns the master config, the submitit executor and the launcher
    object submitit would pickle."""
    captured: dict[str, Any] = {}

    def map_array(executor: Any, function: Any, *iterables: Any) -> list[Any]:
        captured["executor"], captured["function"], captured["args"] = executor, function, list(zip(*iterables))

        class Submitted:
            def results(self) -> list[JobReturn]:
                return [JobReturn(status=JobStatus.COMPLETED, _return_value=None)]

        return [Submitted() for _ in captured["args"]]

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", map_array)
    GlobalHydra.instance().clear()
    overrides = [*launcher_overrides, *TASK_OVERRIDES, f"paths.log_dir={tmp_path / 'logs'}"]
    with initialize_config_module(config_module="zeroseg.conf", version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
        context = HydraContext(config_loader=GlobalHydra.instance().config_loader(), callbacks=Callbacks(cfg))
        launcher = Plugins.instance().instantiate_launcher(hydra_context=context, task_function=record_job, config=cfg)
        launcher.launch([[*TASK_OVERRIDES, f"paths.log_dir={tmp_path / 'logs'}", *job] for job in sweep], initial_job_idx=0)
    GlobalHydra.instance().clear()
    return cfg, captured["executor"], captured


def sbatch_lines(executor: Any, jobs: int) -> list[str]:
    """The script submitit would pass to ``sbatch`` for an array of ``jobs`` jobs."""
    slurm = executor._executor
    assert isinstance(slurm, submitit.SlurmExecutor)
    slurm.parameters["map_count"] = jobs
    return slurm._make_submission_file_text(slurm._submitit_command_str, "test").splitlines()


def test_slurm_launcher_renders_one_task_per_gpu_on_every_node_with_requeue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_srun: None
) -> None:
    cfg, executor, captured = launch_without_submitting(tmp_path, monkeypatch, SLURM_OVERRIDES, [["seed=0"], ["seed=1"]])
    lines = sbatch_lines(executor, jobs=2)
    flags = {line.split("=", 1)[0]: line.split("=", 1)[-1] for line in lines if line.startswith("#SBATCH")}
    assert lines[0] == "#!/bin/bash"
    assert flags["#SBATCH --nodes"] == "2"  # trainer.num_nodes
    assert flags["#SBATCH --ntasks-per-node"] == "4" and flags["#SBATCH --gpus-per-node"] == "4"  # one task per GPU
    assert flags["#SBATCH --partition"] == "gpu-long" and flags["#SBATCH --account"] == "proj42"
    assert flags["#SBATCH --time"] == "720"
    assert flags["#SBATCH --cpus-per-task"] == "6"
    assert flags["#SBATCH --signal"] == "USR1@180"  # Lightning's requeue signal, before the time limit
    assert "#SBATCH --requeue" in lines
    assert flags["#SBATCH --array"] == "0-1%2"  # a sweep is one job array
    sweep_dir = Path(cfg.hydra.sweep.dir)
    assert flags["#SBATCH --output"].startswith(str(sweep_dir / ".submitit"))
    (command,) = [line for line in lines if line.startswith("srun ")]
    assert "-m submitit.core._submit" in command
    # the jobs are the swept overrides on top of the shared ones
    assert [args[0][-1] for args in captured["args"]] == ["seed=0", "seed=1"]


def test_a_slurm_node_runs_the_job_in_lightnings_slurm_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_srun: None
) -> None:
    cfg, executor, captured = launch_without_submitting(tmp_path, monkeypatch, SLURM_OVERRIDES, [["seed=0"], ["seed=1"]])
    launcher = cloudpickle.loads(cloudpickle.dumps(captured["function"]))  # what submitit ships to the node
    # task 6 of 8 = second node, third GPU, as SLURM sets it for `--nodes=2 --ntasks-per-node=4`
    slurm_env = {
        "SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_ARRAY_JOB_ID": "4241", "SLURM_ARRAY_TASK_ID": "1",
        "SLURM_JOB_NAME": "train", "SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4", "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NNODES": "2", "SLURM_NODELIST": "gpu[01-02]", "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_PROCID": "6",
        "SLURM_LOCALID": "2", "SLURM_NODEID": "1", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "8",
    }  # fmt: skip
    for name, value in slurm_env.items():
        monkeypatch.setenv(name, value)
    assert SLURMEnvironment.detect()
    overrides, job_dir_key, job_num, job_id, singleton_state = captured["args"][1]
    result = launcher(overrides, job_dir_key, job_num, job_id, singleton_state)
    GlobalHydra.instance().clear()
    assert result.status == JobStatus.COMPLETED, result._return_value
    job = result.return_value
    assert job["environment"] == "SLURMEnvironment"
    assert (job["world_size"], job["global_rank"], job["node_rank"], job["local_rank"]) == (8, 6, 1, 2)
    assert job["trainer_global_rank"] == 6 and job["seed"] == 1
    assert job["auto_requeue"] is True and job["requeue_signal"] == signal.SIGUSR1  # the sbatch --signal
    assert Path(job["output_dir"]) == Path(cfg.hydra.sweep.dir) / "1"


def test_tasks_per_node_that_disagree_with_trainer_devices_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_srun: None
) -> None:
    overrides = [*SLURM_OVERRIDES, "hydra.launcher.gpus_per_node=2"]
    cfg, executor, captured = launch_without_submitting(tmp_path, monkeypatch, overrides, [["seed=0"]])
    assert "#SBATCH --ntasks-per-node=2" in sbatch_lines(executor, jobs=1)
    for name, value in {"SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "train", "SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2",
                        "SLURM_NNODES": "2", "SLURM_NODELIST": "gpu[01-02]", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                        "SLURM_NODEID": "0"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    trainer_cfg = OmegaConf.merge(cfg.trainer, {"default_root_dir": str(tmp_path)})
    trainer = hydra.utils.instantiate(trainer_cfg, logger=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match="ntasks-per-node=2"):  # trainer.devices=4 but 2 tasks per node
        trainer.strategy.cluster_environment.validate_settings(num_devices=trainer.num_devices, num_nodes=trainer.num_nodes)


def test_a_job_started_in_a_fresh_process_writes_into_the_submitting_process_sweep_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_srun: None
) -> None:
    cfg, executor, captured = launch_without_submitting(tmp_path, monkeypatch, SLURM_OVERRIDES, [["seed=0"]])
    sweep_dir = Path(cfg.hydra.sweep.dir)
    launcher = cloudpickle.loads(cloudpickle.dumps(captured["function"]))
    monkeypatch.setattr(run_dirs, "_RESOLVED", {})  # a node's process has resolved nothing yet
    for name, value in {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242"}.items():
        monkeypatch.setenv(name, value)
    overrides, job_dir_key, job_num, job_id, singleton_state = captured["args"][0]
    result = launcher(overrides, job_dir_key, job_num, job_id, {**singleton_state})
    GlobalHydra.instance().clear()
    assert Path(result.return_value["output_dir"]) == sweep_dir / "0"


def test_local_launcher_composes_for_one_machine(tmp_path: Path) -> None:
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="zeroseg.conf", version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=local", f"paths.log_dir={tmp_path}"], return_hydra_config=True)
    GlobalHydra.instance().clear()
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.LocalLauncher")
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.nodes) == (1, 0, 1)
    assert launcher.submitit_folder.startswith(str(tmp_path))


def test_optuna_example_searches_two_knobs_on_the_validation_score(tmp_path: Path) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override
    from optuna.distributions import LogUniformDistribution, UniformDistribution

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="zeroseg.conf", version_base="1.3"):
        cfg = compose("train", overrides=["experiment=optuna_chimera_toy", f"paths.log_dir={tmp_path}"], return_hydra_config=True)
    GlobalHydra.instance().clear()
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("optuna_sweeper.OptunaSweeper") and sweeper.direction == "maximize"
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in sweeper.params.items()])
    distributions = {o.key_or_group: create_optuna_distribution_from_override(o) for o in parsed}
    assert isinstance(distributions["method.optimizer.lr"], LogUniformDistribution)
    assert isinstance(distributions["method.gamma"], UniformDistribution)
    for key in distributions:
        assert OmegaConf.select(cfg, key) is not None, key  # both knobs exist in the composed config
    assert cfg.optimized_metric.startswith("val/")  # a search never selects on the test split
    assert cfg.method._target_ == "zeroseg.methods.ChimeraSeg" and cfg.hydra.runtime.choices.dataset == "synthetic"
