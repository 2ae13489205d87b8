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
Standalone (no etcd.endpoints): resources from the policy ConfigMap mounted at
/etc/agent-mesh/policies. etcd mode: spec.etcd instead of spec.policy.dir (the agent refuses
both), and the pod puts its node's name in metadata.name at start (agent-mesh.agentCommand).
*/}}
{{- define "agent-mesh.agentConfig" -}}
apiVersion: mesh.agentmesh.dev/v1alpha1
kind: AgentConfig
metadata:
  {{- if .Values.etcd.endpoints }}
  # Replaced by the node's name when the pod starts: it names the node record in etcd.
  {{- end }}
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
    tunnel: 0.0.0.0:{{ int .Values.ports.tunnel }}
  proxy:
    connectTimeout: {{ .Values.proxy.connectTimeout }}
    drainTimeout: {{ int .Values.proxy.drainTimeoutSeconds }}s
    l7: {{ .Values.proxy.l7 }}
  policy:
    {{- if not .Values.etcd.endpoints }}
    dir: /etc/agent-mesh/policies
    {{- end }}
    defaultAction: {{ .Values.policy.defaultAction }}
    reloadInterval: {{ .Values.policy.reloadInterval }}
  workloads: {{ toJson .Values.workloads }}
  {{- if .Values.podEnrolment.enabled }}
  kubernetes:
    {{- with .Values.podEnrolment.labelSelector }}
    labelSelector: {{ . }}
    {{- end }}
  {{- end }}
{{- with .Values.etcd.endpoints }}
  etcd:
    endpoints: {{ toJson . }}
    prefix: {{ $.Values.etcd.prefix | quote }}
    cacheFile: {{ $.Values.etcd.cacheFile }}
    dialTimeout: {{ $.Values.etcd.dialTimeout }}
    leaseTtl: {{ $.Values.etcd.leaseTtl }}
    {{- if $.Values.etcd.tls.secretName }}
    # Secret {{ $.Values.etcd.tls.secretName }}, mounted read-only at /etc/agent-mesh/etcd-tls.
    tls:
      caFile: /etc/agent-mesh/etcd-tls/ca.crt
      certFile: /etc/agent-mesh/etcd-tls/tls.crt
      keyFile: /etc/agent-mesh/etcd-tls/tls.key
      {{- with $.Values.etcd.tls.serverName }}
      serverName: {{ . | quote }}
      {{- end }}
    {{- end }}
{{- end }}
{{- if and .Values.etcd.endpoints .Values.signer.enabled }}
  identity:
    trustDomain: {{ .Values.trustDomain | quote }}
  tunnel:
    # Where the other nodes reach this node's tunnel (published in its node record): the
    # node's address (status.hostIP), filled in by the start script.
    advertiseAddress: "@HOST_ADDRESS@:{{ int .Values.ports.tunnel }}"
{{- end }}
{{- if .Values.telemetry.otlpEndpoint }}
# Recorded for when the agent reads them (NOT READ by this version):
{{- with .Values.telemetry.otlpEndpoint }}
#   OTLP endpoint: {{ . }}
{{- end }}
#   trust domain: {{ .Values.trustDomain }}
{{- end }}
{{- end }}

{{/*
The agent container's command and args. etcd mode: a copy of the shared configuration with
metadata.name set to the node's name (NODE_NAME, from spec.nodeName), so that every node has its
own record under <prefix>/nodes/, and the tunnel's advertised address set to the node's address
(HOST_IP, from status.hostIP; IPv6 in brackets); /tmp is the pod's emptyDir.
*/}}
{{- define "agent-mesh.agentCommand" -}}
{{- if .Values.etcd.endpoints }}
command: ["nsenter", "--cgroup=/proc/1/ns/cgroup", "--", "/bin/sh", "-c"]
args:
  - |
    set -eu
    case "${HOST_IP:-}" in *:*) host="[${HOST_IP}]" ;; *) host="${HOST_IP:-}" ;; esac
    sed -e "0,/^  name: .*/s//  name: ${NODE_NAME}/" -e "s/@HOST_ADDRESS@/${host}/" \
      /etc/agent-mesh/config/agent.yaml > /tmp/agent.yaml
    exec mesh-agent run --config /tmp/agent.yaml
{{- else }}
command: ["nsenter", "--cgroup=/proc/1/ns/cgroup", "--", "mesh-agent"]
args: ["run", "--config", "/etc/agent-mesh/config/agent.yaml"]
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
{{- range .Values.etcd.endpoints }}
{{- if $.Values.etcd.tls.secretName }}
{{- if not (hasPrefix "https://" .) }}
{{- fail (printf "etcd.endpoints: %s must be an https://HOST:PORT URL: etcd.tls.secretName is set, and TLS settings with a plaintext endpoint would send the mesh's state in clear" .) }}
{{- end }}
{{- else }}
{{- if hasPrefix "https://" . }}
{{- fail (printf "etcd.endpoints: %s uses TLS: set etcd.tls.secretName to a Secret with ca.crt, tls.crt and tls.key" .) }}
{{- end }}
{{- if not (hasPrefix "http://" .) }}
{{- fail (printf "etcd.endpoints: %s must be an http://HOST:PORT URL" .) }}
{{- end }}
{{- end }}
{{- end }}
{{- if .Values.etcd.endpoints }}
{{- if .Values.policy.files }}
{{- fail "policy.files is not read in etcd mode (etcd.endpoints is set): the agent takes its resources from etcd, write them with `meshctl --etcd URL apply -f FILE`; unset one of the two" }}
{{- end }}
{{- if not (isAbs .Values.etcd.cacheFile) }}
{{- fail (printf "etcd.cacheFile must be an absolute path on the node, not %v" .Values.etcd.cacheFile) }}
{{- end }}
{{- end }}
{{- if not (has .Values.log.format (list "json" "text")) }}
{{- fail (printf "log.format must be json or text, not %v" .Values.log.format) }}
{{- end }}
{{- end }}
