#!/usr/bin/env python3
"""The gRPC contract seen from another language: a Python client (grpcio, stubs generated from
proto/ at run time into a temporary directory) against a real `tokenvault serve --dev` on
127.0.0.1 with an ephemeral port.

Covers: Tokenize in every format (and reuse_existing, expires_at), Detokenize, GetTokenInfo,
TokenizeBatch and DetokenizeBatch with good and bad items mixed, DeleteToken (idempotent, then
NOT_FOUND), the error codes INVALID_ARGUMENT (message without the input), NOT_FOUND,
UNAUTHENTICATED and PERMISSION_DENIED, grpc.health.v1 Check = SERVING, and reflection listing
the service with its six methods.

Run: python3 tests/python/test_client.py   (after `cargo build`; TOKENVAULT_BIN overrides
the binary). Prints `python-client: N passed, N failed` last; exit status 0 only when every
test passed and at least one ran. The server is stopped at the end whatever happens, and the
whole run is bounded by a watchdog (TOKENVAULT_PY_TIMEOUT seconds, default 300).

Test card numbers appear only in the constants below; failure messages never print them.
"""

import datetime
import io
import os
import re
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tvharness  # noqa: E402

import grpc  # noqa: E402
from google.protobuf import timestamp_pb2  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc  # noqa: E402

# Public test card numbers (Luhn-valid, issued for testing by the brands).
VISA = "4111111111111111"
VISA_GROUPED = "4111 1111 1111 1111"
MASTERCARD = "5555555555554444"
AMEX = "378282246310005"
DISCOVER = "6011111111111117"
# Luhn failure (last digit changed) and non-digits.
BAD_LUHN = "4111111111111112"
LETTERS = "4111x11111111111"

RPC_TIMEOUT = 15  # seconds, every call
UNKNOWN_TOKEN = "tok_" + "A" * 22  # well-formed, never issued

pb = None
pb_grpc = None
SERVER = None
CHANNEL = None
STUB = None
STUBS_DIR = None


def setUpModule():
    global pb, pb_grpc, SERVER, CHANNEL, STUB, STUBS_DIR
    STUBS_DIR = tempfile.TemporaryDirectory(prefix="tokenvault-stubs-")
    pb, pb_grpc = tvharness.generate_stubs(STUBS_DIR.name)
    SERVER = tvharness.DevServer().start()
    # A principal with the delete role, added by the admin CLI while the server runs.
    SERVER.keys["deleter"] = SERVER.admin(
        "clients", "add", "deleter", "--roles", "delete,info"
    ).strip()
    CHANNEL = grpc.insecure_channel(SERVER.addr)
    grpc.channel_ready_future(CHANNEL).result(timeout=RPC_TIMEOUT)
    STUB = pb_grpc.TokenVaultServiceStub(CHANNEL)
    wait_until_known("deleter")


