{{- define "pushnode.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "pushnode.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "pushnode.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{ include "pushnode.selectorLabels" . }}
{{- end -}}

{{- define "pushnode.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pushnode.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "pushnode.secretName" -}}
{{- default (include "pushnode.fullname" .) .Values.auth.existingSecret -}}
{{- end -}}

{{/* Drain + grace + preStop + margin: the kubelet must not kill a pod mid-drain. */}}
{{- define "pushnode.terminationGrace" -}}
{{- $drain := .Values.config.server.drain_period | default "10s" | trimSuffix "s" | int -}}
{{- $grace := .Values.config.server.shutdown_grace | default "5s" | trimSuffix "s" | int -}}
{{- add $drain $grace .Values.preStopSleepSeconds 10 -}}
{{- end -}}
