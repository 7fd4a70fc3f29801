"""Which users may claim which emulated domains: the emulator's domain policy.

Without a policy, a process says which domain it is (``VCHAN_DOMID``) and
the emulator believes it: every process that can reach the emulator's
sockets -- those of the user who started it, and root -- may be any domain.
That is the development default.

With a policy (``vchan sim start --bind-domains FILE``, kept as
``<state dir>/domains.policy`` so that an emulator restarted in that
directory keeps it), a domain is bound to what the kernel vouches for: the
user id of the process at the other end of each connection (``SO_PEERCRED``
on the Unix socket, which a process cannot choose).  A claim of a domain the
policy does not give to that user is refused, on the hypervisor socket
(grants, mappings, event channels) and on the domain's XenStore socket
alike.  The sockets are then opened to every user (mode 0666, directories
0711): who gets in is decided per connection, by the policy.

The file, one rule a line::

    # DOMAINS   USERS
    0           alice
    1-4         bob, 1005
    7           carol
    *           alice          # every domain no other line names

DOMAINS is a domain id, a range ``N-M`` or ``*``; USERS are user names or
numeric uids, separated by commas or blanks.  Lines naming the same domain
add up.  A domain no line names (and no ``*``) may be claimed by nobody.
Names are resolved when the emulator starts.

What a policy cannot do: processes of one user can read each other's
memory (ptrace, ``/proc/<pid>/mem``), so a user is the smallest unit the
emulator can keep apart; and the user who runs the emulator (and root)
can always reach into it.
"""

from __future__ import annotations

import os
import pwd
import re
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from ..addresses import DOMID_MAX

__all__ = [
    "POLICY_FILE",
    "Policy",
    "PolicyError",
    "describe_uid",
    "load",
    "peer_credentials",
]

POLICY_FILE = "domains.policy"

_RANGE = re.compile(r"(\d+)(?:-(\d+))?\Z")
_CRED = struct.Struct("3i")     # struct ucred: pid, uid, gid


class PolicyError(ValueError):
    """A policy file that cannot be used (the message names the line)."""


def describe_uid(uid: int) -> str:
    """``uid 1001 (bob)``, or ``uid 1001`` for a uid without a name."""
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process that connected ``sock``, as the kernel saw it."""
    return _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))


def _uid(word: str, where: str) -> int:
    if word.isdigit():
        uid = int(word)
        if uid >= 1 << 32:
            raise PolicyError(f"{where}: uid {word} is out of range")
        return uid
    try:
        return pwd.getpwnam(word).pw_uid
    except KeyError:
        raise PolicyError(f"{where}: no user named {word!r}") from None


@dataclass(frozen=True)
class Policy:
    """Rules ``(first domid, last domid, uids)`` and the uids of ``*``."""

    rules: tuple[tuple[int, int, frozenset[int]], ...]
    default: frozenset[int] | None
    source: str

    @classmethod
    def parse(cls, text: str, source: str = "policy") -> Policy:
        rules: list[tuple[int, int, frozenset[int]]] = []
        default: set[int] | None = None
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            where = f"{source} line {n}"
            domains, _, users = line.replace("\t", " ").partition(" ")
            words = [w for w in re.split(r"[\s,]+", users.strip()) if w]
            if not words:
                raise PolicyError(f"{where}: say which users may claim {domains!r} "
                                  "(DOMAINS USER[,USER...])")
            uids = frozenset(_uid(w, where) for w in words)
            if domains == "*":
                default = (default or set()) | uids
                continue
            m = _RANGE.match(domains)
            if not m:
                raise PolicyError(f"{where}: {domains!r} is not a domain id, a range N-M "
                                  "or *")
            first = int(m.group(1))
            last = int(m.group(2)) if m.group(2) is not None else first
            if first > last or last > DOMID_MAX:
                raise PolicyError(f"{where}: domain ids are 0..{DOMID_MAX} (first <= "
                                  f"last), got {domains}")
            rules.append((first, last, uids))
        return cls(tuple(rules), None if default is None else frozenset(default), source)

    def allowed(self, domid: int) -> frozenset[int]:
        """The uids that may claim ``domid``."""
        named = [uids for first, last, uids in self.rules if first <= domid <= last]
        if named:
            return frozenset().union(*named)
        return self.default or frozenset()

    def why_not(self, domid: int, uid: int) -> str | None:
        """None if ``uid`` may claim ``domid``; else a sentence saying why not."""
        allowed = self.allowed(domid)
        if uid in allowed:
            return None
        if allowed:
            who = ", ".join(describe_uid(u) for u in sorted(allowed))
            bound = f"is bound to {who}"
        else:
            bound = "is given to no user"
        return (f"domain {domid} {bound} by the emulator's domain policy {self.source}; "
                f"this process runs as {describe_uid(uid)}")

    def uids(self) -> frozenset[int]:
        """Every uid the policy names."""
        return frozenset().union(*(u for _, _, u in self.rules), self.default or frozenset())

    def describe(self) -> list[str]:
        """The rules, one line each, with uids named."""
        def users(uids: frozenset[int]) -> str:
            return ", ".join(describe_uid(u) for u in sorted(uids))

        lines = [f"{first}{'' if first == last else f'-{last}'}  {users(uids)}"
                 for first, last, uids in self.rules]
        if self.default is not None:
            lines.append(f"*  {users(self.default)}")
        return lines


def path_in(directory: Path) -> Path:
    return directory / POLICY_FILE


def load(directory: Path) -> Policy | None:
    """The policy of the emulator in ``directory``, None if it has none."""
    path = path_in(directory)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PolicyError(f"cannot read {path}: {exc.strerror}") from None
    return Policy.parse(text, str(path))


def install(directory: Path, source: Path | None) -> Policy | None:
    """Make ``source`` (checked first) the policy of ``directory``; None removes it."""
    target = path_in(directory)
    if source is None:
        target.unlink(missing_ok=True)
        return None
    try:
        text = source.read_text()
    except OSError as exc:
        raise PolicyError(f"cannot read the policy {source}: {exc.strerror}") from None
    Policy.parse(text, str(source))                 # refuse a bad one before using it
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.chmod(tmp, 0o644)
    tmp.replace(target)
    return Policy.parse(text, str(target))
