{{- define "vaultfs.fullname" -}}
{{- .Values.fullnameOverride | default "vaultfs" | trunc 50 | trimSuffix "-" -}}
{{- end -}}

{{- define "vaultfs.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "vaultfs.labels" -}}
app.kubernetes.io/name: vaultfs
app.kubernetes.io/part-of: vaultfs
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "vaultfs.pluginDir" -}}
{{ trimSuffix "/" .Values.kubeletDir }}/plugins/{{ .Values.driverName }}
{{- end -}}

{{- define "vaultfs.keeperDir" -}}
{{ dir .Values.keeper.socket }}
{{- end -}}
