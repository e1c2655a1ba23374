"""tokenvault from Python (grpcio): tokenize at checkout, detokenize at charge time.

    ./generate.sh                       # stubs from ../../proto into ./gen
    CHECKOUT_API_KEY=tvk_... PAYMENTS_API_KEY=tvk_... python3 checkout.py

Over TLS (server certificate checked against VAULT_CA), and with mutual TLS when
CLIENT_CERT / CLIENT_KEY are set:

    VAULT_ADDR=vault.internal:50051 VAULT_CA=ca.crt CLIENT_CERT=checkout.crt \
    CLIENT_KEY=checkout.key CHECKOUT_API_KEY=... PAYMENTS_API_KEY=... python3 checkout.py

One process plays both services for brevity; in production the checkout service holds
only the tokenize role and the payments worker the detokenize role, each with its own key.
"""

import os
import sys

import grpc

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "gen"))
from tokenvault.v1 import tokenvault_pb2 as pb  # noqa: E402
from tokenvault.v1 import tokenvault_pb2_grpc as pb_grpc  # noqa: E402


def connect(api_key: str) -> pb_grpc.TokenVaultServiceStub:
    """A stub that sends `authorization: Bearer <api_key>` with every call."""
    addr = os.environ.get("VAULT_ADDR", "127.0.0.1:50051")
    call_creds = grpc.metadata_call_credentials(
        lambda _ctx, callback: callback((("authorization", f"Bearer {api_key}"),), None)
    )
    ca = os.environ.get("VAULT_CA")
    if ca:
        cert, key = os.environ.get("CLIENT_CERT"), os.environ.get("CLIENT_KEY")
        channel_creds = grpc.ssl_channel_credentials(
            root_certificates=open(ca, "rb").read(),
            # Mutual TLS: the certificate's SAN identifies this service to the vault.
            private_key=open(key, "rb").read() if key else None,
            certificate_chain=open(cert, "rb").read() if cert else None,
        )
        creds = grpc.composite_channel_credentials(channel_creds, call_creds)
        channel = grpc.secure_channel(addr, creds)
    else:
        # Plaintext is for a local `tokenvault serve --dev` only. grpcio refuses call
        # credentials on an insecure channel, so send the header as call metadata instead.
        channel = grpc.insecure_channel(addr)
        stub = pb_grpc.TokenVaultServiceStub(channel)
        return _WithMetadata(stub, (("authorization", f"Bearer {api_key}"),))
    return pb_grpc.TokenVaultServiceStub(channel)


class _WithMetadata:
    """Adds fixed metadata to every call of a stub (plaintext development only)."""

    def __init__(self, stub, metadata):
        self._stub, self._metadata = stub, metadata

    def __getattr__(self, name):
        method = getattr(self._stub, name)
        return lambda request, **kw: method(request, metadata=self._metadata, timeout=10, **kw)


def checkout(stub, pan: str) -> str:
    """Checkout: the card number from the payment form leaves as a token."""
    response = stub.Tokenize(
        pb.TokenizeRequest(pan=pan, format=pb.TOKEN_FORMAT_OPAQUE, reuse_existing=True)
    )
    return response.token


def charge(stub, token: str, order: str) -> None:
    """Charge time: reveal the card for the acquirer; the reason is audited."""
    response = stub.Detokenize(pb.DetokenizeRequest(token=token, reason=f"charge order {order}"))
    pan = response.pan  # hand to the acquirer; never log it
    print(f"charged order {order} on {response.info.masked_pan} ({len(pan)} digits)")
    del pan


def main() -> int:
    checkout_key = os.environ.get("CHECKOUT_API_KEY")
    payments_key = os.environ.get("PAYMENTS_API_KEY")
    if not checkout_key or not payments_key:
        print("set CHECKOUT_API_KEY and PAYMENTS_API_KEY", file=sys.stderr)
        return 2
    checkout_stub = connect(checkout_key)
    token = checkout(checkout_stub, "4111 1111 1111 1111")
    print(f"checkout stored token {token}")
    charge(connect(payments_key), token, "42")
    try:
        checkout_stub.Detokenize(pb.DetokenizeRequest(token=token, reason="curiosity"))
        print("checkout could detokenize: check its roles", file=sys.stderr)
        return 1
    except grpc.RpcError as e:
        print(f"checkout detokenize refused: {e.code().name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
