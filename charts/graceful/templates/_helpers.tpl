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
