"""A Spark cluster of several "hosts" on one machine, with a real, shaped network between them (issue 20).

    python -m sparkml_dist.netcluster up --workers 2 --rate 1gbit [--name sdn] [--subnet 10.213.7]
                                         [--pin] [--cpus 0.5] [--run-dir work/netcluster]
    python -m sparkml_dist.netcluster submit [--executors N] -- jobs/train.py --config conf/local.yaml ...
    python -m sparkml_dist.netcluster exec [--run-dir work/netcluster] [--host head] -- CMD ...
    python -m sparkml_dist.netcluster shape --rate 100mbit [--run-dir work/netcluster]
    python -m sparkml_dist.netcluster bytes [--run-dir work/netcluster]
    python -m sparkml_dist.netcluster probe [--src w1] [--dst head] [--seconds 2] [--run-dir work/netcluster]
    python -m sparkml_dist.netcluster down [--run-dir work/netcluster] [--name sdn]

Each host is a network namespace (``<name>-head``, ``<name>-w1`` ...) with one interface, ``eth0``, the end of
a veth pair whose other end is on a bridge (``<name>-br``) in the machine's own namespace, and its own
address on a private /24 that only these namespaces use (head .10, worker i .10+i; the bridge .1). The
head runs the Spark master and is where the driver runs (``exec``; the parameter servers, which the driver
starts on its own address, run there too); each worker host runs one Spark worker, and so its executors,
their Python workers and the Horovod ranks. Every daemon is started with ``SPARK_LOCAL_IP`` and ``--host``
set to its namespace's address, so nothing can take a loopback shortcut between hosts: a namespace's
``lo`` reaches only itself.

``--rate`` shapes every host's link in both directions with a token bucket (``tc qdisc ... tbf``: on
``eth0`` inside the namespace for what the host sends, on the bridge-side end for what it receives), like a
full-duplex NIC of that rate; ``unshaped`` leaves the links at veth speed. ``bytes`` prints what each
host's link carried (the bridge-side end's counters: rx is what the host sent), to check a strategy's own
byte accounting against the wire; ``probe`` measures what one TCP stream gets between two hosts (the rate
the shaping really gives, payload only).

CPU: ``--pin`` puts worker host i on CPU i (round robin); ``--cpus F`` caps each worker host at F CPUs
with the kernel's CFS bandwidth control (a cgroup per host, ``sparkml-netcluster-<name>/<host>``, v1
``cpu.cfs_quota_us`` or v2 ``cpu.max``), so that more hosts than cores still get equal, fixed shares: 4 hosts
at ``--cpus 0.4`` on 2 cores each get 0.4 of a core, and a 1-host run at the same cap is the fair
denominator of a speedup. The worker daemon joins its group before it starts; executors, their Python
workers and the ranks inherit it.

``down`` ends every process inside the namespaces (``ip netns pids``: the daemons, executors, Python
workers, and anything else started there), then deletes the namespaces (their veth pairs go with them) and
the bridge. It works from the name alone, so it cleans up after a crashed ``up`` or a killed job, and
it is a no-op when nothing is left. Needs root and a kernel with network namespaces, veth, bridge and
``sch_tbf`` (and, for ``--cpus``, a writable cgroup ``cpu`` controller); ``up`` refuses clearly otherwise.
``down`` also removes the CPU groups. Pure standard library; no pyspark import.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from sparkml_dist.runtime.cluster import (
    MASTER_CLASS,
    SPARK_LOCAL_IP,
    WORKER_CLASS,
    ClusterError,
    alive_workers,
    daemon_env,
    master_json,
    spark_home,
    spawn,
    wait_for,
)

log = logging.getLogger("sparkml_dist.netcluster")  # its pre-move name: logging configs keep working

STATE_FILE = "netcluster.json"
NETNS_ETC = Path("/etc/netns")
"""Per-namespace files ``ip netns exec`` mounts over /etc (here: each host's /etc/hosts)."""
CGROUP_ROOT = Path("/sys/fs/cgroup")
CPU_GROUP = "sparkml-netcluster-{}"
"""A cluster's CPU group (one child per worker host) under the cgroup cpu controller's root."""
CFS_PERIOD_US = 100_000
PROBE_PORT = 7199
MASTER_PORT = 7077
WEBUI_PORT = 8080
WORKER_WEBUI_PORT = 8081
HEAD = "head"
IFACE = "eth0"
_RATE = re.compile(r"^(\d+(?:\.\d+)?)(kbit|mbit|gbit)$")
_UNIT_BITS = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
_NAME = re.compile(r"^[a-z][a-z0-9]{0,5}$")  # leaves room for "-w99" inside Linux's 15-character names


class NetClusterError(ClusterError):
    """The simulated cluster cannot be brought up or down here; the message says why and what to do."""


@dataclass(frozen=True)
class Host:
    name: str
    """``head`` or ``w<i>``."""
    netns: str
    address: str
    link: str
    """The bridge-side end of the host's veth pair (in the machine's own namespace)."""


@dataclass(frozen=True)
class NetCluster:
    """What ``up`` recorded: the hosts, the master, and the daemons' PIDs."""

    name: str
    subnet: str
    rate: str
    run_dir: str
    hosts: list[Host]
    master_url: str = ""
    webui_url: str = ""
    pids: list[int] = field(default_factory=list)
    cpus: float | None = None
    """Each worker host's CPU cap (None: uncapped)."""

    @property
    def head(self) -> Host:
        return self.hosts[0]

    @property
    def workers(self) -> list[Host]:
        return self.hosts[1:]

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise NetClusterError(f"no host {name!r} in cluster {self.name}; hosts: {[h.name for h in self.hosts]}")

    def exec_prefix(self, host: str = HEAD) -> list[str]:
        """The command prefix that runs a program on ``host`` (inside its namespace)."""
        return ["ip", "netns", "exec", self.host(host).netns]

    def env(self, host: str = HEAD) -> dict[str, str]:
        """The environment a process on ``host`` needs: its address as SPARK_LOCAL_IP."""
        return {**os.environ, SPARK_LOCAL_IP: self.host(host).address}

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> NetCluster:
        data = json.loads(text)
        data["hosts"] = [Host(**h) for h in data["hosts"]]
        return cls(**data)


def rate_bits(rate: str) -> float:
    """``100mbit`` -> 1e8; ``unshaped`` -> 0. Refuses anything else, naming the forms it takes."""
    if rate == "unshaped":
        return 0.0
    m = _RATE.match(rate)
    if not m or float(m.group(1)) <= 0:
        raise NetClusterError(
            f"link rate {rate!r} is not one of <number>kbit, <number>mbit, <number>gbit (e.g. 100mbit, 1gbit) or "
            "unshaped"
        )
    return float(m.group(1)) * _UNIT_BITS[m.group(2)]


def plan(name: str, workers: int, subnet: str, rate: str, run_dir: str | Path) -> NetCluster:
    """The hosts of a cluster (nothing is created): checks the name, the subnet and the rate."""
    if not _NAME.match(name):
        raise NetClusterError(f"cluster name {name!r} must be 1-6 lowercase letters or digits, starting with a letter")
    if not 1 <= workers <= 200:
        raise NetClusterError(f"workers must be between 1 and 200, got {workers}")
    parts = subnet.split(".")
    if len(parts) != 3 or not all(p.isdigit() and 0 <= int(p) <= 255 for p in parts):
        raise NetClusterError(f"subnet {subnet!r} must be the first three octets of a private /24, e.g. 10.213.7")
    rate_bits(rate)
    names = [HEAD, *[f"w{i}" for i in range(1, workers + 1)]]
    hosts = [Host(h, f"{name}-{h}", f"{subnet}.{10 + i}", f"{name}-{h}") for i, h in enumerate(names)]
    return NetCluster(name, subnet, rate, str(Path(run_dir).absolute()), hosts)


def up(
    run_dir: str | Path,
    workers: int = 2,
    rate: str = "1gbit",
    name: str = "sdn",
    subnet: str = "10.213.7",
    cores: int = 1,
    memory: str = "1g",
    timeout_s: float = 120.0,
    pin: bool = False,
    cpus: float | None = None,
) -> NetCluster:
    """Create the namespaces, the bridge and the shaped links; start the master on the head and one worker per
    worker host; return once the master reports them all alive. Whatever was left of an earlier cluster of
    the same name is removed first; on any failure, everything this call made is removed again. ``pin``:
    worker host i runs on its own ``cores`` CPUs (``taskset``; round robin when there are fewer), so ranks on
    different hosts do not share a core while the machine has enough. ``cpus``: each worker host capped at
    that many CPUs (CFS bandwidth control), equal fixed shares when hosts outnumber cores."""
    cluster = plan(name, workers, subnet, rate, run_dir)
    _check_can_run()
    if cpus is not None:
        why = why_no_cpu_cap(cpus)
        if why:
            raise NetClusterError(why)
    run_path = Path(cluster.run_dir)
    run_path.mkdir(parents=True, exist_ok=True)
    down(run_path, name)
    (run_path / STATE_FILE).write_text(cluster.to_json())  # before creating anything: `down` finds it
    try:
        _network(cluster)
        cluster = _daemons(cluster, cores, memory, timeout_s, pin, cpus)
        (run_path / STATE_FILE).write_text(cluster.to_json())
        log.info(
            "cluster %s up: master %s on %s, %d worker host(s) %s, links %s%s", name, cluster.master_url,
            cluster.head.netns, workers, ", ".join(h.address for h in cluster.workers), rate,
            f", {cpus} CPU(s) per worker host" if cpus else "",
        )  # fmt: skip
        return cluster
    except BaseException:
        down(run_path, name)
        raise


def down(run_dir: str | Path | None = None, name: str | None = None, timeout_s: float = 30.0) -> list[str]:
    """End every process in the cluster's namespaces, delete the namespaces and the bridge; return the
    namespaces removed. ``name`` alone is enough (after a crash); with neither, the one in ``run_dir``."""
    state = Path(run_dir).absolute() / STATE_FILE if run_dir is not None else None
    if name is None:
        if state is None or not state.exists():
            return []
        name = NetCluster.from_json(state.read_text()).name
    if shutil.which("ip") is None:
        return []
    spaces = [ns for ns in _netns_list() if ns.startswith(f"{name}-")]
    leftover_etc = list(NETNS_ETC.glob(f"{name}-*"))
    pids = [pid for ns in spaces for pid in _netns_pids(ns)]
    _end(pids, timeout_s)
    for ns in spaces:
        _ip("netns", "del", ns, check=False)
    _await_links_gone(name)
    for folder in NETNS_ETC.glob(f"{name}-*"):
        shutil.rmtree(folder, ignore_errors=True)
    if Path(f"/sys/class/net/{name}-br").exists():
        _ip("link", "del", f"{name}-br", check=False)
    _remove_cpu_groups(name)
    if state is not None and state.exists():
        state.unlink()
    if spaces or leftover_etc:
        log.info("cluster %s down: ended %d process(es), removed %s", name, len(pids), ", ".join(spaces))
    return spaces


def _await_links_gone(name: str, timeout_s: float = 10.0) -> None:
    """The kernel destroys a deleted namespace (and the veth pairs in it) asynchronously, so an ``up`` of the
    same name right after ``down`` found ``<name>-w1`` still there ("RTNETLINK answers: File exists"): delete
    the bridge-side ends ourselves and wait until no ``<name>-*`` link is left but the bridge."""
    deadline = time.monotonic() + timeout_s
    while True:
        links = [p.name for p in Path("/sys/class/net").glob(f"{name}-*") if p.name != f"{name}-br"]
        if not links:
            return
        if time.monotonic() > deadline:
            log.warning("links %s of cluster %s are still there after %.0f s", links, name, timeout_s)
            return
        for link in links:
            _ip("link", "del", link, check=False)
        time.sleep(0.1)


def read_state(run_dir: str | Path) -> NetCluster:
    path = Path(run_dir).absolute() / STATE_FILE
    if not path.exists():
        raise NetClusterError(
            f"no cluster recorded in {path}; bring one up with `python -m sparkml_dist.netcluster up`"
        )
    return NetCluster.from_json(path.read_text())


def link_bytes(cluster: NetCluster) -> dict[str, dict[str, int]]:
    """Per host: bytes it ``sent`` and ``received`` over its link (the bridge-side end's counters, so what the
    host sent is that end's rx), and what its own loopback carried (``lo``, which never leaves the host)."""
    out = {}
    for h in cluster.hosts:
        stats = Path(f"/sys/class/net/{h.link}/statistics")
        lo = _run([*cluster.exec_prefix(h.name), "cat", "/sys/class/net/lo/statistics/tx_bytes"], check=False)
        out[h.name] = {
            "sent": int((stats / "rx_bytes").read_text()),
            "received": int((stats / "tx_bytes").read_text()),
            "loopback": int(lo.stdout.strip() or 0) if lo.returncode == 0 else -1,
        }
    return out


@contextlib.contextmanager
def running(run_dir: str | Path, workers: int = 2, rate: str = "1gbit", **kwargs: object) -> Iterator[NetCluster]:
    """``up`` as a context manager: ``down`` on exit, whatever happened."""
    cluster = up(run_dir, workers, rate, **kwargs)  # type: ignore[arg-type]
    try:
        yield cluster
    finally:
        down(run_dir, cluster.name)


def reshape(cluster: NetCluster, rate: str) -> NetCluster:
    """Change every link's rate in place (processes keep running): ``tc qdisc replace`` with the new bucket,
    or the qdiscs removed for ``unshaped``. Returns the cluster with its new rate (also recorded)."""
    bits = rate_bits(rate)
    for h in cluster.hosts:
        for prefix, dev in (([], h.link), (cluster.exec_prefix(h.name), IFACE)):
            if bits:
                _run([*prefix, "tc", "qdisc", "replace", "dev", dev, *_tbf(bits)])
            else:
                _run([*prefix, "tc", "qdisc", "del", "dev", dev, "root"], check=False)  # none there: fine
    changed = replace(cluster, rate=rate)
    state = Path(cluster.run_dir) / STATE_FILE
    if state.exists():
        state.write_text(changed.to_json())
    return changed


def submit_command(
    cluster: NetCluster,
    app: str | Path,
    args: list[str],
    executors: int,
    py_files: str | Path | None = None,
    executor_memory: str = "1g",
    driver_memory: str = "2g",
    conf: dict[str, str] | None = None,
) -> list[str]:
    """The ``spark-submit`` command line that runs ``app`` (a .py file) with ``args`` from the head host, in
    client mode, on ``executors`` one-core executors (waiting until all registered, so a barrier stage sees
    its slots), the driver bound to the head's address. Run it with ``cluster.env("head")``."""
    python = sys.executable
    settings = {
        "spark.pyspark.python": python, "spark.pyspark.driver.python": python,
        "spark.driver.host": cluster.head.address, "spark.driver.bindAddress": cluster.head.address,
        "spark.dynamicAllocation.enabled": "false", "spark.scheduler.minRegisteredResourcesRatio": "1.0",
        "spark.scheduler.maxRegisteredResourcesWaitingTime": "120s", "spark.ui.enabled": "false",
        **(conf or {}),
    }  # fmt: skip
    cmd = [*cluster.exec_prefix(HEAD), str(spark_home() / "bin" / "spark-submit"), "--master", cluster.master_url,
           "--deploy-mode", "client", "--driver-memory", driver_memory, "--executor-memory", executor_memory,
           "--executor-cores", "1", "--total-executor-cores", str(executors)]  # fmt: skip
    if py_files is not None:
        cmd += ["--py-files", str(py_files)]
    for k, v in settings.items():
        cmd += ["--conf", f"{k}={v}"]
    return [*cmd, str(app), *args]


def why_not_here() -> str | None:
    """None when this machine can run the simulated cluster; else the reason (for tests to print when they skip)."""
    try:
        _check_can_run()
    except NetClusterError as exc:
        return str(exc)
    return None


# ------------------------------------------------------------------------------------------------ internals


def _check_can_run() -> None:
    if sys.platform != "linux":
        raise NetClusterError(f"network namespaces are Linux only; this is {sys.platform}")
    if os.geteuid() != 0:
        raise NetClusterError(
            "the simulated cluster needs root (it creates network namespaces, veth links and tc qdiscs): run it "
            "as root, e.g. `sudo -E .venv/bin/python -m sparkml_dist.netcluster up ...`"
        )
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise NetClusterError(
                f"`{tool}` is not on PATH: install iproute2 (Debian/Ubuntu: apt-get install iproute2)"
            )
    probe = f"sdprobe{os.getpid() % 100000}"
    bridge = _ip("link", "add", probe, "type", "bridge", check=False)
    if bridge.returncode != 0:
        raise NetClusterError(
            f"this kernel refuses a bridge device (`ip link add ... type bridge` said: {bridge.stderr.strip()}): "
            "load the bridge module (modprobe bridge)"
        )
    _ip("link", "del", probe, check=False)
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        raise NetClusterError(
            f"this kernel or container refuses network namespaces (`ip netns add` said: {made.stderr.strip()}); "
            "a container needs CAP_SYS_ADMIN and CAP_NET_ADMIN"
        )
    try:
        tbf = _run(["ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "1gbit",
                    "burst", "128kb", "latency", "50ms"], check=False)  # fmt: skip
        if tbf.returncode != 0:
            raise NetClusterError(
                f"the kernel lacks the token-bucket qdisc (`tc qdisc add ... tbf` said: {tbf.stderr.strip()}): load "
                "sch_tbf (modprobe sch_tbf), or bring the cluster up with --rate unshaped"
            )
    finally:
        _ip("netns", "del", probe, check=False)


def _network(cluster: NetCluster) -> None:
    bridge = f"{cluster.name}-br"
    _ip("link", "add", bridge, "type", "bridge")
    _ip("addr", "add", f"{cluster.subnet}.1/24", "dev", bridge)
    _ip("link", "set", bridge, "up")
    bits = rate_bits(cluster.rate)
    for h in cluster.hosts:
        _ip("netns", "add", h.netns)
        _ip("link", "add", h.link, "type", "veth", "peer", "name", IFACE, "netns", h.netns)
        _ip("link", "set", h.link, "master", bridge, "up")
        _ip("-n", h.netns, "addr", "add", f"{h.address}/24", "dev", IFACE)
        _ip("-n", h.netns, "link", "set", IFACE, "up")
        _ip("-n", h.netns, "link", "set", "lo", "up")
        _hosts_file(cluster, h)
        if bits:
            _shape(cluster, h, bits)


def _hosts_file(cluster: NetCluster, h: Host) -> None:
    """``/etc/netns/<ns>/hosts``, which ``ip netns exec`` mounts over ``/etc/hosts`` inside the namespace: the
    machine's hostname resolves to the host's own address there, as on a real host (Horovod 0.28.1's Gloo
    binds the address the hostname resolves to for its process-set context, whatever HOROVOD_GLOO_IFACE
    says), and every host of the cluster is known by name."""
    lines = ["127.0.0.1 localhost", f"{h.address} {socket.gethostname()} {h.name}"]
    lines += [f"{o.address} {o.name}" for o in cluster.hosts if o is not h]
    folder = NETNS_ETC / h.netns
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "hosts").write_text("\n".join(lines) + "\n")


