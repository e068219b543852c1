"""A fake Guix world for the GitHub Actions scenarios: what the installers put on a runner, and
stand-ins for the commands the example workflows call that would reach the network or build.

The example workflows run unchanged on the runner emulator (tests/ghrunner). What they fetch
comes from a local mirror through a fake `wget`; `gpg` checks fake signatures (the sha256 of
the file, so a wrong tarball still fails); the Guix binary tarball is a real tarball with a
small store, its daemon DB and fake `guix`/`guix-daemon` programs; `systemctl` starts that
daemon and bind-mounts `/gnu/store` read-only as guix-install.sh's `gnu-store.mount` does;
`guix build NAME` adds a few items to the store and registers them in the live DB under a
shared `big-lock`, as a daemon session does. `groupadd`/`useradd` are recorded, not run (the
machine's /etc is the host's). The fakes live in the machine's own /usr/local/bin and
/usr/local/sbin, ahead of the real commands on every PATH, sudo's included.
"""

from __future__ import annotations

import hashlib
import tarfile
import tempfile
from pathlib import Path

from incstore import db, sample

from .ghrunner import Machine

ISOLATED = ("/gnu", "/var/guix", "/etc/guix", "/home/runner", "/root", "/tmp", "/usr/local/bin",
            "/usr/local/sbin", "/etc/systemd/system", "/var/log/guix")
PROFILE = "/var/guix/profiles/per-user/root/current-guix"
PYTHON = "/usr/bin/python3"  # a python visible inside the machines (not the host's pyenv)
VENV = Path("/opt/incstore-test-venv")  # incstore for the machines (see test_actions)


def fake_signature(data: bytes) -> str:
    return "FAKE-SIGNATURE sha256:" + hashlib.sha256(data).hexdigest() + "\n"


GUIX = f'''#!{VENV}/bin/python
"""Fake guix: `build NAME...` makes a few items per NAME in the store and registers them in
the live DB as a daemon session would; `shell [--pure] [--no-grafts] NAME... -- CMD...` does
the same and then runs CMD; the rest only pretends."""
import fcntl, hashlib, os, sys
from pathlib import Path
args = sys.argv[1:]
command = []
if args[:1] == ["shell"]:
    if "--" in args:
        command = args[args.index("--") + 1:]
        args = args[:args.index("--")]
    args = ["build", *args[1:]]
if args[:1] == ["build"]:
    if os.geteuid() != 0:  # the daemon does the work, as root
        os.execvp("sudo", ["sudo", "-n", "--preserve-env", sys.argv[0], *sys.argv[1:]])
    from incstore import db, mountns, nar
    from incstore.storepath import nix32_encode
    store = Path("/gnu/store")
    if os.statvfs(store).f_flag & os.ST_RDONLY:
        mountns.make_writable(store)
    db_path = Path("/var/guix/db/db.sqlite")
    lock = os.open("/var/guix/db/big-lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.lockf(lock, fcntl.LOCK_SH)  # a daemon session, for as long as it works
    valid = set(db.valid_paths(db_path, db.GUIX))
    base = sorted(p for p in valid if "-part" not in p)  # the installer's items
    infos = []
    for name in [a for a in args[1:] if not a.startswith("-")]:
        previous = base[:1]
        for i in range(3):
            digest = hashlib.sha256(f"{{name}}-{{i}}".encode()).digest()[:20]
            path = f"/gnu/store/{{nix32_encode(digest)}}-{{name}}-part{{i}}"
            if path not in valid:
                item = store / path[11:]
                item.mkdir()
                (item / "bin").mkdir()
                size = int(next((a.split("=", 1)[1] for a in args
                                 if a.startswith("--item-bytes=")), "2048"))
                seed = hashlib.sha256(path.encode()).digest()
                body = ((seed * (size // 32 + 1))[:size // 2]
                        + hashlib.shake_256(seed).digest(size // 2))
                (item / "bin" / name).write_bytes(body + "\\n".join(previous).encode())
                (item / "bin" / name).chmod(0o555)
                for p in (item / "bin", item):
                    p.chmod(0o555)
                for p in (item / "bin" / name, item / "bin", item):
                    os.utime(p, (1, 1))
                digest_ = nar.dump_hashed(item)
                infos.append(db.PathInfo(path, digest_.db_hash, digest_.size, 1_700_000_000,
                                         None, tuple(sorted(previous))))
                valid.add(path)
            previous = [path]
        if not command:
            print(previous[0])
    db.register_in_place(db_path, db.GUIX, infos)
    if command:
        os.execvp(command[0], command)
elif args[:2] == ["archive", "--authorize"]:
    os.makedirs("/etc/guix", exist_ok=True)
    with open("/etc/guix/acl", "a") as f:
        f.write(sys.stdin.read())
elif args[:1] == ["describe"]:
    print("guix 0000000 (fake)")
'''

