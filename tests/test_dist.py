"""The release files work where a user installs them, outside the source tree.

``scripts/build-dist`` builds the sdist and the manylinux wheel; the slow
tests here (run under CI, or with ``VCHAN_TEST_DIST=1``) install each in a
fresh virtualenv in a temporary directory, on Python 3.11 and 3.12, and run
the commands a user runs there: ``vchan demo``, ``vchan sim run`` with
Debian's ``vchan-socket-proxy`` talking to a Python client, and the examples
(the README's echo pair, the aiohttp one).  From the
unpacked sdist they run mypy and the whole default suite.  The quick tests pin down the pieces: the
version's one source, the sdist's file list, and where ``vchan.sim.compat``
finds or builds the drop-in libraries of an installed vchan.
"""

from __future__ import annotations

import ast
import hashlib
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import support

import vchan
from vchan.sim import compat

ROOT = Path(__file__).resolve().parents[1]
PROXY = Path("/usr/lib/xen-4.17/bin/vchan-socket-proxy")
SLOW = support.IN_CI or os.environ.get("VCHAN_TEST_DIST") == "1"
slow = pytest.mark.skipif(not SLOW, reason="builds and installs the release files (a few "
                                           "minutes): VCHAN_TEST_DIST=1 or CI runs it")


def _python(version: str) -> str | None:
    """An interpreter of ``version`` (3.11, 3.12): on PATH, or one of pyenv's."""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    found = sorted(pyenv.glob(f"versions/{version}.*/bin/python{version}"), reverse=True)
    for candidate in [shutil.which(f"python{version}"), *found]:
        if candidate and subprocess.run([str(candidate), "-c", "pass"],
                                        capture_output=True).returncode == 0:
            return str(candidate)
    return None


def _run(argv: list[str | Path], *, cwd: Path, env: dict[str, str] | None = None,
         timeout: float = 600, input: bytes | None = None) -> str:
    done = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True,
                          timeout=timeout, input=input)
    out = done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
    assert done.returncode == 0, f"{argv} exited {done.returncode}:\n{out[-4000:]}"
    return out


def _user_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a user outside the tree: no VCHAN_* of the suite's."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("VCHAN_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), **extra)
    env.pop("XDG_RUNTIME_DIR", None)
    return env


# -- quick: the pieces ----------------------------------------------------------


def test_the_version_is_written_once() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^dynamic = \["version"\]', pyproject, re.M)
    assert not re.search(r"^version\s*=", pyproject.split("[tool.")[0], re.M)
    assert 'version = { attr = "vchan.__version__" }' in pyproject
    tree = ast.parse((ROOT / "vchan" / "__init__.py").read_text())
    versions = [n.value.value for n in tree.body if isinstance(n, ast.Assign)
                and any(getattr(t, "id", None) == "__version__" for t in n.targets)
                and isinstance(n.value, ast.Constant)]
    assert versions == [vchan.__version__]
    assert f"vchan {vchan.__version__}" in _run(
        [sys.executable, "-m", "vchan", "--version"], cwd=ROOT)


def test_license_and_changelog_are_there() -> None:
    assert "MIT License" in (ROOT / "LICENSE").read_text()
    assert 'license = "MIT"' in (ROOT / "pyproject.toml").read_text()
    assert (ROOT / "CHANGELOG.md").read_text().startswith("# Changelog")