def _shape(cluster: NetCluster, h: Host, bits: float) -> None:
    """tbf at ``bits``/s each way: the bucket holds ~10 ms of traffic (at least 64 KiB, so a full-size
    segment always fits), and a packet waits at most 50 ms in the queue before it is dropped."""
    _run(["tc", "qdisc", "add", "dev", h.link, *_tbf(bits)])  # what the host receives
    _run([*cluster.exec_prefix(h.name), "tc", "qdisc", "add", "dev", IFACE, *_tbf(bits)])  # what it sends


def _tbf(bits: float) -> list[str]:
    burst = max(64 * 1024, int(bits / 8 / 100))
    return ["root", "tbf", "rate", f"{int(bits)}bit", "burst", str(burst), "latency", "50ms"]


def _daemons(
    cluster: NetCluster, cores: int, memory: str, timeout_s: float, pin: bool, cpus: float | None = None
) -> NetCluster:
    run_path = Path(cluster.run_dir)
    spark_class = str(spark_home() / "bin" / "spark-class")
    head = cluster.head
    master_url = f"spark://{head.address}:{MASTER_PORT}"
    webui_url = f"http://{head.address}:{WEBUI_PORT}"
    pids = []

    def env(h: Host) -> dict[str, str]:
        return {**daemon_env(run_path), SPARK_LOCAL_IP: h.address}

    master = [spark_class, MASTER_CLASS, "--host", head.address, "--port", str(MASTER_PORT),
              "--webui-port", str(WEBUI_PORT)]  # fmt: skip
    pids.append(spawn([*cluster.exec_prefix(HEAD), *master], env(head), run_path / "master.log"))
    wait_for(lambda: master_json(webui_url) is not None, timeout_s, f"the master {webui_url}", run_path)
    for i, h in enumerate(cluster.workers):
        work = run_path / f"worker-{h.name}"
        work.mkdir(exist_ok=True)
        cmd = [spark_class, WORKER_CLASS, master_url, "--host", h.address, "--cores", str(cores), "--memory", memory,
               "--webui-port", str(WORKER_WEBUI_PORT), "--work-dir", str(work)]  # fmt: skip
        if pin and shutil.which("taskset"):
            # the worker, its executors and their Python workers (the rank) inherit the CPU set
            first = (i * cores) % (os.cpu_count() or 1)
            cpu_list = ",".join(str((first + c) % (os.cpu_count() or 1)) for c in range(cores))
            cmd = ["taskset", "-c", cpu_list, *cmd]
        cmd = [*cluster.exec_prefix(h.name), *cmd]
        if cpus is not None:
            # join the host's group, then exec into the namespace (whose /sys, remounted by `ip netns exec`,
            # has no cgroup tree): everything the worker starts inherits the cap
            procs = _cpu_group(cluster.name, h.name, cpus) / "cgroup.procs"
            cmd = ["sh", "-c", 'echo $$ > "$1" && shift && exec "$@"', "sh", str(procs), *cmd]
        pids.append(spawn(cmd, env(h), run_path / f"worker-{h.name}.log"))
    n = len(cluster.workers)
    wait_for(lambda: alive_workers(webui_url) >= n, timeout_s, f"{n} alive workers at {webui_url}", run_path)
    return replace(cluster, master_url=master_url, webui_url=webui_url, pids=pids, cpus=cpus)