GUIX_DAEMON = """#!/bin/bash
# Fake guix-daemon: the main process never opens the DB (sessions do); it just runs.
echo $$ > /var/guix/daemon.pid
while sleep 3600; do :; done
"""

SYSTEMCTL = f"""#!/bin/bash
# Fake systemctl for the units the Guix installers use.
set -e
now=
units=()
for arg in "$@"; do
    case "$arg" in
        --now) now=1 ;;
        daemon-reload|enable|start|restart|disable|stop|-*) verb="${{verb:-$arg}}" ;;
        *) units+=("$arg") ;;
    esac
done
case "$verb" in
    daemon-reload|disable|stop) exit 0 ;;
    enable) [ -n "$now" ] || exit 0 ;;
esac
for unit in "${{units[@]}}"; do
    case "$unit" in
        gnu-store.mount)
            mountpoint -q /gnu/store || true
            mount --bind /gnu/store /gnu/store
            mount -o remount,bind,ro /gnu/store ;;
        guix-daemon|guix-daemon.service)
            if [ -f /var/guix/daemon.pid ]; then kill "$(cat /var/guix/daemon.pid)" 2>/dev/null || true; fi
            setsid {PROFILE}/bin/guix-daemon </dev/null >/var/log/guix-daemon.log 2>&1 & ;;
    esac
done
"""

WGET = f"""#!{PYTHON}
# Fake wget: serves URLs from the test's mirror by their file name.
import os, shutil, sys
mirror = {{mirror!r}}
args, urls, out, directory = sys.argv[1:], [], None, "."
i = 0
while i < len(args):
    a = args[i]
    if a in ("-O", "-P"):
        if a == "-O":
            out = args[i + 1]
        else:
            directory = args[i + 1]
        i += 2
        continue
    if a.startswith("-"):
        i += 1
        continue
    urls.append(a)
    i += 1
def name(url):
    if "guix-binary.tar.xz" in url:
        return "guix-binary-nightly.x86_64-linux.tar.xz"
    return url.split("?")[0].rstrip("/").rsplit("/", 1)[-1]
for url in urls:
    src = os.path.join(mirror, name(url))
    if not os.path.exists(src):
        print(f"wget: {{url}}: 404 Not Found", file=sys.stderr)
        sys.exit(8)
    if out == "-":
        with open(src, "rb") as f:
            sys.stdout.buffer.write(f.read())
    else:
        shutil.copyfile(src, out or os.path.join(directory, name(url)))
"""

GPG = f"""#!{PYTHON}
# Fake gpg: --import accepts any key; --verify checks a fake signature (the file's sha256).
import hashlib, sys
args = [a for a in sys.argv[1:] if not a.startswith("--") or a in ("--import", "--verify")]
if "--import" in args:
    sys.stdin.buffer.read()
    sys.exit(0)
if "--verify" in args:
    files = [a for a in args if a != "--verify"]
    sig, data = files[0], files[1] if len(files) > 1 else files[0][:-4]
    want = "FAKE-SIGNATURE sha256:" + hashlib.sha256(open(data, "rb").read()).hexdigest()
    ok = open(sig).read().strip() == want
    print("gpg: Good signature" if ok else "gpg: BAD signature", file=sys.stderr)
    sys.exit(0 if ok else 1)
sys.exit(0)
"""

RECORD = """#!/bin/bash
# Fake {name}: the machine's /etc is the host's; account creation is recorded, not done.
echo "{name} $*" >> /var/log/guix/accounts.log
exit 0
"""

GUIX_INSTALL_SH = f"""#!/bin/bash
# Fake guix-install.sh: what the real one does on a systemd runner, in brief.
set -eo pipefail
[ "$UID" -eq 0 ] || {{ echo "This script must be run as root."; exit 1; }}
read -r _ || true
tar --extract --strip-components=1 --file "$GUIX_BINARY_FILE_NAME" -C /
groupadd --system guixbuild
for i in $(seq -w 1 10); do useradd -g guixbuild --system "guixbuilder$i"; done
cp {PROFILE}/lib/systemd/system/guix-daemon.service /etc/systemd/system/
cp {PROFILE}/lib/systemd/system/gnu-store.mount /etc/systemd/system/
systemctl daemon-reload
systemctl enable guix-daemon.service
systemctl enable gnu-store.mount
systemctl start guix-daemon
systemctl start gnu-store.mount
mkdir -p /usr/local/bin
ln -sf {PROFILE}/bin/guix /usr/local/bin/guix
{PROFILE}/bin/guix archive --authorize < {PROFILE}/share/guix/ci.guix.gnu.org.pub
echo "Guix has successfully been installed!"
"""

