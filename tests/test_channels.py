"""Channel URIs, JSON/keyval channel lists, and opening real sockets and files."""

from __future__ import annotations

import os
import shlex
import socket
import stat
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cprfast.channels import (
    DEFER,
    Channel,
    ChannelType,
    ExecAddress,
    FdAddress,
    FileAddress,
    MigrationAddress,
    TcpAddress,
    UnixAddress,
    connect,
    listen,
    open_file,
    parse_channels,
    parse_incoming,
    parse_uri,
)
from cprfast.errors import MigrationError

# ------------------------------------------------------------------------ URIs


@pytest.mark.parametrize(
    ("uri", "addr"),
    [
        ("unix:/run/vm/main.sock", UnixAddress("/run/vm/main.sock")),
        ("tcp:localhost:4444", TcpAddress("localhost", 4444)),
        ("tcp:10.0.0.2:0", TcpAddress("10.0.0.2", 0)),
        ("tcp:[::1]:4444", TcpAddress("::1", 4444)),
        ("tcp::4444", TcpAddress("", 4444)),
        ("file:/tmp/vm.state", FileAddress("/tmp/vm.state", 0)),
        ("file:/tmp/vm.state,offset=4096", FileAddress("/tmp/vm.state", 4096)),
        ("file:/tmp/vm.state,offset=0x1000", FileAddress("/tmp/vm.state", 4096)),
        ("file:/tmp/vm.state,offset=2M", FileAddress("/tmp/vm.state", 2 << 20)),
        ("fd:7", FdAddress(7)),
        ("fd:migfd", FdAddress("migfd")),
        ("exec:cat > /tmp/x", ExecAddress(("/bin/sh", "-c", "cat > /tmp/x"))),
        ("exec:", ExecAddress(("/bin/sh", "-c", ""))),
    ],
)
def test_parse_uri_forms(uri: str, addr: MigrationAddress) -> None:
    assert parse_uri(uri) == addr
    assert parse_uri(addr.uri) == addr


def test_streamable_only_file_is_not() -> None:
    assert not FileAddress("/x").streamable
    for addr in (UnixAddress("/x"), TcpAddress("h", 1), FdAddress(3), ExecAddress(("cat",))):
        assert addr.streamable


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("foo:bar", "unknown migration protocol: foo:bar"),
        ("/just/a/path", "unknown migration protocol: /just/a/path"),
        ("unix:", "invalid Unix socket address"),
        ("fd:", "invalid file descriptor address"),
        ("tcp:hostonly", "error parsing address 'hostonly'"),
        ("tcp::", "error parsing port in address ':'"),
        ("tcp:host:http", "error parsing port in address 'host:http'"),
        ("tcp:host:1234,ipv4", "error parsing port in address 'host:1234,ipv4'"),
        ("tcp:[::1]4444", "error parsing IPv6 address '[::1]4444'"),
        ("tcp:[::1]:", "error parsing port in address '[::1]:'"),
        ("tcp:host:65536", "port 65536 out of range in address 'host:65536'"),
        ("file:/x,offset=abc", "file URI has bad offset abc: Invalid argument"),
        ("file:/x,offset=", "file URI has bad offset : Invalid argument"),
        ("file:/x,offset=99999E", "file URI has bad offset 99999E: Numerical result out of range"),
        ("file:", "file URI has an empty path"),
        ("file:,offset=5", "file URI has an empty path"),
        ("rdma:host:1", "rdma migration is not supported by cprfast"),
        ("vsock:3:1234", "vsock migration is not supported by cprfast"),
    ],
)
def test_parse_uri_errors(uri: str, message: str) -> None:
    with pytest.raises(MigrationError) as e:
        parse_uri(uri)
    assert str(e.value) == message


def test_exec_argv_uri_is_shell_equivalent() -> None:
    addr = ExecAddress(("/usr/bin/gzip", "-c", "a file"))
    assert addr.uri == "exec:/usr/bin/gzip -c 'a file'"
    parsed = parse_uri(addr.uri)
    assert isinstance(parsed, ExecAddress)
    assert shlex.split(parsed.argv[2]) == list(addr.argv)


