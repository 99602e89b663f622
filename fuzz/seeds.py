"""Write the seed corpus: valid inputs made by our own encoders, QEMU-format bytes, edge cases.

    python fuzz/seeds.py        # (re)writes fuzz/corpus/<target>/seed-*

Files are named by content hash, so running it again changes nothing unless an
encoder changed. Inputs a fuzzer found stay beside the seeds as ``regress-*``
(see ``fuzz/README.md``).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fuzz_targets  # noqa: E402
import numpy as np  # noqa: E402
from cprfast import _core, cpr_state, stream  # noqa: E402

CORPUS = Path(__file__).resolve().parent / "corpus"


def _with_fds(nfds: int, payload: bytes) -> bytes:
    """The targets' input framing: a first byte with the fd count, then the bytes."""
    return bytes([nfds]) + payload


def cpr_streams(inline_fds: bool) -> Iterator[bytes]:
    """CPR states as our encoder writes them, plus QEMU's no-iommufd subsection form."""
    fds = [os.memfd_create("seed", os.MFD_CLOEXEC) for _ in range(3)]
    try:
        for n in range(4):
            with cpr_state.CprState() as state:
                for i in range(n):
                    state.save_fd(f"ram{i}" if i != 2 else "vhost-user-blk", i, fds[i])
                if n >= 2:
                    state.vfio_devices.append(cpr_state.VfioDevice("0000:00:04.0", 7, 1, 2))
                data, carried = cpr_state.encode(state, inline_fds=inline_fds)
                yield _with_fds(len(carried) if inline_fds else 3, data)
        # QEMU without iommufd: the subsection ends right after its version.
        head = struct.pack(">II", cpr_state.MAGIC, cpr_state.VERSION) + b"\0"
        sub = cpr_state.VFIO_SUBSECTION.encode()
        yield _with_fds(0, head + bytes([5, len(sub)]) + sub + struct.pack(">I", 1))
    finally:
        for fd in fds:
            os.close(fd)


def main_streams() -> Iterator[bytes]:
    """Main streams written by StreamWriter: empty, devices, a RAM section."""
    for sections in ([], [stream.Section("cpu", 0, 1, b"\x01" * 16)], [stream.Section("a", 3, 2, b"")]):
        r, w = os.pipe()
        try:
            writer = stream.StreamWriter(w)
            for s in sections:
                writer.device(s)
            if not sections:
                writer.ram("pc.ram", lambda fd: 0)
            writer.end()
            os.close(w)
            w = -1
            yield os.read(r, 1 << 16)
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)


URIS = [
    "unix:/run/cpr.sock",
    "tcp:127.0.0.1:4444",
    "tcp:[::1]:4444",
    "tcp::0",
    "file:/var/lib/vm.state,offset=0x1000",
    "file:/x,offset=4K",
    "fd:3",
    "fd:monfd",
    "exec:cat > /tmp/state",
    "rdma:1.2.3.4:5",
]

_UNIX = {"transport": "socket", "type": "unix", "path": "/run/cpr.sock"}
_INET = {"transport": "socket", "type": "inet", "host": "::1", "port": "4444"}
_FILE = {"transport": "file", "filename": "/x", "offset": 4096}
_EXEC = {"transport": "exec", "args": ["/bin/sh", "-c", "cat"]}
CHANNEL_LISTS = [
    [{"channel-type": "main", "addr": _INET}, {"channel-type": "cpr", "addr": _UNIX}],
    [{"channel-type": "main", "addr": _FILE}],
    [{"channel-type": "main", "addr": _EXEC}],
    [{"channel-type": "main", "addr": {"transport": "socket", "type": "fd", "str": "5"}}],
]
INCOMING = [
    "defer",
    *URIS,
    json.dumps(CHANNEL_LISTS[0][1]),
    json.dumps(CHANNEL_LISTS[0]),
    "cpr,addr.transport=socket,addr.type=unix,addr.path=/run/cpr.sock",
    "main,addr.transport=exec,addr.args.0=/bin/cat,addr.args.1=x,,y",
]


