"""Two processes x 4 CPU devices through jax.distributed: each tokenizes and feeds only its data shard, the
result is that of one 8-device process with the same shards, and bad data in one process stops both. A DCN
mesh spans the processes, and its interleaved batch rows still give one process's batches."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from eu_jax.convert.checkpoint import load_params
from eu_jax.parallel.mesh import make_mesh
from eu_jax.parallel.sharding import batch_sharding
from eu_jax.train.loop import train
from tests.test_data_shards import fed_batches
from tests.test_train import assert_trees_close
from tests.tiny_run import make_tiny_run, tiny_config, write_jsonl

COMMON = dict(
    train={"steps": 2},
    mesh={"data": 2, "fsdp": 2, "tensor": 2},
    objective={"retain": "kl_ref", "forget": "npo"},
    optimizer={"learning_rate": 1e-3, "eps": 1e-4},
)

WORKER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from tests.tiny_run import make_tiny_run, tiny_config
    from eu_jax.train.loop import train

    root, out, address, pid = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    common = {common!r}
    distributed = {{"coordinator_address": address, "num_processes": 2, "process_id": pid}}
    result = train(tiny_config(make_tiny_run(root), out, distributed=distributed, **common))
    print("final loss", repr(result.last_metrics["loss"]), flush=True)
    """
).format(common=COMMON)

# DCN over fsdp inside ICI data: mesh (data 2, fsdp 2 x 2 processes), so process 0 holds batch rows 0, 1, 4, 5.
DCN_MESH = {"data": 2, "fsdp": 2, "tensor": 1, "dcn_fsdp": 2}

DCN_WORKER = textwrap.dedent(
    """
    import json, sys
    from eu_jax.data.batches import format_spans, process_rows
    from eu_jax.parallel.distributed import DistributedSettings, initialize_distributed
    from eu_jax.parallel.mesh import mesh_from_config
    from eu_jax.parallel.sharding import batch_sharding
    from tests.test_data_shards import fed_batches

    initialize_distributed(DistributedSettings(sys.argv[1], 2, int(sys.argv[2])))
    try:
        mesh_from_config({{"data": -1, "fsdp": 1, "tensor": 1, "dcn_data": 4}})
    except ValueError as err:
        print("mismatch:", err)
    sharding = batch_sharding(mesh_from_config({mesh!r}))
    print("rows", format_spans(process_rows(sharding, (8,))))
    print("batches", json.dumps(fed_batches(sharding)))
    """
).format(mesh=DCN_MESH)

# eu-train's config for the failing run: the tiny run with a retain set given on the command line.
CONFIG_FILE = textwrap.dedent(
    """
    from pathlib import Path
    from tests.tiny_run import make_tiny_run, tiny_config

    def get_config():
        return tiny_config(make_tiny_run(Path({root!r})), Path("unset"), **{common!r})
    """
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_processes(command_for, cwd_for=lambda pid: None) -> list[tuple[int, str]]:
    """(exit code, output) of two processes of one jax.distributed run; `command_for(pid, address)` gives
    each one's command line, `cwd_for(pid)` its working folder. A run that hangs is killed and fails the test."""
    address = f"127.0.0.1:{free_port()}"
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.getcwd(),
        PYTHONUNBUFFERED="1",
    )
    workers = [
        subprocess.Popen(
            command_for(pid, address), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd_for(pid)
        )
        for pid in (0, 1)
    ]
    results = []
    try:
        for worker in workers:
            output = worker.communicate(timeout=600)[0]
            results.append((worker.returncode, output))
    except subprocess.TimeoutExpired:
        pytest.fail("a process of the two-process run did not finish within 600 s")
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    return results


def test_two_processes_feed_their_own_shards_and_match_one(tmp_path):
    paths = make_tiny_run(tmp_path / "data")
    single = train(tiny_config(paths, tmp_path / "single", data={"shards": 2}, **COMMON))

    results = run_two_processes(
        lambda pid, address: [sys.executable, "-c", WORKER, str(tmp_path / "data"), str(tmp_path / "multi"), address, str(pid)]
    )
    for code, output in results:
        assert code == 0, output[-3000:]
    outputs = [output for _, output in results]

    assert "process 0 of 2 feeds batch rows 0:4 of 8 from data shards 0:1 of 2" in outputs[0]
    assert "process 1 of 2 feeds batch rows 4:8 of 8 from data shards 1:2 of 2" in outputs[1]
    for half in ("retain", "forget"):  # each process tokenized half of each set: its own shard
        assert f"process 0 of 2 holds {half} data shards 0:1 of 2: 24 of 48 examples" in outputs[0]
        assert f"process 1 of 2 holds {half} data shards 1:2 of 2: 24 of 48 examples" in outputs[1]
        assert f"{half}: 48 pairs examples from {paths[half]} in 2 shards -> 48 rows" in outputs[0]  # totals, once
        assert f"{half}: 48 pairs" not in outputs[1]
    losses = [float(o.split("final loss ")[1].split()[0]) for o in outputs]
    assert losses[0] == losses[1] == pytest.approx(single.last_metrics["loss"], abs=1e-5)
    assert_trees_close(load_params(tmp_path / "multi" / "checkpoints")[0], load_params(tmp_path / "single" / "checkpoints")[0], atol=1e-5)


