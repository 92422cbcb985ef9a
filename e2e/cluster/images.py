#!/usr/bin/env python3
"""OCI image archives for the real-cluster harness, built without Docker or a registry.

    images.py build  --out DIR --release DIR --kube-bin DIR [--upstream]  # archives + images.txt
    images.py parity [--archives DIR]                          # against deploy/Dockerfile
    images.py refs [--kube-bin DIR] [--upstream]               # the refs `build` writes
    images.py upstream-refs                                    # "<ref> <file>" of --upstream's
    images.py extract ARCHIVE PATH DEST                        # one file out of an archive

--upstream adds the test images of Kubernetes' e2e storage suite (e2e.test), under the refs the
suite asks for (read from the Kubernetes tree's test/utils/image/manifest.go): busybox, agnhost
(build-kube.sh --upstream builds its binary), and two stand-ins, glibc-dns-testing and nginx,
that hold only what the storage tests run in them (see upstream_images()).

Each archive is an OCI image layout in a tar (oci-layout, index.json, blobs/sha256/...) that
`ctr images import` reads; index.json names the image with io.containerd.image.name. Layers are
reproducible: entries sorted, parents first, mtime 0, owner 0:0 by number, gzip without a name
or time; the same inputs give the same digests. An archive is rewritten only when its key (this
script, the image's description and the sha256 of every input file) changed.

deploy/Dockerfile stays the way users build images. `parity` checks that this second path
agrees with it: entrypoint, user, exposed ports and the COPY'd binaries at the same paths, and
for the node image the same apt packages (here copied from the host's installed packages with
their shared libraries, as e2e/vm/lib/mkinitrd.sh does). With --archives it reads the built
archives' configs and layers instead of this script's description.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "deploy" / "Dockerfile"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SSL_ENV = "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
# Host packages copied into the node image: what deploy/Dockerfile's enbd-node stage installs
# with apt. ca-certificates contributes its generated bundle, the rest their files.
NODE_PACKAGES = ["e2fsprogs", "xfsprogs", "util-linux", "mount", "ca-certificates"]
# The tools enbd-node runs by name (enbd-node/src/mount.rs); each must resolve on PATH.
NODE_TOOLS = ["mkfs.ext4", "mkfs.xfs", "resize2fs", "xfs_growfs"]
SKIP_PREFIXES = ("usr/share/doc/", "usr/share/man/", "usr/share/locale/", "usr/share/info/",
                 "usr/share/lintian/", "usr/share/bash-completion/")
PAUSE_TAG = "3.10.2"  # Kubernetes v1.36 build/pause/Makefile TAG and kubeadm's PauseVersion
PAUSE_REF = f"registry.k8s.io/pause:{PAUSE_TAG}"  # containerd's sandbox image on the node
BUSYBOX_REF = "docker.io/library/busybox:1.36"  # kind_common's "busybox:1.36", normalised
K8S_TREE = "deps/github.com/openshift/kubernetes"
# The e2e suite's images the external storage tests use on Linux (manifest.go's ImageIDs), and
# the archive each becomes. BusyBox: the default test image (pods of most tests); Agnhost:
# subpath tests' containers and the host-exec pods (nsenter into the node); GlibcDnsTesting:
# multivolume's concurrent-access tests; Nginx: volumes' "should allow exec of files".
UPSTREAM_FILES = {
    "BusyBox": "e2e-busybox.tar",
    "Agnhost": "e2e-agnhost.tar",
    "GlibcDnsTesting": "e2e-glibc-dns-testing.tar",
    "Nginx": "e2e-nginx.tar",
}
# The glibc-dns-testing stand-in: what multivolume runs in it (sh; test; GNU dd with
# iflag=direct and oflag=nocache, which busybox's dd lacks; blockdev --getss; base64,
# sha256sum, head, cat, sleep; grep -F), from the host's Debian like the node image.
GLIBC_PACKAGES = ["dash", "coreutils", "grep", "util-linux"]


class ImageError(Exception):
    pass


# ---- root filesystems --------------------------------------------------------------------

@dataclasses.dataclass
class Entry:
    kind: str  # dir | file | symlink
    mode: int = 0o755
    src: str | None = None  # host file for kind=file
    data: bytes | None = None  # literal content for kind=file
    link: str | None = None  # target for kind=symlink
    strip: bool = False  # strip --strip-debug the host file on the way in


class Rootfs:
    """An image's files by path (relative, no leading slash); parents are added implicitly."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}

    def _put(self, path: str, entry: Entry) -> None:
        path = path.strip("/")
        parent = os.path.dirname(path)
        if parent and parent not in self.entries:
            self.dir(parent)
        if parent and self.entries[parent].kind != "dir":
            raise ImageError(f"/{path}: its parent is a {self.entries[parent].kind}")
        old = self.entries.get(path)
        if old is not None and old != entry:
            if old.kind == entry.kind == "dir":
                return
            raise ImageError(f"/{path} added twice, differently ({old.kind}, {entry.kind})")
        self.entries[path] = entry

    def dir(self, path: str, mode: int = 0o755) -> None:
        if path.strip("/") not in self.entries:
            self._put(path, Entry("dir", mode))

    def file(self, path: str, *, src: str | None = None, data: bytes | None = None,
             mode: int = 0o644, strip: bool = False) -> None:
        self._put(path, Entry("file", mode, src=src, data=data, strip=strip))

    def symlink(self, path: str, target: str) -> None:
        self._put(path, Entry("symlink", 0o777, link=target))

    def host(self, host_path: str) -> None:
        """Copies a host path to the same path, symlinks on the way included (so /sbin ->
        usr/sbin and the loader's links come along as links, as in a Debian image)."""
        pending = [c for c in host_path.split("/") if c]
        cur = ""
        for _ in range(256):
            if not pending:
                break
            cur = f"{cur}/{pending.pop(0)}"
            if os.path.islink(cur):
                target = os.readlink(cur)
                self.symlink(cur, target)
                base = "" if target.startswith("/") else os.path.dirname(cur)
                rest = [c for c in os.path.normpath(f"{base}/{target}").split("/") if c]
                pending = rest + pending
                cur = ""
            elif os.path.isdir(cur):
                if pending:
                    self.dir(cur)
                else:
                    self.dir(cur, os.stat(cur).st_mode & 0o7777)
            elif os.path.isfile(cur):
                if pending:
                    raise ImageError(f"{host_path}: {cur} is not a directory")
                self.file(cur, src=cur, mode=os.stat(cur).st_mode & 0o7777)
            else:
                raise ImageError(f"{host_path}: {cur} does not exist on this host")
        else:
            raise ImageError(f"{host_path}: too many symbolic links")

    def resolve(self, path: str) -> Entry | None:
        """The entry at `path` inside the image, following the image's own symlinks."""
        pending = [c for c in path.split("/") if c]
        cur = ""
        for _ in range(256):
            if not pending:
                return self.entries.get(cur) if cur else Entry("dir")
            cur = f"{cur}/{pending.pop(0)}".strip("/")
            e = self.entries.get(cur)
            if e is None:
                return None
            if e.kind == "symlink":
                assert e.link is not None
                base = "" if e.link.startswith("/") else os.path.dirname(cur)
                pending = [c for c in os.path.normpath(f"/{base}/{e.link}").split("/") if c] + pending
                cur = ""
        return None

    def which(self, tool: str, env: list[str]) -> str | None:
        path = next((e[5:] for e in env if e.startswith("PATH=")), "")
        for d in path.split(":"):
            e = self.resolve(f"{d}/{tool}")
            if e is not None and e.kind == "file" and e.mode & 0o111:
                return f"{d}/{tool}"
        return None


