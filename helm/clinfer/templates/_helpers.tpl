{{/* Names and labels. */}}

{{- define "clinfer.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "clinfer.fullname" -}}
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

{{/* The name of one component's objects: (dict "root" $ "component" "api"). */}}
{{- define "clinfer.componentName" -}}
{{- printf "%s-%s" (include "clinfer.fullname" .root) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "clinfer.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "clinfer.selectorLabels" -}}
app.kubernetes.io/name: {{ include "clinfer.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "clinfer.labels" -}}
helm.sh/chart: {{ include "clinfer.chart" . }}
{{ include "clinfer.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: clinfer
{{- end }}

{{/* Image reference: (dict "root" $ "image" .Values.workerInfer.image); empty fields fall back to .Values.image. */}}
{{- define "clinfer.image" -}}
{{- $repository := .root.Values.image.repository }}
{{- $tag := .root.Values.image.tag | default .root.Chart.AppVersion }}
{{- with .image }}
{{- $repository = .repository | default $repository }}
{{- $tag = .tag | default $tag }}
{{- end }}
{{- printf "%s:%s" $repository (toString $tag) }}
{{- end }}

{{/* Refuse to render a release that could not work. */}}
{{- define "clinfer.validate" -}}
{{- if not .Values.connections.existingSecret }}
{{- fail "connections.existingSecret is required: a Secret with the database and broker URLs (see values.yaml)" }}
{{- end }}
{{- if and (not .Values.auth.jwksUrl) (not .Values.auth.devKeySecret) }}
{{- fail "set auth.jwksUrl and auth.issuer (production), or auth.devKeySecret (evaluation only): without either, no API pod can validate a token" }}
{{- end }}
{{- if and .Values.auth.jwksUrl (not .Values.auth.issuer) }}
{{- fail "auth.issuer is required with auth.jwksUrl" }}
{{- end }}
{{- if and .Values.keda.enabled (not .Values.keda.redis.address) }}
{{- fail "keda.redis.address (host:port of the broker's Redis) is required with keda.enabled" }}
{{- end }}
{{- end }}

{{/*
Settings shared by every clinfer process, as KEY: "value" lines. The ConfigMap holds them for the Deployments; the
migration hook inlines them, because a pre-install hook runs before the ConfigMap exists.
*/}}
{{- define "clinfer.configData" -}}
CLINFER_HOST: "0.0.0.0"
CLINFER_PORT: {{ .Values.api.service.port | toString | quote }}
CLINFER_DIMSE_PORT: {{ .Values.dimse.service.port | toString | quote }}
CLINFER_DIMSE_AE_TITLE: {{ .Values.config.dimseAeTitle | quote }}
CLINFER_STATE_DIR: "/var/lib/clinfer"
CLINFER_BLOB_DIR: {{ .Values.blobs.mountPath | quote }}
CLINFER_MODEL_REPOSITORY: "/opt/clinfer/models"
CLINFER_AUTH_AUDIENCE: {{ .Values.auth.audience | quote }}
{{- with .Values.auth.issuer }}
CLINFER_AUTH_ISSUER: {{ . | quote }}
{{- end }}
{{- with .Values.auth.jwksUrl }}
CLINFER_AUTH_JWKS_URL: {{ . | quote }}
{{- end }}
CLINFER_METRICS_PUBLIC: {{ .Values.metrics.public | toString | quote }}
{{- range $key, $value := .Values.config.extraEnv }}
{{ $key }}: {{ $value | toString | quote }}
{{- end }}
{{- end }}

{{/* The connection strings, from the existing Secret. */}}
{{- define "clinfer.secretEnv" -}}
- name: CLINFER_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.connections.existingSecret }}
      key: {{ .Values.connections.databaseUrlKey }}
- name: CLINFER_BROKER_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.connections.existingSecret }}
      key: {{ .Values.connections.brokerUrlKey }}
{{- end }}

{{/* envFrom + env of a long-running clinfer container. */}}
{{- define "clinfer.containerEnv" -}}
envFrom:
  - configMapRef:
      name: {{ include "clinfer.componentName" (dict "root" . "component" "config") }}
env:
  {{- include "clinfer.secretEnv" . | nindent 2 }}
{{- end }}

{{/* Pod-level fields every clinfer pod shares. */}}
{{- define "clinfer.podCommon" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.serviceAccountName }}
serviceAccountName: {{ . }}
{{- end }}
automountServiceAccountToken: false
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end }}

{{/* Volumes: (dict "root" $ "blobs" true). /tmp and the state directory are writable emptyDirs. */}}
{{- define "clinfer.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .root.Values.tmpDir.sizeLimit }}
- name: state
  emptyDir:
    sizeLimit: {{ .root.Values.stateDir.sizeLimit }}
{{- if .blobs }}
- name: blobs
  persistentVolumeClaim:
    claimName: {{ .root.Values.blobs.existingClaim | default (include "clinfer.componentName" (dict "root" .root "component" "blobs")) }}
{{- end }}
{{- with .root.Values.models.existingClaim }}
- name: models
  persistentVolumeClaim:
    claimName: {{ . }}
    readOnly: true
{{- end }}
{{- end }}

{{- define "clinfer.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: state
  mountPath: /var/lib/clinfer
{{- if .blobs }}
- name: blobs
  mountPath: {{ .root.Values.blobs.mountPath }}
{{- end }}
{{- if .root.Values.models.existingClaim }}
- name: models
  mountPath: /opt/clinfer/models
  readOnly: true
{{- end }}
{{- end }}

{{/* Scheduling fields of one component: the component's values. */}}
{{- define "clinfer.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Pod template annotations: roll the pods when the settings change. */}}
{{- define "clinfer.podAnnotations" -}}
checksum/config: {{ include "clinfer.configData" . | sha256sum }}
{{- with .Values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end }}
