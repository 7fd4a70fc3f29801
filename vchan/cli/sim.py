"""``vchan sim``: control the emulated hypervisor (start, stop, status, ls, set, run)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..addresses import check_domid
from . import options
from .errors import UsageError
from .run import exec_program, find_program, program_argv

__all__ = ["add_parser"]


def _sim(args: argparse.Namespace) -> int:
    import json

    from .. import sim
    from ..backend import check_environment

    check_environment("sim", domid=False)      # VCHAN_SIM_DIR, VCHAN_SIM_TIMEOUT
    directory = sim.state_dir()
    if args.sim_command == "start":
        running = sim.is_running(directory)
        if args.bind_domains is not None:
            _install_policy(args.bind_domains, directory, running)
        if args.foreground:
            from ..sim.hypervisor import main as run

            return run(["--dir", str(directory)])
        sim.ensure_running(directory)
        print(f"emulator {'already running' if running else 'started'} in {directory}")
        policy = sim.control({"cmd": "status"}, directory).get("policy")
        if policy:
            print(f"domains bound to users by {policy['file']}:")
            for rule in policy["rules"] or ["(no domain for anyone)"]:
                print(f"  {rule}")
        else:
            print("any process that reaches it may claim any domain "
                  "(--bind-domains POLICY binds domains to users)")
        return 0
    if args.sim_command == "stop":
        stopped = sim.stop(directory)
        print(f"emulator {'stopped' if stopped else 'was not running'} in {directory}")
        return 0
    if args.sim_command == "status":
        info = sim.control({"cmd": "status"}, directory)
        if args.json:
            print(json.dumps(info, indent=2))
            return 0
        print(f"emulator pid {info['pid']} in {info['dir']}, grant limit "
              f"{info['grant_limit']} pages per domain")
        policy = info.get("policy")
        print(f"domains bound to users by {policy['file']}: " + "; ".join(policy["rules"])
              if policy else "domains: any process that reaches the emulator may claim any")
        print(f"{'domain':>6}  {'alive':5}  {'handles':>7}  {'granted':>7}  {'shares':>6}  "
              f"{'maps':>5}  {'ports':>5}  processes")
        for d in info["domains"]:
            print(f"{d['domid']:>6}  {'yes' if d['alive'] else 'no':5}  {d['handles']:>7}  "
                  f"{d['granted_pages']:>7}  {d['shares']:>6}  {d['mappings']:>5}  "
                  f"{len(d['ports']):>5}  {' '.join(map(str, d['processes']))}")
        return 0
    if args.sim_command == "ls":
        return _sim_ls(args.path, directory)
    if args.sim_command == "set":
        from ..sim.hypervisor import MAX_GRANT_LIMIT
        from ..sim.xenstore_model import QUOTA_MAX, QUOTA_NAMES

        known = ["grant-limit", *(f"xenstore-quota-{name}" for name in QUOTA_NAMES)]
        if args.key not in known:
            raise UsageError(f"unknown setting {args.key!r} (known: {', '.join(known)})")
        try:
            value = int(args.value)
        except ValueError:
            raise UsageError(f"{args.key} must be a number, got {args.value!r}") from None
        top = MAX_GRANT_LIMIT if args.key == "grant-limit" else QUOTA_MAX
        if not 0 <= value <= top:
            unit = " pages" if args.key == "grant-limit" else ""
            raise UsageError(f"{args.key} must be in 0..{top}{unit}, got {args.value}")
        answer = sim.control({"cmd": "set", "key": args.key, "value": value}, directory)
        print(f"{args.key} = {answer[args.key]}")
        return 0
    if args.sim_command == "run":
        return _sim_run(args.domid, args.command, directory, args.peer)
    raise UsageError("vchan sim: say start, stop, status, set or run (see vchan sim --help)")


def _install_policy(source: str, directory: Path, running: bool) -> None:
    """``vchan sim start --bind-domains FILE|off``: the policy of ``directory``."""
    from ..sim import policy

    current = policy.path_in(directory)
    if running:
        same = source == "off" and not current.exists()
        if source != "off":
            try:
                same = current.exists() and Path(source).read_bytes() == current.read_bytes()
            except OSError:
                same = False
        if not same:
            raise UsageError(f"the emulator already runs in {directory}: its domain policy "
                             "is read when it starts (vchan sim stop, then start again)")
        return
    try:
        policy.install(directory, None if source == "off" else Path(source))
    except policy.PolicyError as exc:
        raise UsageError(f"--bind-domains: {exc}") from None


def _sim_ls(path: str, directory: Path) -> int:
    """Print the emulator's XenStore tree below ``path``, as xenstore-ls does (as dom0)."""
    from .. import sim
    from ..xenstore import XenStoreSync

    if not path.startswith("/"):
        raise UsageError(f"sim ls: PATH must be absolute (/local/domain/1), got {path!r}")
    sim.ensure_running(directory)
    socket_path = sim.control({"cmd": "xenstore-socket", "domid": 0}, directory)["path"]
    with XenStoreSync(socket_path) as xs:
        def show(node: str, depth: int) -> None:
            for name in sorted(xs.directory(node), key=lambda n: (not n.isdigit(), n.zfill(8)
                                                                  if n.isdigit() else n)):
                child = f"{node.rstrip('/')}/{name}"
                try:
                    value = xs.read(child).decode("utf-8", "backslashreplace")
                except FileNotFoundError:
                    continue        # gone while we looked
                print(f"{'  ' * depth}{name} = \"{value}\"")
                show(child, depth + 1)

        try:
            show(path, 0)
        except FileNotFoundError:
            raise UsageError(f"sim ls: no node {path}") from None
    return 0


