#!/usr/bin/env python3
"""TLS configuration scan: `tokenvault serve --dev --tls-cert --tls-key` on 127.0.0.1 with a
freshly generated test CA and server certificate (ECDSA P-256, 90 days, `cryptography`), then
`sslyze --mozilla_config=intermediate` against it. Fails on anything below Mozilla's
"intermediate" profile: protocol versions, cipher suites, curves, certificate type and
lifetime, downgrade protection (TLS_FALLBACK_SCSV), secure renegotiation, extended master
secret, compression, Heartbleed, CCS injection, ROBOT.

The generated CA is passed to sslyze (`--certinfo_ca_file`) so path validation is judged on
a trusted chain. sslyze exits 0 when it cannot connect at all, so success also requires its
"OK - Compliant" line. Everything is bounded: server start 60 s, sslyze 300 s, whole run
TOKENVAULT_TLS_SCAN_TIMEOUT (default 420 s). Prints `tls-scan: N passed, N failed` last.

Run: python3 tests/python/tls_scan.py   (after `cargo build`, in a venv with sslyze)
"""

import datetime
import ipaddress
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tvharness  # noqa: E402

SSLYZE_TIMEOUT = 300


def write_private(path, data):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def make_certificates(out_dir, days=90, prefix=""):
    """A test CA and a server certificate for 127.0.0.1/localhost, valid for `days`;
    returns the paths (ca, cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
    until = now + datetime.timedelta(days=days)  # Mozilla: at most 366 days

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tokenvault tls-scan test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(until)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )

    pem = serialization.Encoding.PEM
    ca_path = os.path.join(out_dir, prefix + "ca.pem")
    cert_path = os.path.join(out_dir, prefix + "server.pem")
    key_path = os.path.join(out_dir, prefix + "server.key")
    with open(ca_path, "wb") as f:
        f.write(ca.public_bytes(pem))
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(pem))
    write_private(
        key_path,
        key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
    return ca_path, cert_path, key_path


def check_handshake_and_health(server, ca_path):
    """A gRPC health check over TLS, trusting only the test CA."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with open(ca_path, "rb") as f:
        creds = grpc.ssl_channel_credentials(root_certificates=f.read())
    with grpc.secure_channel(f"127.0.0.1:{server.port}", creds) as channel:
        resp = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=tvharness.SERVICE_NAME), timeout=15
        )
    return resp.status == health_pb2.HealthCheckResponse.SERVING


def run_sslyze(port, ca_path, out_dir, quiet=False):
    cmd = [
        sys.executable, "-m", "sslyze",
        "--mozilla_config=intermediate",
        f"--certinfo_ca_file={ca_path}",
        f"--json_out={os.path.join(out_dir, 'sslyze.json')}",
        f"127.0.0.1:{port}",
    ]
    try:
        out = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=SSLYZE_TIMEOUT
        )
    except subprocess.TimeoutExpired:
        print(f"sslyze did not finish within {SSLYZE_TIMEOUT} s")
        return False
    text = out.stdout.decode("utf-8", "replace")
    if quiet:
        # Only the verdict and its reasons.
        text_start = text.find("COMPLIANCE AGAINST TLS CONFIGURATION")
        sys.stdout.write(tvharness.redact(text[max(text_start, 0):]))
    else:
        sys.stdout.write(tvharness.redact(text))
    if out.returncode != 0 and not quiet:
        sys.stdout.write(tvharness.redact(out.stderr.decode("utf-8", "replace")[-4000:]))
    compliant = out.returncode == 0 and f"127.0.0.1:{port}: OK - Compliant" in text
    print(f"sslyze exit {out.returncode}; {'compliant' if compliant else 'NOT compliant'}")
    return compliant


def main():
    tvharness.install_watchdog(
        int(os.environ.get("TOKENVAULT_TLS_SCAN_TIMEOUT", "420")), "tls-scan"
    )
    results = {}
    server = None
    with tempfile.TemporaryDirectory(prefix="tokenvault-tls-") as tmp:
        try:
            ca, cert, key = make_certificates(tmp)
            server = tvharness.DevServer(["--tls-cert", cert, "--tls-key", key]).start()
            results["banner says TLS"] = server.tls
            try:
                results["gRPC health over TLS"] = check_handshake_and_health(server, ca)
            except Exception as e:  # noqa: BLE001 - reported as a failed check
                print(f"health over TLS failed: {tvharness.redact(str(e))}")
                results["gRPC health over TLS"] = False
            results["sslyze mozilla intermediate"] = run_sslyze(server.port, ca, tmp)
            code = server.stop()
            results["server stops cleanly on SIGTERM"] = code == 0
            server.cleanup()
            server = None

            # The gate must be able to fail: a certificate valid for 400 days is over the
            # profile's 366-day limit, so the same scan has to report non-compliance.
            print("\n-- negative control: 400-day certificate must be reported non-compliant --")
            ca, cert, key = make_certificates(tmp, days=400, prefix="long-")
            server = tvharness.DevServer(["--tls-cert", cert, "--tls-key", key]).start()
            results["sslyze rejects a 400-day certificate"] = not run_sslyze(
                server.port, ca, tmp, quiet=True
            )
        except Exception as e:  # noqa: BLE001
            print(f"tls-scan could not run: {tvharness.redact(str(e))}")
            results.setdefault("setup", False)
        finally:
            if server is not None:
                server.cleanup()
    for name, ok in results.items():
        print(f"  {'ok  ' if ok else 'FAIL'} {name}")
    passed = sum(1 for ok in results.values() if ok)
    failed = len(results) - passed
    print(f"tls-scan: {passed} passed, {failed} failed", flush=True)
    return 0 if failed == 0 and passed > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