def elf_dynamic(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"\x7fELF":
        return False
    out = subprocess.run(["ldd", path], capture_output=True, text=True)
    return out.returncode == 0 and "statically linked" not in out.stdout


def shared_libraries(paths: list[str]) -> list[str]:
    """The libraries and loader that the dynamic ELF files among `paths` load (one ldd run:
    a process per file is slow on a loaded machine)."""
    elves = []
    for p in paths:
        with open(p, "rb") as f:
            if f.read(4) == b"\x7fELF":
                elves.append(p)
    # ldd exits 1 when some of them are static; those print no library lines.
    out = subprocess.run(["ldd", *elves], capture_output=True, text=True).stdout
    libs = set()
    for line in out.splitlines():
        if "not found" in line:
            raise ImageError(f"ldd: {line.strip()}")
        if m := re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line):
            libs.add(m.group(1))
    return sorted(libs)


def host_package_files(pkg: str) -> list[str]:
    out = subprocess.run(["dpkg-query", "-L", pkg], capture_output=True, text=True)
    if out.returncode != 0:
        raise ImageError(f"package {pkg} is not installed on this host (run e2e/setup-host.sh)")
    files = []
    for p in out.stdout.splitlines():
        if not p.startswith("/") or p.strip("/").startswith(SKIP_PREFIXES):
            continue
        if os.path.islink(p) or os.path.isfile(p):
            files.append(p)
    return files


def host_package_version(pkg: str) -> str:
    return subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True,
                          text=True, check=True).stdout


# ---- the images --------------------------------------------------------------------------

@dataclasses.dataclass
class Image:
    ref: str
    file: str
    layers: list[Rootfs]
    config: dict


def image_config(entrypoint: list[str], *, user: str = "", ports: list[int] = (),
                 env: list[str] = (PATH_ENV,), cmd: list[str] | None = None,
                 workdir: str = "", labels: dict | None = None) -> dict:
    c: dict = {"Env": list(env)}
    if entrypoint:
        c["Entrypoint"] = entrypoint
    if cmd:
        c["Cmd"] = cmd
    if user:
        c["User"] = user
    if ports:
        c["ExposedPorts"] = {f"{p}/tcp": {} for p in ports}
    if workdir:
        c["WorkingDir"] = workdir
    if labels:
        c["Labels"] = labels
    return c


def distroless_base(*, nonroot: bool) -> Rootfs:
    """What the project's binaries need of gcr.io/distroless/{cc,static}: users, /tmp, the CA
    bundle and nsswitch.conf (the binaries are static: no libraries)."""
    fs = Rootfs()
    fs.file("etc/passwd", data=b"root:x:0:0:root:/root:/sbin/nologin\n"
            b"nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n"
            b"nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n")
    fs.file("etc/group", data=b"root:x:0:\nnobody:x:65534:\ntty:x:5:\nstaff:x:50:\n"
            b"nonroot:x:65532:\n")
    fs.file("etc/nsswitch.conf", data=b"passwd: files\ngroup: files\nhosts: files dns\n")
    fs.dir("tmp", 0o1777)
    fs.dir("root", 0o700)
    if nonroot:
        fs._put("home/nonroot", Entry("dir", 0o700))
    fs.file(CA_BUNDLE.strip("/"), src=os.path.realpath(CA_BUNDLE), mode=0o644)
    return fs


