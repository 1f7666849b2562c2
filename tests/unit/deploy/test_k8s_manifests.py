"""The Kubernetes manifests of deploy/k8s, checked offline.

Every document validates against the Kubernetes OpenAPI schemas that `kubernetes-validate` ships
(strict: an unknown or misspelt field fails, as `kubectl apply --validate=strict` would), in the
plain base files and in both rendered variants (base = GPU, cpu/ overlay; rendered with
`kubectl kustomize` where kubectl is installed). Then the parts must agree with each other and
with the code: the Service selects the learner's pods, clients dial the Service on the ports the
run TOML sets, every container's command line parses with the real `or1` CLI and its `--set`
overrides validate with the ConfigMap's TOML through `common.config.load_config`, the Secret's
`items` lay out exactly the files `bus.auth` reads for each role, and the probes read the health
file the containers are told to write.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import pytest

kv = pytest.importorskip("kubernetes_validate",
                         reason="kubernetes-validate is not installed (pip install -e '.[test]')")
yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (kubernetes-validate needs it)")

from kubernetes_validate.utils import SchemaNotFoundError, ValidationError  # noqa: E402

from common.config import Config, load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
K8S = ROOT / "deploy" / "k8s"
BASE = K8S / "base"
K8S_VERSION = "1.31"  # the schemas checked against (kubernetes-validate bundles 1.25 .. 1.37)
SECRET = "or1-curve"
KEYS_DIR = "/etc/or1/keys"
RUN_TOML = "/etc/or1/run.toml"
WORKLOADS = ("StatefulSet", "Deployment")


# --- loading --------------------------------------------------------------------------------------


def load_yaml_docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def base_files() -> list[Path]:
    return sorted(p for p in BASE.glob("*.yaml") if p.name != "kustomization.yaml")


def plain_docs() -> list[dict]:
    return [d for p in base_files() for d in load_yaml_docs(p.read_text())]


def rendered(variant: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: cannot render the kustomize variants "
                    "(the plain base files are still checked)")
    out = subprocess.run([kubectl, "kustomize", str(K8S / variant)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize deploy/k8s/{variant} failed:\n{out.stderr}"
    return load_yaml_docs(out.stdout)


@pytest.fixture(params=["plain", "base", "cpu"])
def fleet(request) -> tuple[str, list[dict]]:
    """(variant, documents): the base files as written, and both variants as kustomize renders them."""
    return request.param, plain_docs() if request.param == "plain" else rendered(request.param)


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def containers(docs: list[dict]) -> list[tuple[dict, dict]]:
    """(workload, container) for every container of every StatefulSet and Deployment."""
    return [(w, c) for w in docs if w["kind"] in WORKLOADS for c in w["spec"]["template"]["spec"]["containers"]]


def run_toml(docs: list[dict]) -> str:
    return one(docs, "ConfigMap", "or1-run")["data"]["run.toml"]


def run_config(docs: list[dict], tmp_path: Path, overrides: list[str] = ()) -> Config:
    path = tmp_path / "run.toml"
    path.write_text(run_toml(docs))
    return load_config(path, list(overrides))


def sets(args: list[str]) -> list[str]:
    """The values of every `--set KEY=VALUE` in a command line."""
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("--set", "-s")]


def flag(args: list[str], name: str) -> str:
    assert name in args, f"{name} missing from {args}"
    return args[args.index(name) + 1]


def validation_errors(doc: dict) -> str | None:
    """None if `doc` validates (strict) against the Kubernetes schemas, else the error."""
    try:
        kv.validate(doc, K8S_VERSION, strict=True)
    except ValidationError as e:
        return f"{'.'.join(str(p) for p in e.path)}: {e.message}"
    except SchemaNotFoundError as e:  # a kind Kubernetes does not know is an error here, not a warning
        return e.message
    return None


# --- schema -------------------------------------------------------------------------------------


def test_every_document_validates_against_the_kubernetes_schemas(fleet):
    variant, docs = fleet
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "Deployment", "Deployment", "NetworkPolicy", "Service", "StatefulSet"], kinds
    errors = {f"{d['kind']}/{d['metadata']['name']}": validation_errors(d) for d in docs}
    assert not {k: v for k, v in errors.items() if v}, f"{variant}: {errors}"


@pytest.mark.parametrize("mutate, where", [
    (lambda s: s["spec"]["template"]["spec"].__setitem__(  # a misspelt field
        "terminationGracePeriodSecond", s["spec"]["template"]["spec"].pop("terminationGracePeriodSeconds")), ""),
    (lambda s: s["spec"].__setitem__("replicas", "1"), "spec.replicas"),  # a string for an integer
    (lambda s: s["spec"]["template"]["spec"]["containers"][0].pop("name"), "spec.template.spec.containers.0"),
], ids=["misspelt-field", "wrong-type", "missing-required"])
def test_a_broken_manifest_fails_validation(mutate, where):
    """The validation can fail: a typo, a wrong type and a missing required field are each caught."""
    learner = copy.deepcopy(one(plain_docs(), "StatefulSet", "or1-learner"))
    assert validation_errors(learner) is None
    mutate(learner)
    error = validation_errors(learner)
    assert error is not None and error.startswith(where), error


def test_the_kustomization_lists_every_base_manifest():
    kust = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    assert sorted(kust["resources"]) == [p.name for p in base_files()]


# --- the pieces agree -----------------------------------------------------------------------------


def test_the_service_selects_the_learner_pods_on_the_configured_ports(fleet, tmp_path):
    _, docs = fleet
    cfg = run_config(docs, tmp_path)
    svc = one(docs, "Service", "or1-learner")
    sts = one(docs, "StatefulSet", "or1-learner")
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"]
    assert sts["spec"]["replicas"] == 1
    assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert svc["spec"]["selector"].items() <= labels.items()
    for w in docs:  # the selector picks no other pod
        if w["kind"] in WORKLOADS and w is not sts:
            assert not svc["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()
    container_ports = {p["name"]: p["containerPort"] for p in sts["spec"]["template"]["spec"]["containers"][0]["ports"]}
    service_ports = {p["name"]: (p["port"], container_ports[p["targetPort"]]) for p in svc["spec"]["ports"]}
    want = cfg.learner.control_port, cfg.learner.weights_port
    assert service_ports == {"control": (want[0], want[0]), "weights": (want[1], want[1])}


def test_clients_dial_the_service_and_the_learner_advertises_it(fleet, tmp_path):
    _, docs = fleet
    cfg = run_config(docs, tmp_path)
    svc = one(docs, "Service", "or1-learner")["metadata"]["name"]
    by_role = {w["metadata"]["name"]: c for w, c in containers(docs)}
    assert flag(by_role["or1-learner"]["args"], "--advertise") == svc
    for name in ("or1-actor", "or1-reward"):
        assert flag(by_role[name]["args"], "--learner") == f"tcp://{svc}:{cfg.learner.control_port}"
    assert flag(by_role["or1-actor"]["args"], "--relay-bind") == "tcp://*:5557"
    assert {p["containerPort"] for p in by_role["or1-actor"]["ports"]} == {5557}


def command_lines(docs: list[dict]) -> list[list[str]]:
    """Every `or1 ...` command line: containers (command + args) and exec probes."""
    lines = []
    for _, c in containers(docs):
        lines.append(c.get("command", []) + c.get("args", []))
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            cmd = c.get(probe, {}).get("exec", {}).get("command", [])
            if cmd[:1] == ["or1"]:
                lines.append(cmd)
    return lines


def test_every_command_line_parses_with_the_or1_cli(fleet):
    """Each flag exists on its subcommand (parsed by the real CLI, nothing run)."""
    import click
    from typer.main import get_command

    from deploy.cli import app

    _, docs = fleet
    group = get_command(app)
    lines = command_lines(docs)
    assert sorted(line[1] for line in lines) == ["actor", "learner", "reward", "status"]
    for line in lines:
        assert line[0] == "or1", line
        cmd = group.get_command(None, line[1])
        assert cmd is not None, f"or1 has no command {line[1]!r}"
        try:
            cmd.make_context(line[1], list(line[2:]))
        except click.ClickException as e:
            pytest.fail(f"{' '.join(line)}: {e.format_message()}")


def test_the_run_toml_and_every_set_override_validate(fleet, tmp_path):
    """The ConfigMap's TOML loads through common.config (every key in the schema), and so does it
    with each command line's --set overrides applied, as the pod will do."""
    _, docs = fleet
    cfg = run_config(docs, tmp_path)
    for line in command_lines(docs):
        assert flag(line, "--config") == RUN_TOML
        over = run_config(docs, tmp_path, sets(line))
        assert over.bus.curve_dir == KEYS_DIR, line
    assert cfg.learner.run_dir.startswith("/"), "the run directory must be an absolute path on the volume"


