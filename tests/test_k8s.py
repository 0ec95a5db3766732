"""The Kubernetes manifests: valid offline, and saying what the service needs.

``make k8s-validate`` runs ``scripts/k8s_validate.py`` (schema validation of every rendered
object). These tests check that the validator really fails on broken manifests, and what
the schemas cannot: 2+ replicas, a non-root read-only pod, the three probes on the
service's own endpoints, a grace period that covers preStop + drain, the provider key as
a mounted file where the ConfigMap points, and a ConfigMap the service itself accepts.
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from service.__main__ import DRAIN_MARGIN_S
from service.settings import Settings

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "k8s"
OVERLAYS = ["base", "overlays/dev", "overlays/production"]


def _load_validator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("k8s_validate", REPO / "scripts/k8s_validate.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


validator = _load_validator()


def rendered(overlay: str) -> dict[tuple[str, str], dict[str, Any]]:
    return {validator.key(obj): obj for obj in validator.render(K8S / overlay)}


def gateway(objects: Mapping[tuple[str, str], dict[str, Any]]) -> tuple[dict[str, Any], Any]:
    deployment = objects[("Deployment", "sluice")]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return deployment, container


class Recording(dict[str, str]):
    """An environment that remembers every variable the settings asked for."""

    def __init__(self, values: Mapping[str, str]) -> None:
        super().__init__(values)
        self.asked: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.asked.add(key)
        return super().get(key, default)


def test_every_overlay_renders_and_validates() -> None:
    """What ``make k8s-validate`` runs, over the repository's manifests: no problems."""
    assert validator.main(["k8s_validate", str(K8S)]) == 0


@pytest.mark.parametrize(
    ("file", "old", "new"),
    [
        ("base/deployment.yaml", "revisionHistoryLimit: 5", "revisionHistoryLimt: 5"),
        ("base/deployment.yaml", "revisionHistoryLimit: 5", 'revisionHistoryLimit: "five"'),
        ("base/service.yaml", "app.kubernetes.io/component: gateway", "app: nothing"),
        ("base/deployment.yaml", "secretName: sluice-provider", "secretName: typo"),
    ],
    ids=["unknown-field", "wrong-type", "selects-no-pod", "missing-secret"],
)
def test_the_validator_fails_on_a_broken_manifest(
    tmp_path: Path, file: str, old: str, new: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """One broken line in a copy of k8s/: the validator exits 1 and names the problem."""
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    target = copy / file
    text = target.read_text()
    assert old in text
    target.write_text(text.replace(old, new, 1))
    assert validator.main(["k8s_validate", str(copy)]) == 1
    assert "k8s-validate:" in capsys.readouterr().err


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_gateway_pod_is_replicated_locked_down_and_probed(overlay: str) -> None:
    """2+ replicas, requests and limits, non-root read-only, /livez, /readyz and a startup probe."""
    objects = rendered(overlay)
    deployment, container = gateway(objects)
    pod = deployment["spec"]["template"]["spec"]
    assert "replicas" not in deployment["spec"]  # the HPA's to set (2+, below)
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
    assert {"cpu", "memory"} <= container["resources"]["limits"].keys()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["startupProbe"]["httpGet"]["path"] in ("/livez", "/readyz")
    hpa = objects[("HorizontalPodAutoscaler", "sluice")]
    assert hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["scaleTargetRef"]["name"] == "sluice"
    pdb = objects[("PodDisruptionBudget", "sluice")]
    assert pdb["spec"]["maxUnavailable"] == 1
    service = objects[("Service", "sluice")]
    assert service["spec"]["ports"][0]["targetPort"] == container["ports"][0]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_grace_period_covers_prestop_and_the_drain_window(overlay: str) -> None:
    """terminationGracePeriodSeconds >= preStop sleep + SLUICE_DRAIN_S + the close margin,
    so the kubelet never SIGKILLs a replica whose streams are still being checkpointed."""
    objects = rendered(overlay)
    deployment, container = gateway(objects)
    config = objects[("ConfigMap", "sluice-config")]["data"]
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = float(config["SLUICE_DRAIN_S"])
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= pre_stop + drain + DRAIN_MARGIN_S


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_configmap_is_accepted_by_the_service_and_every_key_is_read(
    overlay: str, tmp_path: Path
) -> None:
    """``Settings.from_env`` over the ConfigMap (key files where the Secrets are mounted):
    no error, and no key the service does not read (a typo would be silently ignored)."""
    objects = rendered(overlay)
    _, container = gateway(objects)
    config = dict(objects[("ConfigMap", "sluice-config")]["data"])
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    pod = objects[("Deployment", "sluice")]["spec"]["template"]["spec"]
    secrets = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}
    env = dict(config)
    for variable in ("OPENAI_API_KEY_FILE", "SLUICE_CLIENT_KEYS_FILE"):
        path = config.get(variable) or ""
        if not path:
            continue
        directory, _, name = path.rpartition("/")
        secret = secrets[mounts[directory]]  # the file comes from a Secret mounted there
        assert name in [item["path"] for item in secret["items"]]
        local = tmp_path / name
        local.write_text('{"keys": {}}' if name.endswith(".json") else "sk-test")
        env[variable] = str(local)
    # A URL the pod takes from a Secret (production's Redis) stands in as any URL would.
    from_secrets = {e["name"] for e in container.get("env", ()) if "valueFrom" in e}
    env.update({name: "redis://secret:6379/0" for name in from_secrets if "REDIS" in name})
    recording = Recording(env)
    settings = Settings.from_env(recording)
    assert config.keys() <= recording.asked
    assert settings.shared.redis_url is not None  # replicas > 1 need shared state
    assert settings.shared.redis_failure in ("open", "closed")


def test_production_requires_the_database_secret() -> None:
    """In production a missing database Secret stops the pod from starting, instead of the
    ledger silently going to SQLite on an emptyDir that every rollout wipes."""
    _, container = gateway(rendered("overlays/production"))
    (database,) = [e for e in container["env"] if e["name"] == "SLUICE_DATABASE_URL"]
    assert database["valueFrom"]["secretKeyRef"]["optional"] is False
    _, dev = gateway(rendered("overlays/dev"))
    (dev_database,) = [e for e in dev["env"] if e["name"] == "SLUICE_DATABASE_URL"]
    assert dev_database["valueFrom"]["secretKeyRef"]["optional"] is True
