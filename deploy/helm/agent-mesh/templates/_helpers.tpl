{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "agent-mesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of the release's objects. */}}
{{- define "agent-mesh.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "agent-mesh.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "agent-mesh.labels" -}}
helm.sh/chart: {{ include "agent-mesh.chart" . }}
app.kubernetes.io/name: {{ include "agent-mesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: agent-mesh
{{- end }}

{{/* Selector labels of the node agent. */}}
{{- define "agent-mesh.selectorLabels" -}}
app.kubernetes.io/name: {{ include "agent-mesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: node-agent
{{- end }}

{{- define "agent-mesh.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "agent-mesh.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "agent-mesh.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Where the kubelet probes the admin endpoint: the node's loopback unless bound elsewhere. */}}
{{- define "agent-mesh.probeHost" -}}
{{- if eq .Values.admin.bindAddress "0.0.0.0" }}127.0.0.1{{ else }}{{ .Values.admin.bindAddress }}{{ end }}
{{- end }}

{{/*
The AgentConfig file (spec of mesh-agent 0.1.0: every field here is read by the agent).
Its checksum rolls the DaemonSet when it changes; policy changes are reloaded live instead.
*/}}
{{- define "agent-mesh.agentConfig" -}}
apiVersion: mesh.agentmesh.dev/v1alpha1
kind: AgentConfig
metadata:
  name: {{ include "agent-mesh.fullname" . }}
spec:
  datapath:
    pinDir: {{ .Values.datapath.pinDir }}
    attachCgroup: /
    accelerate: {{ .Values.datapath.accelerate }}
    maxWorkloads: {{ int .Values.datapath.maxWorkloads }}
    maxConnections: {{ int .Values.datapath.maxConnections }}
    exclude:
      cidrs: {{ toJson .Values.datapath.exclude.cidrs }}
      ports: {{ toJson .Values.datapath.exclude.ports }}
  listeners:
    outbound: 127.0.0.1:{{ int .Values.ports.outbound }}
    outboundV6: "::1"
    admin: {{ .Values.admin.bindAddress }}:{{ int .Values.ports.admin }}
  proxy:
    connectTimeout: {{ .Values.proxy.connectTimeout }}
    drainTimeout: {{ int .Values.proxy.drainTimeoutSeconds }}s
    l7: {{ .Values.proxy.l7 }}
  policy:
    dir: /etc/agent-mesh/policies
    defaultAction: {{ .Values.policy.defaultAction }}
    reloadInterval: {{ .Values.policy.reloadInterval }}
  workloads: {{ toJson .Values.workloads }}
{{- if or .Values.etcd.endpoints .Values.telemetry.otlpEndpoint }}
# Recorded for when the agent reads them (NOT READ by this version, which runs standalone):
{{- with .Values.etcd.endpoints }}
#   etcd endpoints: {{ join "," . }}
{{- end }}
{{- with .Values.etcd.tls.secretName }}
#   etcd TLS: Secret {{ . }}, mounted at /etc/agent-mesh/etcd-tls
{{- end }}
{{- with .Values.telemetry.otlpEndpoint }}
#   OTLP endpoint: {{ . }}
{{- end }}
#   trust domain: {{ .Values.trustDomain }}
{{- end }}
{{- end }}

{{/* Fails the render on values that cannot work. */}}
{{- define "agent-mesh.checkValues" -}}
{{- if le (int .Values.terminationGracePeriodSeconds) (int .Values.proxy.drainTimeoutSeconds) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be greater than proxy.drainTimeoutSeconds (%d): the kubelet would kill the agent while it drains" (int .Values.terminationGracePeriodSeconds) (int .Values.proxy.drainTimeoutSeconds)) }}
{{- end }}
{{- if not (has .Values.policy.defaultAction (list "Allow" "Deny")) }}
{{- fail (printf "policy.defaultAction must be Allow or Deny, not %v" .Values.policy.defaultAction) }}
{{- end }}
{{- if not (has .Values.log.format (list "json" "text")) }}
{{- fail (printf "log.format must be json or text, not %v" .Values.log.format) }}
{{- end }}
{{- end }}