# The project images: what deploy/Dockerfile's final stages say, written out independently
# so that `parity` can catch the two drifting apart.
PROJECT = {
    "enbd-server": dict(binary="enbd-server", path="/usr/local/bin/enbd-server",
                        user="65532:65532", ports=[10809, 10810, 9810], base="distroless"),
    "enbd-csi-driver": dict(binary="csi-driver", path="/usr/local/bin/csi-driver",
                            user="65532:65532", ports=[9811], base="distroless"),
    "enbd-node": dict(binary="enbd-node", path="/usr/local/bin/enbd-node",
                      user="", ports=[9812], base="debian", packages=NODE_PACKAGES),
}
# The CSI sidecars: refs as charts/enbd-csi/values.yaml names them (snapshot-controller as
# external-snapshotter's deploy/kubernetes/snapshot-controller does), each upstream Dockerfile's
# layout: distroless/static, the binary at /<name>, run as root.
SIDECARS = {
    "csi-provisioner": ("sidecars", "provisioner"),
    "csi-attacher": ("sidecars", "attacher"),
    "csi-resizer": ("sidecars", "resizer"),
    "csi-snapshotter": ("sidecars", "snapshotter"),
    "csi-external-health-monitor-controller": ("sidecars", "healthMonitor"),
    "livenessprobe": ("sidecars", "livenessProbe"),
    "csi-node-driver-registrar": ("sidecars", "nodeDriverRegistrar"),
    "snapshot-controller": None,
}


def snapshot_controller_ref(kube_bin: Path) -> str:
    """The image external-snapshotter's snapshot-controller Deployment (build-kube.sh copies it
    to <bin>/crds/) asks for, so the cluster runs that YAML unchanged."""
    for y in sorted((kube_bin / "crds").glob("*.yaml")):
        if m := re.search(r"^\s*image:\s*(\S+/snapshot-controller:\S+)", y.read_text(), re.M):
            return m.group(1)
    raise ImageError(f"no snapshot-controller image in {kube_bin}/crds/*.yaml")


def chart_sidecar_refs(kube_bin: Path | None) -> dict[str, str]:
    """name -> ref, read from the chart's values.yaml (`image:` under each sidecar key);
    snapshot-controller's from kube_bin's YAML (left out without kube_bin)."""
    refs: dict[str, str] = {}
    section = key = None
    for line in (REPO / "charts/enbd-csi/values.yaml").read_text().splitlines():
        if re.match(r"^\S", line):
            section = line.split(":")[0]
        elif section == "sidecars" and (m := re.match(r"^  (\w+):\s*$", line)):
            key = m.group(1)
        elif section == "sidecars" and key and (m := re.match(r"^    image:\s*(\S+)", line)):
            refs[key] = m.group(1)
    out = {}
    for name, where in SIDECARS.items():
        if where is None:
            if kube_bin is not None:
                out[name] = snapshot_controller_ref(kube_bin)
        elif where[1] not in refs:
            raise ImageError(f"charts/enbd-csi/values.yaml has no sidecars.{where[1]}.image")
        else:
            out[name] = refs[where[1]]
    return out


def project_image(name: str, release: Path, cache: Path) -> Image:
    spec = PROJECT[name]
    src = release / spec["binary"]
    if not src.is_file():
        raise ImageError(f"{src} is missing (build the static release binaries first)")
    labels = {}
    if spec["base"] == "distroless":
        base = distroless_base(nonroot=True)
        env = [PATH_ENV, SSL_ENV]
        workdir = "/home/nonroot"
    else:
        base = node_base(cache)
        env = [PATH_ENV]
        workdir = ""
        labels["io.enbd.debian-release"] = os_release().get("VERSION_CODENAME", "")
        labels["io.enbd.host-packages"] = " ".join(
            f"{p}={host_package_version(p)}" for p in spec["packages"])
    app = Rootfs()
    app.file(spec["path"], src=str(src), mode=0o755, strip=True)
    cfg = image_config([spec["path"]], user=spec["user"], ports=spec["ports"], env=env,
                       workdir=workdir, labels=labels)
    return Image(f"enbd.local/{name}:e2e", f"{name}.tar", [base, app], cfg)


def os_release() -> dict[str, str]:
    text = Path("/etc/os-release").read_text()
    return {k: v.strip('"') for k, v in re.findall(r"^(\w+)=(.*)$", text, re.M)}


def host_paths(cache: Path, name: str, packages: list[str]) -> list[str]:
    """The host paths an image copies: the packages' files (docs and manuals left out) and
    their libraries. Cached per image `name` until any package on the host changes (dpkg's
    list)."""
    installed = subprocess.run(["dpkg-query", "-W"], capture_output=True, text=True,
                               check=True).stdout
    key = hashlib.sha256((installed + repr(packages)).encode()).hexdigest()[:16]
    f = cache / f"{name}-paths-{key}.json"
    if f.exists():
        return json.loads(f.read_text())
    paths = [CA_BUNDLE] if "ca-certificates" in packages else []
    for pkg in packages:
        if pkg != "ca-certificates":  # its generated bundle is all the image needs of it
            paths += host_package_files(pkg)
    paths += shared_libraries(sorted({os.path.realpath(p) for p in paths if os.path.isfile(p)}))
    for old in cache.glob(f"{name}-paths-*.json"):
        old.unlink()
    f.write_text(json.dumps(paths))
    return paths


