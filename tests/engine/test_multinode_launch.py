"""The multi-node launch commands users copy: the SLURM script examples/slurm/train.sbatch (run by bash with stand-ins
for srun and scontrol, its torchrun arguments parsed by torchrun's own parser and the training arguments by
structalign's) and the README's multi-node torchrun commands."""
import os
import shlex
import subprocess

from torch.distributed.run import get_args_parser

from structalign.cli import build_parser

REPO = os.path.join(os.path.dirname(__file__), "..", "..")
SBATCH = os.path.join(REPO, "examples", "slurm", "train.sbatch")
README = os.path.join(REPO, "README.md")


def _torchrun_args(argv: list):
    """torchrun's parse of argv (its own flags, then the script and its arguments); an unknown flag exits."""
    return get_args_parser().parse_args(argv)


def test_sbatch_script_is_valid_bash_with_its_directives_before_the_first_command():
    subprocess.run(["bash", "-n", SBATCH], check=True)
    with open(SBATCH) as f:
        lines = [line.strip() for line in f]
    first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    directives = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    # sbatch stops reading #SBATCH lines at the first command: a directive below it would be silently ignored.
    assert directives and max(directives) < first_command
    assert "#SBATCH --ntasks-per-node=1" in lines  # one torchrun per node: it starts the per-GPU processes


def _fake_slurm(tmp_path) -> dict:
    """PATH with stand-ins for scontrol (two host names) and srun (records its argv), and a job's SLURM variables."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # One line per node, written one at a time as a long list would be: a reader that stops after the first line
    # (head -n 1) makes the second write fail with SIGPIPE, an error under pipefail.
    (bin_dir / "scontrol").write_text('#!/bin/bash\n[ "$1 $2" = "show hostnames" ] || exit 1\n'
                                      'echo gpu-017\nsleep 0.2\necho gpu-018\n')
    (bin_dir / "srun").write_text('#!/bin/bash\nprintf "%s\\0" "$@" > "$SRUN_ARGV"\n')
    for tool in ("scontrol", "srun"):
        os.chmod(bin_dir / tool, 0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-[017-018]",
            "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "4242", "SLURM_GPUS_ON_NODE": "8",
            "SRUN_ARGV": str(tmp_path / "srun_argv")}


def test_sbatch_script_runs_one_torchrun_per_node_meeting_on_the_first_node(tmp_path):
    env = _fake_slurm(tmp_path)
    subprocess.run(["bash", SBATCH, "wflw_lgrn_r34", "data.root=/data/WFLW", "optim.name=lamb"], env=env,
                   check=True, cwd=tmp_path)
    argv = (tmp_path / "srun_argv").read_bytes().decode().split("\0")[:-1]
    at = argv.index("torchrun")
    assert "--kill-on-bad-exit=1" in argv[:at] and "--ntasks-per-node=1" in argv[:at]
    run = _torchrun_args(argv[at + 1:])
    assert (run.nnodes, run.nproc_per_node, run.rdzv_backend) == ("2", "8", "c10d")
    assert run.rdzv_endpoint == "gpu-017:29500" and run.rdzv_id == "structalign-4242" and not run.standalone
    assert run.module and run.training_script == "structalign.cli"
    train = build_parser().parse_args(run.training_script_args)
    assert (train.command, train.config, train.overrides, train.resume) == \
        ("train", "wflw_lgrn_r34", ["data.root=/data/WFLW", "optim.name=lamb"], "auto")


def test_sbatch_script_without_a_config_says_how_to_call_it(tmp_path):
    result = subprocess.run(["bash", SBATCH], env=_fake_slurm(tmp_path), capture_output=True, text=True)
    assert result.returncode == 2 and "usage: sbatch examples/slurm/train.sbatch CONFIG" in result.stderr
    assert not (tmp_path / "srun_argv").exists()


def _readme_multinode_torchrun_commands() -> list:
    """The torchrun commands in README's code blocks that span nodes (--nnodes), continuation lines joined."""
    commands, in_code, command = [], False, ""
    with open(README) as f:
        for line in f:
            if line.startswith("```"):
                in_code, command = not in_code, ""
                continue
            command += line.rstrip("\n")
            if in_code and command.endswith("\\"):
                command = command[:-1]
                continue
            words = shlex.split(command, comments=True) if in_code and command.startswith("torchrun") else []
            if any(w.startswith("--nnodes") for w in words):
                commands.append(words[1:])
            command = ""
    return commands


def test_readme_multinode_torchrun_commands_parse_as_torchrun_and_structalign_arguments():
    commands = _readme_multinode_torchrun_commands()
    assert commands, "README shows no multi-node torchrun command"
    for argv in commands:
        run = _torchrun_args(argv)
        assert run.rdzv_backend == "c10d" and run.rdzv_endpoint and not run.standalone
        assert run.module and run.training_script == "structalign.cli"
        assert build_parser().parse_args(run.training_script_args).command == "train"

