"""JSON schemas for the custom resources in deploy/k8s, written from their documentation (the
Kubernetes schemas that kubernetes-validate ships have no CRDs):
- KEDA 2.x: ScaledObject and TriggerAuthentication ("ScaledObject specification",
  "Authentication"), and the PostgreSQL scaler's trigger fields ("Scalers: PostgreSQL").
- Prometheus Operator monitoring.coreos.com/v1: PodMonitor and PrometheusRule (API reference).
Unknown fields are rejected (additionalProperties: false), as `kubectl apply` with server-side
field validation would.
"""
from __future__ import annotations

STR = {"type": "string"}
INT = {"type": "integer"}
BOOL = {"type": "boolean"}
STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
ANY_OBJECT = {"type": "object"}


def obj(properties: dict, required: tuple = ()) -> dict:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


METADATA = obj({"name": STR, "namespace": STR, "labels": STR_MAP, "annotations": STR_MAP}, ("name",))


def resource(api_version: str, kind: str, spec: dict) -> dict:
    return obj({"apiVersion": {"const": api_version}, "kind": {"const": kind}, "metadata": METADATA, "spec": spec},
               ("apiVersion", "kind", "metadata", "spec"))


# --- KEDA --------------------------------------------------------------------------------------
# Trigger metadata and authentication parameters of the postgresql scaler (KEDA 2.12+): metadata
# values are strings (the CRD types them map[string]string).
POSTGRESQL_METADATA = {"query", "targetQueryValue", "activationTargetQueryValue", "connectionFromEnv", "host", "port",
                       "userName", "dbName", "sslmode", "passwordFromEnv"}
POSTGRESQL_AUTH_PARAMETERS = {"connection", "password", "host", "port", "userName", "dbName", "sslmode"}

SCALED_OBJECT = resource("keda.sh/v1alpha1", "ScaledObject", obj({
    "scaleTargetRef": obj({"apiVersion": STR, "kind": STR, "name": STR, "envSourceContainerName": STR}, ("name",)),
    "pollingInterval": {"type": "integer", "minimum": 1},
    "cooldownPeriod": {"type": "integer", "minimum": 0},
    "initialCooldownPeriod": {"type": "integer", "minimum": 0},
    "idleReplicaCount": {"type": "integer", "minimum": 0},
    "minReplicaCount": {"type": "integer", "minimum": 0},
    "maxReplicaCount": {"type": "integer", "minimum": 1},
    "fallback": obj({"failureThreshold": {"type": "integer", "minimum": 1}, "replicas": {"type": "integer", "minimum": 0},
                     "behavior": {"enum": ["static", "currentReplicas", "currentReplicasIfHigher",
                                           "currentReplicasIfLower"]}},
                    ("failureThreshold", "replicas")),
    "advanced": obj({
        "restoreToOriginalReplicaCount": BOOL,
        # behavior is checked against Kubernetes' HorizontalPodAutoscalerBehavior schema separately.
        "horizontalPodAutoscalerConfig": obj({"name": STR, "behavior": ANY_OBJECT}),
        "scalingModifiers": obj({"formula": STR, "target": STR, "activationTarget": STR,
                                 "metricType": {"enum": ["AverageValue", "Value"]}}),
    }),
    "triggers": {"type": "array", "minItems": 1, "items": obj({
        "type": STR,
        "name": STR,
        "metadata": STR_MAP,
        "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
        "useCachedMetrics": BOOL,
        "authenticationRef": obj({"name": STR, "kind": {"enum": ["TriggerAuthentication",
                                                                   "ClusterTriggerAuthentication"]}}, ("name",)),
    }, ("type", "metadata"))},
}, ("scaleTargetRef", "triggers")))

TARGET_REF = obj({"parameter": STR, "name": STR, "key": STR}, ("parameter", "name", "key"))
TRIGGER_AUTHENTICATION = resource("keda.sh/v1alpha1", "TriggerAuthentication", obj({
    "secretTargetRef": {"type": "array", "items": TARGET_REF},
    "configMapTargetRef": {"type": "array", "items": TARGET_REF},
    "env": {"type": "array", "items": obj({"parameter": STR, "name": STR, "containerName": STR}, ("parameter", "name"))},
    "podIdentity": ANY_OBJECT,
    "hashiCorpVault": ANY_OBJECT,
    "azureKeyVault": ANY_OBJECT,
    "awsSecretManager": ANY_OBJECT,
    "gcpSecretManager": ANY_OBJECT,
    "boundServiceAccountToken": {"type": "array"},
}))

# --- Prometheus Operator -----------------------------------------------------------------------
RELABEL = obj({
    "sourceLabels": {"type": "array", "items": STR}, "separator": STR, "targetLabel": STR, "regex": STR,
    "modulus": INT, "replacement": STR,
    "action": {"enum": ["replace", "keep", "drop", "hashmod", "labelmap", "labeldrop", "labelkeep", "lowercase",
                        "uppercase", "keepequal", "dropequal", "Replace", "Keep", "Drop", "HashMod", "LabelMap",
                        "LabelDrop", "LabelKeep", "Lowercase", "Uppercase", "KeepEqual", "DropEqual"]},
})
DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
POD_MONITOR = resource("monitoring.coreos.com/v1", "PodMonitor", obj({
    "jobLabel": STR,
    "podTargetLabels": {"type": "array", "items": STR},
    "selector": ANY_OBJECT,  # a LabelSelector: checked against Kubernetes' schema separately
    "namespaceSelector": obj({"any": BOOL, "matchNames": {"type": "array", "items": STR}}),
    "sampleLimit": INT, "targetLimit": INT, "labelLimit": INT, "labelNameLengthLimit": INT,
    "labelValueLengthLimit": INT, "attachMetadata": ANY_OBJECT, "scrapeClass": STR,
    "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": obj({
        "port": STR, "portNumber": INT, "targetPort": {"type": ["string", "integer"]}, "path": STR,
        "scheme": {"enum": ["http", "https"]}, "params": ANY_OBJECT, "interval": DURATION,
        "scrapeTimeout": DURATION, "honorLabels": BOOL, "honorTimestamps": BOOL,
        "trackTimestampsStaleness": BOOL, "relabelings": {"type": "array", "items": RELABEL},
        "metricRelabelings": {"type": "array", "items": RELABEL}, "basicAuth": ANY_OBJECT,
        "bearerTokenSecret": ANY_OBJECT, "authorization": ANY_OBJECT, "oauth2": ANY_OBJECT,
        "tlsConfig": ANY_OBJECT, "proxyUrl": STR, "followRedirects": BOOL, "enableHttp2": BOOL,
        "filterRunning": BOOL,
    })},
}, ("selector",)))

PROMETHEUS_RULE = resource("monitoring.coreos.com/v1", "PrometheusRule", obj({
    "groups": {"type": "array", "items": obj({
        "name": STR, "interval": DURATION, "query_offset": DURATION, "limit": INT, "labels": STR_MAP,
        "partial_response_strategy": STR,
        "rules": {"type": "array", "minItems": 1, "items": {
            **obj({"alert": STR, "record": STR, "expr": {"type": ["string", "integer"]}, "for": DURATION,
                   "keep_firing_for": DURATION, "labels": STR_MAP, "annotations": STR_MAP}, ("expr",)),
            "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
        }},
    }, ("name", "rules"))},
}))

SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): SCALED_OBJECT,
    ("keda.sh/v1alpha1", "TriggerAuthentication"): TRIGGER_AUTHENTICATION,
    ("monitoring.coreos.com/v1", "PodMonitor"): POD_MONITOR,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE,
}
