/**
 * The agent protocol, declared once: every frame type with its wire code, direction, payload and
 * meaning, and the numbers both ends agree on. Everything else is derived from this file:
 *
 * - `src/guest/protocol.ts` (the TS codec) builds `HostMsg`, `GuestMsg` and its constants from it;
 * - `guest/agent/protocol.h` (the C agent) and `guest/agent/protocol_consts.py` (the agent's Python
 *   test driver) are generated from it, and so are the tables of `docs/agent-protocol.md`, by
 *   `scripts/gen-agent-protocol.ts` (`npm run gen:protocol`); test/unit/agent-protocol-spec.test.ts
 *   fails when a generated file is stale and pins the wire codes in a snapshot.
 *
 * Names are the same everywhere. A name may exist in both directions (TCP_DATA), so each language
 * qualifies it by direction: TS and Python `HostMsg.TCP_DATA` / `GuestMsg.TCP_DATA`, C
 * `H_TCP_DATA` / `G_TCP_DATA`.
 *
 * Payload and meaning are Markdown, as they appear in the docs.
 */

export interface MessageSpec {
  readonly code: number;
  readonly payload: string;
  readonly meaning: string;
  /** Handled by the host-side exec relay; never sent to or by a guest. */
  readonly relayOnly?: boolean;
}

/** Host → guest. */
export const HOST_MESSAGES = {
  EXEC: { code: 0x01, payload: "see below", meaning: "start a process" },
  STDIN: {
    code: 0x02,
    payload: "bytes",
    meaning:
      "bytes for the process's stdin; **empty payload = EOF** (close the pipe; in TTY mode, write `^D`)",
  },
  RESIZE: {
    code: 0x03,
    payload: "u16 rows, u16 cols",
    meaning: "TIOCSWINSZ on the PTY (TTY mode only; ignored otherwise)",
  },
  SIGNAL: {
    code: 0x04,
    payload: "u32 signo",
    meaning: "`kill(-pgid, signo)` on the process group of the stream's process",
  },
  WRITE_FILE: {
    code: 0x05,
    payload: "u32 mode (low 12 bits) \\| flags, path",
    meaning:
      "open (create, truncate) `path` with `mode`, creating missing parents with 0755; FILE_DATA frames follow. " +
      "Flag 0x10000 (WRITE_REPLACE_LINK): a symlink at `path` is removed first instead of being written through",
  },
  FILE_DATA: {
    code: 0x06,
    payload: "bytes",
    meaning:
      "a chunk for an open WRITE_FILE; **empty payload = end**, the guest closes the file and answers RESULT. " +
      "If any write or the close fails, the file is removed (never left half-written) and RESULT carries the first error",
  },
  READ_FILE: {
    code: 0x07,
    payload: "path",
    meaning: "the guest answers DATA frames (≤ 64 KiB each, flow controlled by ACK) then RESULT",
  },
  LIST_DIR: {
    code: 0x08,
    payload: "path",
    meaning: "the guest answers DATA frames, each holding whole entries, then RESULT",
  },
  PING: {
    code: 0x09,
    payload: "anything",
    meaning: "the guest answers PONG with the same stream and payload",
  },
  SHUTDOWN: { code: 0x0a, payload: "—", meaning: "`sync()`, then power off" },
  TCP_CONNECT: {
    code: 0x0b,
    payload: "u16 port",
    meaning:
      "connect a TCP socket to `127.0.0.1:port` in the guest (port forwarding); answered by TCP_CONNECTED or TCP_CLOSED",
  },
  TCP_DATA: {
    code: 0x0c,
    payload: "bytes",
    meaning:
      "bytes for the stream's socket; **empty payload = the host side finished sending** " +
      "(`shutdown(SHUT_WR)` on the guest socket once the pending bytes are written)",
  },
  CLOSE: {
    code: 0x0d,
    payload: "—",
    meaning:
      "abort the stream's operation. TCP: close the guest socket now, drop pending bytes, answer TCP_CLOSED. " +
      "READ_FILE: close the file, answer RESULT `ECANCELED`. WRITE_FILE: close and remove the file, answer RESULT `ECANCELED`",
  },
  ACK: {
    code: 0x0e,
    payload: "u32 n",
    meaning:
      "the host delivered `n` bytes of the stream's guest→host data (STDOUT+STDERR of an EXEC, DATA of a READ_FILE, " +
      'TCP_DATA); see "Flow control"',
  },
  ALLOW_LIST: {
    code: 0x0f,
    payload: 'JSON `{op: "add"\\|"delete", hosts}`',
    meaning:
      "**relay only** (never sent to a guest): changes the VM's allow-list in the owning process; answered with DATA " +
      "(JSON `{added\\|removed, allowed_hosts}`) then RESULT (errno 22 and a message on a bad pattern or a VM not in " +
      "intercept mode). The relay greets with `matchlock-relay 4`",
    relayOnly: true,
  },
  PAUSE: {
    code: 0x10,
    payload: 'JSON `{op: "pause"\\|"resume"\\|"status"}`',
    meaning:
      "**relay only** (never sent to a guest): pauses or resumes the VM in the owning process (QMP `stop` / `cont`), " +
      "or asks whether it is paused; answered with DATA (JSON `{paused, changed}`: the state after it, and whether " +
      "this frame changed it) then RESULT (errno 22 on an unknown op; 5 and a message when the VM cannot change: " +
      "stopping, or dead). From `matchlock-relay 4` on; an older relay answers with a LOG line only",
    relayOnly: true,
  },
  SET_IDENTITY: {
    code: 0x11,
    payload:
      "u32 n, n bytes of entropy (≤ 512), boot parameters (`matchlock.NAME=VALUE` words, blank-separated)",
    meaning:
      "sent once to a VM restored from a snapshot, before anything else runs: the entropy is credited to the kernel's " +
      "pool and the CRNG reseeded (`RNDADDENTROPY`, `RNDRESEEDCRNG`), then the parameters are applied as at boot " +
      "(`matchlock.net`, `.hostname`, `.time`, `.disk`, `.vfs`); answered by RESULT",
  },
} as const satisfies Record<string, MessageSpec>;

