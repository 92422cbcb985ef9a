{{/* Names, labels and flag helpers shared by every template. */}}

{{- define "enbd-csi.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-scoped base name; the release name alone when it already contains the chart name. */}}
{{- define "enbd-csi.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "enbd-csi.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "enbd-csi.labels" -}}
helm.sh/chart: {{ include "enbd-csi.chart" . }}
app.kubernetes.io/name: {{ include "enbd-csi.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: enbd-csi
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: call with (dict "ctx" $ "component" "node"). */}}
{{- define "enbd-csi.selectorLabels" -}}
app.kubernetes.io/name: {{ include "enbd-csi.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* The label selector csi-driver uses to discover this release's enbd-server pods. */}}
{{- define "enbd-csi.serverSelector" -}}
{{- if .Values.controller.serverSelector -}}
{{- .Values.controller.serverSelector -}}
{{- else -}}
{{- printf "app.kubernetes.io/component=enbd-server,app.kubernetes.io/instance=%s" .Release.Name -}}
{{- end -}}
{{- end -}}

{{/* <repositoryPrefix><name>:<tag> of one ENBD image: call with (dict "ctx" $ "image" .Values.node.image). */}}
{{- define "enbd-csi.image" -}}
{{- $tag := .image.tag | default .ctx.Values.image.tag | default .ctx.Chart.AppVersion -}}
{{- printf "%s%s:%s" .ctx.Values.image.repositoryPrefix .image.name $tag -}}
{{- end -}}

{{/* The port number of a HOST:PORT listen address (IPv6 "[::]:10809" included). */}}
{{- define "enbd-csi.port" -}}
{{- splitList ":" . | last | int -}}
{{- end -}}

{{- define "enbd-csi.serverServiceName" -}}
{{- printf "%s-server" (include "enbd-csi.fullname" .) -}}
{{- end -}}

{{- define "enbd-csi.controllerServiceAccount" -}}
{{- printf "%s-controller" (include "enbd-csi.fullname" .) -}}
{{- end -}}

{{- define "enbd-csi.nodeServiceAccount" -}}
{{- printf "%s-node" (include "enbd-csi.fullname" .) -}}
{{- end -}}

{{- define "enbd-csi.serverServiceAccount" -}}
{{- printf "%s-server" (include "enbd-csi.fullname" .) -}}
{{- end -}}

{{/* Directory of the node plugin's CSI socket on the host, as kubelet expects it. */}}
{{- define "enbd-csi.pluginDir" -}}
{{- printf "%s/plugins/%s" (trimSuffix "/" .Values.kubeletDir) .Values.driverName -}}
{{- end -}}

{{/* Secret names of the management TLS material (the same in helm and cert-manager mode). */}}
{{- define "enbd-csi.tlsSecret" -}}
{{- printf "%s-%s-tls" (include "enbd-csi.fullname" .ctx) .who -}}
{{- end -}}

{{/* Where every binary finds its TLS files (a Secret volume: ca.crt, tls.crt, tls.key). */}}
{{- define "enbd-csi.tlsDir" -}}
/etc/enbd/tls
{{- end -}}

{{/* DNS names of the server certificate: every StatefulSet pod through the headless Service. */}}
{{- define "enbd-csi.serverDnsNames" -}}
{{- $svc := include "enbd-csi.serverServiceName" . -}}
{{- $ns := .Release.Namespace -}}
{{- list (printf "*.%s.%s.svc" $svc $ns) (printf "*.%s.%s.svc.%s" $svc $ns .Values.clusterDomain) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns .Values.clusterDomain) | toJson -}}
{{- end -}}
