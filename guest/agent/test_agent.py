#!/usr/bin/env python3
"""Development test driver for the guest agent (docs/agent-protocol.md).

    cc -static -Os -s -Wall -Wextra -o /tmp/matchlock-agent guest/agent/*.c
    python3 guest/agent/test_agent.py /tmp/matchlock-agent       # --stdio mode, no VM needed
    python3 guest/agent/test_agent.py --vm /path/to/agent.sock   # a booted VM's agent port

--vm runs the protocol-only tests plus t_vm_system against a VM whose "agent" virtserialport is a
unix socket chardev (server=on,wait=off); it expects a busybox-like image with hostname testvm,
matchlock.time=1700000000, users app (1000, home /home/app) and nobody, group staff (50), and it
ends with SHUTDOWN. Standard library only. User-switching tests need root (skipped otherwise).
The port-forward (TCP stream) tests run their servers on this host's 127.0.0.1, so --stdio mode only.
"""
import hashlib
import os
import queue
import socket
import struct
import subprocess
import errno
import sys
import threading
import time
import traceback

AGENT = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] != "--vm" else "/tmp/matchlock-agent"

# The protocol's numbers, generated from src/guest/protocol-spec.ts (npm run gen:protocol).
sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from protocol_consts import AGENT_VERSION, CHUNK, GUEST_NAMES, MAX_PAYLOAD, WINDOW, WRITE_REPLACE_LINK, ExecFlags, GuestMsg, HostMsg  # noqa: E402


class Agent:
    """A connection to an agent: a `--stdio` child process, or a socket (a VM's agent port)."""

    def __init__(self, sock=None):
        if sock is None:
            # a leaked fd (as a careless host might pass) must not reach the processes
            leak = os.open("/dev/null", os.O_RDONLY)
            self.p = subprocess.Popen([AGENT, "--stdio"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      bufsize=0, pass_fds=(leak,))
            os.close(leak)
            self._read, self._write = self.p.stdout.read, self.p.stdin.write
        else:
            self.p = None
            self._read, self._write = sock.recv, sock.sendall
        self.queues = {}
        self.qlock = threading.Lock()
        self.wlock = threading.Lock()
        self.next_stream = 1
        self.logs = []
        self.eof = threading.Event()
        threading.Thread(target=self._reader, daemon=True).start()

    def q(self, stream):
        with self.qlock:
            return self.queues.setdefault(stream, queue.Queue())

    def _read_exact(self, n):
        b = b""
        while len(b) < n:
            c = self._read(n - len(b))
            if not c:
                return None
            b += c
        return b

    def _reader(self):
        while True:
            h = self._read_exact(9)
            if h is None:
                break
            ln, typ, stream = struct.unpack("<IBI", h)
            assert ln <= MAX_PAYLOAD, f"frame too large: {ln}"
            assert typ in GUEST_NAMES, f"unknown frame type {typ:#x}"
            payload = self._read_exact(ln) if ln else b""
            assert payload is not None
            if typ == GuestMsg.LOG:
                self.logs.append(payload.decode())
            assert typ != GuestMsg.TCP_DATA or ln <= CHUNK, f"TCP_DATA of {ln} bytes"
            self.q(stream).put((typ, payload))
        self.eof.set()

    def stream(self):
        s = self.next_stream
        self.next_stream += 1
        return s

    def send(self, typ, stream, payload=b""):
        with self.wlock:
            self._write(struct.pack("<IBI", len(payload), typ, stream) + payload)

    def recv(self, stream, timeout=10):
        try:
            return self.q(stream).get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"timeout waiting for a frame on stream {stream}")

    def start(self, argv, env=(), user="", cwd="", flags=0, rows=0, cols=0):
        s = self.stream()
        strs = [user, cwd] + list(argv) + list(env)
        payload = struct.pack("<IHHHH", flags, rows, cols, len(argv), len(env))
        payload += b"".join((x.encode() if isinstance(x, str) else x) + b"\0" for x in strs)
        self.send(HostMsg.EXEC, s, payload)
        return s

    def collect(self, s, stdin=None, eof=True, timeout=30, on_frame=None, extra=0):
        """Run an exec stream to EXIT; feed stdin with flow control. Returns a result dict."""
        r = dict(out=b"", err=b"", code=None, sig=None, error=None, pid=None, acked=0, max_unacked=0,
                 extra=extra)  # extra: STDIN bytes sent outside of `stdin` (by the caller, callbacks)
        sent = 0
        eof_sent = False
        deadline = time.time() + timeout
        while True:
            if stdin is not None and r["pid"] is not None:
                while sent < len(stdin) and sent - r["acked"] < WINDOW:
                    n = min(CHUNK, len(stdin) - sent, WINDOW - (sent - r["acked"]))
                    self.send(HostMsg.STDIN, s, stdin[sent:sent + n])
                    sent += n
                    r["max_unacked"] = max(r["max_unacked"], sent - r["acked"])
                if sent == len(stdin) and eof and not eof_sent:
                    self.send(HostMsg.STDIN, s, b"")
                    eof_sent = True
            typ, p = self.recv(s, max(0.1, deadline - time.time()))
            if typ == GuestMsg.STARTED:
                assert len(p) == 4 and r["pid"] is None
                r["pid"] = struct.unpack("<I", p)[0]
            elif typ in (GuestMsg.STDOUT, GuestMsg.STDERR):
                r["out" if typ == GuestMsg.STDOUT else "err"] += p
                r["out_unacked"] = r.get("out_unacked", 0) + len(p)
                r["max_out_unacked"] = max(r.get("max_out_unacked", 0), r["out_unacked"])
                if not r.get("hold_acks"):
                    self.send(HostMsg.ACK, s, struct.pack("<I", len(p)))
                    r["out_unacked"] -= len(p)
            elif typ == GuestMsg.STDIN_ACK:
                r["acked"] += struct.unpack("<I", p)[0]
                assert r["acked"] <= sent + r["extra"], "acked more than sent"
            elif typ == GuestMsg.ERROR:
                r["error"] = p.decode()
            elif typ == GuestMsg.EXIT:
                r["code"], r["sig"] = struct.unpack("<ii", p)
                return r
            else:
                raise AssertionError(f"unexpected frame {NAMES.get(typ, typ)} on exec stream")
            if on_frame:
                on_frame(typ, p, r)

    def run(self, argv, **kw):
        stdin = kw.pop("stdin", None)
        timeout = kw.pop("timeout", 30)
        if stdin is not None:
            kw["flags"] = kw.get("flags", 0) | ExecFlags.STDIN
        return self.collect(self.start(argv, **kw), stdin=stdin, timeout=timeout)

    def write_file(self, path, data, mode=0o644, chunk=MAX_PAYLOAD):
        s = self.stream()
        self.send(HostMsg.WRITE_FILE, s, struct.pack("<I", mode) + path.encode() + b"\0")
        for i in range(0, len(data), chunk):
            self.send(HostMsg.FILE_DATA, s, data[i:i + chunk])
        self.send(HostMsg.FILE_DATA, s, b"")
        typ, p = self.recv(s)
        assert typ == GuestMsg.RESULT, GUEST_NAMES.get(typ)
        return struct.unpack("<i", p[:4])[0], p[4:].decode()

    def read_file(self, path):
        s = self.stream()
        self.send(HostMsg.READ_FILE, s, path.encode() + b"\0")
        data = b""
        while True:
            typ, p = self.recv(s)
            if typ == GuestMsg.DATA:
                assert len(p) <= CHUNK
                data += p
                self.send(HostMsg.ACK, s, struct.pack("<I", len(p)))
            else:
                assert typ == GuestMsg.RESULT, GUEST_NAMES.get(typ)
                return data, struct.unpack("<i", p[:4])[0], p[4:].decode()

    def list_dir(self, path):
        s = self.stream()
        self.send(HostMsg.LIST_DIR, s, path.encode() + b"\0")
        entries = {}
        while True:
            typ, p = self.recv(s)
            if typ == GuestMsg.RESULT:
                return entries, struct.unpack("<i", p[:4])[0], p[4:].decode()
            assert typ == GuestMsg.DATA
            off = 0
            while off < len(p):
                mode, size, sec, nsec = struct.unpack_from("<IQqI", p, off)
                end = p.index(b"\0", off + 24)
                entries[p[off + 24:end].decode()] = (mode, size, sec, nsec)
                off = end + 1

    def tcp_connect(self, port, s=None):
        """TCP_CONNECT; returns (stream, None) once connected or (stream, errno) if TCP_CLOSED."""
        s = s or self.stream()
        self.send(HostMsg.TCP_CONNECT, s, struct.pack("<H", port))
        typ, p = self.recv(s)
        if typ == GuestMsg.TCP_CONNECTED:
            assert p == b""
            return s, None
        assert typ == GuestMsg.TCP_CLOSED and len(p) == 4, (GUEST_NAMES.get(typ), p)
        return s, struct.unpack("<i", p)[0]

    def tcp_transfer(self, s, data=b"", timeout=60, chunk=CHUNK):
        """Send data (flow controlled by STDIN_ACK) then the empty TCP_DATA; receive (acking with
        ACK) until TCP_CLOSED. Checks both windows and the frame order."""
        r = dict(data=b"", errno=None, acked=0, max_unacked=0, eof=False)
        sent, eof_sent, got = 0, False, []
        deadline = time.time() + timeout
        while True:
            while sent < len(data) and sent - r["acked"] < WINDOW:
                n = min(chunk, len(data) - sent, WINDOW - (sent - r["acked"]))
                self.send(HostMsg.TCP_DATA, s, data[sent:sent + n])
                sent += n
                r["max_unacked"] = max(r["max_unacked"], sent - r["acked"])
            if sent == len(data) and not eof_sent:
                self.send(HostMsg.TCP_DATA, s, b"")
                eof_sent = True
            typ, p = self.recv(s, max(0.1, deadline - time.time()))
            if typ == GuestMsg.STDIN_ACK:
                r["acked"] += struct.unpack("<I", p)[0]
                assert r["acked"] <= sent, "acked more than sent"
            elif typ == GuestMsg.TCP_DATA:
                assert not r["eof"], "TCP_DATA after the empty one"
                if not p:
                    r["eof"] = True
                else:
                    got.append(p)
                    self.send(HostMsg.ACK, s, struct.pack("<I", len(p)))
            elif typ == GuestMsg.TCP_CLOSED:
                r["errno"] = struct.unpack("<i", p)[0]
                r["data"] = b"".join(got)
                return r
            else:
                raise AssertionError(f"unexpected frame {NAMES.get(typ, typ)} on a TCP stream")

    def close(self):
        try:
            self.p.stdin.close()
        except Exception:
            pass
        try:
            return self.p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.p.kill()
            raise AssertionError("agent did not exit on EOF")


