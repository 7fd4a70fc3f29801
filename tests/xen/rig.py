#!/usr/bin/env python3
"""The Xen rig: real Xen 4.17 booted under QEMU (TCG), dom0 + PV domUs.

One command for contributors (as root, or with sudo for the image build)::

    python tests/xen/rig.py run                  # the cross-domain tests (default selection)
    python tests/xen/rig.py run tests/xen -k proxy -x   # other pytest arguments
    python tests/xen/rig.py bench                # vchan vs TCP between dom0 and a domU
    python tests/xen/rig.py build                # only build (or find) the cached image

What ``run`` does:

1. **Image** (cached): a Debian bookworm tree from ``debootstrap`` with Xen,
   Linux and Python, made into an ext4 file without loop mounts
   (``mkfs.ext4 -d``), plus the Xen binary, dom0's kernel and initrd beside
   it.  It lives under ``${XDG_CACHE_HOME:-~/.cache}/vchan/xen-rig/image-<key>``
   where ``key`` hashes the recipe (this file's ``RECIPE`` and ``image/``), so
   a changed recipe builds a new image.  About 80 s, network-bound.
2. **Share**: a run directory holds the 9p share for dom0 -- the stage
   scripts (``guest/``), this checkout's tests, and ``site/``: this checkout
   installed (``pip install --target``, built here with the same Python 3.11
   ABI as the guest's) with what the tests need.
3. **Boot**: ``qemu-system-x86_64`` with the uncompressed Xen as
   ``-kernel``, dom0's kernel and initrd as multiboot modules, the image as a
   throw-away (``snapshot=on``) root and a second, read-only time for the
   domUs.  dom0's stage script starts xenstored and xenconsoled, makes the
   ``xenbr0`` bridge, runs pytest, writes the exit status and collects the
   logs, then powers off.  QEMU is killed if the whole run exceeds
   ``--timeout``.
4. **Result**: the run directory (printed) holds ``serial.log`` (Xen and
   dom0's console), ``out/pytest.log``, ``out/xen-logs/console/guest-*.log``
   (every domU's console), ``out/domus/`` (each domU's job logs) and the
   status; the command exits with pytest's status (3 for a rig failure).

The tests under ``tests/xen/`` drive domUs from dom0 through
``tests/xen/harness.py``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent

# -- the image recipe ---------------------------------------------------------------------

#: Everything that decides the image's content; its hash names the cache entry.
RECIPE: dict[str, object] = {
    "format": 1,
    "suite": "bookworm",
    "mirror": "http://deb.debian.org/debian",
    "variant": "minbase",
    "packages": [
        "linux-image-amd64", "initramfs-tools", "udev", "kmod",
        "xen-hypervisor-4.17-amd64", "xen-utils-4.17", "xenstore-utils", "libxenmisc4.17",
        "python3", "iproute2", "procps", "e2fsprogs", "util-linux",
    ],
    "initramfs_modules": ["virtio_pci", "virtio_blk", "xen_blkfront", "ext4"],
    "size": "2G",
}
IMAGE_FILES = sorted((HERE / "image").iterdir())

#: Xen's command line (see docs/xen-rig.md: smap=0 and spec-ctrl=eager-fpu are required
#: under QEMU's TCG CPU model).
XEN_CMDLINE = ("console=com1 com1=115200,8n1 dom0_mem=768M,max:768M dom0_max_vcpus=2 "
               "bootscrub=0 smap=0 spec-ctrl=eager-fpu")
DOM0_CMDLINE = "root=/dev/vda rw console=hvc0 earlyprintk=xen init=/sbin/rig-init"
QEMU_MEMORY_MIB = 3072

#: What the guests' Python needs besides vchan: pytest and its plugins for dom0's run.
GUEST_REQUIREMENTS = ["pytest>=8", "pytest-asyncio>=1.4", "pytest-timeout>=2.3",
                      "uvloop>=0.19"]

DEFAULT_SELECTION = ["tests/xen", "tests/test_devices.py", "-k", "not sim", "--durations=15"]


class RigError(Exception):
    """The rig itself failed (not the tests it ran)."""


def log(message: str) -> None:
    """One line of progress on stderr."""
    print(f"xen-rig: {message}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    """``${XDG_CACHE_HOME:-~/.cache}/vchan/xen-rig`` (or ``$VCHAN_XEN_RIG_CACHE``)."""
    explicit = os.environ.get("VCHAN_XEN_RIG_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vchan" / "xen-rig"


def recipe_key() -> str:
    """A short hash of the recipe and the in-image files."""
    h = hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode())
    for path in IMAGE_FILES:
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Image:
    """A built image: root file system, Xen, dom0's kernel and initrd."""

    directory: Path

    @property
    def rootfs(self) -> Path:
        return self.directory / "rootfs.img"

    @property
    def xen(self) -> Path:
        return self.directory / "xen"

    @property
    def kernel(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.img"

    def complete(self) -> bool:
        return (self.directory / "done").exists()


def _run(argv: list[str], **kw: object) -> None:
    """Run a build step; a failure is a RigError naming the step."""
    log("$ " + shlex.join(argv))
    done = subprocess.run(argv, check=False, **kw)  # type: ignore[call-overload]
    if done.returncode != 0:
        raise RigError(f"{argv[0]} failed with status {done.returncode}")


def _root_prefix() -> list[str]:
    if os.geteuid() == 0:
        return []
    if shutil.which("sudo"):
        return ["sudo"]
    raise RigError("building the image needs root (debootstrap): run as root or install sudo")


def build_image(force: bool = False) -> Image:
    """Find the cached image for the current recipe, or build it."""
    image = Image(cache_root() / f"image-{recipe_key()}")
    if image.complete() and not force:
        return image
    for tool in ("debootstrap", "mkfs.ext4"):
        if not shutil.which(tool) and not Path("/usr/sbin", tool).exists():
            raise RigError(f"{tool} is missing: scripts/setup.sh --xen installs the rig's packages")
    cache_root().mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    sudo = _root_prefix()
    with tempfile.TemporaryDirectory(dir=cache_root(), prefix="build-") as tmp:
        tree = Path(tmp) / "tree"
        packages = ",".join(RECIPE["packages"])  # type: ignore[arg-type]
        _run([*sudo, "debootstrap", f"--variant={RECIPE['variant']}", f"--include={packages}",
              str(RECIPE["suite"]), str(tree), str(RECIPE["mirror"])])
        modules = "\n".join(RECIPE["initramfs_modules"]) + "\n"  # type: ignore[arg-type]
        script = (
            "set -e\n"
            f"printf '%s' {shlex.quote(modules)} >> \"$1/etc/initramfs-tools/modules\"\n"
            "sed -i 's/^MODULES=.*/MODULES=list/' \"$1/etc/initramfs-tools/initramfs.conf\"\n"
            "chroot \"$1\" update-initramfs -u -k all\n"
            "install -m 755 \"$2/rig-init\" \"$1/sbin/rig-init\"\n"
            "mkdir -p \"$1/rig\" \"$1/job\"\n"
            "echo rig > \"$1/etc/hostname\"\n"
            ": > \"$1/etc/fstab\"\n"
            "rm -rf \"$1\"/var/cache/apt/archives/*.deb \"$1\"/var/lib/apt/lists/*\n"
        )
        _run([*sudo, "sh", "-c", script, "sh", str(tree), str(HERE / "image")])
        staging = Path(tmp) / "image"
        staging.mkdir()
        boot = tree / "boot"
        kernels = sorted(boot.glob("vmlinuz-*"))
        initrds = sorted(boot.glob("initrd.img-*"))
        xens = sorted(boot.glob("xen-4.17*.gz"))
        if not (kernels and initrds and xens):
            raise RigError(f"the image has no kernel, initrd or Xen under {boot}")
        shutil.copyfile(kernels[-1], staging / "vmlinuz")
        shutil.copyfile(initrds[-1], staging / "initrd.img")
        with gzip.open(xens[-1]) as src, open(staging / "xen", "wb") as dst:
            shutil.copyfileobj(src, dst)
        rootfs = staging / "rootfs.img"
        _run(["truncate", "-s", str(RECIPE["size"]), str(rootfs)])
        _run([*sudo, "mkfs.ext4", "-q", "-F", "-L", "rigroot", "-d", str(tree), str(rootfs)])
        (staging / "recipe.json").write_text(json.dumps(RECIPE, indent=1) + "\n")
        (staging / "done").write_text(f"{time.monotonic() - started:.0f} s\n")
        if image.directory.exists():
            shutil.rmtree(image.directory)
        staging.rename(image.directory)
        _run([*sudo, "rm", "-rf", str(tree)])
    log(f"image built in {time.monotonic() - started:.0f} s: {image.directory}")
    for old in cache_root().glob("image-*"):
        if old != image.directory:
            log(f"removing the image of an older recipe: {old}")
            shutil.rmtree(old, ignore_errors=True)
    return image


# -- the share: this checkout, installed for the guests' Python ------------------------------


def _wheelhouse_site(target: Path, requirements: list[str]) -> None:
    """Install ``requirements`` for the guest's Python 3.11 into ``target``."""
    if sys.version_info[:2] != (3, 11):
        raise RigError(f"run the rig with Python 3.11 (the guest's), not {sys.version.split()[0]}")
    _run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
          "--no-compile", "--target", str(target), *requirements],
         stdout=subprocess.DEVNULL)