/** Guest → host. */
export const GUEST_MESSAGES = {
  READY: {
    code: 0x80,
    payload: "version string (no NUL)",
    meaning: "sent once, on stream 0, when the agent serves",
  },
  STDOUT: {
    code: 0x81,
    payload: "bytes",
    meaning: "process output (in TTY mode all output is STDOUT); flow controlled by ACK",
  },
  STDERR: { code: 0x82, payload: "bytes", meaning: "process error output" },
  EXIT: {
    code: 0x83,
    payload: "i32 exit_code, i32 signal",
    meaning:
      "the process ended; always the last frame of an EXEC stream. `signal` is the terminating signal or 0; " +
      "then `exit_code` = 128 + signal",
  },
  ERROR: {
    code: 0x84,
    payload: "message (UTF-8, no NUL)",
    meaning:
      "the exec could not start (bad user, chdir, exec failure…); EXIT follows with 127 (not found), " +
      "126 (not executable) or 1 (other)",
  },
  STARTED: { code: 0x85, payload: "u32 pid", meaning: "the process started; pid in the guest" },
  STDIN_ACK: {
    code: 0x86,
    payload: "u32 n",
    meaning:
      "`n` bytes of STDIN (or of a TCP stream's TCP_DATA) were written to the process or socket (or discarded " +
      "because it closed). The host keeps at most 256 KiB unacknowledged per stream",
  },
  DATA: { code: 0x87, payload: "bytes", meaning: "a chunk of READ_FILE content or LIST_DIR entries" },
  RESULT: {
    code: 0x88,
    payload: "i32 errno (0 = ok), message (UTF-8, no NUL)",
    meaning: "ends a WRITE_FILE / READ_FILE / LIST_DIR",
  },
  PONG: { code: 0x89, payload: "as PING", meaning: "the answer to a PING" },
  LOG: { code: 0x8a, payload: "message", meaning: "a diagnostic line from the agent (stream 0)" },
  TCP_CONNECTED: {
    code: 0x8b,
    payload: "—",
    meaning: "the TCP_CONNECT succeeded; data may flow both ways",
  },
  TCP_DATA: {
    code: 0x8c,
    payload: "bytes",
    meaning:
      "bytes read from the guest socket (≤ 64 KiB each); **empty payload = the guest peer finished sending** (EOF read)",
  },
  TCP_CLOSED: {
    code: 0x8d,
    payload: "i32 errno",
    meaning:
      "the stream is over (0 = both directions finished normally; else the connect or socket error); always its last frame",
  },
} as const satisfies Record<string, MessageSpec>;

export interface ConstantSpec {
  readonly value: number | string;
  readonly meaning: string;
  /** Written in hexadecimal (a flag). */
  readonly hex?: boolean;
}

