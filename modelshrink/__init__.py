"""The modelshrink Python SDK: `from modelshrink.client import Client, AsyncClient`.

A package of its own at the top level so that users import the product's name, as they type it on
the command line; it holds only the client (the service lives in `service/`, the workers in `workers/`)."""

from modelshrink.client import ApiFailure, AsyncClient, Client

__all__ = ["ApiFailure", "AsyncClient", "Client"]