def test_an_installed_vchan_builds_the_compat_libraries_into_a_user_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A wheel built without Xen's headers carries the sources only: they are
    built on first use into ~/.cache/vchan/compat/DIGEST, once."""
    support.need(support.c_compiler(), "a C compiler (apt-get install gcc)")
    support.need(Path("/usr/include/xengnttab.h").exists(),
                 "Xen's headers (apt-get install libxen-dev)")
    shipped = tmp_path / "site" / "vchan" / "_kernel"
    shutil.copytree(ROOT / "kernel", shipped, ignore=shutil.ignore_patterns("build"))
    monkeypatch.setattr(compat, "_CHECKOUT", tmp_path / "no-checkout" / "kernel" / "compat")
    monkeypatch.setattr(compat, "_SHIPPED", shipped / "compat")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert compat.source_dir() == shipped / "compat"
    assert compat.prebuilt_dir() is None
    out = compat.build()
    assert out.parent == tmp_path / "cache" / "vchan" / "compat"
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == \
        sorted(compat.LIBRARIES)
    stamp = (out / "libxengnttab.so.1").stat().st_mtime_ns
    assert compat.build() == out and (out / "libxengnttab.so.1").stat().st_mtime_ns == stamp
    # Other sources (an upgraded vchan): another directory, never the old libraries.
    with open(shipped / "compat" / "compat.c", "a") as f:
        f.write("\n/* changed */\n")
    assert compat.build() != out
    # Libraries a wheel carries are used as they are.
    lib = shipped / "compat" / "lib"
    shutil.copytree(out, lib)
    assert compat.build() == lib


def test_missing_compat_sources_are_one_clear_error(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compat, "_CHECKOUT", tmp_path / "a")
    monkeypatch.setattr(compat, "_SHIPPED", tmp_path / "b")
    with pytest.raises(compat.CompatError, match="reinstall vchan"):
        compat.build()


# -- slow: the release files, built and installed ------------------------------


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    out = tmp_path_factory.mktemp("dist")
    _run([ROOT / "scripts" / "build-dist", out], cwd=ROOT, timeout=900)
    wheels = list(out.glob("vchan-*.whl"))
    sdists = list(out.glob("vchan-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1
    yield {"wheel": wheels[0], "sdist": sdists[0]}


def _venv(python: str, where: Path, *install: str | Path) -> Path:
    _run([python, "-m", "venv", where], cwd=where.parent)
    _run([where / "bin" / "python", "-m", "pip", "install", "-q",
          "--disable-pip-version-check", *install], cwd=where.parent, timeout=900)
    return where


@slow
def test_the_wheel_is_abi3_manylinux_and_carries_the_compat_libraries(
        dist: dict[str, Path]) -> None:
    name = dist["wheel"].name
    assert re.fullmatch(rf"vchan-{re.escape(vchan.__version__)}-cp311-abi3-"
                        r"(manylinux\w+\.)*manylinux_2_\d+_x86_64\.whl", name), name
    names = zipfile.ZipFile(dist["wheel"]).namelist()
    assert "vchan/_native.abi3.so" in names
    for lib in compat.LIBRARIES:
        assert f"vchan/_kernel/compat/lib/{lib}" in names
    assert "vchan/_kernel/compat/gnttab.c" in names and "vchan/_kernel/sim.c" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


@slow
def test_the_sdist_holds_every_file_of_the_tree(dist: dict[str, Path]) -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout (an unpacked sdist itself)")
    prefix = f"vchan-{vchan.__version__}/"
    with tarfile.open(dist["sdist"]) as tar:
        held = {m.name.removeprefix(prefix) for m in tar.getmembers() if m.isfile()}
    missing = sorted(set(tracked.stdout.split()) - held - {".gitignore"})
    assert not missing, f"the sdist lacks {missing}"


@slow
@pytest.mark.parametrize("version", ["3.11", "3.12"])
def test_the_wheel_installs_and_runs_outside_the_tree(dist: dict[str, Path], version: str,
                                                      tmp_path: Path) -> None:
    python = _python(version)
    support.need(python, f"Python {version} (pyenv install {version})")
    assert python is not None
    support.need(PROXY.exists(), "Debian's vchan-socket-proxy (apt-get install xen-utils-4.17)")
    venv = _venv(python, tmp_path / "venv", dist["wheel"])
    bin_ = venv / "bin"
    home = tmp_path / "home"
    home.mkdir()
    env = _user_env(home, VCHAN_SIM_DIR=str(tmp_path / "sim"))
    # The installed package is the one that runs: not the source tree.
    where = _run([bin_ / "python", "-c", "import vchan; print(vchan.__file__)"],
                 cwd=tmp_path, env=env)
    assert where.strip().startswith(str(venv)), where
    out = _run([bin_ / "vchan", "demo", "--mib", "32", "--no-compare"], cwd=tmp_path,
               env=env, timeout=300)
    assert "(match)" in out and "MISMATCH" not in out, out
    assert "stopped the emulator the demo started" in out, out
    _socket_proxy_round_trip(bin_, tmp_path, env)
    _examples(bin_, tmp_path, env)


def _examples(bin_: Path, tmp: Path, env: dict[str, str]) -> None:
    """The README's first example and the aiohttp one, copied out of the tree and
    run by the installed vchan (aiohttp installed as the README says)."""
    for name in ("echo_server.py", "echo_client.py", "aiohttp_over_vchan.py"):
        shutil.copy(ROOT / "examples" / name, tmp / name)
    _run([bin_ / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check",
          "aiohttp"], cwd=tmp, timeout=600)
    for serve, client, expect in [
            (["echo_server.py"], ["echo_client.py"], "b'hello over vchan'"),
            (["aiohttp_over_vchan.py", "serve"], ["aiohttp_over_vchan.py", "fetch"],
             "all responses as expected")]:
        server = subprocess.Popen([bin_ / "python", *serve], cwd=tmp,
                                  env=dict(env, VCHAN_DOMID="1"), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
        try:
            out = _run([bin_ / "python", *client], cwd=tmp, env=dict(env, VCHAN_DOMID="2"),
                       timeout=60)
            assert expect in out, out
        finally:
            server.terminate()
            _, err = server.communicate(timeout=30)
        assert "Traceback" not in err, err
    _run([bin_ / "vchan", "sim", "stop"], cwd=tmp, env=env)


def _socket_proxy_round_trip(bin_: Path, tmp: Path, env: dict[str, str]) -> None:
    """Debian's vchan-socket-proxy (server, domain 1) and vchan (client, domain 2),
    both through the installed ``vchan sim run``, 256 KiB each way."""
    block = hashlib.sha256(b"x").digest()           # ours: 8,192 of these (256 KiB)
    ours = block * 8192
    theirs = random.Random(17).randbytes((256 << 10) + 1)
    client = tmp / "client.py"
    client.write_text(
        "import asyncio, hashlib, sys\nimport vchan\n\n"
        "async def main() -> None:\n"
        "    sys.stdin.readline()                  # go: the server is up\n"
        "    reader, writer = await vchan.open_connection(1, 'echo', timeout=30)\n"
        "    writer.write(hashlib.sha256(b'x').digest() * 8192)\n"
        "    await writer.drain()\n"
        f"    got = await reader.readexactly({len(theirs)})\n"
        "    print(hashlib.sha256(got).hexdigest(), flush=True)\n"
        "    writer.close()\n"
        "    await writer.wait_closed()\n\n"
        "asyncio.run(main())\n")
    py = subprocess.Popen([bin_ / "vchan", "sim", "run", "--domid", "2", "--",
                           bin_ / "python", client], cwd=tmp, env=env, stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # --peer 2: the C server needs its client's domain to exist when it starts,
    # and the client's own `sim run` may not have reached the emulator yet.
    srv = subprocess.Popen([bin_ / "vchan", "sim", "run", "--domid", "1", "--peer", "2",
                            "--", PROXY, "--mode=server", "2",
                            "/local/domain/1/data/vchan/2/echo", "-"],
                           cwd=tmp, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
    try:
        assert py.stdin is not None and srv.stdin is not None and srv.stdout is not None
        py.stdin.write(b"go\n")
        py.stdin.flush()
        got = srv.stdout.read(len(ours))                # vchan -> proxy's stdout
        if got != ours:     # short: the proxy ended; say why, not a 256 KiB diff
            _, err = srv.communicate(timeout=30)
            pytest.fail(f"the proxy wrote {len(got)} of {len(ours)} bytes "
                        f"({'intact' if ours.startswith(got) else 'corrupted'}): "
                        f"{err.decode(errors='replace')}")
        srv.stdin.write(theirs)                         # proxy's stdin -> vchan
        srv.stdin.flush()
        out, err = py.communicate(timeout=60)
        assert py.returncode == 0, err.decode(errors="replace")
        assert out.decode().strip() == hashlib.sha256(theirs).hexdigest()
        assert srv.wait(timeout=30) == 0, srv.stderr.read() if srv.stderr else ""
    finally:
        for p in (py, srv):
            if p.poll() is None:
                p.kill()
                p.wait()
            for f in (p.stdin, p.stdout, p.stderr):
                if f is not None:
                    f.close()
        _run([bin_ / "vchan", "sim", "stop"], cwd=tmp, env=env)


#: What test_the_sdist_installs_and_its_suite_and_mypy_run runs from the sdist.
SDIST_SUITE = tuple(f"tests/test_{name}.py" for name in (
    "ring", "mux", "devices", "compat", "cli", "streams", "xenstore", "examples"))


def test_the_sdist_suite_names_files_that_exist() -> None:
    missing = [f for f in SDIST_SUITE if not (ROOT / f).is_file()]
    assert not missing, f"renamed or removed: update SDIST_SUITE ({missing})"


@slow
@pytest.mark.timeout(2400)
def test_the_sdist_installs_and_its_suite_and_mypy_run(dist: dict[str, Path],
                                                      tmp_path: Path) -> None:
    python = _python("3.11")
    assert python is not None
    with tarfile.open(dist["sdist"]) as tar:
        tar.extractall(tmp_path, filter="data")
    tree = tmp_path / f"vchan-{vchan.__version__}"
    # Built from the sdist, with what the suite and mypy use.
    venv = _venv(python, tmp_path / "venv", f"{dist['sdist']}[dev]")
    bin_ = venv / "bin"
    home = tmp_path / "home"
    home.mkdir()
    env = _user_env(home, VCHAN_SIM_DIR=str(tmp_path / "sim"))
    out = _run([bin_ / "vchan", "demo", "--mib", "16", "--no-compare"], cwd=tmp_path, env=env,
               timeout=300)
    assert "(match)" in out, out
    # mypy checks the unpacked tree (vchan, tests, examples, benchmarks) as CI does.
    _run([bin_ / "mypy"], cwd=tree, env=env, timeout=900)
    # The suite from the unpacked tree, as a developer runs it: installed
    # editable there (scripts/setup.sh does the same).  The files that test
    # what the sdist builds -- the C ring, framing and send path, the device
    # layer, the compat libraries with a C peer, the command, the streams,
    # XenStore, the examples -- not the whole default suite: CI has just run
    # that from the checkout, and test_the_sdist_holds_every_file_of_the_tree
    # shows the tree it ran from is the sdist's (about 2 minutes, not 9).
    _run([bin_ / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check",
          "--no-deps", "-e", tree], cwd=tmp_path, timeout=900)
    suite_env = {k: v for k, v in env.items() if k != "CI"}
    ran = _run([bin_ / "pytest", "-q", "-p", "no:cacheprovider", *SDIST_SUITE,
                "--timeout", "240"], cwd=tree, env=suite_env, timeout=1200)
    assert re.search(r"\d+ passed", ran) and " failed" not in ran, ran[-2000:]
