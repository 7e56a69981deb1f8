{{/* Name of the release's objects: <release> if it already says "sns", else <release>-sns. */}}
{{- define "sns.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "sns.labels" -}}
app.kubernetes.io/name: sns-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: tiny-sns
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "sns.selectorLabels" -}}
app.kubernetes.io/name: sns-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "sns.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "sns.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "sns.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "sns.leaseName" -}}
{{- default (include "sns.fullname" .) .Values.leaderElection.leaseName -}}
{{- end -}}
