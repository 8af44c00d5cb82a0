"""deploy/kubernetes: every manifest is valid for the Kubernetes API (strict schemas: an unknown
or misspelt field fails), kustomization.yaml lists exactly the manifests there are, and what the
DaemonSet tells p2pimg is what p2pimg accepts: its arguments and config.toml go through the real
parser and config loader, and the init container's script runs for real, writing the hosts.toml
files `p2pimg containerd-config` makes.

There is no cluster here: nothing is applied, and nothing checks that containerd pulls through
the mirror on a real node (tests/integration/test_clients.py does that for containerd itself).
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from p2pimg.cli.clientconfig import containerd_hosts_toml
from p2pimg.cli.commands import _config
from p2pimg.cli.main import build_parser
from p2pimg.node.config import Config, parse_listen
from p2pimg.sources.upstream.refs import canonical_hub, registry_base

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSIONS = ["1.31.0", "1.33.0"]  # what the manifests must be valid for
NAMESPACE = "p2pimg"
HOST_IP = "10.1.2.3"  # what the kubelet puts in $(HOST_IP) on some node


def manifests() -> dict[str, list[dict[str, Any]]]:
    """Every YAML file of deploy/kubernetes but kustomization.yaml, by name: its documents."""
    found = {}
    for path in sorted(DEPLOY.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            found[path.name] = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    return found


def resources() -> list[dict[str, Any]]:
    return [doc for docs in manifests().values() for doc in docs]


def one(kind: str) -> dict[str, Any]:
    (found,) = [doc for doc in resources() if doc["kind"] == kind]
    return found


def kustomization() -> dict[str, Any]:
    doc = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert isinstance(doc, dict)
    return doc


def pod_spec() -> dict[str, Any]:
    spec = one("DaemonSet")["spec"]["template"]["spec"]
    assert isinstance(spec, dict)
    return spec


def container(name: str) -> dict[str, Any]:
    spec = pod_spec()
    (found,) = [c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == name]
    return found


def env(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


def expand(arg: str, variables: dict[str, str]) -> str:
    """$(VAR) as the kubelet expands it in a container's command and args."""
    return re.sub(r"\$\((\w+)\)", lambda m: variables[m.group(1)], arg)


def serve_config(tmp_path: Path, args: list[str] | None = None) -> Config:
    """The configuration `p2pimg serve` would run with on a node: the DaemonSet's arguments,
    parsed by p2pimg's own parser, over a home holding the ConfigMap's config.toml."""
    main = container("p2pimg")
    assert "command" not in main, "the image's entrypoint (p2pimg) runs the arguments"
    argv = [expand(a, {"HOST_IP": HOST_IP}) for a in (main["args"] if args is None else args)]
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text((DEPLOY / "config.toml").read_text())
    parsed = build_parser().parse_args([*argv, "--home", str(home)])
    assert parsed.command == "serve"
    return _config(parsed)


# --- the Kubernetes API -----------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_is_valid_for_the_api_with_no_unknown_field(version: str) -> None:
    found = manifests()
    assert set(found) >= {"namespace.yaml", "serviceaccount.yaml", "service.yaml", "daemonset.yaml"}
    for name, docs in found.items():
        assert docs, f"{name} holds no resource"
        for doc in docs:
            kubernetes_validate.validate(doc, version, strict=True)  # raises ValidationError


