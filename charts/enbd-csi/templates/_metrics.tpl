{{/* "true" when Prometheus Operator objects may be rendered: the cluster serves
monitoring.coreos.com/v1, or metrics.skipApiCheck says to render them regardless. */}}
{{- define "enbd-csi.monitoringApi" -}}
{{- if or .Values.metrics.skipApiCheck (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1") -}}
true
{{- end -}}
{{- end -}}

{{/* The metrics ports scraped per component: a list of port names. */}}
{{- define "enbd-csi.controllerMetricsPorts" -}}
metrics
{{- if .Values.metrics.sidecars.enabled }} m-provisioner m-attacher m-resizer
{{- if and .Values.sidecars.snapshotter.enabled (include "enbd-csi.snapshotApi" .) }} m-snapshotter{{ end }}
{{- end }}
{{- end -}}