def _cpu_base() -> tuple[Path, str] | None:
    """Where CPU groups can be made and which interface: (``/sys/fs/cgroup/cpu``, "v1") or
    (``/sys/fs/cgroup``, "v2"); None when neither has the ``cpu`` controller."""
    unified = CGROUP_ROOT / "cgroup.controllers"
    if unified.exists():
        return (CGROUP_ROOT, "v2") if "cpu" in unified.read_text().split() else None
    if (CGROUP_ROOT / "cpu" / "cpu.cfs_quota_us").exists():
        return CGROUP_ROOT / "cpu", "v1"
    return None


def _group_dir(name: str) -> Path | None:
    base = _cpu_base()
    return base[0] / CPU_GROUP.format(name) if base else None


def why_no_cpu_cap(cpus: float = 0.5) -> str | None:
    """None when worker hosts can be capped at ``cpus`` CPUs here; else why not, and what to do."""
    if not 0.01 <= cpus <= (os.cpu_count() or 1):
        return f"--cpus {cpus} must be between 0.01 and this machine's {os.cpu_count()} CPUs"
    base = _cpu_base()
    if base is None:
        return (
            f"no cgroup cpu controller under {CGROUP_ROOT} (neither v1 cpu/cpu.cfs_quota_us nor v2 with 'cpu' in "
            "cgroup.controllers): mount it, or bring the cluster up without --cpus"
        )
    probe = base[0] / CPU_GROUP.format(f"probe{os.getpid()}")
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        return f"cannot make a CPU group in {base[0]} ({exc}): run as root with a writable cgroup filesystem"
    return None