def _sim_run(domid: int, command: list[str], directory: Path, peers: list[int]) -> int:
    """Exec a program as a process of emulated domain ``domid`` (``peers`` exist too)."""
    import os

    from ..sim import compat

    argv = program_argv(command, "sim run: name the program "
                                 "(vchan sim run --domid N -- PROGRAM ARGS)")
    for n, what in [(domid, "--domid"), *((p, "--peer") for p in peers)]:
        try:
            check_domid(n, what)
        except ValueError as exc:
            raise UsageError(f"sim run: {exc}") from None
    # Everything that can fail is checked before the emulator is started.
    program = find_program(argv, "sim run")
    env = compat.run_environment(domid, directory)
    # The program inherits these connections: its domain (and its peers')
    # exist while it runs.
    held = [compat.hold_domain(d, directory) for d in dict.fromkeys([domid, *peers])]
    for sock in held:
        os.set_inheritable(sock.fileno(), True)
    exec_program(program, argv, env)


def add_parser(subparsers: Any) -> None:
    """Add ``sim`` and its actions to the ``vchan`` command's subparsers."""
    simp = options.subcommand(
        subparsers, "sim", help="control the emulated hypervisor",
        description="Control the emulated hypervisor (processes play Xen domains). Its state "
                    "directory is $VCHAN_SIM_DIR (default $XDG_RUNTIME_DIR/vchan-sim or "
                    "/tmp/vchan-sim-UID).",
        epilog="examples:\n  vchan sim start\n  vchan sim status\n  vchan sim ls /local/domain\n"
               "  vchan sim set grant-limit 4096\n"
               "  vchan sim run --domid 1 -- ./libxenvchan-program ARGS\n  vchan sim stop",
    )
    simsub = simp.add_subparsers(dest="sim_command", metavar="ACTION")
    start = simsub.add_parser("start", help="start the emulator (if it is not running)")
    start.add_argument("--foreground", action="store_true", help="run in this process")
    start.add_argument(
        "--bind-domains", metavar="POLICY",
        help="bind domains to users: POLICY is a file of lines 'DOMAINS USERS' (e.g. "
             "'1-4 bob,1005', '* alice'); a process may then claim only the domains its "
             "uid is given (checked with SO_PEERCRED).  Kept in the state directory for "
             "later starts; 'off' removes it.  See README, 'What the emulator protects'")
    simsub.add_parser("stop", help="stop the emulator")
    lsp = options.subcommand(simsub, "ls", help="the XenStore tree (as xenstore-ls shows it)",
                             epilog="examples:\n  vchan sim ls\n  vchan sim ls /local/domain/1")
    lsp.add_argument("path", nargs="?", default="/", help="where to start (default /)")
    status = simsub.add_parser("status", help="domains, grants and event channels")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    setp = options.subcommand(simsub, "set", help="change a setting while running",
                              epilog="examples:\n  vchan sim set grant-limit 4096\n"
                                     "  vchan sim set xenstore-quota-transactions 20")
    setp.add_argument("key", help="grant-limit: pages each domain may have granted at once; "
                                  "xenstore-quota-NAME (NAME: nodes, watches, transactions, "
                                  "transaction-nodes, node-permissions, node-size, path-max): "
                                  "a XenStore quota of unprivileged domains, 0 for none")
    setp.add_argument("value")
    runp = options.subcommand(
        simsub, "run", help="run a program (e.g. a libxenvchan one) in an emulated domain",
        description="Run PROGRAM as a process of emulated domain N (the emulator is started\n"
                    "if it is not running).  Unmodified C programs linked with Xen's\n"
                    "libxenvchan (Debian's vchan-socket-proxy, ...) get drop-in libxengnttab,\n"
                    "libxenevtchn and libxenctrl over the emulator (LD_LIBRARY_PATH; a wheel\n"
                    "carries them built, else they are built on first use) and the domain's\n"
                    "XenStore (XENSTORED_PATH); vchan's Python side gets VCHAN_DOMID.",
        epilog="examples:\n"
               "  vchan sim run --domid 1 --peer 2 -- /usr/lib/xen-4.17/bin/vchan-socket-proxy \\\n"
               "      --mode=server 2 /local/domain/1/data/vchan/2/echo /run/echo.sock\n"
               "  vchan sim run --domid 2 -- python3 client.py")
    runp.add_argument("--domid", type=int, default=0, metavar="N",
                      help="the emulated domain to run in (default 0)")
    runp.add_argument("--peer", type=int, action="append", default=[], metavar="M",
                      help="domain M exists too while PROGRAM runs, as on Xen, where both "
                           "domains exist before their programs: a C server "
                           "(libxenvchan_server_init) needs its client's domain (repeatable)")
    runp.add_argument("command", nargs=argparse.REMAINDER, metavar="-- PROGRAM ARGS",
                      help="the program and its arguments")
    simp.set_defaults(func=_sim)