# ---------------------------------------------------------------- tests

def ok(r, out=None, code=0):
    assert r["error"] is None, r
    assert r["code"] == code and r["sig"] == 0, r
    if out is not None:
        assert r["out"] == out, r


def t_ping(a):
    s = a.stream()
    a.send(HostMsg.PING, s, b"hello\0\x01binary")
    assert a.recv(s) == (GuestMsg.PONG, b"hello\0\x01binary")
    s = a.stream()
    a.send(HostMsg.PING, s)
    assert a.recv(s) == (GuestMsg.PONG, b"")


def t_set_identity_only_in_a_vm(a):
    # In --stdio mode the agent is not the VM's init: it must not touch the host's clock or RNG.
    s = a.stream()
    a.send(HostMsg.SET_IDENTITY, s, struct.pack("<I", 4) + b"abcd" + b"matchlock.hostname=x")
    typ, p = a.recv(s)
    assert typ == GuestMsg.RESULT and struct.unpack("<i", p[:4])[0] == errno.EPERM, (GUEST_NAMES.get(typ), p)
    t_ping(a)  # still serving


def t_exit_codes(a):
    ok(a.run(["echo", "hello", "world"]), b"hello world\n")
    for c in (0, 1, 7):
        r = a.run(["sh", "-c", f"echo x; exit {c}"])
        ok(r, b"x\n", c)


def t_signal(a):
    s = a.start(["sleep", "100"])
    t0 = time.time()

    def on(typ, p, r):
        if typ == GuestMsg.STARTED:
            a.send(HostMsg.SIGNAL, s, struct.pack("<I", 9))
    r = a.collect(s, on_frame=on)
    assert r["code"] == 137 and r["sig"] == 9, r
    assert time.time() - t0 < 2
    # SIGTERM reaches the whole process group (sh and its child)
    s = a.start(["sh", "-c", "sleep 100; echo survived"])

    def on2(typ, p, r):
        if typ == GuestMsg.STARTED:
            time.sleep(0.2)
            a.send(HostMsg.SIGNAL, s, struct.pack("<I", 15))
    r = a.collect(s, on_frame=on2)
    assert r["sig"] == 15 and r["code"] == 143 and r["out"] == b"", r