def _cpu_group(name: str, host: str, cpus: float) -> Path:
    """The host's CPU group, capped at ``cpus`` CPUs per CFS period (made if missing)."""
    base = _cpu_base()
    if base is None:
        raise NetClusterError(why_no_cpu_cap(cpus) or "no cgroup cpu controller")
    root, kind = base
    group = root / CPU_GROUP.format(name)
    folder = group / host
    quota = max(1000, int(cpus * CFS_PERIOD_US))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if kind == "v1":
            (folder / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
            (folder / "cpu.cfs_quota_us").write_text(str(quota))
        else:
            for parent in (root, group):  # the cpu controller must be enabled down to the host's group
                (parent / "cgroup.subtree_control").write_text("+cpu")
            (folder / "cpu.max").write_text(f"{quota} {CFS_PERIOD_US}")
    except OSError as exc:
        raise NetClusterError(
            f"cannot cap host {host} at {cpus} CPUs in {folder} ({exc}): run as root on a writable cgroup "
            "filesystem, or bring the cluster up without --cpus"
        ) from exc
    return folder


def _remove_cpu_groups(name: str, timeout_s: float = 10.0) -> None:
    """Remove the cluster's CPU groups (their processes were ended first; a group empties as they exit)."""
    group = _group_dir(name)
    if group is None or not group.exists():
        return
    deadline = time.monotonic() + timeout_s
    for folder in [*sorted(p for p in group.iterdir() if p.is_dir()), group]:
        while True:
            try:
                folder.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    log.warning("could not remove CPU group %s (%s): remove it with rmdir once empty", folder, exc)
                    break
                time.sleep(0.2)


_PROBE_SERVER = """
import json, socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); s.settimeout(float(sys.argv[3]))
c, _ = s.accept(); c.settimeout(float(sys.argv[3])); n, t0 = 0, None
while True:
    b = c.recv(1 << 20)
    if not b:
        break
    t0 = t0 or time.monotonic()
    n += len(b)
print(json.dumps({"bytes": n, "seconds": time.monotonic() - (t0 or time.monotonic())}))
"""
_PROBE_CLIENT = """
import socket, sys, time
deadline = time.monotonic() + 10
while True:
    try:
        c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10); break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)
buf, end = bytes(1 << 16), time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    c.sendall(buf)
c.close()
"""


def probe(cluster: NetCluster, src: str = "w1", dst: str = HEAD, seconds: float = 2.0) -> dict[str, object]:
    """One TCP stream from ``src`` to ``dst`` for ``seconds``: what it carried and at what rate (payload bits
    per second, so a little under the link rate: headers are ~3% at 1,500-byte frames)."""
    if src == dst:
        raise NetClusterError(f"probe needs two different hosts, got {src} -> {dst}")
    target = cluster.host(dst).address
    wait = seconds + 20
    server = subprocess.Popen([*cluster.exec_prefix(dst), sys.executable, "-c", _PROBE_SERVER, target,
                               str(PROBE_PORT), str(wait)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)  # fmt: skip
    try:
        _run([*cluster.exec_prefix(src), sys.executable, "-c", _PROBE_CLIENT, target, str(PROBE_PORT), str(seconds)])
        out, err = server.communicate(timeout=wait)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    if server.returncode != 0:
        raise NetClusterError(f"the probe's receiver on {dst} failed ({server.returncode}): {err.strip()[-2000:]}")
    got = json.loads(out.strip().splitlines()[-1])
    bits = got["bytes"] * 8 / got["seconds"] if got["seconds"] > 0 else 0.0
    return {"src": src, "dst": dst, "bytes": got["bytes"], "seconds": round(got["seconds"], 3),
            "payload_bits_per_s": round(bits), "link_rate_bits_per_s": rate_bits(cluster.rate)}  # fmt: skip


def _netns_list() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _netns_pids(ns: str) -> list[int]:
    out = _ip("netns", "pids", ns, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def _end(pids: list[int], timeout_s: float) -> None:
    """SIGTERM, then SIGKILL what is still alive after ``timeout_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + (timeout_s if sig == signal.SIGTERM else 10)
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)
        pids = [p for p in pids if _alive(p)]
        if not pids:
            return


def _alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run(["ip", *args], check=check)


def _run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise NetClusterError(f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Spark hosts as network namespaces joined by shaped links.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up")
    p_up.add_argument("--workers", type=int, default=2)
    p_up.add_argument("--rate", default="1gbit", help="100mbit, 1gbit, 10gbit, ... or unshaped")
    p_up.add_argument("--name", default="sdn")
    p_up.add_argument("--subnet", default="10.213.7")
    p_up.add_argument("--cores", type=int, default=1)
    p_up.add_argument("--memory", default="1g")
    p_up.add_argument("--pin", action="store_true", help="each worker host on its own CPU(s) (taskset)")
    p_up.add_argument("--cpus", type=float, default=None, help="cap each worker host at this many CPUs (cgroup)")
    p_shape = sub.add_parser("shape")
    p_shape.add_argument("--rate", required=True)
    p_exec = sub.add_parser("exec")
    p_exec.add_argument("--host", default=HEAD)
    p_exec.add_argument("command", nargs=argparse.REMAINDER)
    p_submit = sub.add_parser("submit")
    p_submit.add_argument("--executors", type=int, default=0, help="default: one per worker host")
    p_submit.add_argument("--executor-memory", default="1g")
    p_submit.add_argument("command", nargs=argparse.REMAINDER)
    sub.add_parser("bytes")
    p_probe = sub.add_parser("probe")
    p_probe.add_argument("--src", default="w1")
    p_probe.add_argument("--dst", default=HEAD)
    p_probe.add_argument("--seconds", type=float, default=2.0)
    p_down = sub.add_parser("down")
    p_down.add_argument("--name", default=None)
    for p in sub.choices.values():
        if not any(a.dest == "run_dir" for a in p._actions):
            p.add_argument("--run-dir", default="work/netcluster")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "up":
            c = up(args.run_dir, args.workers, args.rate, args.name, args.subnet, args.cores, args.memory,
                   pin=args.pin, cpus=args.cpus)  # fmt: skip
            print(json.dumps({"master_url": c.master_url, "hosts": {h.name: h.address for h in c.hosts}}))
        elif args.cmd == "exec":
            c = read_state(args.run_dir)
            command = args.command[1:] if args.command[:1] == ["--"] else args.command
            if not command:
                raise NetClusterError("exec needs a command after --, e.g. exec --host head -- spark-submit ...")
            os.execvpe("ip", [*c.exec_prefix(args.host), *command], c.env(args.host))
        elif args.cmd == "submit":
            c = read_state(args.run_dir)
            command = args.command[1:] if args.command[:1] == ["--"] else args.command
            if not command:
                raise NetClusterError("submit needs an application after --, e.g. submit -- jobs/train.py --config ...")
            from sparkml_dist.runtime.cluster import package_library

            py_files = package_library(Path(c.run_dir) / "dist")
            cmd = submit_command(c, command[0], command[1:], args.executors or len(c.workers), py_files,
                                 args.executor_memory)  # fmt: skip
            os.execvpe(cmd[0], cmd, c.env(HEAD))
        elif args.cmd == "shape":
            print(json.dumps({"rate": reshape(read_state(args.run_dir), args.rate).rate}))
        elif args.cmd == "bytes":
            print(json.dumps(link_bytes(read_state(args.run_dir))))
        elif args.cmd == "probe":
            print(json.dumps(probe(read_state(args.run_dir), args.src, args.dst, args.seconds)))
        else:
            print(json.dumps({"removed": down(args.run_dir, args.name)}))
    except ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
