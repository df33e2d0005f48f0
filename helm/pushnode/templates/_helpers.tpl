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

{{- define "pushnode.pusherSecretName" -}}
{{- default (include "pushnode.fullname" .) .Values.pusher.existingSecret -}}
{{- end -}}

{{/*
Whether the native auth secrets are wired: always without Pusher apps (the Secret template
then insists on them), and with apps only when some auth value is given.
*/}}
{{- define "pushnode.authEnabled" -}}
{{- if or (empty .Values.pusher.apps) .Values.auth.existingSecret .Values.auth.jwtSecret .Values.auth.apiKeys -}}
true
{{- end -}}
{{- end -}}

{{- define "pushnode.redisSecretName" -}}
{{- default (include "pushnode.fullname" .) .Values.redis.existingSecret -}}
{{- end -}}

{{/*
A duration as the node reads it ("500ms", "20s", "1m30s"; units ms, s, m, h), in milliseconds.
Anything else fails the render instead of being misread.
*/}}
{{- define "pushnode.durationMs" -}}
{{- $d := toString . | trim -}}
{{- if not (regexMatch "^([0-9]+(ms|s|m|h))+$" $d) -}}
{{- fail (printf "duration %q: give it as a number and a unit (ms, s, m, h), e.g. \"500ms\", \"20s\", \"1m30s\"" $d) -}}
{{- end -}}
{{- $ms := 0 -}}
{{- range regexFindAll "[0-9]+(ms|s|m|h)" $d -1 -}}
{{- $n := regexFind "^[0-9]+" . | atoi -}}
{{- $unit := regexReplaceAll "^[0-9]+" . "" -}}
{{- $scale := get (dict "ms" 1 "s" 1000 "m" 60000 "h" 3600000) $unit -}}
{{- $ms = add $ms (mul $n $scale) -}}
{{- end -}}
{{- $ms -}}
{{- end -}}

{{/* A memory quantity ("1Gi", "512Mi", "2G", "1000000") in bytes. */}}
{{- define "pushnode.quantityBytes" -}}
{{- $q := toString . | trim -}}
{{- if not (regexMatch "^[0-9]+(Ki|Mi|Gi|Ti|k|K|M|G|T)?$" $q) -}}
{{- fail (printf "resources.limits.memory %q: give whole units (e.g. 1Gi, 512Mi, 2G)" $q) -}}
{{- end -}}
{{- $n := regexFind "^[0-9]+" $q | atoi -}}
{{- $unit := regexReplaceAll "^[0-9]+" $q "" -}}
{{- $scale := get (dict "" 1 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 "k" 1000 "K" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000) $unit -}}
{{- mul $n $scale -}}
{{- end -}}

{{/*
The node's worst case after SIGTERM (src/server.rs): the drain, at most 1 s (capped by the
grace) for the last closes to leave, then one shutdown_grace for sessions and listeners
together. Before it the preStop sleep; after it a margin for the process to exit.
*/}}
{{- define "pushnode.terminationGrace" -}}
{{- $drain := include "pushnode.durationMs" (.Values.config.server.drain_period | default "10s") | int64 -}}
{{- $grace := include "pushnode.durationMs" (.Values.config.server.shutdown_grace | default "5s") | int64 -}}
{{- $ms := add $drain (min 1000 $grace) $grace -}}
{{- add (div (add $ms 999) 1000) .Values.preStopSleepSeconds .Values.terminationGraceMarginSeconds -}}
{{- end -}}

{{/* limits.max_memory_bytes: as configured, else memoryLimitPercent of the memory limit (0: off). */}}
{{- define "pushnode.maxMemoryBytes" -}}
{{- $limits := .Values.config.limits | default dict -}}
{{- if hasKey $limits "max_memory_bytes" -}}
{{- $limits.max_memory_bytes | int64 -}}
{{- else if and .Values.memoryLimitPercent (dig "limits" "memory" "" .Values.resources) -}}
{{- $bytes := include "pushnode.quantityBytes" .Values.resources.limits.memory | int64 -}}
{{- div (mul $bytes (.Values.memoryLimitPercent | int64)) 100 -}}
{{- else -}}
0
{{- end -}}
{{- end -}}

{{/*
A value as TOML: tables inline ({k = v, ...}), arrays of anything, scalars as JSON (which TOML
reads the same for strings, numbers and booleans). For lists of tables such as
config.webhooks.endpoints.
*/}}
{{- define "pushnode.tomlValue" -}}
{{- if kindIs "map" . -}}
{ {{- $first := true }}{{ range $k, $v := . }}{{ if not $first }}, {{ end }}{{ $first = false }}{{ $k }} = {{ include "pushnode.tomlValue" $v }}{{ end -}} }
{{- else if kindIs "slice" . -}}
[{{ range $i, $v := . }}{{ if $i }}, {{ end }}{{ include "pushnode.tomlValue" $v }}{{ end }}]
{{- else -}}
{{ . | toJson }}
{{- end -}}
{{- end -}}
