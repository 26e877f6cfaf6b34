"""ttRPC - containerd's lightweight gRPC-like protocol - on trio, server and client.

Public API:
    Server, Method, CallContext     serve services (agent/daemon builds on these)
    open_client, Client             call them (agentctl, tests, host tools)
    serve_address, parse_address    transports: vsock, unix, unix abstract, hvsock, serial
    Code, TTRPCError                status codes and the error carrying one
"""

from .client import Client, open_client
from .codes import Code
from .errors import ConnectionClosed, TTRPCError
from .server import CallContext, Method, Server
from .serve import serve_address, serve_serial
from .transport import Address, AddressError, connect, listen_socket, parse_address

__all__ = [
    "Address", "AddressError", "CallContext", "Client", "Code", "ConnectionClosed", "Method",
    "Server", "TTRPCError", "connect", "listen_socket", "open_client", "parse_address",
    "serve_address", "serve_serial",
]
