"""Start real Mosquitto 2 brokers for tests (127.0.0.1 only, generated config, log to file)."""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

MOSQUITTO_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/usr/bin/mosquitto")


def find_mosquitto() -> str | None:
    exe = shutil.which("mosquitto")
    if exe:
        return exe
    for cand in MOSQUITTO_CANDIDATES:
        if os.access(cand, os.X_OK):
            return cand
    return None


def find_mosquitto_passwd() -> str | None:
    exe = shutil.which("mosquitto_passwd")
    if exe:
        return exe
    for cand in ("/usr/bin/mosquitto_passwd", "/usr/local/bin/mosquitto_passwd"):
        if os.access(cand, os.X_OK):
            return cand
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class TlsFiles:
    ca_file: Path
    ca_key: Path
    cert_file: Path
    key_file: Path
    client_cert: Path
    client_key: Path


def make_tls_files(directory: Path, hostname: str = "127.0.0.1") -> TlsFiles:
    """Generate a CA, a server cert for ``hostname``/localhost and a client cert (EC P-256)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.timezone.utc)

    def key_pem(key) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedmq test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(cn: str, server: bool):
        key = ec.generate_private_key(ec.SECP256R1())
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(minutes=5))
            .not_valid_after(now + _dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        if server:
            sans: list[x509.GeneralName] = [x509.DNSName("localhost")]
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(hostname)))
            except ValueError:
                sans.append(x509.DNSName(hostname))
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return key, b.sign(ca_key, hashes.SHA256())

    srv_key, srv_cert = leaf(hostname, True)
    cli_key, cli_cert = leaf("fedmq-test-client", False)
    files = TlsFiles(
        ca_file=directory / "ca.crt",
        ca_key=directory / "ca.key",
        cert_file=directory / "server.crt",
        key_file=directory / "server.key",
        client_cert=directory / "client.crt",
        client_key=directory / "client.key",
    )
    files.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.ca_key.write_bytes(key_pem(ca_key))
    files.cert_file.write_bytes(srv_cert.public_bytes(serialization.Encoding.PEM))
    files.key_file.write_bytes(key_pem(srv_key))
    files.client_cert.write_bytes(cli_cert.public_bytes(serialization.Encoding.PEM))
    files.client_key.write_bytes(key_pem(cli_key))
    for p in (files.ca_key, files.key_file, files.client_key):
        os.chmod(p, 0o600)
    return files


class MosquittoBroker:
    """One mosquitto process with its own config, log and (optionally) password/ACL/TLS files."""

    def __init__(
        self,
        directory: Path,
        *,
        message_size_limit: int | None = None,
        max_packet_size: int | None = None,
        allow_anonymous: bool | None = None,
        users: dict[str, str] | None = None,
        acl: str | None = None,
        tls: bool = False,
        require_certificate: bool = False,
        max_queued_messages: int | None = None,
        extra_config: str = "",
        port: int | None = None,
        exe: str | None = None,
    ) -> None:
        self.exe = exe or find_mosquitto()
        if self.exe is None:
            raise FileNotFoundError("mosquitto is not installed")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.tls_files: TlsFiles | None = make_tls_files(self.dir / "tls") if tls else None
        self.log_path = self.dir / "mosquitto.log"
        self.conf_path = self.dir / "mosquitto.conf"
        self.users = dict(users or {})
        self.proc: subprocess.Popen | None = None

        lines = [f"listener {self.port} 127.0.0.1"]
        if self.tls_files is not None:
            lines += [
                f"cafile {self.tls_files.ca_file}",
                f"certfile {self.tls_files.cert_file}",
                f"keyfile {self.tls_files.key_file}",
                f"require_certificate {'true' if require_certificate else 'false'}",
            ]
        if allow_anonymous is None:
            allow_anonymous = not self.users
        lines.append(f"allow_anonymous {'true' if allow_anonymous else 'false'}")
        if self.users:
            pw = self.dir / "passwd"
            tool = find_mosquitto_passwd()
            if tool is None:
                raise FileNotFoundError("mosquitto_passwd is not installed")
            first = True
            for user, password in self.users.items():
                args = [tool, "-b"] + (["-c"] if first else []) + [str(pw), user, password]
                subprocess.run(args, check=True, capture_output=True, timeout=30)
                first = False
            lines.append(f"password_file {pw}")
        if acl is not None:
            acl_path = self.dir / "acl"
            acl_path.write_text(acl.strip() + "\n")
            lines.append(f"acl_file {acl_path}")
        lines += [
            "persistence false",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
        ]
        if message_size_limit is not None:
            lines.append(f"message_size_limit {message_size_limit}")
        if max_packet_size is not None:
            lines.append(f"max_packet_size {max_packet_size}")
        if max_queued_messages is not None:
            lines.append(f"max_queued_messages {max_queued_messages}")
        if os.geteuid() == 0:
            lines.append("user root")  # else mosquitto drops to 'mosquitto' and cannot read tmp files
        if extra_config:
            lines.append(extra_config.strip())
        self.conf_path.write_text("\n".join(lines) + "\n")

    # -- addresses --------------------------------------------------------------------------
    @property
    def url(self) -> str:
        scheme = "mqtts" if self.tls_files is not None else "mqtt"
        return f"{scheme}://{self.host}:{self.port}"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- lifecycle --------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10.0) -> MosquittoBroker:
        if self.running:
            return self
        self.proc = subprocess.Popen(
            [self.exe, "-c", str(self.conf_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(
                    f"mosquitto exited with {self.proc.returncode}: {err.strip()} {self.log_text()[-2000:]}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"mosquitto did not listen on {self.port} within {timeout}s") from None
                time.sleep(0.02)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if proc.stderr:
            proc.stderr.close()

    def restart(self) -> MosquittoBroker:
        self.stop()
        return self.start()

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"MosquittoBroker({self.url}, running={self.running})"


SITE_BRIDGE_CONF = Path(__file__).resolve().parents[1] / "configs" / "mosquitto" / "site-bridge.conf"


def bridge_topic_lines(conf: Path = SITE_BRIDGE_CONF) -> list[str]:
    """The ``topic`` lines of a shipped bridge config (what crosses the bridge, in which direction)."""
    return [line.strip() for line in conf.read_text().splitlines() if line.strip().startswith("topic ")]


def bridge_config(remote: MosquittoBroker, name: str, topic_lines: list[str] | None = None) -> str:
    """``extra_config`` for a site broker bridged to ``remote`` (plain TCP on loopback, anonymous),
    forwarding ``topic_lines`` (default: those of configs/mosquitto/site-bridge.conf)."""
    lines = [
        f"connection {name}",
        f"address {remote.host}:{remote.port}",
        f"remote_clientid {name}",
        "bridge_protocol_version mqttv311",
        "cleansession false",
        "try_private true",
        "restart_timeout 1 5",
        "notifications false",
        *(topic_lines if topic_lines is not None else bridge_topic_lines()),
    ]
    return "\n".join(lines)