# PromyLOPh/guix-install-action v1.5, the same steps against the fake world
GUIX_INSTALL_ACTION = f"""name: Install GNU Guix (fake, as v1.5 does it)
runs:
  using: composite
  steps:
    - run: echo LANG=en_US.utf8 >> $GITHUB_ENV
      shell: bash
    - run: wget -nv "https://ci.guix.gnu.org/search/latest/archive?query=spec:tarball+status:success+system:x86_64-linux+guix-binary.tar.xz" -O guix-binary-nightly.x86_64-linux.tar.xz
      shell: bash
    - run: |
        sudo -- tar --extract --file "guix-binary-nightly.x86_64-linux.tar.xz" -C / --no-overwrite-dir
        sudo -- groupadd --system guixbuild
        export GUIX_PATH={PROFILE}
        sudo cp $GUIX_PATH/lib/systemd/system/{{gnu-store.mount,guix-daemon.service}} /etc/systemd/system/
        sudo systemctl daemon-reload
        sudo systemctl enable --now gnu-store.mount guix-daemon.service
        echo "$GUIX_PATH/bin" >> $GITHUB_PATH
      shell: bash
    - run: |
        for F in {PROFILE}/share/guix/*.pub; do
          sudo {PROFILE}/bin/guix archive --authorize < $F
        done
      shell: bash
"""


def build_tarball(dest: Path, version: str, *, items: int = 6, seed: int = 7,
                  top: str = ".") -> Path:
    """A Guix binary tarball: `./gnu/store` with a few base items, `./var/guix` with their
    DB and root's current-guix profile holding the fake programs and unit files."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        spec = sample.SampleSpec(items=items, blob_bytes=8 << 10, modules=3, seed=seed)
        sample.add_items(root, db.GUIX, items, seed=seed, spec=spec)
        profile = root / PROFILE.lstrip("/")
        (profile / "bin").mkdir(parents=True)
        (profile / "bin" / "guix").write_text(GUIX)
        (profile / "bin" / "guix-daemon").write_text(GUIX_DAEMON)
        for p in (profile / "bin" / "guix", profile / "bin" / "guix-daemon"):
            p.chmod(0o755)
        (profile / "share/guix").mkdir(parents=True)
        (profile / "share/guix/ci.guix.gnu.org.pub").write_text(
            "(public-key (ecc (curve Ed25519) (q #8D156F295D24B0D9A86FA5741A840FF2D24F60F7B6C4"
            "134814AD55625971B394#)))\n")
        units = profile / "lib/systemd/system"
        units.mkdir(parents=True)
        (units / "guix-daemon.service").write_text(f"[Service]\nExecStart={PROFILE}/bin/"
                                                   "guix-daemon --build-users-group=guixbuild\n")
        (units / "gnu-store.mount").write_text("[Mount]\nWhat=/gnu/store\nWhere=/gnu/store\n"
                                               "Type=none\nOptions=bind,ro\n")
        dest.mkdir(parents=True, exist_ok=True)
        out = dest / f"guix-binary-{version}.x86_64-linux.tar.xz"
        with tarfile.open(out, "w:xz") as tar:
            for part in ("gnu", "var"):
                tar.add(root / part, arcname=f"{top}/{part}")
    (dest / (out.name + ".sig")).write_text(fake_signature(out.read_bytes()))
    return out


def make_mirror(dest: Path, version: str) -> Path:
    """What the workflows download: the release tarball and its signature, the nightly one,
    guix-install.sh, and the release signing keys."""
    tarball = build_tarball(dest, version)
    nightly = dest / "guix-binary-nightly.x86_64-linux.tar.xz"
    nightly.write_bytes(tarball.read_bytes())
    (dest / "guix-install.sh").write_text(GUIX_INSTALL_SH)
    (dest / "viewgpg.php").write_text("-----BEGIN PGP PUBLIC KEY BLOCK-----\nfake\n")
    return dest


def install_fakes(machine: Machine, mirror: Path) -> None:
    """Put the fake commands in the machine's /usr/local/bin and /usr/local/sbin."""
    for name, text in (("wget", WGET.replace("{mirror!r}", repr(str(mirror)))),
                       ("gpg", GPG), ("systemctl", SYSTEMCTL)):
        machine.write_file(f"/usr/local/bin/{name}", text, mode=0o755)
    for name in ("groupadd", "useradd", "usermod"):
        machine.write_file(f"/usr/local/sbin/{name}", RECORD.format(name=name), mode=0o755)
    machine.write_file("/var/log/guix/accounts.log", "")


def guix_install_action(dest: Path) -> Path:
    """The fake PromyLOPh/guix-install-action, as a local action directory."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "action.yml").write_text(GUIX_INSTALL_ACTION)
    return dest