def test_the_run_directory_is_on_the_claimed_volume(fleet, tmp_path):
    """Checkpoints outlive the pod: the run directory is under the volumeClaimTemplate's mount,
    and the learner resumes (which, with no checkpoint yet, starts fresh)."""
    from learner.checkpoint import latest_checkpoint

    _, docs = fleet
    sts = one(docs, "StatefulSet", "or1-learner")
    claims = {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
    c = sts["spec"]["template"]["spec"]["containers"][0]
    mounts = [m["mountPath"] for m in c["volumeMounts"] if m["name"] in claims]
    run_dir = run_config(docs, tmp_path).learner.run_dir
    assert any(Path(run_dir).is_relative_to(m) for m in mounts), (run_dir, mounts)
    assert "--resume" in c["args"]
    assert latest_checkpoint(tmp_path / "empty-run") is None


def test_every_mount_has_its_volume_and_the_configmap_its_key(fleet):
    _, docs = fleet
    maps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    for w, c in containers(docs):
        name = w["metadata"]["name"]
        volumes = {v["name"]: v for v in w["spec"]["template"]["spec"]["volumes"]}
        claims = {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
        for m in c["volumeMounts"]:
            assert m["name"] in volumes.keys() | claims, f"{name}: mount {m['name']!r} has no volume"
        config_mounts = [m for m in c["volumeMounts"] if "configMap" in volumes.get(m["name"], {})]
        assert [m["mountPath"] for m in config_mounts] == [RUN_TOML], name
        for m in config_mounts:
            data = maps[volumes[m["name"]]["configMap"]["name"]]
            assert m["subPath"] in data and m.get("readOnly") is True, name


def test_the_model_path_is_the_one_the_images_build(tmp_path):
    model = run_config(plain_docs(), tmp_path).learner.model
    for dockerfile in ("Dockerfile.cpu", "Dockerfile.gpu"):
        assert f"or1 tiny-model {model}" in (ROOT / "deploy" / "docker" / dockerfile).read_text(), dockerfile


# --- the CurveZMQ Secret ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    """Keys made as the README says (`or1 keys keys/`)."""
    from bus.auth import make_layout

    d = tmp_path_factory.mktemp("keys")
    make_layout(d, ["actor", "reward", "admin"])
    return d


def secret_data(keys: Path) -> dict[str, Path]:
    """The Secret `kubectl create secret generic or1-curve --from-file=keys/ --from-file=keys/clients/`
    makes: one entry per regular file of each directory (subdirectories are skipped), by file name."""
    data: dict[str, Path] = {}
    for d in (keys, keys / "clients"):
        for f in sorted(p for p in d.iterdir() if p.is_file()):
            assert f.name not in data, f"{f.name} twice: --from-file would refuse it"
            data[f.name] = f
    return data


def test_the_readme_secret_validates(keys):
    import base64

    data = secret_data(keys)
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": SECRET}, "type": "Opaque",
              "data": {k: base64.b64encode(p.read_bytes()).decode() for k, p in data.items()}}
    assert validation_errors(secret) is None
    readme = (K8S / "README.md").read_text()
    assert f"kubectl create secret generic {SECRET} --from-file=keys/ --from-file=keys/clients/" in readme


def materialise(keys: Path, volume: dict, into: Path) -> Path:
    """Lay the Secret's items out as the kubelet would: each key at its `path` under the mount, with
    the volume's defaultMode (the learner refuses secret keys other users can read)."""
    data = secret_data(keys)
    for item in volume["secret"]["items"]:
        assert item["key"] in data, f"Secret {SECRET} has no key {item['key']!r} (keys: {sorted(data)})"
        target = into / item["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data[item["key"]].read_bytes())
        target.chmod(item.get("mode", volume["secret"]["defaultMode"]))
    return into


def keys_volume(w: dict, c: dict) -> dict:
    volumes = {v["name"]: v for v in w["spec"]["template"]["spec"]["volumes"]}
    mounts = [m for m in c["volumeMounts"] if m["mountPath"] == KEYS_DIR]
    assert len(mounts) == 1 and mounts[0].get("readOnly") is True, w["metadata"]["name"]
    volume = volumes[mounts[0]["name"]]
    assert volume["secret"]["secretName"] == SECRET
    return volume


def test_each_role_gets_the_keys_bus_auth_reads_and_no_more(fleet, keys, tmp_path):
    import zmq.auth

    from bus.auth import client_curve, server_curve
    from bus.messages import ROLE_ACTOR, ROLE_ADMIN, ROLE_REWARD

    _, docs = fleet
    public = {name: zmq.auth.load_certificate(keys / "clients" / f"{name}.key")[0]
              for name in ("actor", "reward", "admin")}
    by_role = {w["metadata"]["name"]: (w, c) for w, c in containers(docs)}
    laid = {name: materialise(keys, keys_volume(*wc), tmp_path / name) for name, wc in by_role.items()}
    for name, (w, c) in by_role.items():
        mode = keys_volume(w, c)["secret"]["defaultMode"]
        assert mode & 0o077 in (0, 0o040), f"{name}: Secret files readable by others (mode {mode:o})"

    def secret_of(path: str) -> bytes:
        _, sec = zmq.auth.load_certificate(path)
        assert sec is not None, f"{path} holds no secret key"
        return sec

    # The learner: its own key pair, and an allow-list of exactly the three clients' public keys.
    srv = server_curve(str(laid["or1-learner"]))
    secret_of(srv.secret_key_file)
    assert set(zmq.auth.load_certificates(srv.allowed_clients_dir)) == set(public.values())
    secret_of(client_curve(str(laid["or1-learner"]), ROLE_ADMIN).secret_key_file)  # its liveness probe
    # An actor: its key pair, the server's public key, and (relaying) the server's pair.
    act = client_curve(str(laid["or1-actor"]), ROLE_ACTOR)
    secret_of(act.secret_key_file)
    zmq.auth.load_certificate(act.server_public_key_file)
    secret_of(server_curve(str(laid["or1-actor"])).secret_key_file)
    # A reward worker: its key pair and the server's public key only.
    rew = client_curve(str(laid["or1-reward"]), ROLE_REWARD)
    secret_of(rew.secret_key_file)
    zmq.auth.load_certificate(rew.server_public_key_file)
    held = {p.relative_to(laid["or1-reward"]).as_posix() for p in laid["or1-reward"].rglob("*") if p.is_file()}
    assert held == {"server.key", "clients/reward.key", "clients/reward.key_secret"}


# --- probes, resources, images, network ----------------------------------------------------------------


def test_probes_read_what_the_containers_write(fleet):
    _, docs = fleet
    for w, c in containers(docs):
        name = w["metadata"]["name"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert probe in c, f"{name} has no {probe}"
        if name == "or1-learner":
            assert c["readinessProbe"]["tcpSocket"]["port"] == "control"
            assert c["startupProbe"]["tcpSocket"]["port"] == "control"
            assert flag(c["livenessProbe"]["exec"]["command"], "--learner") == "tcp://127.0.0.1:5555"
            # `or1 status` gives up after 10 s: the probe must wait longer than that for its answer
            assert c["livenessProbe"]["timeoutSeconds"] > 10
            continue
        path = health_file(c)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert path in " ".join(c[probe]["exec"]["command"]), f"{name} {probe} reads another file"


def health_file(c: dict) -> str:
    paths = [s.split("=", 1)[1] for s in sets(c["args"]) if s.startswith("bus.health_file=")]
    assert len(paths) == 1, f"{c['name']}: expected one --set bus.health_file=..., got {paths}"
    return paths[0]


def probe_shell(c: dict, probe: str) -> str:
    return c[probe]["exec"]["command"][-1]


@pytest.mark.parametrize("age_s, readiness_ok, liveness_ok", [(5, True, True), (120, False, True), (900, False, False)])
def test_the_health_probes_judge_the_files_age(fleet, tmp_path, age_s, readiness_ok, liveness_ok):
    """Run the probes' shell commands (GNU date and stat, as in the images) on a file of a given age."""
    import os
    import time

    _, docs = fleet
    local = tmp_path / "health"
    for w, c in containers(docs):
        if w["metadata"]["name"] == "or1-learner":
            continue
        path = health_file(c)
        local.touch()
        os.utime(local, (time.time() - age_s, time.time() - age_s))
        for probe, ok in (("readinessProbe", readiness_ok), ("livenessProbe", liveness_ok)):
            cmd = probe_shell(c, probe).replace(path, str(local))
            passed = subprocess.run(["sh", "-c", cmd], timeout=10).returncode == 0
            assert passed is ok, (w["metadata"]["name"], probe, age_s)
        local.unlink()
        cmd = probe_shell(c, "livenessProbe").replace(path, str(local))
        assert subprocess.run(["sh", "-c", cmd], capture_output=True, timeout=10).returncode != 0  # no file: not alive


def test_gpu_requests_in_the_gpu_variant_and_none_in_the_cpu_variant(fleet):
    variant, docs = fleet
    gpu = variant != "cpu"
    for w, c in containers(docs):
        name, res = w["metadata"]["name"], c["resources"]
        assert c["image"] == ("or1:gpu" if gpu else "or1:cpu"), name
        assert {"cpu", "memory"} <= res["requests"].keys(), name
        assert "memory" in res["limits"], name
        wants_gpu = gpu and name in ("or1-learner", "or1-actor")
        for part in ("requests", "limits"):
            assert (res[part].get("nvidia.com/gpu") == 1) is wants_gpu, (name, part)


def test_only_the_reward_worker_runs_as_root(fleet):
    _, docs = fleet
    for w, c in containers(docs):
        pod = w["spec"]["template"]["spec"].get("securityContext", {})
        sc = {**pod, **c.get("securityContext", {})}
        if w["metadata"]["name"] == "or1-reward":
            assert sc["runAsUser"] == 0 and "SYS_ADMIN" in sc["capabilities"]["add"]
            assert sc["capabilities"]["drop"] == ["ALL"]
        else:
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001 and sc["fsGroup"] == 10001


def test_reward_pods_may_reach_only_the_learner_and_dns(fleet, tmp_path):
    _, docs = fleet
    pol = one(docs, "NetworkPolicy", "or1-reward-egress")
    reward = one(docs, "Deployment", "or1-reward")["spec"]["template"]["metadata"]["labels"]
    learner = one(docs, "StatefulSet", "or1-learner")["spec"]["template"]["metadata"]["labels"]
    assert pol["spec"]["podSelector"]["matchLabels"].items() <= reward.items()
    assert pol["spec"]["policyTypes"] == ["Egress"]
    to_learner, to_dns = pol["spec"]["egress"]
    assert to_learner["to"][0]["podSelector"]["matchLabels"].items() <= learner.items()
    assert to_learner["ports"] == [{"protocol": "TCP", "port": run_config(docs, tmp_path).learner.control_port}]
    assert {p["port"] for p in to_dns["ports"]} == {53}