def test_the_validation_can_fail() -> None:
    daemonset = one("DaemonSet")
    kubernetes_validate.validate(daemonset, KUBERNETES_VERSIONS[-1], strict=True)
    misspelt = copy.deepcopy(daemonset)
    misspelt["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    wrong_type = copy.deepcopy(daemonset)
    wrong_type["spec"]["template"]["spec"]["hostNetwork"] = "yes"
    for bad in (misspelt, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, KUBERNETES_VERSIONS[-1], strict=True)


def test_kustomization_lists_exactly_the_manifests_and_generates_the_config() -> None:
    k = kustomization()
    assert k["kind"] == "Kustomization" and k["namespace"] == NAMESPACE
    assert sorted(k["resources"]) == sorted(manifests()), "resources must name every manifest, and only those"
    assert len(set(k["resources"])) == len(k["resources"])
    (generator,) = k["configMapGenerator"]
    assert generator["files"] == ["config.toml"] and (DEPLOY / "config.toml").is_file()
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    assert volumes["config"]["configMap"]["name"] == generator["name"]
    # Everything is in the namespace, named or left to kustomize, and the images are one image.
    for doc in resources():
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace", NAMESPACE) == NAMESPACE, doc["metadata"]
    images = {c["image"].rpartition(":")[0] for c in pod_spec()["containers"] + pod_spec()["initContainers"]}
    assert images == {image["name"] for image in k["images"]} == {"ghcr.io/p2pimg/p2pimg"}


# --- what p2pimg is told ----------------------------------------------------------------------------


def test_the_daemonset_arguments_and_config_toml_are_what_p2pimg_accepts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("P2PIMG_MDNS", raising=False)  # the tests' own setting, not the pods'
    config = serve_config(tmp_path)
    service = one("Service")
    peer_port = service["spec"]["ports"][0]["port"]
    assert config.listen == "127.0.0.1:5050"  # the node's loopback, where its containerd looks
    assert parse_listen(config.peer_listen or "") == (HOST_IP, peer_port)
    fqdn = f"{service['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
    assert config.peer_dns == ((fqdn, peer_port),)
    assert config.upstreams == ("https://registry-1.docker.io", "https://ghcr.io")
    assert config.cache_max == 20 << 30 and config.mdns  # mDNS too, as an alternative
    # The swarm key file is the Secret's, where it is mounted.
    main = container("p2pimg")
    mounts = {m["name"]: m for m in main["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    (item,) = volumes["swarm-key"]["secret"]["items"]
    assert config.swarm_key_file == f"{mounts['swarm-key']['mountPath']}/{item['path']}"
    # ... which the README's command makes, with that key.
    secret = volumes["swarm-key"]["secret"]["secretName"]
    command = f"kubectl -n {NAMESPACE} create secret generic {secret} --from-file={item['key']}="
    assert command in (ROOT / "README.md").read_text()
    # The home is the cache's host directory, and config.toml lands in it.
    assert env(main)["P2PIMG_HOME"] == mounts["home"]["mountPath"] == str(volumes["home"]["hostPath"]["path"])
    assert mounts["config"]["mountPath"] == f"{env(main)['P2PIMG_HOME']}/config.toml"


def test_config_toml_uses_only_keys_p2pimg_reads() -> None:
    source = (ROOT / "p2pimg" / "node" / "config.py").read_text()
    known = set(re.findall(r"file_values\.get\(\"(\w+)\"", source)) | {
        "peer_tls_cert",
        "peer_tls_key",
        "peer_tls_ca",
    }
    used = set(tomllib.loads((DEPLOY / "config.toml").read_text()))
    assert used <= known, f"config.toml keys p2pimg ignores: {sorted(used - known)}"


def test_the_argument_check_can_fail(tmp_path: Path) -> None:
    args = container("p2pimg")["args"]
    with pytest.raises(SystemExit):  # argparse: unknown option
        serve_config(tmp_path, [*args, "--cache-maximum=1G"])
    from p2pimg.errors import InvalidInput

    with pytest.raises(InvalidInput):  # the config loader: not HOST:PORT
        serve_config(tmp_path, [a.replace(":5051", "") for a in args])


def test_the_network_the_probes_and_the_peer_port_fit_together() -> None:
    spec = pod_spec()
    assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["tolerations"] == [{"operator": "Exists"}]
    main = container("p2pimg")
    listen = next(a.partition("=")[2] for a in main["args"] if a.startswith("--listen="))
    host, port = parse_listen(listen)
    for probe in (main["readinessProbe"], main["livenessProbe"]):
        assert probe["httpGet"] == {"host": host, "port": port, "path": "/v2/"}
    service = one("Service")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= spec_labels().items()
    (peer,) = main["ports"]
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] == peer["name"] and service_port["port"] == peer["containerPort"]


def spec_labels() -> dict[str, str]:
    labels = one("DaemonSet")["spec"]["template"]["metadata"]["labels"]
    assert isinstance(labels, dict)
    return labels


def test_the_containers_run_as_tightly_as_their_jobs_allow() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER 10001:10001$", dockerfile, re.M)
    assert re.search(r'^ENTRYPOINT \["p2pimg"\]$', dockerfile, re.M)
    spec = pod_spec()
    assert (
        spec["automountServiceAccountToken"] is False
        and spec["serviceAccountName"] == one("ServiceAccount")["metadata"]["name"]
    )
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in spec["containers"] + spec["initContainers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"] and not sc.get("privileged"), c["name"]
        assert set(c["resources"]["limits"]) == {"cpu", "memory"}, c["name"]
    main = container("p2pimg")["securityContext"]
    assert main["runAsUser"] == main["runAsGroup"] == 10001 and main["runAsNonRoot"] is True
    assert "add" not in main["capabilities"]
    assert container("containerd-hosts")["securityContext"]["capabilities"] == {"drop": ["ALL"]}


# --- the init container that writes containerd's hosts.toml -----------------------------------------


def run_init_script(certs_d: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    init = container("containerd-hosts")
    assert init["command"][:2] == ["/bin/sh", "-c"]
    bin_dir = tmp_path / "bin"  # `p2pimg` on PATH, as in the image: this checkout's
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "p2pimg").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m p2pimg "$@"\n')
    (bin_dir / "p2pimg").chmod(0o755)
    variables = {**env(init), "CERTS_D": str(certs_d), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return subprocess.run(
        ["/bin/sh", "-c", init["command"][2]], env=variables, capture_output=True, text=True, timeout=120
    )


def test_the_init_container_writes_a_hosts_toml_per_mirrored_registry(tmp_path: Path) -> None:
    init = container("containerd-hosts")
    variables = env(init)
    registries = variables["REGISTRIES"].split()
    # One per upstream, named as containerd names registries, and the mirror is the registry.
    upstream_hosts = [canonical_hub(registry_base(u)[1]) for u in serve_config(tmp_path).upstreams]
    assert registries == upstream_hosts == ["docker.io", "ghcr.io"]
    assert variables["MIRROR"] == f"http://{serve_config(tmp_path).listen}"
    mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    assert (
        variables["CERTS_D"] == mounts["containerd-certs"] == volumes["containerd-certs"]["hostPath"]["path"]
    )

    certs_d = tmp_path / "certs.d"
    result = run_init_script(certs_d, tmp_path)
    assert result.returncode == 0, result.stderr
    for registry in registries:
        written = (certs_d / registry / "hosts.toml").read_text()
        assert written == containerd_hosts_toml(registry, variables["MIRROR"])
        hosts = tomllib.loads(written)
        assert hosts["host"] == {"http://127.0.0.1:5050": {"capabilities": ["pull", "resolve"]}}
    assert tomllib.loads((certs_d / "docker.io" / "hosts.toml").read_text())["server"] == (
        "https://registry-1.docker.io"
    )
    assert sorted(p.name for p in certs_d.iterdir()) == registries
    assert not list(certs_d.rglob("*.tmp"))

    # Again (a restarted pod): the same files. A hosts.toml the operator wrote is left alone.
    theirs = 'server = "https://ghcr.io"\n[host."https://their-mirror.example"]\n'
    (certs_d / "ghcr.io" / "hosts.toml").write_text(theirs)
    result = run_init_script(certs_d, tmp_path)
    assert result.returncode == 0, result.stderr
    assert (certs_d / "ghcr.io" / "hosts.toml").read_text() == theirs
    assert "ghcr.io/hosts.toml was not written by p2pimg" in result.stderr
    assert (certs_d / "docker.io" / "hosts.toml").read_text() == containerd_hosts_toml(
        "docker.io", variables["MIRROR"]
    )