/** Numbers (and the version string) both ends agree on. */
export const PROTOCOL_CONSTANTS = {
  HEADER_SIZE: { value: 9, meaning: "frame header: u32 len, u8 type, u32 stream" },
  MAX_PAYLOAD: { value: 1024 * 1024, meaning: "largest frame payload, both directions" },
  WINDOW: {
    value: 256 * 1024,
    meaning: "flow control: most bytes of one stream and direction sent and not yet acknowledged",
  },
  CHUNK: {
    value: 64 * 1024,
    meaning:
      "largest data frame the guest sends (STDOUT, STDERR, DATA, TCP_DATA) and the host's chunk size for STDIN, FILE_DATA and TCP_DATA",
  },
  DRAIN_MAX: {
    value: 4 * 1024 * 1024,
    meaning: "output the agent still forwards after its process exited (a grandchild may keep writing)",
  },
  WRITE_REPLACE_LINK: {
    value: 0x10000,
    hex: true,
    meaning: "WRITE_FILE flag (above the mode bits): a symlink at the path is replaced, not written through",
  },
  AGENT_VERSION: { value: "matchlock-agent 1", meaning: "the agent's READY payload" },
  VFS_MAX_MESSAGE: {
    value: 1024 * 1024,
    meaning:
      "the vfs relay's buffer each way: the largest raw FUSE message it reads from `/dev/fuse` or takes from the port (a longer length from the host ends the relay)",
  },
} as const satisfies Record<string, ConstantSpec>;

/** Bits of the EXEC payload's `flags` word. */
export const EXEC_FLAGS = {
  TTY: { value: 1, meaning: "run on a new PTY" },
  STDIN: { value: 2, meaning: "stdin is a pipe fed by STDIN frames; otherwise `/dev/null`" },
  MKDIR_CWD: { value: 4, meaning: "create the working directory and parents, 0755, if missing" },
} as const satisfies Record<string, ConstantSpec>;

/** Kernel command line parameters the agent reads as PID 1 (`NAME=VALUE`; anything else it ignores). */
export const BOOT_PARAMS = {
  "matchlock.hostname": { value: "NAME", meaning: "`sethostname`" },
  "matchlock.time": { value: "SECONDS[.FRACTION]", meaning: "set the clock (no RTC in a micro-VM)" },
  "matchlock.rootfstype": {
    value: "ext4",
    meaning: "filesystem of the image base disk `/dev/vda`, mounted read-only (default ext4)",
  },
  "matchlock.net": {
    value: "GUEST/PREFIX,GATEWAY,MTU",
    meaning:
      "configure `eth0`: IPv6 off, MTU, address, link up, default route (failures are logged, not fatal); without it `eth0` stays down; `up`: IPv6 off and link up with no address (a snapshot template's, silent, so a clone only sets its address)",
  },
  "matchlock.probe": {
    value: "1",
    meaning: "the host's accelerator probe: print `MATCHLOCK-PROBE-OK` on the console and power off",
  },
  "matchlock.rng": {
    value: "1",
    meaning:
      "the host gave the VM a virtio-rng device (it does so only for a CPU without RDRAND): load `virtio_rng`, which is skipped otherwise",
  },
  "matchlock.disk": {
    value: "vdX:PATH:ro|rw",
    meaning:
      "an extra disk (a volume or raw ext4 image): mount `/dev/vdX` (ext4, nosuid, nodev) at PATH, read-only with `ro`; one parameter per disk, at most 20; failures are logged, not fatal",
  },
  "matchlock.fuse": {
    value: "1",
    meaning:
      "load `fuse` at boot even without `matchlock.vfs` (a snapshot template whose clones get host folders through SET_IDENTITY)",
  },
  "matchlock.vfs": {
    value: "PATH",
    meaning:
      "host folders: load `fuse`, mount a FUSE file system (`matchlock` on PATH, type `fuse.matchlock`) and relay its raw messages over the virtio-serial port `vfs`, both ways, unchanged; the host answers them",
  },
} as const satisfies Record<string, ConstantSpec>;

type Codes<T extends Record<string, MessageSpec>> = { readonly [K in keyof T]: T[K]["code"] };

function codes<T extends Record<string, MessageSpec>>(spec: T): Codes<T> {
  return Object.fromEntries(Object.entries(spec).map(([name, m]) => [name, m.code])) as Codes<T>;
}

type Values<T extends Record<string, ConstantSpec>> = { readonly [K in keyof T]: T[K]["value"] };

function values<T extends Record<string, ConstantSpec>>(spec: T): Values<T> {
  return Object.fromEntries(Object.entries(spec).map(([name, c]) => [name, c.value])) as Values<T>;
}

/** Host → guest frame types by name. */
export const HostMsg = codes(HOST_MESSAGES);
/** Guest → host frame types by name. */
export const GuestMsg = codes(GUEST_MESSAGES);
export const ExecFlags = values(EXEC_FLAGS);
export const Constants = values(PROTOCOL_CONSTANTS);
