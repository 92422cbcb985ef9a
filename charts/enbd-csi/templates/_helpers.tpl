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

{{/* One ENBD image: <repository>:<tag>, the repository being the component's image.repository or
<repositoryPrefix><name>. Call with (dict "ctx" $ "image" .Values.node.image). */}}
{{- define "enbd-csi.image" -}}
{{- $tag := .image.tag | default .ctx.Values.image.tag | default .ctx.Chart.AppVersion -}}
{{- $repo := .image.repository | default (printf "%s%s" .ctx.Values.image.repositoryPrefix .image.name) -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end -}}

{{/* A sidecar's image: its full `image` reference, with `repository` and/or `tag` replacing
those parts when set (private registry mirrors). Call with the sidecar's values. */}}
{{- define "enbd-csi.sidecarImage" -}}
{{- $ref := .image -}}
{{- $repo := $ref -}}
{{- $tag := "" -}}
{{- if regexMatch ":[^/:]+$" $ref -}}
{{- $tag = regexFind "[^:]+$" $ref -}}
{{- $repo = trimSuffix (printf ":%s" $tag) $ref -}}
{{- end -}}
{{- $repo = .repository | default $repo -}}
{{- $tag = .tag | default $tag -}}
{{- if $tag -}}
{{- printf "%s:%s" $repo $tag -}}
{{- else -}}
{{- $repo -}}
{{- end -}}
{{- end -}}

{{/* Whether the cluster serves the snapshot API (VolumeSnapshotClass, the snapshotter). */}}
{{- define "enbd-csi.snapshotApi" -}}
{{- if .Capabilities.APIVersions.Has "snapshot.storage.k8s.io/v1" -}}true{{- end -}}
{{- end -}}

{{/* The server pods' PriorityClass: the one named in values, else the chart's own. */}}
{{- define "enbd-csi.serverPriorityClass" -}}
{{- if .Values.server.priorityClassName -}}
{{- .Values.server.priorityClassName -}}
{{- else if .Values.server.priorityClass.create -}}
{{- printf "%s-server" (include "enbd-csi.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* The node plugin's memory limit: node.resources.limits.memory if set, else
node.memory.baseMi + maxVolumes x (journalBytes + perVolumeBuffersMi), in Mi. */}}
{{- define "enbd-csi.nodeResources" -}}
{{- $n := .Values.node -}}
{{- $r := deepCopy ($n.resources | default dict) -}}
{{- $limits := $r.limits | default dict -}}
{{- if and (not $limits.memory) (gt (int64 ($n.maxVolumes | default 0)) 0) -}}
{{- $journalMi := div (int64 ($n.journalBytes | default 67108864)) 1048576 -}}
{{- $perVolume := add $journalMi (int64 $n.memory.perVolumeBuffersMi) -}}
{{- $mi := add (int64 $n.memory.baseMi) (mul (int64 $n.maxVolumes) $perVolume) -}}
{{- $_ := set $limits "memory" (printf "%dMi" $mi) -}}
{{- $_ := set $r "limits" $limits -}}
{{- end -}}
{{- toYaml $r -}}
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

{{/* Seconds in a duration of the schema's form (digits and one unit: h, m or s). */}}
{{- define "enbd-csi.seconds" -}}
{{- $n := regexReplaceAll "[hms]$" . "" | int -}}
{{- if hasSuffix "h" . }}{{ mul $n 3600 }}{{ else if hasSuffix "m" . }}{{ mul $n 60 }}{{ else }}{{ $n }}{{ end -}}
{{- end }}

{{/* The leader-election flags every leader-elected sidecar of the controller takes. The
     sidecars refuse a renew deadline that is not below the lease duration only when they
     start, in a crash loop; the install refuses it here instead. */}}
{{- define "enbd-csi.leaderElectionArgs" -}}
{{- $le := .Values.sidecars.leaderElection -}}
{{- if ge (include "enbd-csi.seconds" $le.renewDeadline | int) (include "enbd-csi.seconds" $le.leaseDuration | int) -}}
{{- fail (printf "sidecars.leaderElection.renewDeadline (%s) must be below leaseDuration (%s)" $le.renewDeadline $le.leaseDuration) -}}
{{- end -}}
{{- if ge (include "enbd-csi.seconds" $le.retryPeriod | int) (include "enbd-csi.seconds" $le.renewDeadline | int) -}}
{{- fail (printf "sidecars.leaderElection.retryPeriod (%s) must be below renewDeadline (%s)" $le.retryPeriod $le.renewDeadline) -}}
{{- end -}}
- --leader-election
- --leader-election-namespace={{ .Release.Namespace }}
- --leader-election-lease-duration={{ $le.leaseDuration }}
- --leader-election-renew-deadline={{ $le.renewDeadline }}
- --leader-election-retry-period={{ $le.retryPeriod }}
{{- end }}
