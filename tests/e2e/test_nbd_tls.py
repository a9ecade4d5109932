"""NBD on Unix sockets and over TLS with real clients (nbdinfo, qemu-img, fio), across a
kill -9 and a takeover, and a squatter on a free identity address.

- `--nbd-socket`: nbd+unix:///lun0?socket=<run-dir>/n1.nbd.s; the run dir is 0700, so only
  the cluster's user connects; the partner binds the same path at takeover.
- `--nbd-tls require`: nbds:// with the cluster's CA (libnbd: ?tls-certificates=<dir>;
  qemu: tls-creds-x509,dir=<dir>); plaintext is refused at the handshake; the partner serves
  the same certificate at the same address.
- fio's nbd engine does not let libnbd read files named in its URI (tls-certificates=), so
  fio finds the CA in libnbd's default directory, $HOME/.pki/libnbd for a user other than
  root (/etc/pki/libnbd for root, which a test must not touch): as root, fio runs as
  `nobody` with a HOME of its own holding a copy of the CA.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.e2e.conftest import BOOT_S, events_when, served_by, wait_until
from tests.e2e.test_nbd_clients import need, run, vmemu_cli
from vmemu import tls as creds

MiB = 1 << 20
NOBODY = 65534
# 2 s of silence before a domain counts as failed (the suite's default is 0.5 s): these tests
# kill node1 on purpose, and a shared two-core host must not fail node2 by accident.
HB_MISSES = 40


def nbd_of(c, node: str = "node1") -> dict[str, Any]:
    return c.status().node(node)["nbd"]


def listening(c, node: str = "node1") -> dict[str, Any]:
    return (nbd_of(c, node).get("listening")) or {}


def certs(c) -> Path:
    return creds.tls_dir(c.dir)


def qemu_obj(c) -> list[str]:
    return ["--object", f"tls-creds-x509,id=tls0,endpoint=client,dir={certs(c)}"]


def qemu_tcp(c, lun: int = 0) -> str:
    n = nbd_of(c)
    return (f"driver=nbd,server.type=inet,server.host={n['address']},server.port={n['port']},"
            f"export=lun{lun},tls-creds=tls0")


def qemu_unix(c, lun: int = 0) -> str:
    # qemu checks the certificate against a host name, and a Unix socket has none: the
    # server certificate names localhost (vmemu/tls.py) for this.
    return (f"driver=nbd,server.type=unix,server.path={nbd_of(c)['socket']},export=lun{lun},"
            "tls-creds=tls0,tls-hostname=localhost")


def qemu_same(qemu_img: str, c, src: Path, target: str) -> None:
    p = run([qemu_img, "compare", *qemu_obj(c), "--image-opts", f"driver=file,filename={src}",
             target])
    assert p.returncode == 0 and "identical" in p.stdout, p.stdout + p.stderr


@pytest.fixture
def fio_home() -> Iterator[tuple[Path, list[str]]]:
    """A HOME whose .pki/libnbd holds the CA (filled by the test), and the command prefix
    that runs fio with it: as `nobody` when we are root (libnbd reads /etc/pki/libnbd for
    root, a system directory), else as ourselves."""
    home = Path(tempfile.mkdtemp(prefix="vmemu-fio-home-"))
    (home / ".pki" / "libnbd").mkdir(parents=True)
    prefix = ["env", f"HOME={home}"]
    if os.geteuid() == 0:
        prefix = ["runuser", "-u", "nobody", "--"] + prefix
    try:
        yield home, prefix
    finally:
        shutil.rmtree(home, ignore_errors=True)


def fio(prefix: list[str], home: Path, uri: str, *extra: str) -> subprocess.CompletedProcess:
    if os.geteuid() == 0:
        for p in [home, *home.rglob("*")]:
            os.chown(p, NOBODY, NOBODY)
    return run([*prefix, need("fio"), "--name=v", "--ioengine=nbd", f"--uri={uri}",
                "--rw=randwrite", "--bs=4k", "--size=8M", "--iodepth=16", "--verify=crc32c",
                "--randseed=4242", *extra], cwd=home)


def test_unix_socket_uri_survives_kill_and_giveback(make_cluster, tmp_path):
    nbdinfo, qemu_img = need("nbdinfo"), need("qemu-img")
    c = make_cluster(nodes=2, disk_mb=256, lun_mb=32, heartbeat_misses=HB_MISSES,
                     nbd_socket=True)
    n = nbd_of(c)
    path = Path(n["socket"])
    assert path.name == "n1.nbd.s" and path.is_socket()
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700  # only our user gets in
    uri = f"nbd+unix:///lun0?socket={path}"
    assert n["unix_uris"][0] == uri and n["tls"] == "off"
    # The listeners' view rides on the guest's heartbeats: polled for, not read once.
    wait_until(lambda: {k: v["listening"] for k, v in listening(c).items()} ==
               {"tcp": True, "unix": True}, 30, "node1 to report both listeners listening")
    p = run([nbdinfo, "--json", uri])
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["exports"][0]["export-size"] == 32 * MiB
    rows = json.loads(vmemu_cli(c, "lun", "list", "--json").stdout)
    assert rows[0]["unix_uri"] == uri
    assert uri in vmemu_cli(c, "status").stdout
    if os.geteuid() == 0:  # another user cannot even reach the socket
        p = run(["runuser", "-u", "nobody", "--", nbdinfo, "--size", uri], cwd="/")
        assert p.returncode != 0 and "ermission denied" in p.stderr, p.stderr

    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(8 * MiB))
    p = run([qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri])
    assert p.returncode == 0, p.stderr

    def compare() -> None:
        p = run([qemu_img, "compare", "-f", "raw", "-F", "raw", str(src), uri])
        assert p.returncode == 0 and "identical" in p.stdout, p.stdout + p.stderr

    compare()
    c.crash("node1")  # SIGKILL: its socket file stays behind; the partner replaces it
    c.wait_for(lambda s: s.node("node1")["identity_served_by"] == "node2", 30, "takeover")
    compare()  # the same URI, node2 answering
    wait_until(lambda: (listening(c).get("unix") or {}).get("listening"), 30,
               "node2 to report node1's Unix listener")
    assert listening(c)["unix"] | {"attempts": 0} == {
        "address": str(path), "listening": True, "error": None, "holder": None,
        "down_s": None, "attempts": 0}
    c.restart("node1")
    c.wait_for(lambda s: s.node("node1")["state"] == "up", BOOT_S, "node1 to boot")
    c.giveback("node1")
    c.wait_for(lambda s: s.node("node1")["identity_served_by"] == "node1", 60, "giveback")
    compare()
    assert not [e for e in c.events() if e["kind"] == "nbd_address_taken"]


def test_tls_require_with_nbdinfo_qemu_and_fio_across_a_takeover(make_cluster, tmp_path,
                                                                  fio_home):
    nbdinfo, qemu_img = need("nbdinfo"), need("qemu-img")
    need("fio")
    c = make_cluster(nodes=2, disk_mb=256, lun_mb=32, heartbeat_misses=HB_MISSES,
                     nbd_socket=True, nbd_tls="require")
    d = certs(c)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for f in (creds.SERVER_KEY, creds.CA_KEY, creds.CLIENT_KEY):
        assert stat.S_IMODE((d / f).stat().st_mode) == 0o600, f
    n = nbd_of(c)
    host, port, sock = n["address"], n["port"], n["socket"]
    tls_uri = f"nbds://{host}:{port}/lun0?tls-certificates={d}"
    unix_uri = f"nbds+unix:///lun0?socket={sock}&tls-certificates={d}"
    assert n["uris"][0] == f"nbds://{host}:{port}/lun0"
    assert n["unix_uris"][0] == f"nbds+unix:///lun0?socket={sock}"
    out = vmemu_cli(c, "status").stdout
    assert "NBD TLS require" in out and f"tls-certificates={d}" in out
    assert "~/.pki/libnbd" in out and "tls-hostname=localhost" in out

    for u in (tls_uri, unix_uri):
        p = run([nbdinfo, u])
        assert p.returncode == 0 and "with TLS" in p.stdout, p.stdout + p.stderr
    # Plaintext is refused at the handshake (NBD_REP_ERR_TLS_REQD, which qemu names).
    for u in (f"nbd://{host}:{port}/lun0", f"nbd+unix:///lun0?socket={sock}"):
        p = run([nbdinfo, "--size", u])
        assert p.returncode != 0 and not p.stdout, p.stdout
        p = run([qemu_img, "info", u])
        assert p.returncode != 0 and "TLS negotiation required" in p.stderr, p.stderr
    # A client that trusts another CA refuses this server.
    other = creds.ensure(tmp_path / "other", [host], "another cluster")
    p = run([nbdinfo, "--size", f"nbds://{host}:{port}/lun0?tls-certificates={other}"])
    assert p.returncode != 0 and "certificate" in p.stderr.lower(), p.stderr

    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(8 * MiB))
    p = run([qemu_img, "convert", "-n", *qemu_obj(c), "-f", "raw", "--target-image-opts",
             str(src), qemu_tcp(c)])
    assert p.returncode == 0, p.stderr
    qemu_same(qemu_img, c, src, qemu_tcp(c))
    qemu_same(qemu_img, c, src, qemu_unix(c))
    home, prefix = fio_home
    shutil.copy(d / creds.CA, home / ".pki" / "libnbd" / creds.CA)  # the CA only, no keys
    fio_uri = f"nbds://{host}:{port}/lun1"
    p = fio(prefix, home, fio_uri, "--do_verify=1")  # writes 8 MiB, reads it back, checks
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    # (figures that ride on heartbeats) the untrusting client hung up mid-handshake
    wait_until(lambda: (s := nbd_of(c)["server"])["tls_sessions"] >= 6
               and s["tls_failures"] >= 1, 10, "the TLS counts in status")

    pid2 = c.status().node("node2")["pid"]
    c.crash("node1")
    c.wait_for(lambda s: s.node("node1")["identity_served_by"] == "node2", 30, "takeover")
    # The same URIs, the same certificate, node2 answering.
    assert nbd_of(c)["uris"][0] == f"nbds://{host}:{port}/lun0"
    wait_until(lambda: (view := listening(c)) != {} and all(v["listening"]
                                                         for v in view.values()), 30,
               "node2 to report node1's listeners")
    p = run([nbdinfo, tls_uri])
    assert p.returncode == 0 and "served by node2" in p.stdout, p.stdout + p.stderr
    qemu_same(qemu_img, c, src, qemu_tcp(c))
    qemu_same(qemu_img, c, src, qemu_unix(c))
    p = fio(prefix, home, fio_uri, "--do_verify=1", "--verify_only=1")  # what fio wrote before
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    p = run([nbdinfo, "--size", f"nbd://{host}:{port}/lun0"])  # and still no plaintext
    assert p.returncode != 0
    assert c.status().node("node2")["pid"] == pid2


SQUATTER = r"""
import json, os, select, socket, ssl, struct, sys, tempfile, time
host, port = sys.argv[1], int(sys.argv[2])
pem = json.loads(sys.stdin.readline())
with tempfile.NamedTemporaryFile("w", suffix=".pem", delete=False) as f:
    f.write(pem["cert"] + pem["key"])
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(f.name)
os.unlink(f.name)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
print("waiting", flush=True)
end = time.monotonic() + 60
while True:  # as soon as the address is free: the moment its server died
    try:
        s.bind((host, port))
        break
    except OSError:
        if time.monotonic() > end:
            sys.exit("never bound")
        time.sleep(0.001)