def prepare_share(run_dir: Path, job: str) -> Path:
    """The 9p share: stage scripts, tests, the installed checkout and ``job.sh``."""
    share = run_dir / "share"
    (share / "out").mkdir(parents=True)
    shutil.copytree(HERE / "guest", share / "boot")
    # dom0's Python: vchan from this checkout plus pytest; the domUs' copy
    # (what the job disks carry) is vchan alone.
    key = hashlib.sha256(json.dumps(GUEST_REQUIREMENTS).encode()).hexdigest()[:12]
    deps = cache_root() / f"site-deps-{key}"
    if not (deps / ".done").exists():
        tmp = Path(tempfile.mkdtemp(dir=cache_root(), prefix="deps-"))
        _wheelhouse_site(tmp, GUEST_REQUIREMENTS)
        (tmp / ".done").write_text("")
        if deps.exists():
            shutil.rmtree(deps)
        tmp.rename(deps)
    site_vchan = share / "site-vchan"
    _wheelhouse_site(site_vchan, [str(ROOT)])
    # cffi's run-time part came with vchan (a dependency); pytest and plugins from the cache.
    shutil.copytree(deps, share / "site-test", ignore=shutil.ignore_patterns(".done"))
    src = share / "src"
    src.mkdir()
    shutil.copy(ROOT / "pyproject.toml", src)
    shutil.copytree(ROOT / "tests", src / "tests",
                    ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache", "corpus"))
    (share / "job.sh").write_text(job)
    return share


# -- booting -------------------------------------------------------------------------------


def qemu_argv(image: Image, share: Path, serial: Path) -> list[str]:
    """QEMU's command line for one run (TCG; Xen as the multiboot kernel)."""
    qemu = shutil.which("qemu-system-x86_64")
    if not qemu:
        raise RigError("qemu-system-x86_64 is missing: scripts/setup.sh --xen installs it")
    dom0 = f"{image.kernel} {DOM0_CMDLINE.replace(',', ',,')},{image.initrd}"
    return [
        qemu, "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2",
        "-m", str(QEMU_MEMORY_MIB), "-no-reboot", "-display", "none", "-monitor", "none",
        "-serial", f"file:{serial}", "-nic", "none",
        "-kernel", str(image.xen), "-append", XEN_CMDLINE, "-initrd", dom0,
        "-drive", f"file={image.rootfs},if=virtio,format=raw,snapshot=on",
        "-drive", f"file={image.rootfs},if=virtio,format=raw,readonly=on",
        "-virtfs", f"local,path={share},mount_tag=rig,security_model=none",
    ]


def boot(image: Image, share: Path, run_dir: Path, timeout: float) -> float:
    """Boot the rig, run the share's job, return the boot-to-poweroff time."""
    serial = run_dir / "serial.log"
    argv = qemu_argv(image, share, serial)
    (run_dir / "qemu.cmd").write_text(shlex.join(argv) + "\n")
    log(f"booting Xen under QEMU (TCG), at most {timeout:.0f} s; serial console: {serial}")
    started = time.monotonic()
    with open(run_dir / "qemu.log", "wb") as qlog:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=qlog, stderr=qlog,
                                start_new_session=True)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log(f"overall timeout ({timeout:.0f} s): killing QEMU")
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise RigError(f"the rig did not finish within {timeout:.0f} s") from None
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    elapsed = time.monotonic() - started
    if proc.returncode != 0:
        raise RigError(f"QEMU exited with status {proc.returncode} (see {run_dir}/qemu.log)")
    return elapsed


