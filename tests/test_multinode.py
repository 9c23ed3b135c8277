"""Training on several nodes as torchrun runs it on a cluster, with two "nodes" on this machine: two launchers of one
process each that meet through a c10d rendezvous at 127.0.0.1 (gloo, CPU). One bundle (SelfReg, tiny) stands for
all: the multi-node overlay (configs/multi_gpu_train.json) and its code are the template's, the same in every bundle.

One two-node training loses a node (its launcher and worker are killed together) once its first checkpoint exists:
the other node must exit with an error instead of waiting, and both nodes relaunched resume from the last
checkpoint. The same run shows that each node trains on its own shard of the training cases, that each process takes
the device of its LOCAL_RANK, and that only global rank 0 writes. A launcher whose second node never comes, and two
nodes that do not share bundle_root, are refused with a message that says what happened.
"""

from __future__ import annotations

import ast
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import METHODS, SELFREG_BUNDLE, small_run_cli

METHOD = next(m for m in METHODS if m.bundle_dir == SELFREG_BUNDLE)
CONFIGS = "['configs/train.json','configs/multi_gpu_train.json']"
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
# How long a node may take to end after the other node is lost or never comes: a node fails at its next collective
# (gloo sees the closed connection) or when its rendezvous times out; a hang would last until the test is killed.
EXIT_BOUND = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(port: int, run_id: str, nnodes: int = 2, join_timeout: int = 120) -> list[str]:
    """One node's launch: the bundle's ``python -m scripts.torchrun`` (torchrun with a clearer rendezvous error),
    one process on this node, ``nnodes`` nodes meeting at 127.0.0.1:``port``."""
    return [sys.executable, "-m", "scripts.torchrun", "--nnodes", str(nnodes), "--nproc_per_node", "1",
            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", run_id,
            "--rdzv_conf", f"join_timeout={join_timeout}"]


def training(root: Path, dataset: Path, epochs: int, probes: Path) -> list[str]:
    """The bundle's training with the multi-node overlay; a probe in ``preflight`` writes, on each rank, its
    LOCAL_RANK, its device, the training images of its shard and its process id to ``probes/rank<global rank>``."""
    probe = (f"$open(os.path.join('{probes}', 'rank%d' % dist.get_rank()), 'w').write(repr(["
             "os.environ['LOCAL_RANK'], str(@device), "
             "[os.path.basename(@train#dataset#data[i]['image']) for i in @train#sampler], os.getpid()]))")
    return ["-m", "monai.bundle", "run", "training", "--config_file", CONFIGS, "--meta_file", "configs/metadata.json",
            "--logging_file", "configs/logging.conf", "--bundle_root", str(root), "--dataset_dir", str(dataset),
            "--max_epochs", str(epochs), *small_run_cli(METHOD), "--preflight#probe", probe]


def start_node(command: list[str], log: Path) -> subprocess.Popen:
    """A node: its launcher, which starts the node's worker process."""
    with open(log, "w") as out:
        return subprocess.Popen(command, cwd=SELFREG_BUNDLE, stdout=out, stderr=subprocess.STDOUT, env=ENV)


def children(pid: int) -> list[int]:
    """The processes ``pid`` started (from /proc): a launcher's workers, which torchrun starts in sessions of their
    own, so that killing the launcher's process group would leave them running."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # the process ended meanwhile
            continue
        if parent == pid:
            found.append(int(stat.parent.name))
    return found


def kill_node(node: subprocess.Popen) -> None:
    """SIGKILL a node's launcher and its workers at once, as when the machine is lost."""
    workers = children(node.pid)
    for pid in [node.pid, *workers]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    node.wait()


def wait(node: subprocess.Popen, seconds: float) -> int | None:
    """The node's exit status, or None (and the node killed) if it is still running after ``seconds``."""
    try:
        return node.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        kill_node(node)
        return None