s.listen(8)
print("bound", flush=True)
while True:
    r, _, _ = select.select([sys.stdin, s], [], [], 1)
    if sys.stdin in r and not sys.stdin.readline():
        break  # the test closed our stdin
    if s in r:
        c, _ = s.accept()
        c.settimeout(5)
        try:  # a fake NBD server that offers TLS with a certificate of its own
            c.sendall(b"NBDMAGIC" + b"IHAVEOPT" + struct.pack(">H", 3))
            c.recv(4)
            magic, option, length = struct.unpack(">QII", c.recv(16))
            if option == 5:  # NBD_OPT_STARTTLS
                c.sendall(struct.pack(">QIII", 0x3E889045565A9, 5, 1, 0))
                try:
                    ctx.wrap_socket(c, server_side=True)
                    print("tls accepted", flush=True)
                except OSError as exc:  # an alert, or (GnuTLS) the client just hangs up
                    print("tls refused by the client:", repr(exc), flush=True)
        except (OSError, struct.error):
            pass
        finally:
            c.close()
"""


class Squatter:
    """SQUATTER as `nobody`, in a session of its own; its output lines in a queue."""

    def __init__(self, host: str, port: int, cert_pem: str, key_pem: str) -> None:
        self.proc = subprocess.Popen(
            ["runuser", "-u", "nobody", "--", "/usr/bin/python3", "-c", SQUATTER, host,
             str(port)], cwd="/", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cert": cert_pem, "key": key_pem}) + "\n")
        self.proc.stdin.flush()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def expect(self, prefix: str, timeout: float = 20) -> str:
        try:
            while not (line := self.lines.get(timeout=timeout)).startswith(prefix):
                pass
        except queue.Empty:
            raise AssertionError(f"the squatter never said {prefix!r}") from None
        return line

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # type: ignore[union-attr]
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def self_signed(host: str) -> tuple[str, str]:
    """A certificate of the squatter's own that names the address it squats."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vmemu NBD server")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(host))]), critical=False)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM).decode(),
            key.private_bytes(serialization.Encoding.PEM,
                              serialization.PrivateFormat.TraditionalOpenSSL,
                              serialization.NoEncryption()).decode())


