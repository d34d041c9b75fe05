"""deploy/Dockerfile and its .dockerignore: pinned multi-stage build, non-root runtime, entrypoint, healthcheck.

The image must agree with the Deployment (uid, data dir) and conf/settings.py; its HEALTHCHECK command is
run here against a stand-in /healthz. Nothing here needs docker.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import subprocess
import sys
import threading

import pytest

from conf.settings import SETTINGS_BY_ENV, load_settings
from tests.fixtures.deploy import DEPLOY, config_map_data, pod_spec, read_text
from tests.fixtures.server import REPO, free_port

DOCKERFILE = os.path.join(DEPLOY, "Dockerfile")
DOCKERIGNORE = os.path.join(DEPLOY, "Dockerfile.dockerignore")


# -- Dockerfile -----------------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    logical, pending = [], ""
    for raw in read_text(DOCKERFILE).splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in logical]


def dockerfile_stages() -> list[dict]:
    """Each stage: its image, its alias, and its instructions."""
    stages = []
    for instruction, args in dockerfile_instructions():
        if instruction == "FROM":
            words = [word for word in args.split() if not word.startswith("--")]
            alias = words[2] if len(words) >= 3 and words[1].lower() == "as" else None
            stages.append({"image": words[0], "alias": alias, "instructions": []})
        else:
            assert stages, f"{instruction} before the first FROM"
            stages[-1]["instructions"].append((instruction, args))
    return stages


def stage_values(stage: dict, instruction: str) -> list[str]:
    return [args for name, args in stage["instructions"] if name == instruction]


def dockerfile_env(stage: dict) -> dict[str, str]:
    env = {}
    for args in stage_values(stage, "ENV"):
        for word in shlex.split(args):
            name, sep, value = word.partition("=")
            assert sep, f"use ENV NAME=value, not the legacy form: ENV {args}"
            env[name] = value
    return env


def healthcheck_command() -> list[str]:
    """The final stage's HEALTHCHECK command, run by this interpreter (the image runs its own python)."""
    final = dockerfile_stages()[-1]
    (args,) = stage_values(final, "HEALTHCHECK")
    command = json.loads(args[args.index("CMD") + 3:].strip())
    assert command[0] == "python", "exec form with the image's python: slim images have no curl"
    return [sys.executable, *command[1:]]


def dockerignore_keeps(path: str) -> bool:
    """Whether Docker sends `path` (relative to the context root) given Dockerfile.dockerignore."""
    keep = True
    for line in read_text(DOCKERIGNORE).splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        regex = re.sub(r"\\\[(.*?)\\\]", r"[\1]", regex)
        parts = path.split("/")
        prefixes = ["/".join(parts[: index + 1]) for index in range(len(parts))]
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            keep = negate
    return keep


def test_dockerfile_images_are_pinned_and_multi_stage():
    stages = dockerfile_stages()
    assert len(stages) >= 2, "build in one stage, run in another"
    aliases = set()
    for stage in stages:
        image = stage["image"]
        if image not in aliases:
            assert "@sha256:" in image or re.fullmatch(r"[\w./-]+:[\w.-]+", image), f"untagged image {image}"
            assert not image.endswith(":latest"), image
        if stage["alias"]:
            aliases.add(stage["alias"])
    assert stages[-1]["image"].startswith("python:3.11-slim")


def test_dockerfile_runtime_stage_has_no_compiler():
    compilers = re.compile(r"(?<![\w.-])(gcc|g\+\+|cc|clang|build-essential|libc6-dev|python3-dev|make)(?![\w.-])")
    builder, final = dockerfile_stages()[0], dockerfile_stages()[-1]
    assert any(compilers.search(args) for args in stage_values(builder, "RUN")), "the builder must compile"
    for args in stage_values(final, "RUN"):
        assert not compilers.search(args), f"compiler in the runtime stage: RUN {args}"
    for args in stage_values(final, "COPY"):
        if "--from=" in args:
            sources = [word for word in args.split() if not word.startswith("--")][:-1]
            assert all(source.startswith("/opt/") for source in sources), f"COPY {args}"


def test_dockerfile_runs_as_the_numeric_non_root_user_of_the_deployment():
    final = dockerfile_stages()[-1]
    users = stage_values(final, "USER")
    assert users, "no USER: the image would run as root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0, "a numeric uid lets Kubernetes verify runAsNonRoot"
    assert gid.isdigit() and int(gid) != 0
    security = pod_spec()["securityContext"]
    assert (int(uid), int(gid)) == (security["runAsUser"], security["runAsGroup"])


def test_dockerfile_entrypoint_env_and_ports():
    final = dockerfile_stages()[-1]
    assert [json.loads(args) for args in stage_values(final, "ENTRYPOINT")] == [["sira"]]
    assert [json.loads(args) for args in stage_values(final, "CMD")] == [["serve"]]
    assert "8080" in " ".join(stage_values(final, "EXPOSE")).split()
    env = dockerfile_env(final)
    assert env["SIRA_BIND"] == "0.0.0.0:8080"
    assert env["SIRA_DATA_DIR"] == "/var/lib/sira"  # created 0750 by the image; in Kubernetes a folder below it
    assert config_map_data()["SIRA_DATA_DIR"].startswith(env["SIRA_DATA_DIR"] + "/")
    settings = load_settings({name: value for name, value in env.items() if name in SETTINGS_BY_ENV})
    assert settings.bind == env["SIRA_BIND"]


def test_dockerignore_sends_the_packages_and_nothing_private():
    assert not os.path.exists(os.path.join(DEPLOY, ".dockerignore")), \
        "docker ignores deploy/.dockerignore for a repo-root context; use deploy/Dockerfile.dockerignore"
    config = read_text(os.path.join(REPO, "setup.cfg"))
    include = re.search(r"\[options\.packages\.find\]\s*include\s*=\s*((?:\n[ \t]+\S+)+)", config).group(1)
    packages = {name for name in include.split() if "*" not in name and "." not in name}
    assert {"app", "workers", "shm", "conf", "migrations"} <= packages
    for path in ["setup.cfg", "pyproject.toml", *(f"{name}/__init__.py" for name in packages)]:
        assert dockerignore_keeps(path), f"the build context lacks {path}"
    for path in [".venv/bin/python", ".git/HEAD", "var/jwt_secret", "tests/conftest.py",
                 "app/__pycache__/main.cpython-311.pyc"]:
        assert not dockerignore_keeps(path), f"the build context would carry {path}"


class HealthStandIn(http.server.BaseHTTPRequestHandler):
    """Answers GET /healthz with the status the test chose; anything else 404."""

    status = 200

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status, expected_rc", [(200, 0), (503, 1)])
def test_dockerfile_healthcheck_command_follows_healthz(status, expected_rc):
    handler = type("Handler", (HealthStandIn,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = dict(os.environ, SIRA_BIND=f"0.0.0.0:{server.server_address[1]}")
        result = subprocess.run(healthcheck_command(), env=env, capture_output=True, text=True, timeout=30)
        assert result.returncode == expected_rc, result.stderr
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_dockerfile_healthcheck_fails_when_nothing_listens():
    env = dict(os.environ, SIRA_BIND=f"0.0.0.0:{free_port()}")
    result = subprocess.run(healthcheck_command(), env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