def debian_base(cache: Path, name: str, packages: list[str]) -> Rootfs:
    """The host's copies of Debian packages' files, every dynamic executable's libraries and
    loader, Debian's merged-/usr links, root's passwd entry, /tmp and /root."""
    fs = Rootfs()
    for top in ("bin", "sbin", "lib", "lib64"):
        if os.path.islink(f"/{top}"):
            fs.symlink(top, os.readlink(f"/{top}"))
    fs.file("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\n")
    fs.file("etc/group", data=b"root:x:0:\n")
    fs.dir("tmp", 0o1777)
    fs.dir("root", 0o700)
    for p in host_paths(cache, name, packages):
        fs.host(p)
    return fs


def node_base(cache: Path) -> Rootfs:
    """deploy/Dockerfile's node stage is debian-slim plus apt packages; here: the host's copies
    of those packages' files (bookworm, like the Dockerfile's DEBIAN_RELEASE) with their
    libraries (debian_base)."""
    return debian_base(cache, "node", NODE_PACKAGES)


def sidecar_image(name: str, ref: str, kube_bin: Path) -> Image:
    src = kube_bin / name
    if not src.is_file():
        raise ImageError(f"{src} is missing (e2e/cluster/build-kube.sh builds it)")
    base = distroless_base(nonroot=False)
    app = Rootfs()
    app.file(name, src=str(src), mode=0o755)
    return Image(ref, f"{name}.tar", [base, app],
                 image_config([f"/{name}"], env=[PATH_ENV, SSL_ENV]))


def k8s_mirror() -> Path:
    return Path(os.environ.get("ENBD_K8S_MIRROR", "/work/.mirror/openshift+microshift/repo"))


def k8s_tree_file(rel: str) -> bytes:
    """A file of the Kubernetes tree (K8S_TREE in the microshift snapshot build-kube.sh builds
    from), at the snapshot's HEAD."""
    mirror = k8s_mirror()
    try:
        return subprocess.run(["git", "-C", str(mirror), "show", f"HEAD:{K8S_TREE}/{rel}"],
                              capture_output=True, check=True).stdout
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        raise ImageError(f"{rel} not readable from {mirror} (fetch openshift/microshift): {e}")