def checkpoint_epoch(path: Path) -> int:
    trainer = torch.load(path, weights_only=True)["trainer"]
    return trainer["iteration"] // trainer["epoch_length"]


@dataclass
class LostNode:
    """A two-node training that lost a node after its first checkpoint: its folder, the newest checkpoint's epoch,
    the other node's exit status (None: it did not end), the seconds it took to end and its log, and each rank's
    probe."""

    root: Path
    dataset: Path
    epoch: int
    survivor_status: int | None
    survivor_seconds: float
    survivor_log: str
    probes: dict[int, list]


@pytest.fixture(scope="module")
def lost_node(tmp_path_factory, synthetic_dataset) -> LostNode:
    base = tmp_path_factory.mktemp("multinode")
    root, probes = base / "run", base / "probes"
    probes.mkdir()
    command = [*launcher(free_port(), "lost-node"), *training(root, synthetic_dataset, 50, probes)]
    lost, survivor = (start_node(command, base / f"node{i}.log") for i in range(2))
    try:
        deadline = time.monotonic() + 540
        while not list(root.glob("models/checkpoint_epoch=*.pt")) and survivor.poll() is None:
            assert time.monotonic() < deadline and lost.poll() is None, (base / "node0.log").read_text()[-3000:]
            time.sleep(0.05)
        kill_node(lost)
        killed = time.monotonic()
        survivor_status = wait(survivor, EXIT_BOUND)
        survivor_seconds = time.monotonic() - killed
    finally:
        for node in (lost, survivor):
            if node.poll() is None:
                kill_node(node)
    epochs = [checkpoint_epoch(p) for p in root.glob("models/checkpoint_epoch=*.pt")]
    assert epochs, (base / "node1.log").read_text()[-3000:]
    return LostNode(root, synthetic_dataset, max(epochs), survivor_status, survivor_seconds,
                    (base / "node1.log").read_text(),
                    {int(p.name[4:]): ast.literal_eval(p.read_text()) for p in probes.glob("rank*")})


def test_a_lost_node_ends_the_other_node_with_an_error(lost_node):
    assert lost_node.survivor_status is not None, f"the other node still ran {EXIT_BOUND} s after losing its peer"
    # (it ended 8 s after the loss on a loaded 2-core machine: its next collective failed, then torchrun stopped)
    assert lost_node.survivor_status != 0, (f"it ended with status 0 {lost_node.survivor_seconds:.0f} s after the loss"
                                            f"\n{lost_node.survivor_log[-3000:]}")


def test_each_node_trains_on_its_own_shard_on_the_device_of_its_local_rank(lost_node):
    assert sorted(lost_node.probes) == [0, 1]
    shards = [set(lost_node.probes[rank][2]) for rank in (0, 1)]
    assert shards[0] and shards[1] and not shards[0] & shards[1]  # disjoint
    training_images = {p.name for p in (lost_node.dataset / "imagesTr").glob("*.nii.gz")}
    assert shards[0] | shards[1] <= training_images
    assert len(shards[0] | shards[1]) == 4  # the 4 training cases of the 6 labelled ones, all trained on
    # global ranks 0 and 1, each the only process of its node: LOCAL_RANK 0 on both, the CPU here
    assert [lost_node.probes[rank][:2] for rank in (0, 1)] == [["0", "cpu"], ["0", "cpu"]]