_host_label = st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True)
_addresses: st.SearchStrategy[MigrationAddress] = st.one_of(
    st.builds(UnixAddress, st.text(min_size=1).filter(lambda s: "\0" not in s)),
    st.builds(
        TcpAddress,
        st.one_of(
            st.just(""),
            st.ip_addresses().map(str),
            st.lists(_host_label, min_size=1, max_size=3).map(".".join),
        ),
        st.integers(0, 65535),
    ),
    st.builds(
        FileAddress,
        st.text(min_size=1).filter(lambda s: ",offset=" not in s),
        st.integers(0, (1 << 64) - 1),
    ),
    st.builds(FdAddress, st.one_of(st.integers(0, 1 << 20), st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_-]*", fullmatch=True))),
    st.builds(lambda cmd: ExecAddress(("/bin/sh", "-c", cmd)), st.text()),
)


@given(_addresses)
def test_uri_round_trip(addr: MigrationAddress) -> None:
    assert parse_uri(addr.uri) == addr


# --------------------------------------------------------------- JSON channels


def _sock(kind: str, **kw: Any) -> dict[str, Any]:
    return {"transport": "socket", "type": kind, **kw}


def test_parse_channels_all_transports() -> None:
    chans = parse_channels(
        [
            {"channel-type": "main", "addr": _sock("inet", host="::1", port="4444")},
            {"channel-type": "cpr", "addr": _sock("unix", path="/run/cpr.sock")},
        ]
    )
    assert chans == {ChannelType.MAIN: TcpAddress("::1", 4444), ChannelType.CPR: UnixAddress("/run/cpr.sock")}
    assert parse_channels([{"channel-type": "main", "addr": _sock("fd", str="9")}]) == {ChannelType.MAIN: FdAddress(9)}
    assert parse_channels([{"channel-type": "main", "addr": _sock("fd", str="mig")}]) == {
        ChannelType.MAIN: FdAddress("mig")
    }
    assert parse_channels(
        [{"channel-type": "main", "addr": {"transport": "file", "filename": "/f", "offset": 8192}}]
    ) == {ChannelType.MAIN: FileAddress("/f", 8192)}
    assert parse_channels([{"channel-type": "main", "addr": {"transport": "file", "filename": "/f"}}]) == {
        ChannelType.MAIN: FileAddress("/f", 0)
    }
    assert parse_channels([{"channel-type": "main", "addr": {"transport": "exec", "args": ["cat"]}}]) == {
        ChannelType.MAIN: ExecAddress(("cat",))
    }


_MAIN = {"channel-type": "main", "addr": _sock("unix", path="/m")}


@pytest.mark.parametrize(
    ("channels", "message"),
    [
        ([_MAIN, _MAIN], "Channel list has more than one main entry"),
        (
            [_MAIN, {"channel-type": "cpr", "addr": _sock("unix", path="/a")}] * 2,
            "Channel list has more than one main entry",
        ),
        (
            [{"channel-type": "cpr", "addr": _sock("unix", path="/a")}] * 2,
            "Channel list has more than one cpr entry",
        ),
        ([{"channel-type": "cpr", "addr": _sock("unix", path="/a")}], "Channel list has no main entry"),
        ([], "Channel list has no main entry"),
        ("main", "Invalid parameter type for 'channels', expected: array"),
        (["main"], "Invalid parameter type for 'channels[0]', expected: object"),
        ([{"channel-type": "foo", "addr": {}}], "Parameter 'channels[0].channel-type' does not accept value 'foo'"),
        ([{"addr": {}}], "Parameter 'channels[0].channel-type' is missing"),
        ([{"channel-type": "main"}], "Parameter 'channels[0].addr' is missing"),
        ([{"channel-type": "main", "addr": []}], "Invalid parameter type for 'channels[0].addr', expected: object"),
        ([{"channel-type": "main", "addr": {}}], "Parameter 'channels[0].addr.transport' is missing"),
        (
            [{"channel-type": "main", "addr": {"transport": "pigeon"}}],
            "Parameter 'channels[0].addr.transport' does not accept value 'pigeon'",
        ),
        (
            [{"channel-type": "main", "addr": {"transport": "socket", "type": "sctp"}}],
            "Parameter 'channels[0].addr.type' does not accept value 'sctp'",
        ),
        ([{"channel-type": "main", "addr": _sock("unix")}], "Parameter 'channels[0].addr.path' is missing"),
        (
            [{"channel-type": "main", "addr": _sock("unix", path=5)}],
            "Invalid parameter type for 'channels[0].addr.path', expected: string",
        ),
        (
            [{"channel-type": "main", "addr": _sock("unix", path="/m", mode=1)}],
            "Parameter 'channels[0].addr.mode' is unexpected",
        ),
        (
            [{"channel-type": "main", "addr": _sock("inet", host="h", port="http")}],
            "Parameter 'channels[0].addr.port' expects a port number",
        ),
        (
            [{"channel-type": "main", "addr": _sock("inet", host="h", port=70000)}],
            "Parameter 'channels[0].addr.port' expects a port number",
        ),
        (
            [{"channel-type": "main", "addr": _sock("inet", host="h", port=True)}],
            "Invalid parameter type for 'channels[0].addr.port', expected: a port number",
        ),
        (
            [{"channel-type": "main", "addr": {"transport": "file", "filename": "/f", "offset": -1}}],
            "Parameter 'channels[0].addr.offset' expects uint64",
        ),
        (
            [{"channel-type": "main", "addr": {"transport": "exec", "args": []}}],
            "Parameter 'channels[0].addr.args' expects a non-empty list of strings",
        ),
        (
            [{"channel-type": "main", "addr": {"transport": "rdma", "host": "h", "port": "1"}}],
            "rdma migration is not supported by cprfast",
        ),
        ([{"channel-type": "main", "addr": _sock("vsock", cid="3", port="1")}], "vsock migration is not supported by cprfast"),
    ],
)
def test_parse_channels_errors(channels: Any, message: str) -> None:
    with pytest.raises(MigrationError) as e:
        parse_channels(channels)
    assert str(e.value) == message


def test_parse_incoming_forms() -> None:
    assert parse_incoming("defer") is DEFER
    assert parse_incoming("unix:/m") == [Channel(ChannelType.MAIN, UnixAddress("/m"))]
    assert parse_incoming('{"channel-type": "cpr", "addr": {"transport": "socket", "type": "fd", "str": "5"}}') == [
        Channel(ChannelType.CPR, FdAddress(5))
    ]
    assert parse_incoming('[{"channel-type": "main", "addr": {"transport": "file", "filename": "/f"}}]') == [
        Channel(ChannelType.MAIN, FileAddress("/f"))
    ]
    # QEMU's keyval form, as qtest's cpr tests use it
    assert parse_incoming("cpr,addr.transport=socket,addr.type=fd,addr.str=5") == [
        Channel(ChannelType.CPR, FdAddress(5))
    ]
    assert parse_incoming("main,addr.transport=file,addr.filename=/a,,b,addr.offset=4096") == [
        Channel(ChannelType.MAIN, FileAddress("/a,b", 4096))
    ]
    assert parse_incoming("main,addr.transport=exec,addr.args.0=gzip,addr.args.1=-d") == [
        Channel(ChannelType.MAIN, ExecAddress(("gzip", "-d")))
    ]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("{not json", "JSON parse error, Expecting property name enclosed in double quotes"),
        ("main,addr.transport", "Expected '=' after parameter 'addr.transport'"),
        ("main,addr.transport=socket,addr.transport=file", "Parameter 'addr.transport' is set more than once"),
        ("main,addr=x,addr.transport=file", "Parameter 'addr.transport' conflicts with an earlier value"),
        ("main,addr.transport=exec,addr.args.1=x", "list indexes must be 0, 1, 2, ... without gaps"),
        ("main", "Parameter 'addr' is missing"),
        ("bogus,addr.transport=file,addr.filename=/f", "Parameter 'channel-type' does not accept value 'bogus'"),
        ("tcp:x", "error parsing address 'x'"),
    ],
)
def test_parse_incoming_errors(spec: str, message: str) -> None:
    with pytest.raises(MigrationError) as e:
        parse_incoming(spec)
    assert str(e.value) == message