def wait_until_known(principal, timeout=15.0):
    """The server picks up clients added by the admin CLI within about a second."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            call("GetTokenInfo", pb.GetTokenInfoRequest(token=UNKNOWN_TOKEN), principal)
            return
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAUTHENTICATED:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not accept the new {principal} key in {timeout} s")
        time.sleep(0.1)


def tearDownModule():
    if CHANNEL is not None:
        CHANNEL.close()
    if SERVER is not None:
        code = SERVER.stop()
        SERVER.cleanup()
        if code != 0:
            raise AssertionError(f"server exited {code} after SIGTERM, expected 0")
    if STUBS_DIR is not None:
        STUBS_DIR.cleanup()


def auth(principal):
    return (("authorization", "Bearer " + SERVER.keys[principal]),)


def call(method, request, principal=None, metadata=None):
    if metadata is None and principal is not None:
        metadata = auth(principal)
    return getattr(STUB, method)(request, metadata=metadata, timeout=RPC_TIMEOUT)


def tokenize(pan, principal="checkout", **fields):
    return call("Tokenize", pb.TokenizeRequest(pan=pan, **fields), principal)


def digit_runs(text, min_len=4):
    return re.findall(r"\d{%d,}" % min_len, text)


class ContractTest(unittest.TestCase):
    def assert_code(self, code, fn, *args, **kwargs):
        """Calls fn, expects an RpcError with `code`; returns its details text."""
        try:
            fn(*args, **kwargs)
        except grpc.RpcError as e:
            self.assertEqual(e.code(), code, tvharness.redact(e.details() or ""))
            return e.details() or ""
        self.fail(f"expected {code.name}, the call succeeded")

    def assert_no_echo(self, message, *inputs):
        for text in inputs:
            if len(text) < 4:  # "" or "123" are in any message
                continue
            for run in digit_runs(text) + [text]:
                self.assertNotIn(run, message, "error message echoes request content")

    def assert_same_secret(self, got, want, what="PAN"):
        # Never assertEqual on card numbers: its failure message would print both.
        self.assertTrue(got == want, f"revealed {what} differs from the tokenized one")

    def assert_shaped(self, token, pan, keep_bin):
        self.assertTrue(token.isdigit() and len(token) == len(pan), "not a PAN-shaped token")
        self.assertEqual(token[-4:], pan[-4:])
        if keep_bin:
            self.assertEqual(token[:6], pan[:6])
        self.assertFalse(luhn_valid(token), "a PAN-shaped token must fail Luhn")
        self.assertFalse(token == pan, "token equals the card number")

    def reveal(self, token, reason="python client test"):
        return call("Detokenize", pb.DetokenizeRequest(token=token, reason=reason), "payments")


def luhn_valid(digits):
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


class TokenizeTest(ContractTest):
    def test_opaque_and_unspecified_formats(self):
        for fmt in (pb.TOKEN_FORMAT_UNSPECIFIED, pb.TOKEN_FORMAT_OPAQUE):
            resp = tokenize(VISA, format=fmt)
            self.assertTrue(resp.token.startswith("tok_"), resp.token)
            self.assertTrue(resp.created)
            self.assertEqual(resp.info.token, resp.token)
            self.assertEqual(resp.info.format, pb.TOKEN_FORMAT_OPAQUE)
            self.assertEqual(resp.info.brand, pb.CARD_BRAND_VISA)
            self.assertEqual(resp.info.last4, VISA[-4:])
            self.assertEqual(resp.info.pan_length, 16)
            self.assertEqual(resp.info.masked_pan, VISA[:6] + "*" * 6 + VISA[-4:])
            self.assertGreaterEqual(resp.info.key_version, 1)
            self.assertTrue(resp.info.HasField("created_at"))
            self.assertFalse(resp.info.HasField("expires_at"))
            self.assert_same_secret(self.reveal(resp.token).pan, VISA)

    def test_pan_shaped(self):
        resp = tokenize(MASTERCARD, format=pb.TOKEN_FORMAT_PAN_SHAPED)
        self.assert_shaped(resp.token, MASTERCARD, keep_bin=False)
        self.assertEqual(resp.info.format, pb.TOKEN_FORMAT_PAN_SHAPED)
        self.assertEqual(resp.info.brand, pb.CARD_BRAND_MASTERCARD)
        self.assert_same_secret(self.reveal(resp.token).pan, MASTERCARD)

    def test_pan_shaped_keep_bin(self):
        resp = tokenize(AMEX, format=pb.TOKEN_FORMAT_PAN_SHAPED_KEEP_BIN)
        self.assert_shaped(resp.token, AMEX, keep_bin=True)
        self.assertEqual(resp.info.format, pb.TOKEN_FORMAT_PAN_SHAPED_KEEP_BIN)
        self.assertEqual(resp.info.brand, pb.CARD_BRAND_AMEX)
        self.assertEqual(resp.info.pan_length, 15)
        self.assert_same_secret(self.reveal(resp.token).pan, AMEX)

    def test_grouped_input_is_normalised(self):
        resp = tokenize(VISA_GROUPED)
        self.assert_same_secret(self.reveal(resp.token).pan, VISA)

    def test_reuse_existing_returns_the_live_token(self):
        first = tokenize(DISCOVER, reuse_existing=True)
        second = tokenize(DISCOVER, reuse_existing=True)
        self.assertEqual(second.token, first.token)
        self.assertFalse(second.created)
        fresh = tokenize(DISCOVER)
        self.assertNotEqual(fresh.token, first.token)
        self.assertTrue(fresh.created)

    def test_expires_at(self):
        ts = timestamp_pb2.Timestamp()
        ts.FromDatetime(datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=1))
        resp = tokenize(VISA, expires_at=ts)
        self.assertTrue(resp.info.HasField("expires_at"))
        self.assertEqual(resp.info.expires_at.seconds, ts.seconds)
        past = timestamp_pb2.Timestamp(seconds=1_000_000_000)
        msg = self.assert_code(grpc.StatusCode.INVALID_ARGUMENT, tokenize, VISA, expires_at=past)
        self.assertIn("expires_at", msg)

    def test_bad_pan_is_invalid_argument_without_echo(self):
        for bad in (BAD_LUHN, LETTERS, "", "123", "4111111111111111111111"):
            msg = self.assert_code(grpc.StatusCode.INVALID_ARGUMENT, tokenize, bad)
            self.assertTrue(msg, "INVALID_ARGUMENT without a message")
            self.assert_no_echo(msg, bad)

    def test_unknown_format_is_invalid_argument(self):
        self.assert_code(grpc.StatusCode.INVALID_ARGUMENT, tokenize, VISA, format=99)


class DetokenizeTest(ContractTest):
    def test_round_trip_and_info_never_reveals(self):
        resp = tokenize(VISA)
        revealed = self.reveal(resp.token)
        self.assert_same_secret(revealed.pan, VISA)
        self.assertEqual(revealed.info.token, resp.token)
        for principal in ("checkout", "payments"):
            info = call("GetTokenInfo", pb.GetTokenInfoRequest(token=resp.token), principal).info
            self.assertEqual(info.token, resp.token)
            self.assertEqual(info.last4, VISA[-4:])
            self.assertEqual(info.bin, VISA[:6])
            self.assertNotIn(VISA, str(info).replace(" ", ""), "info carries the PAN")

    def test_unknown_token_is_not_found(self):
        self.assert_code(grpc.StatusCode.NOT_FOUND, self.reveal, UNKNOWN_TOKEN)
        self.assert_code(
            grpc.StatusCode.NOT_FOUND, call, "GetTokenInfo",
            pb.GetTokenInfoRequest(token=UNKNOWN_TOKEN), "checkout",
        )

    def test_malformed_token_is_invalid_argument(self):
        for bad in ("", "tok_short", "not a token", VISA):
            msg = self.assert_code(grpc.StatusCode.INVALID_ARGUMENT, self.reveal, bad)
            self.assert_no_echo(msg, bad)


class BatchTest(ContractTest):
    def test_tokenize_batch_mixed(self):
        items = [VISA, BAD_LUHN, MASTERCARD, LETTERS, AMEX]
        req = pb.TokenizeBatchRequest(requests=[pb.TokenizeRequest(pan=p) for p in items])
        results = call("TokenizeBatch", req, "checkout").results
        self.assertEqual(len(results), len(items))
        kinds = [r.WhichOneof("outcome") for r in results]
        self.assertEqual(kinds, ["success", "error", "success", "error", "success"])
        for r, pan in zip(results, items):
            if r.WhichOneof("outcome") == "error":
                self.assertEqual(r.error.code, grpc.StatusCode.INVALID_ARGUMENT.value[0])
                self.assert_no_echo(r.error.message, pan)
        # The good items were stored: reveal them in one DetokenizeBatch with bad items mixed in.
        good = [(r.success.token, pan) for r, pan in zip(results, items) if r.HasField("success")]
        tokens = [good[0][0], UNKNOWN_TOKEN, good[1][0], "garbage!", good[2][0]]
        req = pb.DetokenizeBatchRequest(
            requests=[pb.DetokenizeRequest(token=t, reason="batch test") for t in tokens]
        )
        out = call("DetokenizeBatch", req, "payments").results
        self.assertEqual(
            [r.WhichOneof("outcome") for r in out],
            ["success", "error", "success", "error", "success"],
        )
        self.assertEqual(out[1].error.code, grpc.StatusCode.NOT_FOUND.value[0])
        self.assertEqual(out[3].error.code, grpc.StatusCode.INVALID_ARGUMENT.value[0])
        self.assertNotIn("garbage!", out[3].error.message)
        for r, (token, pan) in zip([out[0], out[2], out[4]], good):
            self.assertEqual(r.success.info.token, token)
            self.assert_same_secret(r.success.pan, pan)

    def test_empty_batches(self):
        res = call("TokenizeBatch", pb.TokenizeBatchRequest(), "checkout")
        self.assertEqual(len(res.results), 0)
        res = call("DetokenizeBatch", pb.DetokenizeBatchRequest(), "payments")
        self.assertEqual(len(res.results), 0)


class DeleteTest(ContractTest):
    def test_delete_is_idempotent_then_not_found(self):
        token = tokenize(VISA).token
        req = pb.DeleteTokenRequest(token=token)
        self.assertTrue(call("DeleteToken", req, "deleter").deleted)
        self.assertFalse(call("DeleteToken", req, "deleter").deleted)
        self.assert_code(grpc.StatusCode.NOT_FOUND, self.reveal, token)
        self.assert_code(
            grpc.StatusCode.NOT_FOUND, call, "GetTokenInfo",
            pb.GetTokenInfoRequest(token=token), "deleter",
        )

    def test_delete_unknown_is_not_an_error(self):
        resp = call("DeleteToken", pb.DeleteTokenRequest(token=UNKNOWN_TOKEN), "deleter")
        self.assertFalse(resp.deleted)


class AuthTest(ContractTest):
    def test_missing_or_wrong_credentials_are_unauthenticated(self):
        req = pb.TokenizeRequest(pan=VISA)
        for metadata in (
            (),
            (("authorization", "Bearer tvk_nobody_0000000000000000000000"),),
            (("authorization", "Basic dXNlcjpwYXNz"),),
            (("authorization", "Bearer " + SERVER.keys["checkout"] + "x"),),
        ):
            msg = self.assert_code(
                grpc.StatusCode.UNAUTHENTICATED, call, "Tokenize", req, metadata=metadata
            )
            self.assertNotIn(SERVER.keys["checkout"], msg)
        self.assert_code(
            grpc.StatusCode.UNAUTHENTICATED, call, "Detokenize",
            pb.DetokenizeRequest(token=UNKNOWN_TOKEN, reason="x"), metadata=(),
        )

    def test_wrong_role_is_permission_denied(self):
        token = tokenize(VISA).token
        det = pb.DetokenizeRequest(token=token, reason="not allowed")
        self.assert_code(grpc.StatusCode.PERMISSION_DENIED, call, "Detokenize", det, "checkout")
        self.assert_code(
            grpc.StatusCode.PERMISSION_DENIED, call, "DetokenizeBatch",
            pb.DetokenizeBatchRequest(requests=[det]), "checkout",
        )
        self.assert_code(grpc.StatusCode.PERMISSION_DENIED, tokenize, VISA, principal="payments")
        self.assert_code(
            grpc.StatusCode.PERMISSION_DENIED, call, "DeleteToken",
            pb.DeleteTokenRequest(token=token), "checkout",
        )
        self.assert_code(grpc.StatusCode.PERMISSION_DENIED, tokenize, VISA, principal="deleter")


class HealthAndReflectionTest(ContractTest):
    def test_health_serving(self):
        health = health_pb2_grpc.HealthStub(CHANNEL)
        for service in ("", tvharness.SERVICE_NAME):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT)
            self.assertEqual(resp.status, health_pb2.HealthCheckResponse.SERVING, service)

    def test_reflection_lists_the_service_and_its_methods(self):
        stub = reflection_pb2_grpc.ServerReflectionStub(CHANNEL)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=tvharness.SERVICE_NAME),
        ]
        responses = list(stub.ServerReflectionInfo(iter(requests), timeout=RPC_TIMEOUT))
        self.assertEqual(len(responses), 2)
        names = {s.name for s in responses[0].list_services_response.service}
        self.assertIn(tvharness.SERVICE_NAME, names)
        # Stock tools (grpcurl) find the health service through reflection.
        self.assertIn("grpc.health.v1.Health", names)

        from google.protobuf import descriptor_pb2

        methods = None
        for raw in responses[1].file_descriptor_response.file_descriptor_proto:
            fdp = descriptor_pb2.FileDescriptorProto.FromString(raw)
            for svc in fdp.service:
                if f"{fdp.package}.{svc.name}" == tvharness.SERVICE_NAME:
                    methods = {m.name for m in svc.method}
        self.assertEqual(
            methods,
            {"Tokenize", "TokenizeBatch", "Detokenize", "DetokenizeBatch", "GetTokenInfo",
             "DeleteToken"},
        )


class _RedactingStream(io.TextIOBase):
    def __init__(self, inner):
        self.inner = inner

    def write(self, s):
        return self.inner.write(tvharness.redact(s))

    def flush(self):
        self.inner.flush()


def main():
    tvharness.install_watchdog(int(os.environ.get("TOKENVAULT_PY_TIMEOUT", "300")), "python-client")
    stream = _RedactingStream(sys.stderr)
    suite = unittest.defaultTestLoader.loadTestsFromModule(sys.modules[__name__])
    try:
        result = unittest.TextTestRunner(stream=stream, verbosity=2).run(suite)
    finally:
        if SERVER is not None:  # setUpModule failed half-way, or an interrupt
            SERVER.cleanup()
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    # Module-level set-up/tear-down errors are recorded as errors not tied to a test.
    passed = max(result.testsRun - len(result.failures) - len(result.errors)
                 - len(result.skipped), 0)
    sys.stdout.flush()
    print(f"python-client: {passed} passed, {failed} failed", flush=True)
    return 0 if failed == 0 and passed > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