def test_relaunched_nodes_resume_from_the_last_checkpoint(lost_node, tmp_path):
    root, epoch = lost_node.root, lost_node.epoch
    command = [*launcher(free_port(), "resumed"), *training(root, lost_node.dataset, epoch + 1, tmp_path)]
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    nodes = [start_node(command, log) for log in logs]
    statuses = [wait(node, 540) for node in nodes]
    log = "\n".join(p.read_text() for p in logs)
    assert statuses == [0, 0], log[-5000:]
    # both ranks loaded the newest checkpoint and trained its next epoch only, not from epoch 1 again
    assert log.count(f"Restored all variables from {root}/models/checkpoint_epoch={epoch}.pt") == 2, log[-5000:]
    assert re.findall(r"SupervisedTrainer - INFO - Epoch\[(\d+)\] Complete", log) == [str(epoch + 1)] * 2
    newest = root / f"models/checkpoint_epoch={epoch + 1}.pt"
    assert checkpoint_epoch(newest) == epoch + 1
    # only global rank 0 wrote: the TensorBoard files are those of rank 0's process in each of the two trainings
    # (events.out.tfevents.<time>.<host>.<pid>.<n>)
    rank0 = {lost_node.probes[0][3], ast.literal_eval((tmp_path / "rank0").read_text())[3]}
    assert {int(p.name.split(".")[-2]) for p in root.glob("eval/events.out.tfevents.*")} == rank0
    # the checkpoint resumed from went once its successor was written (n_saved = 1 counts it)
    assert {p.name for p in root.glob("models/*")} == {newest.name, "model.pt", "model_settings.json"}
    assert not list(root.glob("models/.shared-check-*"))  # check_shared_folder removed its marker


def test_a_node_that_never_joins_is_reported_within_the_join_timeout(tmp_path):
    port = free_port()
    command = [*launcher(port, "alone", join_timeout=3), *training(tmp_path / "run", tmp_path, 1, tmp_path)]
    start = time.monotonic()
    node = start_node(command, tmp_path / "node.log")
    status = wait(node, EXIT_BOUND)
    log = (tmp_path / "node.log").read_text()
    assert status is not None, f"the launcher still waited {EXIT_BOUND} s for the second node"
    assert status != 0 and time.monotonic() - start < EXIT_BOUND
    assert (f"the rendezvous 'alone' at 127.0.0.1:{port} (c10d) did not gather --nnodes 2 nodes within "
            "join_timeout=3 s") in log, log[-3000:]
    assert not (tmp_path / "run").exists()  # no worker started


def test_nodes_that_do_not_share_the_bundle_root_are_refused(tmp_path):
    """Two nodes whose ckpt_dir is not one folder (here: two folders) stop, every one with a message saying so. The
    two processes are started without torchrun, as a Kubernetes PyTorchJob without torchrun starts them (RANK,
    WORLD_SIZE, MASTER_ADDR, MASTER_PORT and no LOCAL_RANK), and run multi_gpu_train.json's device choice and
    check (scripts.distributed) alone."""
    check = tmp_path / "check.py"
    check.write_text("import os, sys\nimport torch.distributed as dist\nsys.path.insert(0, os.getcwd())\n"
                     "from scripts.distributed import check_shared_folder, local_rank\n"
                     "print('local rank', local_rank(), flush=True)\ndist.init_process_group('gloo')\n"
                     "check_shared_folder(os.environ['NODE_FOLDER'], wait=0.5)\n")
    port, nodes = free_port(), []
    for rank in range(2):
        env = {**ENV, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "NODE_FOLDER": str(tmp_path / f"node{rank}")}
        env.pop("LOCAL_RANK", None)
        with open(tmp_path / f"node{rank}.log", "w") as out:
            nodes.append(subprocess.Popen([sys.executable, str(check)], cwd=SELFREG_BUNDLE, stdout=out,
                                          stderr=subprocess.STDOUT, env=env))
    statuses = [wait(node, EXIT_BOUND) for node in nodes]
    logs = [(tmp_path / f"node{rank}.log").read_text() for rank in range(2)]
    assert None not in statuses and 0 not in statuses, logs
    for rank, log in enumerate(logs):
        assert "local rank 0" in log  # no LOCAL_RANK and no GPU: the device is this node's first (the CPU here)
        assert f"{tmp_path / f'node{rank}'} is not one folder shared by every node: rank 1 on" in log, log
    assert (tmp_path / "node0").is_dir() and not list(tmp_path.glob("node*/.shared-check-*"))