def t_stdout_stderr(a):
    r = a.run(["sh", "-c", "echo out; echo err >&2; echo out2; echo err2 >&2"])
    ok(r, b"out\nout2\n")
    assert r["err"] == b"err\nerr2\n", r
    # stdin without the STDIN flag is /dev/null
    ok(a.run(["cat"]), b"")
    # only 0, 1, 2 are open in the process (3 is ls's own directory fd)
    ok(a.run(["ls", "/proc/self/fd"]), b"0\n1\n2\n3\n")
    ok(a.run(["ls", "-1", "/proc/self/fd"], flags=ExecFlags.TTY), b"0\r\n1\r\n2\r\n3\r\n")
    # STDIN frames for a process without the STDIN flag: discarded, acknowledged
    s = a.start(["sh", "-c", "sleep 0.3; echo x"])
    a.send(HostMsg.STDIN, s, b"abc")
    r = a.collect(s, extra=3)
    ok(r, b"x\n")
    assert r["acked"] == 3, r
    # RESIZE on a pipe exec, SIGNAL/RESIZE/STDIN after EXIT: ignored
    s = a.start(["sh", "-c", "sleep 0.2; echo y"])
    a.send(HostMsg.RESIZE, s, struct.pack("<HH", 10, 10))
    ok(a.collect(s), b"y\n")
    a.send(HostMsg.SIGNAL, s, struct.pack("<I", 9))
    a.send(HostMsg.RESIZE, s, struct.pack("<HH", 10, 10))
    a.send(HostMsg.STDIN, s, b"late")
    a.send(HostMsg.FILE_DATA, s, b"late")
    t_ping(a)
    assert a.q(s).empty()


def t_stdin_10m(a):
    data = os.urandom(10 << 20)
    t0 = time.time()
    r = a.run(["cat"], stdin=data, timeout=60)
    ok(r)
    assert len(r["out"]) == len(data), (len(r["out"]), len(data))
    assert hashlib.sha256(r["out"]).digest() == hashlib.sha256(data).digest()
    assert r["acked"] == len(data), r["acked"]
    assert r["max_unacked"] <= WINDOW
    print(f"    10 MiB through cat in {time.time() - t0:.2f}s")
    # sha256 computed in the process: the data really went through its stdin
    r = a.run(["sha256sum"], stdin=data, timeout=60)
    ok(r)
    assert r["out"].split()[0].decode() == hashlib.sha256(data).hexdigest()


def t_stdin_closed(a):
    # the process closes stdin: bytes are discarded but still acknowledged
    s = a.start(["sh", "-c", "exec 0<&-; sleep 0.5; echo done"], flags=ExecFlags.STDIN)
    r = a.collect(s, stdin=b"x" * (600 * 1024), eof=False)
    ok(r, b"done\n")
    assert r["acked"] == 600 * 1024, r["acked"]
    # head reads a little and exits; EXIT still arrives
    r = a.run(["head", "-c", "5"], stdin=b"abcdefghij" * 100000)
    ok(r, b"abcde")
    # STDIN for an unknown stream is ignored
    a.send(HostMsg.STDIN, 999999, b"zzz")
    a.send(HostMsg.STDIN, 999999, b"")


def t_env_cwd(a):
    r = a.run(["sh", "-c", 'echo "$FOO|$HOME|$PATH"; pwd'], env=["FOO=bar baz", "PATH=/usr/bin:/bin"],
              cwd="/tmp")
    ok(r)
    lines = r["out"].decode().splitlines()
    assert lines[0].startswith("bar baz|") and lines[0].endswith("|/usr/bin:/bin"), lines
    home = lines[0].split("|")[1]
    if os.geteuid() == 0:
        assert home == "/root", home  # from the passwd entry of uid 0
    assert lines[1] == "/tmp", lines
    # HOME given by the host wins; the environment is exactly what was given (+HOME)
    r = a.run(["/usr/bin/env"], env=["HOME=/x", "A=1"])
    ok(r, b"HOME=/x\nA=1\n")
    r = a.run(["/usr/bin/env"], env=["A=1"])
    assert r["out"].decode().splitlines()[0] == "A=1" and r["out"].decode().splitlines()[1].startswith("HOME=")
    # default cwd is /
    ok(a.run(["pwd"]), b"/\n")
    # PATH search: the given PATH is used (no /bin in it -> not found)
    r = a.run(["ls"], env=["PATH=/nonexistent"])
    assert r["code"] == 127 and r["error"], r
    # MKDIR_CWD
    d = f"/tmp/agent-test-{os.getpid()}/a/b/c"
    r = a.run(["pwd"], cwd=d)
    assert r["code"] == 1 and "chdir" in r["error"], r
    r = a.run(["pwd"], cwd=d, flags=ExecFlags.MKDIR_CWD)
    ok(r, (d + "\n").encode())
    assert oct(os.stat(d).st_mode & 0o777) == oct(0o755)
    r = a.run(["pwd"], cwd=d, flags=ExecFlags.MKDIR_CWD)  # exists already: fine
    ok(r, (d + "\n").encode())


def t_users(a):
    if os.geteuid() != 0:
        print("    (not root: only the empty user is tested)")
        ok(a.run(["id", "-u"]), f"{os.getuid()}\n".encode())
        r = a.run(["id"], user="0")
        assert r["code"] == 1 and r["error"], r
        return
    ok(a.run(["id", "-u"]), b"0\n")
    ok(a.run(["sh", "-c", "id -u; id -g; id -G; echo $HOME"], user="1000"), None)
    r = a.run(["sh", "-c", "id -u; id -g; id -G"], user="1000")
    pw = {l.split(":")[2]: l.split(":") for l in open("/etc/passwd")}
    g1000 = pw["1000"][3] if "1000" in pw else "0"
    ok(r, f"1000\n{g1000}\n{g1000}\n".encode())
    r = a.run(["sh", "-c", "id -u; id -g; id -G; echo $HOME"], user="nobody")
    ok(r, b"65534\n65534\n65534\n/nonexistent\n")
    r = a.run(["sh", "-c", "id -u; id -g; id -G"], user="1000:5")
    ok(r, b"1000\n5\n5\n")
    r = a.run(["sh", "-c", "id -u; id -g"], user="nobody:tty")
    ok(r, b"65534\n5\n")
    r = a.run(["sh", "-c", "id -u; id -g; echo $HOME"], user="4242")  # no passwd entry: gid 0, HOME=/
    ok(r, b"4242\n0\n/\n")
    r = a.run(["sh", "-c", "id -u; id -g"], user="4242:4243")
    ok(r, b"4242\n4243\n")
    for bad in ("nosuchuser", "nobody:nosuchgroup", "1000:nosuchgroup"):
        r = a.run(["id"], user=bad)
        assert r["code"] == 1 and r["sig"] == 0 and r["error"] and r["pid"] is None, r
    # MKDIR_CWD as root, then the user must be able to chdir there
    d = f"/tmp/agent-test-{os.getpid()}/u/v"
    ok(a.run(["pwd"], cwd=d, user="nobody", flags=ExecFlags.MKDIR_CWD), (d + "\n").encode())
    # a directory the user cannot enter
    os.makedirs(f"/tmp/agent-test-{os.getpid()}/private", mode=0o700, exist_ok=True)
    r = a.run(["pwd"], cwd=f"/tmp/agent-test-{os.getpid()}/private", user="nobody")
    assert r["code"] == 1 and "chdir" in r["error"] and "Permission denied" in r["error"], r


