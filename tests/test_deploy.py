"""deploy/ validated offline: compose against compose-spec, manifests against the
Kubernetes schemas, Dockerfiles parse and copy files that exist, and every
environment variable deploy/ sets is one the code reads."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.33.0"
CODE = list((ROOT / "src" / "gridrender").rglob("*.py"))


def compose_schema() -> dict:
    import check_jsonschema

    path = Path(check_jsonschema.__file__).parent / "builtin_schemas" / "vendor" / "compose-spec.json"
    return json.loads(path.read_text())


def test_compose_file_matches_the_compose_spec():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    jsonschema.validate(compose, compose_schema())
    services = compose["services"]
    assert {"redis", "minio", "minio-init", "flower", "submit"} <= services.keys()
    workers = [s for name, s in services.items() if name.startswith("worker")]
    assert len(workers) >= 2
    gpus = [w["deploy"]["resources"]["reservations"]["devices"][0] for w in workers]
    assert all(d["driver"] == "nvidia" and len(d["device_ids"]) == 1 for d in gpus)
    assert len({d["device_ids"][0] for d in gpus}) == len(gpus)  # one GPU each
    assert "--appendonly" in services["redis"]["command"] and "yes" in services["redis"]["command"]
    assert "mc mb" in services["minio-init"]["command"][0]
    assert services["submit"]["profiles"] == ["submit"]


def test_compose_takes_secrets_from_the_env_file_only():
    text = (DEPLOY / "compose.yaml").read_text()
    example = dict(
        line.split("=", 1)
        for line in (DEPLOY / ".env.example").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    for name, value in example.items():
        if "PASSWORD" in name:
            assert value not in text, f"{name}'s example value is baked into compose.yaml"
    for secret in ("REDIS_PASSWORD", "MINIO_ROOT_PASSWORD"):
        assert f"${{{secret}" in text


def k8s_documents():
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield pytest.param(doc, id=f"{path.name}:{doc['kind']}")


@pytest.mark.parametrize("doc", list(k8s_documents()))
def test_kubernetes_manifests_match_their_schemas(doc):
    import kubernetes_validate

    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_worker_deployment_requests_one_gpu_and_is_ready_when_the_pipeline_is_loaded():
    docs = {d["kind"]: d for d in yaml.safe_load_all((DEPLOY / "k8s" / "worker.yaml").read_text())}
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["limits"]["memory"]
    assert container["readinessProbe"]["exec"]["command"] == ["test", "-f", "/tmp/gridrender-ready"]
    assert "--model" in container["args"]  # --model loads the pipeline, then writes the ready file
    assert container["envFrom"] == [{"secretRef": {"name": "gridrender"}}]
    from gridrender.scheduler.settings import Settings

    assert Settings.model_fields["ready_file"].default == "/tmp/gridrender-ready"


def test_keda_scaled_object_points_at_the_worker_deployment():
    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / "optional" / "keda-scaledobject.yaml").read_text()))
    scaled = next(d for d in docs if d["kind"] == "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"]["name"] == "gridrender-worker"
    assert scaled["spec"]["triggers"][0]["metadata"]["listName"].startswith("gridrender.")


@pytest.mark.parametrize("name", ["worker.Dockerfile", "cli.Dockerfile"])
def test_dockerfiles_parse_and_copy_files_that_exist(name):
    from dockerfile_parse import DockerfileParser

    with open(DEPLOY / "docker" / name, "rb") as f:
        parser = DockerfileParser(fileobj=f)
        instructions = [i for i in parser.structure if i["instruction"] != "COMMENT"]
        content = parser.content
    assert instructions[0]["instruction"] == "FROM"
    known = {
        "FROM",
        "RUN",
        "COPY",
        "ENV",
        "WORKDIR",
        "USER",
        "VOLUME",
        "ENTRYPOINT",
        "CMD",
        "HEALTHCHECK",
        "ARG",
        "LABEL",
        "EXPOSE",
        "COMMENT",
    }
    assert {i["instruction"] for i in instructions} <= known
    for copy in (i for i in instructions if i["instruction"] == "COPY"):
        *sources, _ = copy["value"].split()
        for source in sources:
            assert (ROOT / source).exists(), f"{name} copies {source}, which is not in the build context"
    users = [i["value"] for i in instructions if i["instruction"] == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert any('"gridrender"' in i["value"] for i in instructions if i["instruction"] == "ENTRYPOINT")
    if name == "cli.Dockerfile":
        assert "[worker]" not in content  # the scheduler image has no torch
    else:
        assert instructions[0]["value"].startswith("nvidia/cuda:") and '".[worker]"' in content


def variables_read_by_the_code() -> set[str]:
    from gridrender.scheduler.settings import Settings

    names = {f"GRIDRENDER_{field.upper()}" for field in Settings.model_fields}
    for path in CODE:
        names |= set(re.findall(r'"(GRIDRENDER_[A-Z_]+)"', path.read_text()))
    # what boto3 reads for S3 (the "standard AWS variables")
    names |= {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_DEFAULT_REGION",
        "AWS_REGION",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_PROFILE",
    }
    return names


def test_environment_variables_in_deploy_are_the_ones_the_code_reads():
    used = set()
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            used |= set(re.findall(r"\b((?:GRIDRENDER|AWS)_[A-Z0-9_]+)\b", path.read_text()))
    unknown = used - variables_read_by_the_code()
    assert not unknown, f"deploy/ sets variables the code never reads: {sorted(unknown)}"
    assert {"GRIDRENDER_BROKER_URL", "AWS_ENDPOINT_URL_S3", "AWS_SECRET_ACCESS_KEY"} <= used


def test_the_validators_do_reject_broken_files():
    """Guards the tests above: a schema that accepts anything would prove nothing."""
    import kubernetes_validate

    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"services": {"worker": {"image": "x", "gpus_please": True}}}, compose_schema())
    deployment = next(d for d in yaml.safe_load_all((DEPLOY / "k8s" / "worker.yaml").read_text()) if d["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["resourcez"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


# -- locked down: loopback ports, Flower's password, a bucket-scoped S3 user, placeholders refused -----


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def env_example() -> dict[str, str]:
    lines = (DEPLOY / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))


def shell(script: str, env: dict, compose_escapes: bool = False, cwd: Path | None = None):
    """Run a deploy/ shell snippet with sh, as the container would (compose turns `$$` into `$`)."""
    import os
    import subprocess

    if compose_escapes:
        script = script.replace("$$", "$")
    return subprocess.run(
        ["/bin/sh", "-c", script],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=30,
        cwd=cwd,
        check=False,
    )


def test_compose_publishes_consoles_on_loopback_only_and_flower_asks_for_a_password():
    services = compose()["services"]
    published = {name: s["ports"] for name, s in services.items() if s.get("ports")}
    assert {"minio", "flower"} <= published.keys()
    for name, ports in published.items():
        assert all(str(p).startswith("127.0.0.1:") for p in ports), (name, ports)
    auth = services["flower"]["environment"]["FLOWER_BASIC_AUTH"]
    assert "${FLOWER_PASSWORD:?" in auth and auth.startswith("${FLOWER_USER")


def test_compose_workers_use_a_bucket_scoped_minio_user_made_by_minio_init(tmp_path):
    data = compose()
    shared = data["x-gridrender-env"]
    assert shared["AWS_ACCESS_KEY_ID"].startswith("${MINIO_WORKER_USER:?")
    assert shared["AWS_SECRET_ACCESS_KEY"].startswith("${MINIO_WORKER_PASSWORD:?")
    for name, service in data["services"].items():  # root credentials stay with MinIO and its init
        if name not in ("minio", "minio-init", "preflight"):
            assert "MINIO_ROOT" not in yaml.safe_dump(service), name
    # minio-init's script, run against a stand-in `mc` that records each call
    (tmp_path / "mc").write_text(
        '#!/bin/sh\necho "$*" >> "$MC_LOG"\n[ "$1 $2 $3" = "admin policy create" ] && cp "$6" "$MC_LOG.policy"\nexit 0\n'
    )
    (tmp_path / "mc").chmod(0o755)
    script = data["services"]["minio-init"]["command"][0].replace("/tmp/", f"{tmp_path}/")
    env = {
        "MINIO_ROOT_USER": "root",
        "MINIO_ROOT_PASSWORD": "root-secret-123",
        "MINIO_WORKER_USER": "worker",
        "MINIO_WORKER_PASSWORD": "worker-secret-123",
        "S3_BUCKET": "renders",
        "MC_LOG": str(tmp_path / "log"),
    }
    import os

    result = shell(script, {**env, "PATH": f"{tmp_path}:{os.environ['PATH']}"}, compose_escapes=True)
    assert result.returncode == 0, result.stderr
    calls = (tmp_path / "log").read_text().splitlines()
    assert calls[0] == "alias set local http://minio:9000 root root-secret-123"
    assert "admin user add local worker worker-secret-123" in calls
    assert calls[-1] == "admin policy attach local gridrender-bucket --user worker"
    policy = json.loads((tmp_path / "log.policy").read_text())
    resources = {r for statement in policy["Statement"] for r in statement["Resource"]}
    actions = {a for statement in policy["Statement"] for a in statement["Action"]}
    assert resources == {"arn:aws:s3:::renders", "arn:aws:s3:::renders/*"}
    assert "s3:*" not in actions and not any(a.startswith(("admin:", "s3:Delete")) for a in actions)
    assert {"s3:GetObject", "s3:PutObject", "s3:ListBucket"} <= actions  # what S3Store calls
    # a second `compose up`: the policy is attached already (mc says so and exits 1), in an image without grep
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "mc").write_text(
        '#!/bin/sh\n[ "$1 $2 $3" = "admin policy attach" ] || exit 0\n'
        'echo "mc: <ERROR> Unable to attach policy: policy change already in effect" >&2; exit 1\n'
    )
    (bare / "mc").chmod(0o755)
    again = shell(script, {**env, "PATH": str(bare)}, compose_escapes=True)
    assert again.returncode == 0, again.stderr
    (bare / "mc").write_text('#!/bin/sh\n[ "$1 $2 $3" = "admin policy attach" ] || exit 0\necho "no such user" >&2; exit 1\n')
    failed = shell(script, {**env, "PATH": str(bare)}, compose_escapes=True)
    assert failed.returncode != 0 and "no such user" in failed.stderr


def test_compose_refuses_change_me_placeholders_before_anything_starts():
    services = compose()["services"]

    def needs(name: str) -> set[str]:
        direct = set(services[name].get("depends_on", {}))
        return direct.union(*(needs(d) for d in direct)) if direct else set()

    assert all("preflight" in needs(name) for name in services if name != "preflight")
    check = services["preflight"]["command"][0]
    example = env_example()
    secrets = {k: v for k, v in example.items() if "PASSWORD" in k}
    assert set(secrets) == set(services["preflight"]["environment"])  # every password is checked
    refused = shell(check, secrets, compose_escapes=True)  # the example as it ships cannot start
    assert refused.returncode == 1 and "is still the placeholder of .env.example" in refused.stderr
    real = {k: f"{k.lower()}-0123456789" for k in secrets}
    assert shell(check, real, compose_escapes=True).returncode == 0
    for name in secrets:
        for bad in ("CHANGE-ME-please-now", "my-changeme-secret", "short"):
            result = shell(check, {**real, name: bad}, compose_escapes=True)
            assert result.returncode == 1 and name in result.stderr, (name, bad)


def test_kubernetes_pods_refuse_a_secret_with_placeholders():
    secret = next(yaml.safe_load_all((DEPLOY / "k8s" / "secret.example.yaml").read_text()))["stringData"]
    real = {
        "REDIS_PASSWORD": "r3dis-password-long",
        "GRIDRENDER_BROKER_URL": "redis://:r3dis-password-long@redis:6379/0",
        "AWS_ACCESS_KEY_ID": "gridrender-worker",
        "AWS_SECRET_ACCESS_KEY": "s3-secret-long-enough",
    }
    for manifest, kind in (("worker.yaml", "Deployment"), ("submit-job.yaml", "Job")):
        pod = next(d for d in yaml.safe_load_all((DEPLOY / "k8s" / manifest).read_text()) if d["kind"] == kind)
        (init,) = pod["spec"]["template"]["spec"]["initContainers"]
        assert init["envFrom"] == [{"secretRef": {"name": "gridrender"}}] and init["command"] == ["/bin/sh", "-c"]
        refused = shell(init["args"][0], secret)
        assert refused.returncode == 1 and "change-me placeholder" in refused.stderr, (manifest, refused.stderr)
        assert shell(init["args"][0], real).returncode == 0, manifest
        assert shell(init["args"][0], {**real, "AWS_SECRET_ACCESS_KEY": "ChangeMe"}).returncode == 1
    redis_pod = next(d for d in yaml.safe_load_all((DEPLOY / "k8s" / "redis.yaml").read_text()) if d["kind"] == "StatefulSet")
    start = redis_pod["spec"]["template"]["spec"]["containers"][0]["args"][2]
    refused = shell(start, {"REDIS_PASSWORD": secret["REDIS_PASSWORD"]})
    assert refused.returncode == 1 and "placeholder" in refused.stderr
    started = shell(start.replace("exec redis-server", "echo would run redis-server"), {"REDIS_PASSWORD": real["REDIS_PASSWORD"]})
    assert started.returncode == 0 and "--requirepass r3dis-password-long" in started.stdout
