"""A key provider written from ocicrypt's definition (keywrap/keyprovider/keyprovider.go,
utils/keyprovider/keyprovider.proto), for the tests: not cryptlayer's code.

    provider.py cmd  --name NAME --kek FILE [--mode MODE] [--log FILE]   (request on stdin)
    provider.py grpc --name NAME --kek FILE [--mode MODE] [--log FILE]   (prints its port)
                     [--tls-cert PEM --tls-key PEM [--client-ca PEM]]

It wraps optsdata with AES-256-GCM under the 32-byte key in FILE, its annotation a JSON object
as Confidential Containers' provider writes one ({"kid", "wrapped_data", "iv", "wrap_type"}).
It refuses a request that ocicrypt would not send: an op other than keywrap or keyunwrap, or
(as ocicrypt's WrapKeys checks) Parameters without its NAME. MODE makes it misbehave: fail (exit
1 with a message), hang, garbage (not JSON), badb64 (a result that is not base64), empty (no
result), echo (fails repeating its request), wrongkey (unwraps to another key), huge (a very long answer).
With --log, it appends one JSON line per request: its argv, its environment, the op and the
Parameters it got, and what it was sent, base64 fields decoded to hex (the tests look for the
key there, where it belongs, and not in argv or the environment).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM


def b64d(value: str) -> bytes:
    return base64.b64decode(value, validate=True)


def b64e(data: bytes) -> str:
    return base64.b64encode(data).decode()


class Refused(Exception):
    pass


def handle(args: argparse.Namespace, request: bytes) -> bytes:
    """The answer (JSON bytes) to one request, or Refused."""
    doc = json.loads(request)
    op = doc.get("op")
    if op == "keywrap":
        params = (doc["keywrapparams"]["ec"] or {}).get("Parameters") or {}
    elif op == "keyunwrap":
        params = (doc["keyunwrapparams"]["dc"] or {}).get("Parameters") or {}
    else:
        raise Refused(f"unknown op {op!r}")
    if args.name not in params:
        raise Refused(f"no Parameters for {args.name}")
    if args.log:
        entry = {
            "argv": sys.argv,
            "env": dict(os.environ),
            "op": op,
            "params": {k: [b64d(v).decode() for v in vs] for k, vs in params.items()},
            "request": request.decode(),
        }
        with open(args.log, "a") as f:
            f.write(json.dumps(entry) + "\n")
    mode = args.mode
    if mode == "fail":
        raise Refused("the KBS refused to release the key (test)")
    if mode == "echo":  # a careless provider: its input in its message
        raise Refused(f"cannot handle {request.decode()}")
    if mode == "hang":
        time.sleep(3600)
    if mode == "garbage":
        return b"<html>this is not json</html>"
    if mode == "huge":
        return b'{"keyunwrapresults": {"optsdata": "' + b"A" * (4 << 20) + b'"}}'
    kek = Path(args.kek).read_bytes()
    if op == "keywrap":
        optsdata = b64d(doc["keywrapparams"]["optsdata"])
        iv = os.urandom(12)
        annotation = json.dumps(
            {
                "kid": "test/" + args.name,
                "wrapped_data": b64e(AESGCM(kek).encrypt(iv, optsdata, None)),
                "iv": b64e(iv),
                "wrap_type": "A256GCM",
            }
        ).encode()
        result = {"keywrapresults": {"annotation": b64e(annotation)}}
    else:
        annotation = json.loads(b64d(doc["keyunwrapparams"]["annotation"]))
        optsdata = AESGCM(kek).decrypt(
            b64d(annotation["iv"]), b64d(annotation["wrapped_data"]), None
        )
        if mode == "wrongkey":
            optsdata = bytes(len(optsdata))
        result = {"keyunwrapresults": {"optsdata": b64e(optsdata)}}
    if mode == "badb64":
        for inner in result.values():
            for key in inner:
                inner[key] = "***not base64***"
    if mode == "empty":
        result = {"keywrapresults": {"annotation": None}, "keyunwrapresults": {"optsdata": None}}
    return json.dumps(result).encode()


def serve_cmd(args: argparse.Namespace) -> int:
    try:
        sys.stdout.buffer.write(handle(args, sys.stdin.buffer.read()))
    except Exception as err:  # as a provider reports its failure: stderr and an exit status
        print(f"test provider: {err}", file=sys.stderr)
        return 1
    return 0


def _field1(data: bytes) -> bytes:
    """The one bytes field of keyProviderKeyWrapProtocolInput (protobuf, field 1)."""
    if not data:
        return b""
    assert data[0] == 0x0A, data[:4]
    n = shift = 0
    pos = 1
    while True:
        byte = data[pos]
        pos += 1
        n |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return data[pos : pos + n]


def _message(payload: bytes) -> bytes:
    out = bytearray(b"\x0a")
    n = len(payload)
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out) + payload


def serve_grpc(args: argparse.Namespace) -> int:
    from concurrent import futures

    import grpc

    def method(request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            return handle(args, request)
        except Exception as err:
            context.abort(grpc.StatusCode.INTERNAL, f"test provider: {err}")
            raise

    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            method, request_deserializer=_field1, response_serializer=_message
        )
        for name in ("WrapKey", "UnWrapKey")
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("keyprovider.KeyProviderService", handlers),)
    )
    if args.tls_cert:  # TLS, and with --client-ca a client certificate required
        client_ca = Path(args.client_ca).read_bytes() if args.client_ca else None
        credentials = grpc.ssl_server_credentials(
            [(Path(args.tls_key).read_bytes(), Path(args.tls_cert).read_bytes())],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )
        port = server.add_secure_port("127.0.0.1:0", credentials)
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("how", choices=["cmd", "grpc"])
    parser.add_argument("--name", required=True)
    parser.add_argument("--kek", required=True)
    parser.add_argument("--mode", default="normal")
    parser.add_argument("--log")
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    parser.add_argument("--client-ca")
    args = parser.parse_args()
    return serve_cmd(args) if args.how == "cmd" else serve_grpc(args)


if __name__ == "__main__":
    sys.exit(main())