def test_a_squatter_on_the_address_does_not_stop_the_takeover_nor_fool_tls(make_cluster):
    if os.geteuid() != 0:
        pytest.skip("the squatter runs as another user (runuser -u nobody): needs root")
    need("runuser")
    if not os.path.exists("/usr/bin/python3"):
        pytest.skip("the squatter needs /usr/bin/python3 (the venv is not nobody's to read)")
    nbdinfo = need("nbdinfo")
    c = make_cluster(nodes=2, disk_mb=256, lun_mb=32, heartbeat_misses=HB_MISSES,
                     nbd_socket=True, nbd_tls="require")
    n = nbd_of(c)
    host, port, d = n["address"], n["port"], certs(c)
    where = f"{host}:{port}"
    tls_uri = f"nbds://{host}:{port}/lun0?tls-certificates={d}"
    unix_uri = f"nbds+unix:///lun0?socket={n['socket']}&tls-certificates={d}"
    with c.client("node1") as blk:
        blk.write(0, 0, b"\x5a" * 4096)
    sq = Squatter(host, port, *self_signed(host))
    try:
        sq.expect("waiting")  # spinning on bind while node1 holds the address
        # node2's loop held for 3 s: the squatter gets the address between node1's death
        # and node2's takeover, whatever the scheduling (heartbeats go on: no failure).
        c.control.call("probe", {"node": "node2", "what": "stall", "seconds": 3})
        c.crash("node1")
        sq.expect("bound")
        c.wait_for(lambda s: s.node("node1")["identity_served_by"] == "node2", 30, "takeover")
        evs = events_when(c, lambda es: any(e["kind"] == "nbd_address_taken" for e in es))
        [taken] = [e for e in evs if e["kind"] == "nbd_address_taken"]
        assert taken["node"] == "node2" and taken["identity"] == "node1"
        assert taken["address"] == where and taken["transport"] == "tcp"
        assert taken["holder_uid"] == NOBODY and "nobody" in taken["holder"]
        # Served meanwhile: on the block protocol and on its Unix socket.
        with c.client("node1") as blk:
            assert blk.read(0, 0, 4096) == b"\x5a" * 4096
        assert any(e["kind"] == "takeover_complete" for e in events_when(
            c, lambda es: any(e["kind"] == "takeover_complete" for e in es)))
        p = run([nbdinfo, "--size", unix_uri])
        assert p.returncode == 0 and p.stdout.strip() == str(32 * MiB), p.stderr
        # A client that verifies the server refuses the squatter's certificate.
        p = run([nbdinfo, "--size", tls_uri])
        assert p.returncode != 0 and "certificate" in p.stderr.lower(), p.stderr
        said = sq.expect("tls ")
        assert "tls refused by the client" in said
        print(f"squatter: {said}; event: {taken}")
        # The squatter cannot borrow the cluster's key either.
        p = run(["runuser", "-u", "nobody", "--", "cat", str(d / creds.SERVER_KEY)], cwd="/")
        assert p.returncode != 0 and not p.stdout
        out = vmemu_cli(c, "status").stdout
        assert f"node1's NBD tcp address {where} is not listening" in out, out
        assert "uid 65534 (nobody)" in out
        view = listening(c)["tcp"]
        assert not view["listening"] and view["holder"].startswith("uid 65534")
    finally:
        sq.stop()
    evs = events_when(c, lambda es: any(e["kind"] == "nbd_address_bound" for e in es))
    [bound] = [e for e in evs if e["kind"] == "nbd_address_bound"]
    assert bound["address"] == where and bound["identity"] == "node1"
    assert bound["node"] == "node2"
    wait_until(lambda: listening(c)["tcp"]["listening"], 10, "status to show it bound")
    p = run([nbdinfo, "--size", tls_uri])
    assert p.returncode == 0 and p.stdout.strip() == str(32 * MiB), p.stderr
    assert served_by(c, "node1") == "node2"
