"""The client side of every engine, and its one front door.

* `open_engine(backend, model, device, dtype, *, shared=True, **options) -> EngineHandle`: the only way any front end
  (`LLM`, `AsyncLLM`, the server, the CLI, both adapters) opens or reuses an engine (key rule in `front_door.py`).
* `EngineHandle`: an open engine with the client-side request path: tokenizer, chat renderer, image policy, input
  checks (each image opened once), grammar compiled once; hands the engine core `PreparedRequest`s.

The adapters' `LLM` + `AsyncLLM` pair over one handle, opened on first use, is `xgenmm.lazy_engine` (`EngineClients`,
`LazyEngine`), above this package and the clients.
"""

from .front_door import BACKENDS, open_engine, open_engine_keys, shutdown_engines
from .handle import EngineHandle
from .request_ids import new_request_id
from .settings import CLIENT_OPTIONS, ClientSettings

__all__ = ["BACKENDS", "CLIENT_OPTIONS", "ClientSettings", "EngineHandle", "new_request_id", "open_engine",
           "open_engine_keys", "shutdown_engines"]