def k8s_tree_rev() -> str:
    return subprocess.run(["git", "-C", str(k8s_mirror()), "rev-parse", "--short=12", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()


def pause_image(work: Path) -> Image:
    """The pause binary from the Kubernetes tree's build/pause/linux/pause.c, built the way its
    Makefile does (gcc -Os -Wall -Werror -static), run as 65535 like the upstream image."""
    source = k8s_tree_file("build/pause/linux/pause.c")
    rev = k8s_tree_rev()
    gcc = subprocess.run(["gcc", "--version"], capture_output=True, text=True,
                         check=True).stdout.splitlines()[0]
    key = hashlib.sha256(source + gcc.encode() + rev.encode()).hexdigest()[:16]
    binary = work / f"pause-{key}"
    if not binary.exists():
        c = work / "pause.c"
        c.write_bytes(source)
        subprocess.run(["gcc", "-Os", "-Wall", "-Werror", "-static",
                        f"-DVERSION=v{PAUSE_TAG}-microshift-{rev}", "-o", f"{binary}.tmp",
                        str(c)], check=True)
        subprocess.run(["strip", f"{binary}.tmp"], check=True)
        # Older builds go; the one just made (still named .tmp) stays.
        for old in work.glob("pause-*"):
            if old.name != f"{binary.name}.tmp":
                old.unlink()
        os.replace(f"{binary}.tmp", binary)
    fs = Rootfs()
    fs.file("pause", src=str(binary), mode=0o755)
    return Image(PAUSE_REF, "pause.tar", [fs],
                 image_config(["/pause"], user="65535:65535"))


def busybox_rootfs(users: bytes = b"", groups: bytes = b"") -> Rootfs:
    """Debian's busybox-static with a link per applet in /bin, as the upstream busybox image
    lays them out; `users`/`groups`: more passwd/group lines."""
    bb = shutil.which("busybox") or ""
    real = os.path.realpath(bb) if bb else ""
    if not real or elf_dynamic(real):
        raise ImageError("a static busybox is needed (install busybox-static)")
    applets = subprocess.run([real, "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    fs = Rootfs()
    fs.file("bin/busybox", src=real, mode=0o755)
    for a in applets:
        if a != "busybox" and "/" not in a:
            fs.symlink(f"bin/{a}", "busybox")
    fs.file("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\n"
            b"nobody:x:65534:65534:nobody:/home:/bin/false\n" + users)
    fs.file("etc/group", data=b"root:x:0:\nnobody:x:65534:\n" + groups)
    fs.dir("tmp", 0o1777)
    fs.dir("root", 0o700)
    return fs


def busybox_image(ref: str = BUSYBOX_REF, file: str = "busybox.tar") -> Image:
    """busybox for the test pods (kind_common's busybox:1.36 by default): busybox_rootfs, the
    upstream image's config (no entrypoint, `sh`)."""
    return Image(ref, file, [busybox_rootfs()], image_config([], cmd=["sh"]))


# ---- the e2e storage suite's images (--upstream) -------------------------------------------

def upstream_refs() -> dict[str, str]:
    """ImageID -> ref for UPSTREAM_FILES, as the Kubernetes tree's test/utils/image/manifest.go
    makes them: Config{list.<Registry>, name, version} with the default registries
    (initRegistry). The suite remaps them only with KUBE_TEST_REPO_LIST or KUBE_TEST_REPO."""
    for var in ("KUBE_TEST_REPO_LIST", "KUBE_TEST_REPO"):
        if os.environ.get(var):
            raise ImageError(f"{var} is set: the suite would ask for other refs than these")
    text = k8s_tree_file("test/utils/image/manifest.go").decode()
    block = re.search(r"initRegistry = RegistryList\{(.*?)\n\t\}", text, re.S)
    if block is None:
        raise ImageError("manifest.go: no initRegistry = RegistryList{...}")
    registries = dict(re.findall(r"(\w+Registry):\s*\"([^\"]+)\"", block.group(1)))
    configs = {i: (reg, name, ver) for i, reg, name, ver in re.findall(
        r'configs\[(\w+)\] = Config\{list\.(\w+), "([^"]+)", "([^"]+)"\}', text)}
    refs = {}
    for image_id in UPSTREAM_FILES:
        if image_id not in configs or configs[image_id][0] not in registries:
            raise ImageError(f"manifest.go: no configs[{image_id}] with a known registry")
        reg, name, ver = configs[image_id]
        refs[image_id] = f"{registries[reg]}/{name}:{ver}"
    return refs


def agnhost_image(ref: str, kube_bin: Path) -> Image:
    """Upstream's agnhost image (test/images/agnhost/Dockerfile) without its Alpine packages:
    /agnhost (build-kube.sh --upstream builds it from the tree, static) as the entrypoint with
    `pause` as the default argument, /agnhost-2 linked to it, /uploads, porter's localhost
    certificate and key at /, the ports it exposes, user-defined-in-image (1000) in
    group-defined-in-image (50000), and busybox for the shell, nsenter and the commands the
    tests exec in it. Left out: bash, curl, dig, iperf, CoreDNS and the fake registry's
    /var/registry (network tests and image-pull tests, not the storage suite)."""
    src = kube_bin / "agnhost"
    if not src.is_file():
        raise ImageError(f"{src} is missing (e2e/cluster/build-kube.sh --upstream builds it)")
    if elf_dynamic(str(src)):
        raise ImageError(f"{src} is dynamically linked; the image has no libraries for it")
    tag = ref.rsplit(":", 1)[1]
    # "app version <main.Version>" (its cobra root command is named app).
    version = subprocess.run([str(src), "--version"], capture_output=True, text=True).stdout
    if version.split()[1:] != ["version", tag]:
        raise ImageError(f"{src} --version says {version.strip()!r}; the suite asks for {ref}")
    base = busybox_rootfs(
        users=b"user-defined-in-image:x:1000:1000::/home/user-defined-in-image:/bin/sh\n",
        groups=b"user-defined-in-image:x:1000:\n"
               b"group-defined-in-image:x:50000:user-defined-in-image\n")
    base.dir("home/user-defined-in-image")
    app = Rootfs()
    app.file("agnhost", src=str(src), mode=0o755)
    app.symlink("agnhost-2", "agnhost")
    app.dir("uploads")
    for f in ("localhost.crt", "localhost.key"):
        app.file(f, data=k8s_tree_file(f"test/images/agnhost/porter/{f}"))
    return Image(ref, UPSTREAM_FILES["Agnhost"], [base, app],
                 image_config(["/agnhost"], cmd=["pause"], ports=[80, 8080, 8081, 9376, 5000]))


def glibc_image(ref: str, cache: Path) -> Image:
    """A stand-in for glibc-dns-testing (upstream: debian:bookworm-slim + dnsutils + CoreDNS,
    for glibc's resolver in DNS tests): the host's Debian (bookworm) GLIBC_PACKAGES with glibc,
    /bin/sh being dash as in Debian. No DNS tools: the storage suite only runs shell commands
    in it."""
    if not os.path.realpath("/bin/sh").endswith("/dash"):
        raise ImageError("/bin/sh on this host is not dash (the stand-in copies it)")
    fs = debian_base(cache, "glibc-dns-testing", GLIBC_PACKAGES)
    fs.host("/bin/sh")
    labels = {"io.enbd.debian-release": os_release().get("VERSION_CODENAME", ""),
              "io.enbd.host-packages": " ".join(f"{p}={host_package_version(p)}"
                                                for p in GLIBC_PACKAGES),
              "io.enbd.stand-in": "glibc-dns-testing: Debian sh, coreutils, grep, util-linux; "
                                  "no DNS tools"}
    return Image(ref, UPSTREAM_FILES["GlibcDnsTesting"], [fs],
                 image_config([], cmd=["sh"], labels=labels))


def nginx_image(ref: str) -> Image:
    """A stand-in for the nginx test image: the one storage test using it (volumes' "should
    allow exec of files on the volume") replaces its command with `/bin/sh -ec` writing and
    running a script on the volume, so busybox_rootfs serves; run without a command it says
    what it is and fails rather than pretend to serve HTTP."""
    cmd = ["sh", "-c", "echo 'nginx stand-in (e2e/cluster/images.py): no nginx here' >&2; exit 1"]
    return Image(ref, UPSTREAM_FILES["Nginx"], [busybox_rootfs()],
                 image_config([], cmd=cmd, labels={"io.enbd.stand-in": "nginx: busybox only"}))


def upstream_images(kube_bin: Path, cache: Path) -> list[Image]:
    refs = upstream_refs()
    return [busybox_image(refs["BusyBox"], UPSTREAM_FILES["BusyBox"]),
            agnhost_image(refs["Agnhost"], kube_bin),
            glibc_image(refs["GlibcDnsTesting"], cache),
            nginx_image(refs["Nginx"])]


# ---- writing -----------------------------------------------------------------------------

def sha256_file(path: str, cache: dict[str, str]) -> str:
    if path not in cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        cache[path] = h.hexdigest()
    return cache[path]


def image_key(img: Image, hashes: dict[str, str]) -> str:
    desc = {"script": sha256_file(__file__, hashes), "ref": img.ref, "config": img.config,
            "layers": [{p: (dataclasses.asdict(e) | ({"sha256": sha256_file(e.src, hashes)}
                                                    if e.src else {}))
                        for p, e in sorted(fs.entries.items())} for fs in img.layers]}
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=repr).encode()).hexdigest()


class _Hashing(io.RawIOBase):
    """A write-only file that hashes and counts what passes through to `out`."""

    def __init__(self, out):
        self.out, self.h, self.n = out, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.h.update(b)
        self.n += len(b)
        return self.out.write(b) if self.out is not None else len(b)


def tar_info(path: str, e: Entry, size: int = 0) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(path + ("/" if e.kind == "dir" else ""))
    ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname, ti.mode = 0, 0, 0, "", "", e.mode
    ti.type = {"dir": tarfile.DIRTYPE, "file": tarfile.REGTYPE, "symlink": tarfile.SYMTYPE}[e.kind]
    ti.linkname = e.link or ""
    ti.size = size
    return ti


def write_layer(fs: Rootfs, dest: Path, work: Path) -> tuple[str, str, int]:
    """Writes fs as a gzip'ed tar to dest; returns (diff_id, digest, size)."""
    with open(dest, "wb") as raw:
        gz_hash = _Hashing(raw)
        with gzip.GzipFile(filename="", mode="wb", fileobj=gz_hash, mtime=0, compresslevel=6) as gz:
            tar_hash = _Hashing(gz)
            with tarfile.open(fileobj=tar_hash, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                for path in sorted(fs.entries):
                    e = fs.entries[path]
                    if e.kind != "file":
                        tar.addfile(tar_info(path, e))
                        continue
                    if e.data is not None:
                        tar.addfile(tar_info(path, e, len(e.data)), io.BytesIO(e.data))
                        continue
                    assert e.src is not None
                    src = e.src
                    if e.strip:
                        src = str(work / "stripped")
                        subprocess.run(["strip", "--strip-debug", "-o", src, e.src], check=True)
                    with open(src, "rb") as f:
                        tar.addfile(tar_info(path, e, os.fstat(f.fileno()).st_size), f)
    return f"sha256:{tar_hash.h.hexdigest()}", f"sha256:{gz_hash.h.hexdigest()}", gz_hash.n


def write_archive(img: Image, dest: Path, work: Path) -> None:
    blobs: list[tuple[str, Path | bytes]] = []
    layers, diff_ids = [], []
    for i, fs in enumerate(img.layers):
        lp = work / f"layer{i}"
        diff_id, digest, size = write_layer(fs, lp, work)
        diff_ids.append(diff_id)
        layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                       "digest": digest, "size": size})
        blobs.append((digest, lp))
    config = {"architecture": "amd64", "os": "linux", "created": "1970-01-01T00:00:00Z",
              "config": img.config, "rootfs": {"type": "layers", "diff_ids": diff_ids},
              "history": [{"created": "1970-01-01T00:00:00Z",
                           "created_by": "e2e/cluster/images.py"} for _ in layers]}
    cfg = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    cfg_d = f"sha256:{hashlib.sha256(cfg).hexdigest()}"
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg_d,
                   "size": len(cfg)},
        "layers": layers}, sort_keys=True, separators=(",", ":")).encode()
    man_d = f"sha256:{hashlib.sha256(manifest).hexdigest()}"
    blobs += [(cfg_d, cfg), (man_d, manifest)]
    index = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": man_d, "size": len(manifest),
                       "platform": {"architecture": "amd64", "os": "linux"},
                       "annotations": {"io.containerd.image.name": img.ref,
                                       "org.opencontainers.image.ref.name":
                                           img.ref.rsplit(":", 1)[1]}}]},
        sort_keys=True, separators=(",", ":")).encode()
    tmp = dest.with_suffix(".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        def add(name: str, content: Path | bytes, kind: str = "file") -> None:
            e = Entry(kind, 0o755 if kind == "dir" else 0o644)
            if kind == "dir":
                tar.addfile(tar_info(name, e))
            elif isinstance(content, bytes):
                tar.addfile(tar_info(name, e, len(content)), io.BytesIO(content))
            else:
                with open(content, "rb") as f:
                    tar.addfile(tar_info(name, e, os.fstat(f.fileno()).st_size), f)
        add("blobs", b"", "dir")
        add("blobs/sha256", b"", "dir")
        seen = set()
        for digest, content in sorted(blobs, key=lambda b: b[0]):
            if digest not in seen:
                seen.add(digest)
                add(f"blobs/sha256/{digest.split(':')[1]}", content)
        add("index.json", index)
        add("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
    os.replace(tmp, dest)


def build(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    (out / ".cache").mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="images.", dir=out))
    try:
        images = [project_image(n, Path(args.release), out / ".cache") for n in PROJECT]
        refs = chart_sidecar_refs(Path(args.kube_bin))
        images += [sidecar_image(n, refs[n], Path(args.kube_bin)) for n in SIDECARS]
        images += [pause_image(out / ".cache"), busybox_image()]
        if args.upstream:
            images += upstream_images(Path(args.kube_bin), out / ".cache")
        hashes: dict[str, str] = {}
        lines = []
        for img in images:
            dest = out / img.file
            key = image_key(img, hashes)
            keyfile = out / ".cache" / f"{img.file}.key"
            if dest.exists() and keyfile.exists() and keyfile.read_text() == key:
                state = "cached"
            else:
                write_archive(img, dest, work)
                keyfile.write_text(key)
                state = "built"
            lines.append(f"{img.ref} {img.file}\n")
            print(f"images: {state:6} {img.ref:60} {dest.stat().st_size / 2**20:6.1f} MiB",
                  file=sys.stderr)
        (out / "images.txt").write_text("".join(lines))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


# ---- parity with deploy/Dockerfile -------------------------------------------------------

# Defaults the Dockerfile's bases contribute (a stage without USER runs as its base's user).
BASE_DEFAULTS = {
    "gcr.io/distroless/cc-debian12:nonroot": {"user": "65532", "base": "distroless"},
    "debian:bookworm-slim": {"user": "", "base": "debian"},
}


def dockerfile_stages(text: str) -> dict[str, dict]:
    """The final stages of a Dockerfile: base, COPY --from=builder destinations, EXPOSE'd
    ports, USER, ENTRYPOINT and the apt-get install packages."""
    stages: dict[str, dict] = {}
    cur = None
    build_args: dict[str, str] = {}
    for line in re.sub(r"\\\n", " ", text).splitlines():
        words = line.strip().split(None, 1)
        if not words or words[0].startswith("#"):
            continue
        op, rest = words[0].upper(), (words[1] if len(words) > 1 else "")
        rest = re.sub(r"\$\{(\w+)\}", lambda m: build_args.get(m.group(1), m.group(0)), rest)
        if op == "ARG" and cur is None and "=" in rest:
            k, v = rest.split("=", 1)
            build_args[k.strip()] = v.strip()
        elif op == "FROM":
            m = re.match(r"(\S+)\s+AS\s+(\S+)", rest, re.I)
            name = m.group(2) if m else rest
            cur = stages[name] = {"from": m.group(1) if m else rest, "copies": [], "ports": [],
                                  "user": None, "entrypoint": None, "packages": []}
        elif cur is None:
            continue
        elif op == "COPY":
            parts = [p for p in shlex.split(rest) if not p.startswith("--")]
            cur["copies"].append(parts[-1])
        elif op == "EXPOSE":
            cur["ports"] += [int(p.split("/")[0]) for p in rest.split()]
        elif op == "USER":
            cur["user"] = rest.strip()
        elif op == "ENTRYPOINT":
            cur["entrypoint"] = json.loads(rest)
        elif op == "RUN" and "apt-get install" in rest:
            for cmd in rest.split("&&"):
                if "apt-get install" in cmd:
                    tail = cmd.split("apt-get install", 1)[1]
                    cur["packages"] += [w for w in tail.split() if not w.startswith("-")]
    return stages


def parity(args: argparse.Namespace) -> int:
    stages = dockerfile_stages(Path(args.dockerfile).read_text())
    problems: list[str] = []
    for name, spec in PROJECT.items():
        st = stages.get(name)
        if st is None:
            problems.append(f"{name}: no stage of that name in {args.dockerfile}")
            continue
        base = BASE_DEFAULTS.get(st["from"])
        if base is None:
            problems.append(f"{name}: base {st['from']} unknown to images.py (BASE_DEFAULTS)")
            continue
        want = {"entrypoint": st["entrypoint"], "user": st["user"] if st["user"] is not None
                else base["user"], "ports": sorted(st["ports"]), "files": sorted(st["copies"]),
                "base": base["base"], "packages": sorted(st["packages"])}
        if args.archives:
            have = archive_facts(Path(args.archives) / f"{name}.tar")
            fs, env = have.pop("fs"), have.pop("env")
            have["base"] = want["base"]  # not recorded in an image; the files are checked
            have["files"] = sorted(f for f in want["files"] if (e := fs.resolve(f)) is not None
                                   and e.kind == "file" and e.mode & 0o111)
            if name == "enbd-node":
                release = st["from"].split(":")[-1].removesuffix("-slim")
                if have.pop("release") != release:
                    problems.append(f"{name}: built from this host's Debian, not {release} "
                                    "as deploy/Dockerfile's DEBIAN_RELEASE")
                missing = [t for t in NODE_TOOLS if fs.which(t, env) is None]
                if missing:
                    problems.append(f"{name}: not on PATH in the image: {missing}")
        else:
            have = {"entrypoint": [spec["path"]], "user": spec["user"],
                    "ports": sorted(spec["ports"]), "files": [spec["path"]],
                    "base": spec["base"], "packages": sorted(spec.get("packages", []))}
        for k, v in want.items():
            if have.get(k) != v:
                problems.append(f"{name}: {k}: deploy/Dockerfile {v!r}, offline image {have.get(k)!r}")
    where = f"the archives in {args.archives}" if args.archives else "images.py's images"
    for p in problems:
        print(f"parity: FAIL {p}", file=sys.stderr)
    if problems:
        return 1
    print(f"parity: deploy/Dockerfile and {where} agree on {', '.join(PROJECT)}: "
          "entrypoint, user, exposed ports, binaries' paths, node packages", file=sys.stderr)
    return 0


def archive_image(tar: tarfile.TarFile):
    """The manifest of an OCI archive written by write_archive, and a reader of its blobs."""
    def blob(d: str) -> bytes:
        f = tar.extractfile(f"blobs/sha256/{d.split(':')[1]}")
        assert f is not None
        return f.read()
    index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
    return json.loads(blob(index["manifests"][0]["digest"])), blob


def archive_facts(path: Path) -> dict:
    """Config and file tree of an OCI archive written by write_archive."""
    with tarfile.open(path) as tar:
        manifest, blob = archive_image(tar)
        config = json.loads(blob(manifest["config"]["digest"]))
        fs = Rootfs()
        for layer in manifest["layers"]:
            with tarfile.open(fileobj=io.BytesIO(blob(layer["digest"])), mode="r:gz") as lt:
                for m in lt.getmembers():
                    p = m.name.strip("/")
                    if m.isdir():
                        fs.entries[p] = Entry("dir", m.mode)
                    elif m.issym():
                        fs.entries[p] = Entry("symlink", link=m.linkname)
                    else:
                        fs.entries[p] = Entry("file", m.mode)
    c = config["config"]
    labels = c.get("Labels") or {}
    pkgs = labels.get("io.enbd.host-packages", "")
    return {"entrypoint": c.get("Entrypoint"), "user": c.get("User", ""),
            "ports": sorted(int(p.split("/")[0]) for p in c.get("ExposedPorts", {})),
            "packages": sorted(p.split("=")[0] for p in pkgs.split()), "env": c.get("Env", []),
            "release": labels.get("io.enbd.debian-release"),
            "fs": fs}


def refs(args: argparse.Namespace) -> int:
    """The refs `build` writes, without building (snapshot-controller's only with --kube-bin)."""
    kube_bin = Path(args.kube_bin) if args.kube_bin else None
    names = [f"enbd.local/{n}:e2e" for n in PROJECT] + list(chart_sidecar_refs(kube_bin).values())
    names += [PAUSE_REF, BUSYBOX_REF]
    if args.upstream:
        names += upstream_refs().values()
    print("\n".join(names))
    return 0


def upstream_refs_cmd(args: argparse.Namespace) -> int:
    """The "<ref> <file>" lines `build --upstream` adds to images.txt."""
    refs = upstream_refs()
    print("\n".join(f"{refs[i]} {f}" for i, f in UPSTREAM_FILES.items()))
    return 0


def extract(args: argparse.Namespace) -> int:
    """Writes the file at PATH in an archive's image (the last layer holding it) to DEST."""
    want = args.path.strip("/")
    with tarfile.open(args.archive) as tar:
        manifest, blob = archive_image(tar)
        data = None
        for layer in manifest["layers"]:
            with tarfile.open(fileobj=io.BytesIO(blob(layer["digest"])), mode="r:gz") as lt:
                for m in lt.getmembers():
                    if m.name.strip("/") == want:
                        f = lt.extractfile(m) if m.isfile() else None
                        data = (f.read(), m.mode) if f is not None else None
    if data is None:
        raise ImageError(f"{args.archive}: no regular file /{want}")
    Path(args.dest).write_bytes(data[0])
    os.chmod(args.dest, data[1] & 0o777)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", required=True)
    b.add_argument("--release", required=True, help="dir with the static release binaries")
    b.add_argument("--kube-bin", required=True,
                   help="build-kube.sh's bin dir (sidecars; agnhost with --upstream)")
    b.add_argument("--upstream", action="store_true",
                   help="also the e2e storage suite's test images")
    r = sub.add_parser("refs")
    r.add_argument("--kube-bin")
    r.add_argument("--upstream", action="store_true")
    sub.add_parser("upstream-refs")
    x = sub.add_parser("extract")
    x.add_argument("archive")
    x.add_argument("path")
    x.add_argument("dest")
    p = sub.add_parser("parity")
    p.add_argument("--archives", help="check the built archives in this dir, not the spec")
    p.add_argument("--dockerfile", default=str(DOCKERFILE))
    args = ap.parse_args()
    try:
        return {"build": build, "refs": refs, "parity": parity, "upstream-refs": upstream_refs_cmd,
                "extract": extract}[args.cmd](args)
    except (ImageError, subprocess.CalledProcessError, OSError) as e:
        print(f"images: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