def _new_run_dir(base: Path | None) -> Path:
    base = base or cache_root() / "runs"
    base.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(tempfile.mkdtemp(dir=base, prefix=f"{stamp}-"))


def run_job(job: str, *, timeout: float, job_timeout: float, out_dir: Path | None) -> int:
    """Build or reuse the image, boot, run ``job``; the job's status (3: rig failure)."""
    started = time.monotonic()
    run_dir = _new_run_dir(out_dir)
    log(f"run directory: {run_dir}")
    try:
        image = build_image()
        share = prepare_share(run_dir, job)
        (share / "boot" / "env").write_text(f"RIG_JOB_TIMEOUT={int(job_timeout)}\n")
        took = boot(image, share, run_dir, timeout)
    except RigError as exc:
        log(f"FAILED: {exc}")
        log(f"logs: {run_dir}")
        return 3
    status_file = share / "out" / "status"
    status = int(status_file.read_text().strip()) if status_file.exists() else None
    for name in ("pytest.log", "bench.md"):
        if (share / "out" / name).exists():
            (run_dir / name).symlink_to(share / "out" / name)
    log(f"QEMU ran {took:.0f} s; whole run {time.monotonic() - started:.0f} s")
    log(f"logs: {run_dir} (serial.log, pytest.log, share/out/)")
    if status is None:
        log("FAILED: the job wrote no status (see serial.log)")
        return 3
    log(f"job status: {status}")
    return status


