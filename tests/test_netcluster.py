"""The simulated multi-host cluster (issue 20 section 1): Spark hosts as network namespaces joined by shaped
veth links. A 2-host training job runs across the namespaces and its ranks' traffic is seen on the links.

Skipped only where this machine refuses namespaces (not root, no netns, no bridge or tbf), with the reason.
Cost: about 2 minutes (a master and two workers, then one spark-submit of training).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sparkml_dist import netcluster
from sparkml_dist.cluster import alive_workers, package_library
from sparkml_dist.config import load_config
from sparkml_dist.netcluster import NetClusterError
from sparkml_dist.tracking import get_run_record

REPO = Path(__file__).resolve().parents[1]
WHY_NOT = netcluster.why_not_here()
WHY_NO_CAP = netcluster.why_no_cpu_cap(0.5) if WHY_NOT is None else WHY_NOT


def test_bad_rate_name_and_subnet_are_refused_naming_the_forms_taken(tmp_path):
    with pytest.raises(NetClusterError, match=r"link rate 'fast' is not one of .*e.g. 100mbit, 1gbit"):
        netcluster.rate_bits("fast")
    assert netcluster.rate_bits("100mbit") == 1e8 and netcluster.rate_bits("unshaped") == 0
    with pytest.raises(NetClusterError, match="cluster name 'My_Cluster' must be 1-6 lowercase"):
        netcluster.plan("My_Cluster", 2, "10.213.7", "1gbit", tmp_path)
    with pytest.raises(NetClusterError, match="subnet '10.213' must be the first three octets"):
        netcluster.plan("sdn", 2, "10.213", "1gbit", tmp_path)
    c = netcluster.plan("sdn", 2, "10.213.7", "1gbit", tmp_path)
    assert [(h.name, h.netns, h.address) for h in c.hosts] == [
        ("head", "sdn-head", "10.213.7.10"), ("w1", "sdn-w1", "10.213.7.11"), ("w2", "sdn-w2", "10.213.7.12"),
    ]  # fmt: skip
    assert "--cpus 0.0 must be between 0.01 and this machine's" in (netcluster.why_no_cpu_cap(0.0) or "")


def _train_command(cluster, work: Path, py_files: Path) -> list[str]:
    sets = [
        f"paths.work_dir={work}", "train.model=mlp", "train.hidden_sizes=[256]", "train.batch_size=256",
        "train.epochs=1", "train.max_steps_per_epoch=20", "tracking.log_model=false",
        "launch.start_timeout_s=180", "launch.collective_timeout_s=120", "launch.job_timeout_s=500",
    ]  # fmt: skip
    args = ["--config", str(REPO / "conf" / "local.yaml"), *[x for s in sets for x in ("--set", s)]]
    conf = {"spark.local.dir": str(work / "spark-local")}
    return netcluster.submit_command(cluster, REPO / "jobs" / "train.py", args, 2, py_files, "512m", "1g", conf)


@pytest.mark.skipif(WHY_NOT is not None, reason=f"no simulated cluster here: {WHY_NOT}")
def test_a_two_host_job_trains_across_namespaces_and_its_ranks_talk_over_the_links(spark, tmp_path):
    from sparkml_dist.partition import partition
    from sparkml_dist.synthetic import write_dataset

    work = tmp_path / "work"
    sets = [f"paths.work_dir={work}", "generate.rows=20000", "generate.features=64", "generate.partitions=2",
            "partition.num_shards=2", "partition.row_group_mb=0.2"]  # fmt: skip
    cfg = load_config(None, sets)
    write_dataset(spark, cfg.generate)
    partition(spark, cfg)
    py_files = package_library(tmp_path / "dist")
    run_dir = tmp_path / "netcluster"
    cpus = 0.5 if WHY_NO_CAP is None else None  # each worker host capped at half a core where cgroups allow
    if cpus is None:
        print(f"worker hosts not CPU-capped here: {WHY_NO_CAP}")
    with netcluster.running(
        run_dir, workers=2, rate="1gbit", name="sdt", subnet="10.213.9", timeout_s=180, cpus=cpus
    ) as c:
        assert alive_workers(c.webui_url) == 2
        groups = netcluster._group_dir("sdt")
        if cpus is not None:  # each worker daemon (and so its executors and ranks) is in its host's capped group
            for h, pid in zip(c.workers, c.pids[1:], strict=True):
                assert str(pid) in (groups / h.name / "cgroup.procs").read_text().split()
                quota = groups / h.name / "cpu.cfs_quota_us"  # cgroup v1; v2 keeps it first in cpu.max
                quota = quota if quota.exists() else groups / h.name / "cpu.max"
                assert quota.read_text().split()[0] == "50000"
        before = netcluster.link_bytes(c)
        python = sys.executable
        env = {**c.env("head"), "PYSPARK_PYTHON": python, "PYSPARK_DRIVER_PYTHON": python}
        proc = subprocess.run(_train_command(c, work, py_files), cwd=work, env=env, capture_output=True, text=True,
                              timeout=600)  # fmt: skip
        after = netcluster.link_bytes(c)
        spaces = [h.netns for h in c.hosts]
    assert proc.returncode == 0, (proc.stdout[-3000:], [x for x in proc.stderr.splitlines() if " INFO " not in x][-80:])
    # down removed everything it made
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [ns for ns in spaces if ns in listed]
    assert not Path("/sys/class/net/sdt-br").exists() and not (run_dir / netcluster.STATE_FILE).exists()
    assert groups is None or not groups.exists()  # and the CPU groups

    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    record = get_run_record(cfg.tracking, summary["run_id"], ("comm_wire_bytes_per_rank_per_step", "train_loss"))
    assert record.status == "FINISHED" and record.tags["world_size"] == "2"
    wire_per_step = record.histories["comm_wire_bytes_per_rank_per_step"][-1][1]
    steps = 20
    for host in ("w1", "w2"):  # each rank sent at least its share of the ring's bytes over its own link
        sent = after[host]["sent"] - before[host]["sent"]
        assert sent >= wire_per_step * steps, (host, sent, wire_per_step, after)


@pytest.mark.skipif(WHY_NOT is not None, reason=f"no simulated cluster here: {WHY_NOT}")
def test_down_cleans_up_after_a_crash_from_the_name_alone(tmp_path):
    c = netcluster.plan("sdc", 1, "10.213.8", "100mbit", tmp_path)
    netcluster._network(c)  # as if `up` had died after making the network
    qdisc = ["tc", "qdisc", "show", "dev", "sdc-w1"]
    assert "rate 100Mbit" in subprocess.run(qdisc, capture_output=True, text=True).stdout
    c = netcluster.reshape(c, "10mbit")  # in place, both ends
    inside = [*c.exec_prefix("w1"), "tc", "qdisc", "show", "dev", "eth0"]
    assert "rate 10Mbit" in subprocess.run(qdisc, capture_output=True, text=True).stdout
    assert "rate 10Mbit" in subprocess.run(inside, capture_output=True, text=True).stdout
    # what one TCP stream gets: under 10 Mbit/s while shaped at 10 (unshaped, veth carries Gbit/s)
    got = netcluster.probe(c, "w1", "head", 1.0)
    assert 0 < got["payload_bits_per_s"] <= 1.1e7 and got["link_rate_bits_per_s"] == 1e7, got
    netcluster.reshape(c, "unshaped")
    assert "tbf" not in subprocess.run(inside, capture_output=True, text=True).stdout
    sleeper = subprocess.Popen([*c.exec_prefix("w1"), "sleep", "600"])
    time.sleep(0.5)
    group = None
    if WHY_NO_CAP is None:  # a host's CPU group, with a process in it, is removed by down too
        group = netcluster._cpu_group("sdc", "w1", 0.25)
        (group / "cgroup.procs").write_text(str(sleeper.pid))
    removed = netcluster.down(name="sdc")
    assert sorted(removed) == ["sdc-head", "sdc-w1"]
    assert not Path(f"/proc/{sleeper.pid}").exists()  # the process inside was ended (and reaped by down)
    assert not Path("/sys/class/net/sdc-br").exists()
    assert group is None or not group.parent.exists()
    assert netcluster.down(name="sdc") == []  # a no-op the second time
    netcluster._network(c)  # the same name again at once: nothing of the old links is in the way
    assert sorted(netcluster.down(name="sdc")) == ["sdc-head", "sdc-w1"]
