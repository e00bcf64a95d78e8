"""The arm64 sandbox: a Debian arm64 userland + aarch64 onnxruntime/numpy wheels, run under qemu-user.

Built once and cached (``~/.cache/edgefuse/arm64-<cpu>-<suite>-ort<version>``), following the recipe tested in
the qemu-user route ("route A": no binfmt, no chroot, nothing kernel-global):

1. ``debootstrap --foreign --variant=minbase`` downloads and unpacks a minimal arm64 Debian (python3, libstdc++,
   libgomp); every downloaded ``.deb`` is then unpacked with ``dpkg-deb -x`` because the first stage leaves
   python3.11 packed.
2. The host's pip downloads the aarch64 wheels of onnxruntime and numpy and unpacks them into a ``--target``
   folder (no arm64 pip has to run).
3. A fake ``/proc/cpuinfo`` that matches the emulated CPU is written inside the root: qemu's ``-L`` prefix
   redirects the guest's reads there. Without it onnxruntime's cpuinfo parser segfaults on the host's x86 file;
   a file that does not match ``-cpu`` makes onnxruntime pick kernels the CPU lacks (SIGILL).
4. Runs use ``qemu-aarch64-static -cpu <model>``, never ``-cpu max``: with ``max`` (SVE on) qemu 7.2 gives
   wrong int8 results.

Emulation is 100-400x slower than native and its timings say nothing about a device: use it to check that the
arm64 graphs load and agree with x86, and label every number from it as emulated.

Example:
    >>> sorted(CPU_MODELS)
    ['cortex-a72', 'neoverse-n1']
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from edgefuse.errors import ConfigError, MissingDependencyError, ProfileError
from edgefuse.io_utils import atomic_dir, write_json_atomic

logger = logging.getLogger(__name__)

# -cpu name -> the /proc/cpuinfo fields a real core of that model shows (Features drive ORT's kernel choice).
CPU_MODELS: dict[str, dict[str, str]] = {
    # AWS Graviton2 / Ampere Altra class: dot-product int8 (asimddp), no i8mm, no SVE.
    "neoverse-n1": {
        "features": "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop "
        "asimddp ssbs",
        "variant": "0x3",
        "part": "0xd0c",
    },
    # Raspberry Pi 4 class: plain NEON, no dot product.
    "cortex-a72": {"features": "fp asimd evtstrm crc32 cpuid", "variant": "0x0", "part": "0xd08"},
}
EMULATED_CORES = 2  # cores listed in the fake cpuinfo (qemu-user runs guest threads on host threads anyway)
# host tool -> Debian package that provides it
HOST_TOOLS: dict[str, str] = {"debootstrap": "debootstrap", "dpkg-deb": "dpkg"}
QEMU_NAMES: tuple[str, ...] = ("qemu-aarch64-static", "qemu-aarch64")
INSTALL_HINT = "apt-get install -y --no-install-recommends qemu-user-static debootstrap"
ROOT_PACKAGES = "python3,libstdc++6,libgomp1"


@dataclass(frozen=True)
class ArmSandbox:
    """A built sandbox: run the aarch64 Python with :meth:`command` and :meth:`env`."""

    root: Path
    site_packages: Path
    qemu: Path
    cpu: str
    python_version: str
    onnxruntime_version: str

    def command(self, *args: str) -> list[str]:
        """argv that runs the sandbox's python3 with ``args`` under qemu-user.

        Example:
            >>> ArmSandbox(Path("/r"), Path("/s"), Path("/q"), "neoverse-n1", "3.11", "1.32.0").command("-V")[:3]
            ['/q', '-cpu', 'neoverse-n1']
        """
        return [str(self.qemu), "-cpu", self.cpu, "-L", str(self.root),
                str(self.root / "usr" / "bin" / f"python{self.python_version}"), *args]

    def env(self) -> dict[str, str]:
        """A clean environment: nothing from the host's venv (PYTHONHOME, VIRTUAL_ENV) may leak into the guest."""
        return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONPATH": str(self.site_packages),
                "PYTHONNOUSERSITE": "1", "HOME": str(self.root / "root")}