def t_tty(a):
    r = a.run(["tty"], flags=ExecFlags.TTY, rows=30, cols=100)
    ok(r)
    assert r["out"].startswith(b"/dev/pts/"), r
    assert r["err"] == b""
    r = a.run(["stty", "size"], flags=ExecFlags.TTY, rows=30, cols=100)
    ok(r, b"30 100\r\n")
    # stderr also goes to the PTY -> STDOUT
    r = a.run(["sh", "-c", "echo err >&2"], flags=ExecFlags.TTY, rows=24, cols=80)
    ok(r, b"err\r\n")
    # RESIZE while running, then stty again; the input comes through the PTY
    s = a.start(["sh", "-c", "stty size; read x; stty size; echo got=$x"], flags=ExecFlags.TTY, rows=30, cols=100)
    state = {"sent": False}

    def on(typ, p, r):
        if typ == GuestMsg.STDOUT and b"30 100" in r["out"] and not state["sent"]:
            state["sent"] = True
            a.send(HostMsg.RESIZE, s, struct.pack("<HH", 40, 120))
            a.send(HostMsg.STDIN, s, b"hello\n")
            r["extra"] += 6
    r = a.collect(s, on_frame=on)
    ok(r)
    out = r["out"].replace(b"\r\n", b"\n")
    assert out.endswith(b"40 120\ngot=hello\n"), r
    # EOF in TTY mode = ^D: cat ends
    s = a.start(["cat"], flags=ExecFlags.TTY, rows=24, cols=80)
    r = a.collect(s, stdin=b"line\n")
    ok(r)
    assert r["out"].count(b"line\r\n") == 2, r  # echo + cat's output
    # job control works on the PTY: the process group leader has a controlling terminal
    r = a.run(["sh", "-c", "read pid comm state ppid pgrp sid tty rest < /proc/$$/stat; echo $pid $pgrp $sid $tty"],
              flags=ExecFlags.TTY, rows=24, cols=80)
    ok(r)
    pid, pgrp, sid, tty = r["out"].split()
    assert pid == pgrp == sid == str(r["pid"]).encode() and tty != b"0", r  # session leader with a ctty
    # SIGNAL on a TTY process
    s = a.start(["sleep", "100"], flags=ExecFlags.TTY)

    def on3(typ, p, r):
        if typ == GuestMsg.STARTED:
            a.send(HostMsg.SIGNAL, s, struct.pack("<I", 2))
    r = a.collect(s, on_frame=on3)
    assert r["sig"] == 2 and r["code"] == 130, r
    if os.geteuid() == 0:
        r = a.run(["sh", "-c", "id -u; stat -c %u $(tty)"], flags=ExecFlags.TTY, user="nobody")
        ok(r, b"65534\r\n65534\r\n")


def t_exec_errors(a):
    r = a.run(["/nonexistent/binary"])
    assert r["code"] == 127 and r["sig"] == 0 and r["pid"] is None, r
    assert r["error"].startswith("exec /nonexistent/binary:") and "No such file" in r["error"], r
    r = a.run(["no-such-command-xyz"])
    assert r["code"] == 127 and r["error"], r
    p = f"/tmp/agent-test-{os.getpid()}-noexec"
    with open(p, "w") as f:
        f.write("#!/bin/sh\necho hi\n")
    os.chmod(p, 0o644)
    r = a.run([p])
    assert r["code"] == 126 and "Permission denied" in r["error"], r
    os.chmod(p, 0o755)
    ok(a.run([p]), b"hi\n")
    os.unlink(p)
    # malformed payloads
    s = a.stream()
    a.send(HostMsg.EXEC, s, b"\0" * 5)
    r = a.collect(s)
    assert r["code"] == 1 and r["error"], r
    s = a.stream()
    a.send(HostMsg.EXEC, s, struct.pack("<IHHHH", 0, 0, 0, 2, 0) + b"\0\0echo\0")  # argv[1] missing
    r = a.collect(s)
    assert r["code"] == 1 and "malformed" in r["error"], r
    s = a.stream()
    a.send(HostMsg.EXEC, s, struct.pack("<IHHHH", 0, 0, 0, 0, 0) + b"\0\0")  # argc 0
    r = a.collect(s)
    assert r["code"] == 1 and r["error"], r


def t_many(a):
    for i in range(20):
        ok(a.run(["sh", "-c", f"echo {i}"]), f"{i}\n".encode())
    streams = [a.start(["sh", "-c", f"sleep 0.3; echo {i}; echo e{i} >&2; exit {i}"]) for i in range(8)]
    t0 = time.time()
    for i, s in enumerate(streams):
        r = a.collect(s)
        ok(r, f"{i}\n".encode(), i)
        assert r["err"] == f"e{i}\n".encode()
    assert time.time() - t0 < 2, "concurrent execs ran sequentially?"
    # 70 at once (more than 64)
    streams = [a.start(["sh", "-c", "sleep 0.5; echo ok"], flags=ExecFlags.STDIN) for i in range(70)]
    for s in streams:
        a.send(HostMsg.STDIN, s, b"")
    for s in streams:
        ok(a.collect(s), b"ok\n")


def t_concurrent_streams(a):
    # several flow-controlled stdin streams, a big output and file reads, all at once
    results, errors = {}, []
    datas = [os.urandom(4 << 20) for _ in range(4)]

    def cat(i):
        try:
            results[i] = a.run(["cat"], stdin=datas[i], timeout=60)
        except Exception as e:
            errors.append(e)

    def flood():
        try:
            results["flood"] = a.run(["head", "-c", str(20 << 20), "/dev/zero"], timeout=60)
        except Exception as e:
            errors.append(e)

    def reads():
        try:
            for _ in range(5):
                back, err, msg = a.read_file("/etc/passwd")
                assert err == 0 and back == open("/etc/passwd", "rb").read()
                s = a.stream()
                a.send(HostMsg.PING, s, b"p")
                assert a.recv(s) == (GuestMsg.PONG, b"p")
        except Exception as e:
            errors.append(e)
    threads = [threading.Thread(target=cat, args=(i,)) for i in range(4)]
    threads += [threading.Thread(target=flood), threading.Thread(target=reads)]
    t0 = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(4):
        ok(results[i])
        assert results[i]["out"] == datas[i] and results[i]["max_unacked"] <= WINDOW
    ok(results["flood"])
    assert len(results["flood"]["out"]) == 20 << 20
    print(f"    4x4 MiB stdin + 20 MiB output in {time.time() - t0:.2f}s")


def t_grandchild(a):
    t0 = time.time()
    r = a.run(["sh", "-c", "sleep 5 & echo hi"])
    dt = time.time() - t0
    ok(r, b"hi\n")
    assert dt < 1.0, f"EXIT delayed {dt:.2f}s by a grandchild holding stdout"
    t0 = time.time()
    r = a.run(["sh", "-c", "sleep 5 & echo hi"], flags=ExecFlags.TTY)
    ok(r)
    assert time.time() - t0 < 1.0


