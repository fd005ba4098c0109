"""docker/compose.yaml, without Docker: run the compose file's exact commands on loopback
(the setup service, then the three servers with their anti-entropy peers), contribute at
each site as ``docker compose exec SITE crdt-merge contribute`` would, and check the three
servers converge by themselves.

Only what Docker itself provides is translated: container paths (/data, /config, /app) to
directories here, service host names to 127.0.0.1 and the container port to a free port.
Two settings are changed, for speed: the test profile (4 KiB pieces) and a 1 s sync interval.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import numpy as np
import yaml
from http_helpers import PYTHON, REPO, ServerProcess, wait_for
from safetensors.numpy import save_file

from crdt_merge.sync.http import HttpPeer

DOCKER = REPO / "docker"
SITES = ("alpha", "beta", "gamma")
CONTAINER_PORT = "8000"


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Translate:
    """Docker's part: volumes, service names, published ports."""

    def __init__(self, data: Path, config: Path, ports: dict[str, int]) -> None:
        self.paths = {"/data": str(data), "/config": str(config), "/app": str(REPO)}
        self.ports = ports

    def arg(self, value: str) -> str:
        for name, port in self.ports.items():
            value = value.replace(f"http://{name}:{CONTAINER_PORT}", f"http://127.0.0.1:{port}")
        for inside, outside in self.paths.items():
            if value == inside or value.startswith(inside + "/"):
                value = outside + value[len(inside):]
        return "127.0.0.1" if value == "0.0.0.0" else value

    def argv(self, argv: list[str], service: str | None = None) -> list[str]:
        out = [self.arg(a) for a in argv]
        if service is not None:
            at = out.index("--port") + 1
            assert out[at] == CONTAINER_PORT
            out[at] = str(self.ports[service])
        return out

    def env(self, environment: dict[str, str]) -> dict[str, str]:
        venv_bin = str(Path(PYTHON).parent)
        return {**os.environ, "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
                **{k: self.arg(str(v)) for k, v in environment.items()}}


def model(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    save_file({"embed": np.arange(2048, dtype=np.float32).reshape(32, 64),
               "layers.0.w": rng.standard_normal((64, 64)).astype(np.float32)},
              str(path / "model.safetensors"))
    return path


def test_compose_binds_loopback_and_ships_no_tokens():
    """Finding 7 of issue 13: the published ports listen on 127.0.0.1 only, and no token
    is committed (the setup service generates them)."""
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    for name in SITES:
        for mapping in compose["services"][name]["ports"]:
            assert mapping.startswith("127.0.0.1:"), mapping
    assert not (DOCKER / "config").exists()
    for path in DOCKER.rglob("*"):
        if path.is_file():  # nothing that looks like a token (64 hex digits)
            assert not re.search(r"\b[0-9a-f]{64}\b", path.read_text()), path


def test_setup_generates_fresh_private_tokens(tmp_path):
    env = {**os.environ, "PATH": str(Path(PYTHON).parent) + os.pathsep + os.environ["PATH"],
           "CRDT_MERGE_PROFILE": "test"}
    made = []
    for run in ("one", "two"):
        subprocess.run(["sh", str(DOCKER / "setup.sh"), str(tmp_path / run / "data"),
                        str(tmp_path / run / "config")], env=env, check=True, timeout=120,
                       capture_output=True)
        config = tmp_path / run / "config"
        lines = [line.split() for line in (config / "tokens").read_text().splitlines()]
        assert [(site, scope) for site, scope, _ in lines] == [
            ("alpha", "admin"), ("beta", "contribute"), ("gamma", "contribute")]
        for site, _, token in lines:
            assert len(token) == 64 and (config / f"{site}.token").read_text().strip() == token
            assert (config / f"{site}.token").stat().st_mode & 0o077 == 0
        made.append({token for _, _, token in lines})
    assert not made[0] & made[1]  # generated, not shipped


def test_compose_commands_converge_on_loopback(tmp_path):
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    data = tmp_path / "data"
    data.mkdir()
    config = tmp_path / "config"  # the compose file's `config` volume
    t = Translate(data, config, dict(zip(SITES, free_ports(3), strict=True)))

    setup = services["setup"]
    env = t.env({**setup.get("environment", {}), "CRDT_MERGE_PROFILE": "test"})
    subprocess.run(t.argv(setup["entrypoint"] + setup.get("command", [])), env=env, check=True,
                   cwd=tmp_path, timeout=120, capture_output=True)

    servers = []
    try:
        for name in SITES:
            svc = services[name]
            argv = t.argv(svc["entrypoint"] + svc["command"], service=name)
            argv[0] = shutil.which(argv[0], path=t.env({})["PATH"]) or argv[0]
            server_env = t.env({**svc["environment"], "CRDT_MERGE_SYNC_INTERVAL": "1"})
            servers.append(ServerProcess(data / name, argv=argv, env=server_env))
        for s in servers:
            s.wait_ready()
        token = (config / "alpha.token").read_text().strip()

        def states() -> list[tuple[str, int]]:
            out = []
            for s in servers:
                with HttpPeer(s.url, token) as peer:
                    st = peer.state()
                out.append((st.state_root, st.ops))
            return out

        # beta and gamma learn of their admission by anti-entropy alone
        assert wait_for(lambda: len(set(states())) == 1, timeout=60, every=0.25), states()
        for name, seed in zip(SITES, (1, 2, 3), strict=True):
            cmd = ["crdt-merge", "contribute", f"/data/{name}", str(model(tmp_path / name, seed)),
                   "--weight", "1"]
            subprocess.run(t.argv(cmd), env=env, check=True, timeout=120, capture_output=True)
        assert wait_for(lambda: {n for _, n in states()} == {6} and len(set(states())) == 1,
                        timeout=60, every=0.25), states()
    finally:
        for s in servers:
            s.stop()
