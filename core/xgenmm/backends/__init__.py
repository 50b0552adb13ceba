"""Engine cores other than the native one. `vllm_backend.VllmEngineCore`: xGen-MM on vLLM (tensor parallelism,
vLLM's kernels), behind the same `EngineCore` protocol as `xgenmm.engine.native_core.NativeEngineCore`; needs vLLM
and the xgenmm vLLM plugin (the `vllm` extra, docs/vllm.md). Its extra options: `tensor_parallel_size`,
`structured_outputs_backend` ("guidance", the default, keeps grammars identical to native), `vllm_options` (any
`vllm.EngineArgs` fields), or EngineArgs fields by name.

Front ends never build a core: they open engines through `xgenmm.client.open_engine(backend="native" | "vllm", ...)`
(or `LLM(..., backend="vllm")`). `import xgenmm.backends` loads nothing; the native path never imports vLLM.
"""