def test_a_dcn_mesh_over_processes_with_interleaved_batch_rows_gives_one_process_batches():
    expected = fed_batches(batch_sharding(make_mesh({"data": -1})))  # one process, 8 devices

    results = run_two_processes(lambda pid, address: [sys.executable, "-c", DCN_WORKER, address, str(pid)])
    for code, output in results:
        assert code == 0, output[-3000:]
    outputs = [output for _, output in results]
    assert "rows 0:2, 4:6" in outputs[0] and "rows 2:4, 6:8" in outputs[1]
    for output in outputs:
        mismatch = "mesh.dcn_data=4, mesh.dcn_fsdp=1, mesh.dcn_tensor=1: their product, 4, must equal the number of processes"
        assert f"mismatch: {mismatch} the devices are in, 2" in output
        assert json.loads(output.split("batches ")[1].splitlines()[0]) == expected


def test_an_output_folder_the_processes_do_not_share_stops_both_before_any_work(tmp_path):
    """Each process of a pod runs in its own host's folder: a relative train.output_dir would be a different
    disk for each, and every checkpoint split over them. Here each process runs in a folder of its own."""
    make_tiny_run(tmp_path / "data")
    config_file = tmp_path / "config.py"
    config_file.write_text(CONFIG_FILE.format(root=str(tmp_path / "data"), common=COMMON))
    hosts = [tmp_path / "host0", tmp_path / "host1"]
    for host in hosts:
        host.mkdir()

    def command(pid, address):
        return [
            sys.executable, "-m", "eu_jax.train.cli", f"--config={config_file}", "--config.train.output_dir=runs/a",
            f"--config.distributed.coordinator_address={address}", "--config.distributed.num_processes=2",
            f"--config.distributed.process_id={pid}",
        ]  # fmt: skip

    results = run_two_processes(command, cwd_for=lambda pid: hosts[pid])
    message = (
        "eu-train: error: config.train.output_dir: 'runs/a' is not one folder for all 2 processes (process 1 cannot "
        "read what process 0 wrote there), so every checkpoint would be split over the hosts' own disks"
    )
    for code, output in results:
        assert code == 2 and message in output, output[-3000:]
        assert "Traceback" not in output and "holds retain data shards" not in output  # stopped before the data
    written = sorted(p.relative_to(tmp_path).as_posix() for host in hosts for p in host.rglob("*"))
    assert written == ["host0/runs", "host0/runs/a"]  # the check's token removed again, nothing else written


def test_bad_data_in_one_process_stops_both_with_clear_errors(tmp_path):
    make_tiny_run(tmp_path / "data")
    # Odd rows (all of shard 1, which process 1 loads) are longer than max_length=24 and get dropped.
    rows = [{"prompt": f"{i:02d}+{i:02d}=" + ("?" * 40 if i % 2 else ""), "response": f"{2 * i:03d}"} for i in range(48)]
    retain = write_jsonl(tmp_path / "retain_odd_long.jsonl", rows)
    config_file = tmp_path / "config.py"
    config_file.write_text(CONFIG_FILE.format(root=str(tmp_path / "data"), common=COMMON))

    def command(pid, address):
        return [
            sys.executable, "-m", "eu_jax.train.cli", f"--config={config_file}",
            f"--config.train.output_dir={tmp_path / 'run'}", f"--config.data.retain.path={retain}",
            "--config.data.retain.overflow=drop", f"--config.distributed.coordinator_address={address}",
            "--config.distributed.num_processes=2", f"--config.distributed.process_id={pid}",
        ]  # fmt: skip

    (code0, output0), (code1, output1) = run_two_processes(command)
    own = f"{retain} (shard 1 of 2): all 24 examples are longer than max_length=24"
    assert code1 == 2 and f"eu-train: error: {own}" in output1, output1[-3000:]
    assert code0 == 2, output0[-3000:]
    assert f"eu-train: error: process 1 of 2 could not load its data shards, so this one stops too: {own}" in output0
    assert "Traceback" not in output0 + output1
    assert "starting at step" not in output0 + output1  # neither process went on to train
    assert not (tmp_path / "run" / "checkpoints").exists()
