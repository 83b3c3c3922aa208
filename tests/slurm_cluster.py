"""A real SLURM cluster on this machine for the tests: munge, ``slurmctld`` and two ``slurmd``
daemons that act as two nodes (``node1``, ``node2``) on one host.

Everything it writes (config, state, spool, logs, pid files) lives in one folder; the daemons are
stopped by their pid files when the test session ends. ``SLURM_CONF`` in the environment of the
commands it runs points the SLURM tools at this cluster. ``make slurm-deps`` installs Debian's
``slurm-wlm`` and ``munge``; without them (or without root) :func:`unavailable_reason` says why
and the SLURM tests skip with that reason.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

NODES = ("node1", "node2")
CONTROLLER_PORT = 16817
NODE_PORTS = (17001, 17002)
BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "munged", "munge", "unmunge")


def unavailable_reason() -> str | None:
    """Why a local cluster cannot run here, or None when it can."""
    missing = [
        b for b in BINARIES if shutil.which(b) is None and not os.path.exists(f"/usr/sbin/{b}")
    ]
    if missing:
        return (
            f"SLURM is not installed ({', '.join(missing)} missing): run `make slurm-deps` "
            "(apt-get install slurm-wlm munge) to run the SLURM tests"
        )
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root (slurmd runs jobs as their users)"
    return None


def _which(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class LocalSlurm:
    """Start with :meth:`start`, submit with :meth:`sbatch`, stop with :meth:`stop`."""

    def __init__(self, root: Path, cpus_per_node: int = 1):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.cpus = cpus_per_node
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    # ---------------------------------------------------------------- setup
    def _write_conf(self) -> None:
        host = socket.gethostname().split(".")[0]
        for sub in ("state", "spool", "logs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        nodes = "\n".join(
            f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} CPUs={self.cpus} "
            f"RealMemory=4000 State=UNKNOWN"
            for n, p in zip(NODES, NODE_PORTS)
        )
        self.conf.write_text(
            f"""ClusterName=sdltest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={CONTROLLER_PORT}
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool/%n
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd-%n.pid
SlurmctldLogFile={self.root}/logs/slurmctld.log
SlurmdLogFile={self.root}/logs/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1
JobRequeue=1
ReturnToService=2
MpiDefault=none
KillWait=30
InactiveLimit=0
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=30
{nodes}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""
        )

    @staticmethod
    def _ensure_hosts() -> None:
        """Lightning's SLURMEnvironment uses the first node's name as the master address."""
        hosts = Path("/etc/hosts")
        text = hosts.read_text()
        if not all(
            any(
                n in line.split()[1:]
                for line in text.splitlines()
                if line.strip() and not line.startswith("#")
            )
            for n in NODES
        ):
            with hosts.open("a") as f:
                f.write(f"\n127.0.0.1 {' '.join(NODES)}\n")

    @staticmethod
    def _munge_works() -> bool:
        return subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0

    def _ensure_munge(self) -> None:
        if self._munge_works():
            return
        subprocess.run(["pkill", "-x", "munged"], capture_output=True)  # a stale one, if any
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            key.parent.mkdir(parents=True, exist_ok=True)
            key.write_bytes(os.urandom(1024))
        for path in ("/etc/munge", "/var/lib/munge", "/var/log/munge", "/run/munge"):
            Path(path).mkdir(parents=True, exist_ok=True)
            shutil.chown(path, "munge", "munge")
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
        subprocess.run(
            ["runuser", "-u", "munge", "--", _which("munged")], check=True, capture_output=True
        )
        for _ in range(50):
            if self._munge_works():
                return
            time.sleep(0.1)
        raise RuntimeError("munged started but `munge -n | unmunge` fails")

    @staticmethod
    def _stop_stale_clusters() -> None:
        """Daemons of an earlier test cluster (a crashed session) hold the ports: stop them."""
        out = subprocess.run(
            ["pgrep", "-a", "-f", "slurm(ctld|d) -f "], capture_output=True, text=True
        ).stdout
        for line in out.splitlines():
            pid, *argv = line.split()
            conf = Path(argv[argv.index("-f") + 1]) if "-f" in argv[:-1] else None
            if conf is not None and (
                not conf.exists() or "ClusterName=sdltest" in conf.read_text()
            ):
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def start(self, timeout: float = 60) -> LocalSlurm:
        self._stop_stale_clusters()
        self._write_conf()
        self._ensure_hosts()
        self._ensure_munge()
        try:
            return self._start_daemons(timeout)
        except BaseException:
            self.stop()  # never leave daemons behind on a failed start
            raise

    def _start_daemons(self, timeout: float) -> LocalSlurm:
        subprocess.run([_which("slurmctld"), "-f", str(self.conf), "-i"], check=True, env=self.env)
        for node in NODES:
            subprocess.run(
                [_which("slurmd"), "-f", str(self.conf), "-N", node], check=True, env=self.env
            )
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout
            states = dict(line.split() for line in out.splitlines() if line.strip())
            if len(states) == len(NODES) and all(s == "idle" for s in states.values()):
                return self
            time.sleep(1)
        raise RuntimeError(f"local SLURM did not come up in {timeout} s: {self.logs()}")

    def stop(self, drain_timeout: float = 20) -> None:
        deadline = time.time() + drain_timeout  # let finishing jobs complete (their slurmstepd
        while time.time() < deadline:  # would otherwise wait for a slurmd that is gone)
            if not self.run("squeue", "-h", check=False).stdout.strip():
                break
            time.sleep(0.5)
        for pidfile in sorted(self.root.glob("*.pid")):
            try:
                os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)
            except (ValueError, ProcessLookupError):
                pass
        time.sleep(1)

    # ---------------------------------------------------------------- use
    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, check=check, capture_output=True, text=True)

    def sbatch(self, *args: str, env: dict | None = None, cwd: str | None = None) -> str:
        """Submit; returns the job id."""
        out = subprocess.run(
            ["sbatch", "--parsable", *args],
            env={**self.env, **(env or {})},
            cwd=cwd,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return out.strip().split(";")[0]

    def state(self, job: str) -> str:
        out = self.run("scontrol", "show", "job", job, check=False).stdout
        for field in out.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return "UNKNOWN"

    def job_field(self, job: str, name: str) -> str:
        out = self.run("scontrol", "show", "job", job, check=False).stdout
        for field in out.split():
            if field.startswith(f"{name}="):
                return field.split("=", 1)[1]
        return ""

    def wait(self, job: str, states=("COMPLETED",), timeout: float = 300) -> str:
        """Wait until the job reaches one of ``states`` or ends; returns its state."""
        final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
        deadline = time.time() + timeout
        state = "UNKNOWN"
        while time.time() < deadline:
            state = self.state(job)
            if state in states or state in final:
                return state
            time.sleep(1)
        raise TimeoutError(f"job {job} still {state} after {timeout} s\n{self.logs()}")

    def logs(self) -> str:
        parts = []
        for log in sorted((self.root / "logs").glob("*.log")):
            parts.append(f"--- {log.name}\n" + "\n".join(log.read_text().splitlines()[-15:]))
        return "\n".join(parts)