def bundles() -> Iterator[bytes]:
    """fd bundles as ``send_fds`` puts them on the wire (the fds themselves cannot be stored)."""
    for nfds, data in ((0, b""), (1, b"state"), (3, b"x" * 40)):
        a, b = socket.socketpair()
        fds = [os.memfd_create("seed", os.MFD_CLOEXEC) for _ in range(nfds)]
        try:
            _core.send_fds(a.fileno(), data, fds)
            a.shutdown(socket.SHUT_WR)
            raw = bytearray()
            while chunk := _core.recvmsg_fds(b.fileno(), 1 << 16, 253):
                if not chunk[0]:
                    break
                raw += chunk[0]
                for fd in chunk[1]:
                    os.close(fd)
            yield _with_fds(nfds, bytes(raw))
        finally:
            for fd in fds:
                os.close(fd)
            a.close()
            b.close()


def _fuzz_region() -> _core.Region:
    """A region like the fuzz targets': some pages of data, the rest zero."""
    region = _core.Region.create("seed", fuzz_targets.REGION_PAGES * fuzz_targets.PAGE)
    for page in (0, 3, 4, 7):
        region.write(page * fuzz_targets.PAGE, bytes([page + 1]) * 100 + bytes(range(256)) * 4)
    return region


def _read_all(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    out = bytearray()
    while chunk := os.read(fd, 1 << 16):
        out += chunk
    return bytes(out)


def page_streams() -> Iterator[bytes]:
    """Page streams as send_pages writes them: one channel, two channels, only some pages."""
    with _fuzz_region() as region:
        for channels, dirty in ((1, None), (2, None), (1, np.array([0b10010], dtype=np.uint64))):
            fds = [os.memfd_create("seed", os.MFD_CLOEXEC) for _ in range(channels)]
            try:
                _core.send_pages(region, fds[0], dirty=dirty, channels=fds[1:])
                streams = [_read_all(fd) for fd in fds]
            finally:
                for fd in fds:
                    os.close(fd)
            if channels == 1:
                yield bytes([0]) + streams[0]
            else:
                cut = len(streams[0]).to_bytes(2, "little")
                yield bytes([fuzz_targets.FLAG_TWO_CHANNELS]) + cut + streams[0] + streams[1]


def mapped_saves() -> Iterator[bytes]:
    """A mapped-ram save of the fuzz region as save_mapped writes it; resealed and not."""
    with _fuzz_region() as region:
        fd = os.memfd_create("seed", os.MFD_CLOEXEC)
        try:
            _core.save_mapped(region, fd)
            save = _read_all(fd)
        finally:
            os.close(fd)
    yield bytes([0]) + save
    yield bytes([fuzz_targets.FLAG_RESEAL | 2 << 1]) + save


def seeds() -> dict[str, list[bytes]]:
    """Seed inputs per target."""
    return {
        "cpr_inline": list(cpr_streams(inline_fds=True)),
        "cpr_numbers": list(cpr_streams(inline_fds=False)),
        "main_stream": list(main_streams()),
        "channels_uri": [u.encode() for u in URIS],
        "channels_incoming": [s.encode() for s in INCOMING],
        "channels_json": [json.dumps(c).encode() for c in CHANNEL_LISTS],
        "scm_bundle": list(bundles()),
        "pagestream": list(page_streams()),
        "mapped_ram": list(mapped_saves()),
    }


def main() -> None:
    """Write every seed as ``corpus/<target>/seed-<sha1 prefix>``."""
    for target, inputs in seeds().items():
        folder = CORPUS / target
        folder.mkdir(parents=True, exist_ok=True)
        for data in inputs:
            (folder / f"seed-{hashlib.sha1(data).hexdigest()[:16]}").write_bytes(data)


if __name__ == "__main__":
    main()