def _pytest_job(args: list[str]) -> str:
    return ("cd /rig/src && exec python3 -m pytest -p no:cacheprovider "
            + shlex.join(args) + " > /rig/out/pytest.log 2>&1\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Boot real Xen under QEMU and run vchan's cross-domain tests in it.")
    parser.add_argument("--out", type=Path, default=None,
                        help="where run directories go (default: the cache's runs/)")
    parser.add_argument("--timeout", type=float, default=1500,
                        help="kill QEMU after this many seconds (default 1500)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build", help="build the image for the current recipe (or find it cached)")
    run = sub.add_parser("run", help="run pytest in dom0 (default: the cross-domain tests)")
    run.add_argument("pytest_args", nargs=argparse.REMAINDER,
                     help=f"pytest arguments (default: {shlex.join(DEFAULT_SELECTION)})")
    script = sub.add_parser("script", help="run a shell script in dom0 (debugging the rig)")
    script.add_argument("path", type=Path, help="the script; /rig/out keeps what it writes")
    bench = sub.add_parser("bench", help="vchan vs TCP between dom0 and a domU")
    bench.add_argument("--mib", type=int, default=16, help="bulk transfer size (default 16)")
    bench.add_argument("--rounds", type=int, default=300, help="ping-pong rounds (default 300)")
    bench.add_argument("--repeat", type=int, default=3, help="runs of each transport (default 3)")
    args = parser.parse_args(argv)

    if args.cmd == "build":
        try:
            image = build_image()
        except RigError as exc:
            log(f"FAILED: {exc}")
            return 3
        print(image.directory)
        return 0
    job_timeout = max(60.0, args.timeout - 120)
    if args.cmd == "run":
        pytest_args = [a for a in args.pytest_args if a != "--"] or DEFAULT_SELECTION
        job = _pytest_job(pytest_args)
    elif args.cmd == "script":
        job = ("exec > /rig/out/script.log 2>&1\nset -x\ncd /rig/src\n"
               + args.path.read_text())
    else:
        job = ("cd /rig/src && exec python3 tests/xen/bench.py "
               f"--mib {args.mib} --rounds {args.rounds} --repeat {args.repeat} --out /rig/out "
               "> /rig/out/bench.log 2>&1\n")
    return run_job(job, timeout=args.timeout, job_timeout=job_timeout, out_dir=args.out)


if __name__ == "__main__":
    sys.exit(main())
