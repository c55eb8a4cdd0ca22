{{/* Chart name, truncated to the 63 characters a label value may hold. */}}
{{- define "graceful.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-scoped base name of every object: the release name when it already says "graceful". */}}
{{- define "graceful.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "graceful.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "graceful.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "graceful.selectorLabels" -}}
app.kubernetes.io/name: {{ include "graceful.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "graceful.serviceAccountName" -}}
{{- default (printf "%s-operator" (include "graceful.fullname" .)) .Values.serviceAccount.name -}}
{{- end -}}

{{/* Names the operator is told through its environment: one definition each. */}}
{{- define "graceful.operatorDeployment" -}}
{{- printf "%s-operator" (include "graceful.fullname" .) -}}
{{- end -}}
{{- define "graceful.webhookService" -}}
{{- printf "%s-webhook" (include "graceful.fullname" .) -}}
{{- end -}}
{{- define "graceful.webhookConfig" -}}
{{- printf "%s-sidecar-injector" (include "graceful.fullname" .) -}}
{{- end -}}
{{- define "graceful.webhookSecret" -}}
{{- printf "%s-webhook-tls" (include "graceful.fullname" .) -}}
{{- end -}}
{{- define "graceful.webhookCertificate" -}}
{{- printf "%s-webhook" (include "graceful.fullname" .) -}}
{{- end -}}

{{/* An image of the release: (list $ .Values.X.image) -> <image.registry>/<repository>:<tag>,
the tag defaulting to the chart's appVersion. */}}
{{- define "graceful.image" -}}
{{- $root := index . 0 -}}
{{- $registry := required "image.registry is empty: set it to the registry graceful's images are in (a chart pulled from a registry names that registry; make release REGISTRY=... pushes both)" $root.Values.image.registry -}}
{{- printf "%s/%s:%s" (trimSuffix "/" $registry) (index . 1).repository (default $root.Chart.AppVersion $root.Values.image.tag) -}}
{{- end -}}

{{/* rbac.scope, checked: "cluster" (the default) or "namespaces", which needs rbac.namespaces.
Every template that depends on the scope reads it through here, so a bad value fails the render
whichever template Helm renders first. */}}
{{- define "graceful.scope" -}}
{{- $rbac := .Values.rbac | default dict -}}
{{- $scope := $rbac.scope | default "cluster" -}}
{{- if eq $scope "namespaces" -}}
{{- if not $rbac.namespaces -}}
{{- fail "rbac.scope is namespaces but rbac.namespaces is empty: list the namespaces graceful may act in (e.g. --set 'rbac.namespaces={shop,payments}'), or set rbac.scope=cluster" -}}
{{- end -}}
{{- else if ne $scope "cluster" -}}
{{- fail (printf "rbac.scope is %q: it is either cluster (every namespace, through a ClusterRole) or namespaces (only rbac.namespaces, through a Role in each)" $scope) -}}
{{- end -}}
{{- $scope -}}
{{- end -}}

{{/* The namespaces of a namespaced install, each once, comma-separated (GRACEFUL_NAMESPACES);
empty for the cluster scope. */}}
{{- define "graceful.namespaces" -}}
{{- if eq (include "graceful.scope" .) "namespaces" -}}
{{- .Values.rbac.namespaces | uniq | join "," -}}
{{- end -}}
{{- end -}}

{{/* rbac.scope: namespaces: the namespaceSelector expression that consults the webhooks only
in rbac.namespaces (nothing with the cluster scope). */}}
{{- define "graceful.scopeSelector" -}}
{{- with include "graceful.namespaces" . -}}
- key: kubernetes.io/metadata.name
  operator: In
  values:
    {{- range splitList "," . }}
    - {{ . }}
    {{- end }}
{{- end -}}
{{- end -}}

{{/* The Role (and RoleBinding) of the operator in each namespace of rbac.namespaces: not
"<fullname>-operator", the name of its Role in the release namespace (role.yaml), which may be
one of them. */}}
{{- define "graceful.scopedRole" -}}
{{- printf "%s-operator-scoped" (include "graceful.fullname" .) -}}
{{- end -}}

{{/* What the operator needs on namespaced resources, written once: granted in every namespace
by the ClusterRole (rbac.scope: cluster), or by a Role in each of rbac.namespaces (rbac.scope:
namespaces). */}}
{{- define "graceful.namespacedRules" -}}
# The controller: its own resource and status.
- apiGroups: ["graceful.dev"]
  resources: ["gracefulrollouts"]
  verbs: ["get", "list", "watch", "patch", "update"]
- apiGroups: ["graceful.dev"]
  resources: ["gracefulrollouts/status", "gracefulrollouts/finalizers"]
  verbs: ["get", "patch", "update"]
# The controller paces a managed Deployment through its own fields (minReadySeconds,
# strategy, a label and an annotation: docs/rollout.md) and gives a former new ReplicaSet its
# minReadySeconds back; the Deployment controller does all the scaling. The webhook reads
# ReplicaSet -> Deployment to find a Deployment's graceful.dev/inject annotation.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["apps"]
  resources: ["replicasets"]
  verbs: ["get", "list", "watch", "patch"]
# An aborted rollout says so in the Deployment's Progressing condition, so a running
# `kubectl rollout status` fails as it does on a missed progress deadline.
- apiGroups: ["apps"]
  resources: ["deployments/status"]
  verbs: ["patch"]
# The controller reads pod readiness and drains; it never writes pods (ReplicaSets do).
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
# Readiness as the load balancers see it (controller); also what the webhook grants the
# sidecars, which RBAC only allows to a holder of the same permission.
- apiGroups: ["discovery.k8s.io"]
  resources: ["endpointslices"]
  verbs: ["get", "list", "watch"]
# The webhook warns about Services that reach an injected app by port number, and works out
# the data planes in front of a pod from its Services and what names them (docs/data-planes.md).
# A lookup RBAC refuses leaves its kind out of injected pods' lag.
- apiGroups: [""]
  resources: ["services"]
  verbs: ["list"]
- apiGroups: ["networking.k8s.io"]
  resources: ["ingresses"]
  verbs: ["list"]
- apiGroups: ["gateway.networking.k8s.io"]
  resources: ["httproutes"]
  verbs: ["list"]
- apiGroups: ["elbv2.k8s.aws"]
  resources: ["targetgroupbindings"]
  verbs: ["list"]
- apiGroups: ["", "events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- if .Values.webhook.grantEndpointSliceRead }}
# The Role graceful-endpointslice-reader and its RoleBindings in namespaces with injected pods.
# create cannot be narrowed by name in RBAC; the webhook only ever writes these two kinds.
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["get", "create", "patch"]
{{- end }}
{{- end -}}