# ------------------------------------------------------------------- opening


def test_unix_listen_connect_mode_0600_and_cleanup(tmp_path: Path) -> None:
    path = str(tmp_path / "main.sock")
    old = os.umask(0)  # even with a permissive umask the socket file is 0600
    try:
        listener = listen(UnixAddress(path))
    finally:
        os.umask(old)
    with listener:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        client = connect(UnixAddress(path), timeout=5)
        server = listener.accept(timeout=5)
        client.sendall(b"ping")
        assert server.recv(4) == b"ping"
        client.close()
        server.close()
    assert not os.path.exists(path)


def test_unix_listen_replaces_stale_socket_refuses_other_files(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()
    with listen(UnixAddress(path)) as listener:
        c = connect(UnixAddress(path))
        listener.accept(5).close()
        c.close()
    regular = tmp_path / "file"
    regular.write_text("keep me")
    with pytest.raises(MigrationError) as e:
        listen(UnixAddress(str(regular)))
    assert str(e.value) == f"cannot listen on {regular}: it exists and is not a socket"
    assert regular.read_text() == "keep me"


def test_listener_close_leaves_a_replaced_path_alone(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    listener = listen(UnixAddress(path))
    os.unlink(path)
    other = tmp_path / "s"
    other.write_text("someone else's")
    listener.close()
    assert other.read_text() == "someone else's"


def test_accept_timeout_message(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    with listen(UnixAddress(path)) as listener, pytest.raises(TimeoutError) as e:
        listener.accept(timeout=0.05)
    assert str(e.value) == f"no client connected to unix:{path} within 0.05 s"


def test_tcp_port_zero_reports_bound_port() -> None:
    with listen(TcpAddress("127.0.0.1", 0)) as listener:
        assert isinstance(listener.address, TcpAddress)
        assert listener.address.port != 0
        c = connect(listener.address, timeout=5)
        s = listener.accept(timeout=5)
        c.sendall(b"x")
        assert s.recv(1) == b"x"
        c.close()
        s.close()


def test_tcp_ipv6_listen_connect() -> None:
    try:
        listener = listen(TcpAddress("::1", 0))
    except OSError as e:  # pragma: no cover - depends on the host
        pytest.skip(f"no IPv6 loopback: {e}")
    with listener:
        assert isinstance(listener.address, TcpAddress)
        c = connect(TcpAddress("::1", listener.address.port), timeout=5)
        listener.accept(5).close()
        c.close()


def test_fd_listener_prelistened_and_connected(tmp_path: Path) -> None:
    path = str(tmp_path / "pre.sock")
    pre = socket.socket(socket.AF_UNIX)
    pre.bind(path)
    pre.listen(1)
    with listen(FdAddress(pre.detach())) as listener:
        c = connect(UnixAddress(path))
        s = listener.accept(5)
        c.sendall(b"y")
        assert s.recv(1) == b"y"
        c.close()
        s.close()
    # an already connected fd is itself the incoming stream
    a, b = socket.socketpair()
    with listen(FdAddress(b.detach())) as listener:
        s = listener.accept()
        a.sendall(b"z")
        assert s.recv(1) == b"z"
        s.close()
    a.close()


def test_fd_connect_named_and_errors(tmp_path: Path) -> None:
    a, b = socket.socketpair()
    s = connect(FdAddress("migfd"), named_fds={"migfd": b.detach()})
    s.sendall(b"q")
    assert a.recv(1) == b"q"
    s.close()
    a.close()
    with pytest.raises(MigrationError) as e:
        connect(FdAddress("nope"))
    assert str(e.value) == "File descriptor named 'nope' has not been found"
    r, w = os.pipe()
    try:
        with pytest.raises(MigrationError) as e:
            connect(FdAddress(r))
        assert str(e.value) == f"File descriptor '{r}' is not a socket"
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("addr", [FileAddress("/x"), ExecAddress(("/bin/sh", "-c", "cat"))])
def test_connect_listen_refuse_non_sockets(addr: MigrationAddress) -> None:
    with pytest.raises(MigrationError) as e:
        connect(addr)
    assert str(e.value) == f"cannot connect to {addr.uri}: not a socket channel"
    with pytest.raises(MigrationError) as e:
        listen(addr)
    assert str(e.value) == f"cannot listen on {addr.uri}: not a socket channel"


def test_open_file_keeps_prefix_before_offset(tmp_path: Path) -> None:
    path = tmp_path / "state"
    path.write_bytes(b"HEADER--" + b"old data that must go")
    fd = open_file(FileAddress(str(path), 8), write=True)
    try:
        assert not os.get_inheritable(fd)
        os.write(fd, b"new")
    finally:
        os.close(fd)
    assert path.read_bytes() == b"HEADER--new"
    fd = open_file(FileAddress(str(path), 8), write=False)
    try:
        assert os.read(fd, 100) == b"new"
    finally:
        os.close(fd)
    fresh = tmp_path / "fresh"
    os.close(open_file(FileAddress(str(fresh)), write=True))
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o600
    with pytest.raises(FileNotFoundError):
        open_file(FileAddress(str(tmp_path / "missing")), write=False)