def t_output_before_exit(a):
    # lots of output right before exit must all arrive before EXIT
    r = a.run(["sh", "-c", "head -c 3000000 /dev/zero; head -c 100000 /dev/zero >&2"])
    ok(r)
    assert len(r["out"]) == 3000000 and len(r["err"]) == 100000
    r = a.run(["head", "-c", "2000000", "/dev/zero"], flags=ExecFlags.TTY)
    ok(r)
    assert len(r["out"]) == 2000000, len(r["out"])


def t_write_file_replace_link(a):
    base = f"/tmp/agent-test-{os.getpid()}/links"
    os.makedirs(base, exist_ok=True)
    link, target = base + "/resolv.conf", base + "/missing-dir/stub.conf"
    os.symlink(target, link)
    # without the flag, a dangling link is written through (and fails: its directory is missing)
    err, _ = a.write_file(link, b"through\n")
    assert err != 0 and os.path.islink(link)
    # WRITE_REPLACE_LINK: the link itself is replaced by a regular file; its target is untouched
    assert a.write_file(link, b"nameserver 10.99.1.1\n", 0o644 | WRITE_REPLACE_LINK) == (0, "")
    assert not os.path.islink(link) and open(link, "rb").read() == b"nameserver 10.99.1.1\n"
    assert os.stat(link).st_mode & 0o7777 == 0o644 and not os.path.exists(target)


def t_files(a):
    base = f"/tmp/agent-test-{os.getpid()}/files"
    data = os.urandom(3 << 20)
    path = base + "/deep/er/f.bin"
    assert a.write_file(path, data, 0o640, chunk=1000000) == (0, "")
    st = os.stat(path)
    assert st.st_mode & 0o7777 == 0o640 and st.st_size == len(data)
    assert os.stat(base + "/deep").st_mode & 0o777 == 0o755
    back, err, msg = a.read_file(path)
    assert (err, msg) == (0, "") and hashlib.sha256(back).digest() == hashlib.sha256(data).digest()
    # exact mode despite the umask; truncation of an existing file
    assert a.write_file(path, b"short", 0o4777) == (0, "")
    assert os.stat(path).st_mode & 0o7777 == 0o4777
    assert open(path, "rb").read() == b"short"
    # empty file
    assert a.write_file(base + "/empty", b"", 0o600) == (0, "")
    assert a.read_file(base + "/empty") == (b"", 0, "")
    # errors
    err, msg = a.write_file(base + "/deep", b"data")  # a directory
    assert err == 21 and msg.startswith("open " + base + "/deep:"), (err, msg)
    err, msg = a.write_file(path + "/sub/x", b"data")  # parent is a file
    assert err == 20 and msg.startswith("mkdir "), (err, msg)
    back, err, msg = a.read_file(base + "/missing")
    assert back == b"" and err == 2 and msg == f"open {base}/missing: No such file or directory", msg
    back, err, msg = a.read_file(base)
    assert err == 21 and msg.startswith("read "), (err, msg)
    # concurrent reads interleave
    s1, s2 = a.stream(), a.stream()
    a.send(HostMsg.READ_FILE, s1, path.encode() + b"\0")
    a.send(HostMsg.READ_FILE, s2, b"/etc/passwd\0")
    assert a.recv(s2)[0] in (GuestMsg.DATA, GuestMsg.RESULT) and a.recv(s1)[0] in (GuestMsg.DATA, GuestMsg.RESULT)
    # LIST_DIR
    os.symlink("/nonexistent", base + "/link")
    entries, err, msg = a.list_dir(base)
    assert (err, msg) == (0, ""), msg
    assert set(entries) == {"deep", "empty", "link"}, entries
    import stat
    assert stat.S_ISDIR(entries["deep"][0]) and stat.S_ISLNK(entries["link"][0])
    assert entries["empty"][1] == 0 and stat.S_IMODE(entries["empty"][0]) == 0o600
    st = os.lstat(base + "/empty")
    assert entries["empty"][2] == int(st.st_mtime) and entries["empty"][3] == st.st_mtime_ns % 10**9
    # a big directory spans several DATA frames
    big = base + "/big"
    os.mkdir(big)
    for i in range(5000):
        open(f"{big}/file-with-a-rather-long-name-{i:05d}", "w").close()
    entries, err, msg = a.list_dir(big)
    assert err == 0 and len(entries) == 5000
    entries, err, msg = a.list_dir(base + "/nope")
    assert err == 2 and msg, msg


def assert_stalled(a, s, unacked):
    """Stream `s` is at its window: nothing more comes, the agent does not spin, others are served."""
    cpu0 = agent_cpu(a)
    t0 = time.time()
    ok(a.run(["echo", "hi"]), b"hi\n")
    t_ping(a)
    dt = time.time() - t0
    time.sleep(1)
    assert a.q(s).empty(), "data beyond the window"
    assert agent_cpu(a) - cpu0 < 0.3, "the agent spins while a stream is stalled"
    print(f"    stalled at {unacked} bytes; exec meanwhile in {dt * 1000:.0f} ms")


def t_output_backpressure(a):
    # the host does not ACK: the agent stops reading the pipe at the window, the writer blocks
    s = a.start(["sh", "-c", "head -c 8000000 /dev/zero; echo done >&2"])
    got, unacked = [], 0
    while unacked < WINDOW:
        typ, p = a.recv(s, 10)
        if typ == GuestMsg.STARTED:
            continue
        assert typ == GuestMsg.STDOUT, GUEST_NAMES.get(typ)
        got.append(p)
        unacked += len(p)
        assert unacked <= WINDOW, f"{unacked} bytes unacknowledged"
    assert_stalled(a, s, unacked)
    a.send(HostMsg.ACK, s, struct.pack("<I", unacked))
    r = a.collect(s, timeout=60)
    ok(r)
    assert unacked + len(r["out"]) == 8000000 and r["err"] == b"done\n", (unacked, len(r["out"]))
    assert r["max_out_unacked"] <= WINDOW


def t_output_after_exit_waits_for_acks(a):
    # the process exits with output still in its pipe: EXIT comes only after all of it, window kept
    s = a.start(["sh", "-c", "head -c 60000 /dev/zero; exit 3"])
    time.sleep(0.5)
    r = a.collect(s)
    ok(r, code=3)
    assert len(r["out"]) == 60000
    # the window is full when the process exits: nothing more until ACKs, then the rest and EXIT
    s = a.start(["sh", "-c", "head -c 300000 /dev/zero &  wait; exit 4"])
    got = 0
    while got < WINDOW:
        typ, p = a.recv(s, 10)
        if typ == GuestMsg.STDOUT:
            got += len(p)
    time.sleep(0.5)
    assert a.q(s).empty(), "EXIT or output beyond the window before ACKs"
    a.send(HostMsg.ACK, s, struct.pack("<I", got))
    r = a.collect(s)
    ok(r, code=4)
    assert got + len(r["out"]) == 300000