def find_host_tools(search_path: str | None = None) -> dict[str, Path]:
    """Locate qemu-user and the build tools on ``search_path`` (default: ``$PATH`` plus the sbin folders).

    Raises:
        MissingDependencyError: one is missing; the message names the Debian packages to install.

    Example:
        >>> find_host_tools(search_path="/nonexistent")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        edgefuse.errors.MissingDependencyError: ...
    """
    path = search_path if search_path is not None else os.pathsep.join(
        [os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
    found: dict[str, Path] = {}
    missing: list[str] = []
    qemu = next((shutil.which(n, path=path) for n in QEMU_NAMES if shutil.which(n, path=path)), None)
    if qemu is None:
        missing.append("qemu-aarch64-static (package qemu-user-static)")
    else:
        found["qemu"] = Path(qemu)
    for tool, pkg in HOST_TOOLS.items():
        hit = shutil.which(tool, path=path)
        if hit is None:
            missing.append(f"{tool} (package {pkg})")
        else:
            found[tool] = Path(hit)
    if missing:
        raise MissingDependencyError(
            f"--target arm64-emulated needs host tools that are not installed: {', '.join(missing)}; "
            f"install them as root: {INSTALL_HINT}"
        )
    return found


def default_cache_dir() -> Path:
    """``$EDGEFUSE_CACHE`` or ``~/.cache/edgefuse``."""
    return Path(os.environ.get("EDGEFUSE_CACHE", Path.home() / ".cache" / "edgefuse"))


def host_onnxruntime_version() -> str:
    """The onnxruntime version installed on this machine (the sandbox gets the same by default)."""
    try:
        return metadata.version("onnxruntime")
    except metadata.PackageNotFoundError as exc:
        raise MissingDependencyError("onnxruntime is not installed here: pip install onnxruntime") from exc


def cpuinfo_text(cpu: str, cores: int = EMULATED_CORES) -> str:
    """A /proc/cpuinfo for ``cpu`` (see :data:`CPU_MODELS`).

    Example:
        >>> "0xd08" in cpuinfo_text("cortex-a72")
        True
    """
    if cpu not in CPU_MODELS:
        raise ConfigError(f"unknown emulated CPU {cpu!r}; choose one of {sorted(CPU_MODELS)}")
    m = CPU_MODELS[cpu]
    block = ("processor\t: {i}\nBogoMIPS\t: 50.00\nFeatures\t: {features}\nCPU implementer\t: 0x41\n"
             "CPU architecture: 8\nCPU variant\t: {variant}\nCPU part\t: {part}\nCPU revision\t: 1\n\n")
    return "".join(block.format(i=i, **m) for i in range(cores))


def ensure_sandbox(
    cpu: str = "neoverse-n1",
    *,
    cache_dir: Path | None = None,
    onnxruntime_version: str | None = None,
    suite: str = "bookworm",
    search_path: str | None = None,
) -> ArmSandbox:
    """Return the cached sandbox for ``cpu``, building it first if needed (about 1 minute, ~0.5 GB).

    Args:
        cpu: emulated CPU model, a key of :data:`CPU_MODELS`.
        cache_dir: cache folder (default :func:`default_cache_dir`).
        onnxruntime_version: aarch64 onnxruntime to install (default: the host's version).
        suite: Debian release of the arm64 root.
        search_path: where to look for the host tools (default ``$PATH``).

    Raises:
        MissingDependencyError: qemu-user-static or debootstrap is missing.
        ProfileError: the build or the import check under qemu failed.

    Example (the skipped lines are not run: builds a Debian arm64 sandbox under qemu, minutes):
        >>> box = ensure_sandbox("neoverse-n1")  # doctest: +SKIP
        >>> subprocess.run(box.command("-c", "import onnxruntime"), env=box.env(), check=True)  # doctest: +SKIP
    """
    if cpu not in CPU_MODELS:
        raise ConfigError(f"unknown emulated CPU {cpu!r}; choose one of {sorted(CPU_MODELS)}")
    tools = find_host_tools(search_path)
    version = onnxruntime_version or host_onnxruntime_version()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    base = cache / f"arm64-base-{suite}-ort{version}"
    final = cache / f"arm64-{cpu}-{suite}-ort{version}"
    cache.mkdir(parents=True, exist_ok=True)
    with _lock(cache / ".arm64.lock"):
        if not (base / "sandbox.json").is_file():
            logger.warning("building the arm64 emulation sandbox once in %s (about a minute; downloads a minimal "
                           "Debian arm64 root and the aarch64 onnxruntime and numpy wheels); later runs reuse it", base)
            with atomic_dir(base, overwrite=True, require_marker=False, user_modes=False) as tmp:
                _build_base(tmp, tools, version, suite)
        meta = json.loads((base / "sandbox.json").read_text())
        if not (final / "sandbox.json").is_file():
            with atomic_dir(final, overwrite=True, require_marker=False, user_modes=False) as tmp:
                # Hard links: the per-CPU root costs no disk; only its proc/cpuinfo is its own file.
                subprocess.run(["cp", "-al", str(base / "rootfs"), str(tmp / "rootfs")], check=True)
                (tmp / "rootfs" / "proc").mkdir(exist_ok=True)
                (tmp / "rootfs" / "proc" / "cpuinfo").write_text(cpuinfo_text(cpu))
                write_json_atomic(tmp / "sandbox.json", {**meta, "cpu": cpu})
    box = ArmSandbox(final / "rootfs", base / "site-packages", tools["qemu"], cpu, meta["python_version"],
                     meta["onnxruntime_version"])
    _check(box)
    return box


def _build_base(tmp: Path, tools: dict[str, Path], version: str, suite: str) -> None:
    if os.geteuid() != 0:
        raise ProfileError(
            "building the arm64 sandbox needs root (debootstrap unpacks a Debian root); run the first "
            "`edgefuse profile --target arm64-emulated` as root (it is cached afterwards) or use --target ssh://..."
        )
    root = tmp / "rootfs"
    _run([str(tools["debootstrap"]), "--arch=arm64", "--foreign", "--variant=minbase",
          f"--include={ROOT_PACKAGES}", suite, str(root)], "debootstrap (downloading the arm64 Debian root)")
    archives = root / "var" / "cache" / "apt" / "archives"
    for deb in sorted(archives.glob("*.deb")):
        _run([str(tools["dpkg-deb"]), "-x", str(deb), str(root)], f"dpkg-deb -x {deb.name}")
        deb.unlink()  # 40 MB of packages nobody needs once unpacked
    pythons = sorted(p.name for p in (root / "usr" / "bin").glob("python3.*") if p.name[8:].isdigit())
    if not pythons:
        raise ProfileError(f"the arm64 root in {root} has no python3.X; the debootstrap of {suite!r} is incomplete")
    pyver = pythons[-1][len("python"):]  # e.g. "3.11"
    tag = pyver.replace(".", "")
    plat = ["--platform", "manylinux_2_28_aarch64", "--platform", "manylinux2014_aarch64",
            "--python-version", pyver, "--implementation", "cp", "--abi", f"cp{tag}", "--abi", "abi3", "--abi", "none"]
    wheels = tmp / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    _run([*pip, "download", "-q", "--only-binary=:all:", *plat, "-d", str(wheels), f"onnxruntime=={version}", "numpy"],
         f"pip download of the aarch64 onnxruntime=={version} and numpy wheels")
    _run([*pip, "install", "-q", "--no-index", "--find-links", str(wheels), "--target", str(tmp / "site-packages"),
          "--only-binary=:all:", *plat, f"onnxruntime=={version}", "numpy"], "pip install --target of the wheels")
    shutil.rmtree(wheels)
    write_json_atomic(tmp / "sandbox.json", {"suite": suite, "python_version": pyver, "onnxruntime_version": version})


def _check(box: ArmSandbox) -> None:
    """Import onnxruntime under qemu once: a broken cache fails here, with qemu's own words, not mid-profile."""
    proc = subprocess.run(box.command("-c", "import onnxruntime, numpy; print(onnxruntime.__version__)"),
                          env=box.env(), capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 or proc.stdout.strip() != box.onnxruntime_version:
        raise ProfileError(
            f"onnxruntime does not import in the arm64 sandbox {box.root.parent} (exit {proc.returncode}): "
            f"{proc.stderr.strip()[-400:]}; delete that folder to rebuild it"
        )


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ProfileError(f"{what} failed (exit {proc.returncode}): {proc.stderr.strip()[-600:]}")


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    # Two profiles started at once must not build the same sandbox twice (or rename over each other).
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