def t_read_file_backpressure_and_cancel(a):
    s = a.stream()
    a.send(HostMsg.READ_FILE, s, b"/dev/zero\0")
    got = 0
    while got < WINDOW:
        typ, p = a.recv(s, 10)
        assert typ == GuestMsg.DATA, GUEST_NAMES.get(typ)
        got += len(p)
    assert got == WINDOW
    time.sleep(0.5)
    assert a.q(s).empty(), "read_file data beyond the window"
    a.send(HostMsg.CLOSE, s)
    typ, p = a.recv(s, 10)
    assert typ == GuestMsg.RESULT and struct.unpack("<i", p[:4])[0] == errno.ECANCELED, (GUEST_NAMES.get(typ), p)
    back, err, _ = a.read_file("/etc/hostname")
    assert err == 0 and back == open("/etc/hostname", "rb").read()


def t_write_file_enospc_leaves_nothing(a):
    d = f"/tmp/agent-test-{os.getpid()}/tiny"
    os.makedirs(d, exist_ok=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", d]).returncode:
        print("    skipped: needs root to mount a small tmpfs")
        return
    try:
        err, msg = a.write_file(d + "/big", os.urandom(3 << 20), chunk=64 * 1024)
        assert err == errno.ENOSPC and "No space left" in msg, (err, msg)
        assert not os.path.exists(d + "/big"), "a failed write left a partial file"
    finally:
        subprocess.run(["umount", d])


def t_orphans(a):
    # orphans are reaped (the agent is a subreaper in --stdio mode, PID 1 in a VM)
    ok(a.run(["sh", "-c", "(sleep 0.2 &) ; exit 0"]))
    time.sleep(0.6)
    kids = subprocess.run(["ps", "-o", "pid=,stat=,comm=", "--ppid", str(a.p.pid)], capture_output=True,
                          text=True).stdout
    assert "Z" not in kids, kids


def t_bad_frames(a):
    # unknown type: a LOG, then the agent keeps serving
    a.send(0x42, 5)
    typ, p = a.recv(0)
    assert typ == GuestMsg.LOG and b"unknown" in p, p
    t_ping(a)


# ---------------------------------------------------------------- port forwarding (TCP streams)

class Server:
    """A TCP server on 127.0.0.1 (a thread per connection) running handler(conn)."""

    def __init__(self, handler):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.port = self.sock.getsockname()[1]
        self.handler, self.errors, self.done = handler, [], []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        try:
            self.handler(c)
        except Exception as e:
            self.errors.append(e)
        finally:
            c.close()
            self.done.append(1)

    def close(self):
        self.sock.close()


def echo(c):
    while True:
        b = c.recv(1 << 16)
        if not b:
            break
        c.sendall(b)
    c.shutdown(socket.SHUT_WR)


def recv_all(c):
    buf = []
    while True:
        b = c.recv(1 << 16)
        if not b:
            return b"".join(buf)
        buf.append(b)


def agent_cpu(a):
    f = open(f"/proc/{a.p.pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def t_tcp_echo(a):
    srv = Server(echo)
    data = os.urandom(5 << 20)
    t0 = time.time()
    s, err = a.tcp_connect(srv.port)
    assert err is None, err
    r = a.tcp_transfer(s, data)
    assert r["errno"] == 0 and r["eof"], r["errno"]
    assert len(r["data"]) == len(data) and hashlib.sha256(r["data"]).digest() == hashlib.sha256(data).digest()
    assert r["acked"] == len(data) and r["max_unacked"] <= WINDOW
    print(f"    5 MiB echoed in {time.time() - t0:.2f}s")
    # an empty connection; then the same stream id again (free after TCP_CLOSED)
    s, err = a.tcp_connect(srv.port)
    r = a.tcp_transfer(s)
    assert (err, r["errno"], r["data"], r["eof"]) == (None, 0, b"", True), r
    assert a.tcp_connect(srv.port, s)[1] is None
    r = a.tcp_transfer(s, b"again")
    assert (r["errno"], r["data"]) == (0, b"again"), r
    # data and EOF sent before TCP_CONNECTED are kept for when the connection is up
    s = a.stream()
    a.send(HostMsg.TCP_CONNECT, s, struct.pack("<H", srv.port))
    a.send(HostMsg.TCP_DATA, s, b"early")
    a.send(HostMsg.TCP_DATA, s, b"")
    frames = []
    while not frames or frames[-1][0] != GuestMsg.TCP_CLOSED:
        frames.append(a.recv(s))
    assert frames[0] == (GuestMsg.TCP_CONNECTED, b"") and frames[-1] == (GuestMsg.TCP_CLOSED, b"\0\0\0\0"), frames
    assert b"".join(p for t, p in frames if t == GuestMsg.TCP_DATA) == b"early", frames
    assert sum(struct.unpack("<I", p)[0] for t, p in frames if t == GuestMsg.STDIN_ACK) == 5, frames
    srv.close()
    assert not srv.errors, srv.errors


def t_tcp_half_close(a):
    resp = os.urandom(1 << 20)
    req = {}

    def handler(c):
        req["data"] = recv_all(c)   # the request, until the host's EOF
        time.sleep(0.2)             # the guest must wait, not close on the host's EOF
        c.sendall(resp)             # only then the response
    srv = Server(handler)
    s, err = a.tcp_connect(srv.port)
    assert err is None, err
    data = os.urandom(300 * 1024)
    r = a.tcp_transfer(s, data)
    assert r["errno"] == 0 and r["eof"], r["errno"]
    assert req["data"] == data
    assert len(r["data"]) == len(resp) and r["data"] == resp, len(r["data"])
    # the guest peer finishes first: the host can still send afterwards
    def first(c):
        c.sendall(b"banner\n")
        c.shutdown(socket.SHUT_WR)
        req["late"] = recv_all(c)
    srv2 = Server(first)
    s, err = a.tcp_connect(srv2.port)
    assert a.recv(s) == (GuestMsg.TCP_DATA, b"banner\n")
    assert a.recv(s) == (GuestMsg.TCP_DATA, b"")
    cpu0 = agent_cpu(a)
    time.sleep(0.3)
    assert a.q(s).empty()  # not closed while the host still sends
    assert agent_cpu(a) - cpu0 < 0.1, "the agent spins on a half-closed stream"
    r = a.tcp_transfer(s, b"x" * 100000)
    assert r["errno"] == 0 and r["data"] == b"" and not r["eof"], r
    time.sleep(0.1)
    assert req["late"] == b"x" * 100000
    srv.close()
    srv2.close()
    assert not srv.errors and not srv2.errors, (srv.errors, srv2.errors)


def t_tcp_errors(a):
    # a port nobody listens on
    sk = socket.socket()
    sk.bind(("127.0.0.1", 0))
    port = sk.getsockname()[1]
    sk.close()
    s, err = a.tcp_connect(port)
    assert err == 111, err  # ECONNREFUSED
    # port 0 and malformed payloads: EINVAL
    for payload in (b"\0\0", b"\x50", b"\x50\0\0"):
        s = a.stream()
        a.send(HostMsg.TCP_CONNECT, s, payload)
        assert a.recv(s) == (GuestMsg.TCP_CLOSED, struct.pack("<i", 22)), payload
    # a peer that resets the connection: TCP_CLOSED with ECONNRESET
    def reset(c):
        c.recv(10)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    srv = Server(reset)
    s, err = a.tcp_connect(srv.port)
    a.send(HostMsg.TCP_DATA, s, b"hello")
    frames = [a.recv(s)]
    while frames[-1][0] != GuestMsg.TCP_CLOSED:
        frames.append(a.recv(s))
    assert frames[-1] == (GuestMsg.TCP_CLOSED, struct.pack("<i", 104)), frames  # ECONNRESET
    # a peer that stops reading and resets while the host sends a lot: every byte is still
    # acknowledged (the host never waits for a window that cannot open) and the error is reported
    def reader_then_reset(c):
        c.recv(1000)
        time.sleep(0.2)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    srv2 = Server(reader_then_reset)
    s, err = a.tcp_connect(srv2.port)
    r = a.tcp_transfer(s, os.urandom(4 << 20))
    assert r["errno"] in (104, 32), r["errno"]  # ECONNRESET or EPIPE
    assert r["max_unacked"] <= WINDOW
    # a reset after the peer's EOF, while the host sends nothing: noticed at once
    def eof_then_reset(c):
        c.sendall(b"bye")
        c.shutdown(socket.SHUT_WR)
        time.sleep(0.2)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    srv3 = Server(eof_then_reset)
    s, err = a.tcp_connect(srv3.port)
    assert [a.recv(s), a.recv(s)] == [(GuestMsg.TCP_DATA, b"bye"), (GuestMsg.TCP_DATA, b"")]
    typ, p = a.recv(s, 5)
    assert typ == GuestMsg.TCP_CLOSED and struct.unpack("<i", p)[0] in (104, 32), p  # RST in CLOSE_WAIT: EPIPE
    srv3.close()
    # frames for unknown streams are ignored
    for typ in (HostMsg.TCP_DATA, HostMsg.CLOSE, HostMsg.ACK):
        a.send(typ, 777777, struct.pack("<I", 5))
    a.send(HostMsg.TCP_DATA, 777777, b"")
    t_ping(a)
    assert a.q(777777).empty()
    srv.close()
    srv2.close()


def t_tcp_close(a):
    sent = {"n": 0}

    def flood(c):
        while True:
            c.sendall(b"z" * 65536)
            sent["n"] += 65536
    srv = Server(flood)
    s, err = a.tcp_connect(srv.port)
    assert err is None, err
    got = 0
    while got < 1 << 20:  # mid-transfer, acking as we go
        typ, p = a.recv(s)
        if typ == GuestMsg.TCP_DATA:
            got += len(p)
            a.send(HostMsg.ACK, s, struct.pack("<I", len(p)))
    a.send(HostMsg.TCP_DATA, s, b"q" * 1000)
    a.send(HostMsg.CLOSE, s)
    while True:
        typ, p = a.recv(s)
        if typ == GuestMsg.TCP_CLOSED:
            assert p == b"\0\0\0\0", p
            break
        assert typ in (GuestMsg.TCP_DATA, GuestMsg.STDIN_ACK), GUEST_NAMES.get(typ)
    for _ in range(50):  # the server's writes fail: the guest socket is really closed
        if srv.done:
            break
        time.sleep(0.05)
    assert srv.done and isinstance(srv.errors[0], (ConnectionResetError, BrokenPipeError)), srv.errors
    time.sleep(0.1)
    a.send(HostMsg.ACK, s, struct.pack("<I", 1))  # after TCP_CLOSED: the stream is unknown, ignored
    a.send(HostMsg.CLOSE, s)
    t_ping(a)
    assert a.q(s).empty()  # TCP_CLOSED was the last frame
    srv.close()


def t_tcp_backpressure(a):
    big = os.urandom(8 << 20)

    def writer(c):
        c.sendall(big)  # as fast as the guest lets it
    srv = Server(writer)
    s, err = a.tcp_connect(srv.port)
    assert err is None, err
    got = []
    unacked = 0

    def take(timeout):
        nonlocal unacked
        typ, p = a.recv(s, timeout)
        assert typ == GuestMsg.TCP_DATA, GUEST_NAMES.get(typ)
        got.append(p)
        unacked += len(p)
        assert unacked <= WINDOW, f"{unacked} bytes unacknowledged"
        return p
    # no ACK: the agent stops at the window
    while unacked < WINDOW:
        take(10)
    assert_stalled(a, s, unacked)
    # ack everything: the rest flows, each frame acked as it comes
    a.send(HostMsg.ACK, s, struct.pack("<I", unacked))
    unacked = 0
    while True:
        p = take(10)
        if not p:
            break
        a.send(HostMsg.ACK, s, struct.pack("<I", len(p)))
        unacked -= len(p)
    data = b"".join(got)
    assert len(data) == len(big) and data == big, len(data)
    a.send(HostMsg.TCP_DATA, s, b"")
    assert a.recv(s) == (GuestMsg.TCP_CLOSED, b"\0\0\0\0")
    srv.close()


def t_tcp_many(a):
    srv = Server(echo)
    errors, results = [], {}

    def one(i, size):
        try:
            data = os.urandom(size)
            s, err = a.tcp_connect(srv.port)
            assert err is None, err
            r = a.tcp_transfer(s, data, chunk=16 * 1024)
            assert r["errno"] == 0 and r["data"] == data, (r["errno"], len(r["data"]))
            results[i] = True
        except Exception as e:
            errors.append(e)
    for n, size in ((50, 64 * 1024), (300, 4096)):
        results.clear()
        t0 = time.time()
        threads = [threading.Thread(target=one, args=(i, size)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[:3]
        assert len(results) == n
        print(f"    {n} concurrent connections x {size} bytes in {time.time() - t0:.2f}s")
    srv.close()
    assert not srv.errors, srv.errors


def t_protocol_error():
    a = Agent()
    assert a.recv(0)[0] == GuestMsg.READY
    a.send(HostMsg.PING, 1, b"x")
    assert a.recv(1) == (GuestMsg.PONG, b"x")
    with a.wlock:
        a._write(struct.pack("<IBI", MAX_PAYLOAD + 1, HostMsg.PING, 2))
    typ, p = a.recv(0)
    assert typ == GuestMsg.LOG and b"protocol error" in p, p
    time.sleep(0.1)
    a.send(HostMsg.PING, 3, b"y")  # the buffer was reset; fresh frames work again
    assert a.recv(3) == (GuestMsg.PONG, b"y")
    assert a.close() == 0


def t_eof_kills_children():
    a = Agent()
    assert a.recv(0)[0] == GuestMsg.READY
    s = a.start(["sh", "-c", "sleep 100 & sleep 100"])
    typ, p = a.recv(s)
    assert typ == GuestMsg.STARTED
    pid = struct.unpack("<I", p)[0]
    time.sleep(0.2)
    assert a.close() == 0
    # the whole process group is dead (zombies at most, until the host's init reaps them)
    alive = None
    for _ in range(40):
        r = subprocess.run(["ps", "-o", "pid=,stat=", "-g", str(pid)], capture_output=True, text=True)
        alive = [l for l in r.stdout.splitlines() if "Z" not in l.split()[1]]
        if not alive:
            break
        time.sleep(0.05)
    assert not alive, alive


def t_shutdown():
    a = Agent()
    assert a.recv(0)[0] == GuestMsg.READY
    a.send(HostMsg.SHUTDOWN, 0)
    assert a.p.wait(timeout=5) == 0


def t_vm_system(a):
    """PID 1 mode: what init set up (run with --vm against the throwaway VM of the dev notes)."""
    ok(a.run(["hostname"]), b"testvm\n")
    t = int(a.run(["date", "+%s"])["out"])
    assert 1700000000 <= t < 1700000000 + 600, t
    mounts = a.run(["cat", "/proc/mounts"])["out"].decode()
    for want in ("overlay / overlay", "proc /proc proc", "sysfs /sys sysfs", "devtmpfs /dev devtmpfs",
                 "devpts /dev/pts devpts", "tmpfs /dev/shm tmpfs"):
        assert want in mounts, (want, mounts)
    ok(a.run(["cat", "/sys/class/net/lo/flags"]), b"0x9\n")  # IFF_UP|IFF_LOOPBACK
    ok(a.run(["ping", "-c", "1", "-W", "1", "127.0.0.1"]))
    ok(a.run(["sh", "-c", "for f in /dev/fd /dev/stdin /dev/stdout /dev/stderr; do readlink $f; done"]),
       b"/proc/self/fd\n/proc/self/fd/0\n/proc/self/fd/1\n/proc/self/fd/2\n")
    ok(a.run(["sh", "-c", "echo x > /dev/shm/x && cat /dev/shm/x && echo y > /rootfile && cat /rootfile"]), b"x\ny\n")
    ok(a.run(["sh", "-c", "id -u; id -g; id -G; echo $HOME"], user="app"), b"1000\n1000\n1000\n/home/app\n")
    ok(a.run(["sh", "-c", "id -u; id -g"], user="app:staff"), b"1000\n50\n")
    ok(a.run(["sh", "-c", "id -u; id -g; echo $HOME"], user="nobody"), b"65534\n65534\n/nonexistent\n")
    ok(a.run(["sh", "-c", "id -u; id -g; echo $HOME"]), b"0\n0\n/root\n")
    r = a.run(["id"], user="nosuch")
    assert r["code"] == 1 and r["error"], r
    ok(a.run(["pwd"], cwd="/work/a/b", flags=ExecFlags.MKDIR_CWD, user="app"), b"/work/a/b\n")
    data = os.urandom(3 << 20)
    assert a.write_file("/data/x/blob", data, 0o600) == (0, "")
    back, err, msg = a.read_file("/data/x/blob")
    assert err == 0 and back == data
    ok(a.run(["stat", "-c", "%a %s", "/data/x/blob"]), f"600 {len(data)}\n".encode())
    ok(a.run(["stat", "-c", "%a", "/data/x"]), b"755\n")
    entries, err, msg = a.list_dir("/")
    assert err == 0 and {"bin", "etc", "proc", "dev", "sys", "data", "rootfile"} <= set(entries), entries
    # the base image is read-only underneath, the overlay is writable
    ok(a.run(["sh", "-c", "echo z >> /etc/passwd && tail -n 1 /etc/passwd"]), b"z\n")
    # PID 1 reaps orphans
    ok(a.run(["sh", "-c", "(sleep 0.2 &) ; exit 0"]))
    time.sleep(0.5)
    ps = a.run(["ps", "-o", "pid,stat,comm"])["out"].decode()
    assert not [l for l in ps.splitlines()[1:] if l.split()[1].startswith("Z")], ps
    ok(a.run(["sh", "-c", "cat /proc/1/comm"]), b"init\n")
    if os.environ.get("VM_PERSIST"):
        # with an upper disk: what the previous boot wrote is still there
        back, err, msg = a.read_file("/persist")
        print(f"    /persist from an earlier boot: {back!r} ({msg or 'ok'})")
        assert a.write_file("/persist", b"written at " + str(time.time()).encode()) == (0, "")


VM_TESTS = [t_ping, t_exit_codes, t_signal, t_stdout_stderr, t_stdin_10m, t_stdin_closed, t_tty, t_many,
            t_grandchild, t_output_before_exit, t_bad_frames, t_vm_system]


def main():
    vm = sys.argv[1] == "--vm" if len(sys.argv) > 1 else False
    if vm:
        import socket
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(sys.argv[2])
        a = Agent(sock)
    else:
        a = Agent()
    typ, p = a.recv(0, timeout=30)
    assert typ == GuestMsg.READY and p == AGENT_VERSION.encode(), (typ, p)
    print(f"READY {p.decode()!r}")
    tests = [t_ping, t_set_identity_only_in_a_vm, t_exit_codes, t_signal, t_stdout_stderr, t_stdin_10m, t_stdin_closed, t_env_cwd,
             t_users, t_tty, t_exec_errors, t_many, t_concurrent_streams, t_grandchild, t_output_before_exit, t_files, t_write_file_replace_link,
             t_output_backpressure, t_output_after_exit_waits_for_acks, t_read_file_backpressure_and_cancel,
             t_write_file_enospc_leaves_nothing,
             t_orphans, t_bad_frames, t_tcp_echo, t_tcp_half_close, t_tcp_errors, t_tcp_close, t_tcp_backpressure,
             t_tcp_many]
    failed = 0
    for t in VM_TESTS if vm else tests:
        t0 = time.time()
        try:
            t(a)
            print(f"ok   {t.__name__} ({time.time() - t0:.2f}s)")
        except Exception:
            failed += 1
            print(f"FAIL {t.__name__}")
            traceback.print_exc()
    assert not a.logs or all("unknown" in l for l in a.logs), a.logs
    if vm:
        # SHUTDOWN powers the VM off: the connection closes
        a.send(HostMsg.SHUTDOWN, 0)
        assert a.eof.wait(10), "VM did not power off"
        print("ok   shutdown")
    else:
        assert a.close() == 0
        for t in (t_protocol_error, t_eof_kills_children, t_shutdown):
            try:
                t()
                print(f"ok   {t.__name__}")
            except Exception:
                failed += 1
                print(f"FAIL {t.__name__}")
                traceback.print_exc()
        subprocess.run(["rm", "-rf", f"/tmp/agent-test-{os.getpid()}"])
    print("all passed" if not failed else f"{failed} FAILED")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
